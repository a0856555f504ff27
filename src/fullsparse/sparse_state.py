"""What a sparse module carries beyond its torch twin's parameters: the config, the backend,
the cached TSM mask and its step clock, a fixed forward mask (ASP fine-tuning), and how that
state is saved and restored.

:class:`fullsparse.nn.SparseConv2d` and :class:`~fullsparse.nn.SparseLinear` mix in
:class:`_SparseMixin`. The TSM mask and clock are non-persistent buffers (the ``state_dict``
keys stay those of the torch module), saved with :func:`sparse_state_dict` and restored with
:func:`load_sparse_state_`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from fullsparse.config import SparsityConfig, resolve_config
from fullsparse.kernels import check_backend
from fullsparse.operands import output_weight_mask, transposable_mask

__all__ = ["sparse_modules", "sparse_state_dict", "load_sparse_state_", "pruned_state_dict"]


def _is_compiling() -> bool:
    # torch.compiler.is_compiling arrived in torch 2.3; torch._dynamo's in 2.1.
    check = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling
    return bool(check())


class _SparseMixin:
    """What both sparse modules share: the config, the cached TSM mask and its clock."""

    config: SparsityConfig
    weight: nn.Parameter
    training: bool
    #: How the output / grad_input GEMMs run: "auto", "reference", "semi_structured" or
    #: "emulation" (fullsparse.kernels). Not part of the state_dict: it is a runtime choice.
    backend: str

    def _init_sparse(self, config: SparsityConfig | str, backend: str = "auto") -> None:
        self.config = resolve_config(config)
        self.backend = check_backend(backend)
        # Non-persistent: the state_dict keys stay those of the torch module this replaces.
        self.register_buffer("tsm_mask", None, persistent=False)  # type: ignore[attr-defined]
        self.register_buffer(  # type: ignore[attr-defined]
            "tsm_step", torch.zeros((), dtype=torch.int64), persistent=False
        )
        # ASP: a 2:4 forward mask set once (fullsparse.train.asp) and used at every step
        self.register_buffer("fixed_mask", None, persistent=False)  # type: ignore[attr-defined]

    def _groups(self) -> int:
        return int(getattr(self, "groups", 1))

    def _gemm_weight(self) -> Tensor:
        """The weight as the GEMMs read it: ``[Co, Ci/g, kh, kw]`` or ``[d_out, d_in]``.

        The TSM mask has this shape. A module whose Parameter is stored in another layout
        (Hugging Face ``Conv1D``: ``[d_in, d_out]``) returns a view.
        """
        return self.weight

    @classmethod
    def _gemm_weight_of(cls, dense: nn.Module) -> Tensor:
        """:meth:`_gemm_weight` of the dense module this class replaces."""
        return dense.weight  # type: ignore[return-value]

    def _forward_mask(self) -> Tensor | None:
        """The cached transposable mask, recomputed every ``tsm_interval`` training steps.

        A training step is one forward in training mode with grad enabled. S_K masks are not
        cached: they follow the weight at every step (the cost is in the overhead benchmark).
        A fixed mask (ASP), when set, is used as is and never recomputed.
        """
        fixed: Tensor | None = getattr(self, "fixed_mask", None)
        if fixed is not None:
            return fixed
        if not self.config.uses_transposable_mask:
            return None
        if _is_compiling():
            return self._forward_mask_traceable()
        stepping = self.training and torch.is_grad_enabled()
        mask: Tensor | None = self.tsm_mask  # type: ignore[has-type]
        due = stepping and int(self.tsm_step) % self.config.tsm_interval == 0
        weight = self._gemm_weight().detach()
        if mask is None or due or mask.shape != weight.shape:
            mask = transposable_mask(weight, self._groups())
            self.tsm_mask = mask
        if stepping:
            self.tsm_step += 1  # type: ignore[has-type]
        return mask

    def _forward_mask_traceable(self) -> Tensor:
        """:meth:`_forward_mask` as torch.compile can trace it: the same masks, no graph break.

        ``int(tsm_step)`` is data-dependent control flow: a graph break in every sparse
        layer's forward, after which each layer's forward is compiled alone, once per weight
        shape — past the recompile limit (8) the remaining layers silently ran eagerly. Here
        the "is a recompute due" test stays a tensor and ``torch.where`` picks the new or the
        cached mask; the candidate mask is computed every step (about 6·R·C flops, small next
        to the GEMMs), but only a due step keeps it, exactly as in eager mode.
        """
        stepping = self.training and torch.is_grad_enabled()
        mask: Tensor | None = self.tsm_mask  # type: ignore[has-type]
        weight = self._gemm_weight().detach()
        if mask is None or mask.shape != weight.shape:
            mask = transposable_mask(weight, self._groups())
        elif stepping:
            due = self.tsm_step % self.config.tsm_interval == 0  # type: ignore[has-type]
            mask = torch.where(due, transposable_mask(weight, self._groups()), mask)
        self.tsm_mask = mask
        if stepping:
            self.tsm_step += 1  # type: ignore[has-type]
        return mask

    def pruned_weight(self) -> Tensor:
        """The weight operand of the forward GEMM (``S_K(W)``, TSM-masked W, or W), detached,
        shaped like the weight Parameter (what ``load_state_dict`` takes); a module whose
        Parameter is not in the GEMM layout (:meth:`_gemm_weight`) overrides this to
        transpose it back."""
        mask = self.tsm_mask if self.config.uses_transposable_mask else None  # type: ignore
        if getattr(self, "fixed_mask", None) is not None:
            mask = self.fixed_mask  # type: ignore[attr-defined]
        weight = self._gemm_weight().detach()
        out = output_weight_mask(weight, self.config, self._groups(), mask)
        return weight if out is None else weight * out

    def _sparse_repr(self) -> str:
        return f"recipe={self.config.name}, backend={self.backend}"


def sparse_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` for every SparseConv2d / SparseLinear in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, _SparseMixin):
            yield name, module


def sparse_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The sparse state that is not in ``model.state_dict()``: TSM masks, step clocks and
    fixed (ASP) masks.

    Plain tensors only, so checkpoints load with ``torch.load(weights_only=True)``.
    """
    state: dict[str, Tensor] = {}
    for name, module in sparse_modules(model):
        state[f"{name}.tsm_step"] = module.tsm_step.detach().cpu().clone()  # type: ignore
        if module.tsm_mask is not None:  # type: ignore[attr-defined]
            state[f"{name}.tsm_mask"] = module.tsm_mask.detach().cpu().clone()  # type: ignore
        if getattr(module, "fixed_mask", None) is not None:
            state[f"{name}.fixed_mask"] = module.fixed_mask.detach().cpu().clone()  # type: ignore
    return state


def load_sparse_state_(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Restore what :func:`sparse_state_dict` saved (in place). Unknown keys raise KeyError."""
    modules = dict(sparse_modules(model))
    seen = set()
    for key, value in state.items():
        name, _, attr = key.rpartition(".")
        if name not in modules or attr not in ("tsm_step", "tsm_mask", "fixed_mask"):
            raise KeyError(f"sparse state key {key!r} matches no sparse module of the model")
        module = modules[name]
        device = module.weight.device
        gemm_shape = tuple(module._gemm_weight().shape)  # type: ignore[operator]
        if attr in ("tsm_mask", "fixed_mask") and tuple(value.shape) != gemm_shape:
            raise ValueError(
                f"sparse state {key!r} has shape {tuple(value.shape)}, but the layer's weight "
                f"is {gemm_shape}"
            )
        setattr(module, attr, value.to(device=device))
        seen.add(key)
    for name, module in modules.items():
        if f"{name}.tsm_mask" not in seen:
            module.tsm_mask = None  # type: ignore[attr-defined]
        if f"{name}.fixed_mask" not in seen:
            module.fixed_mask = None  # type: ignore[attr-defined]


def pruned_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` with each sparse layer's weight replaced by its pruned forward
    weight (what inference uses); loads into the dense model."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, module in sparse_modules(model):
        key = f"{name}.weight" if name else "weight"
        if key in state:
            state[key] = module.pruned_weight().clone()  # type: ignore[attr-defined]
    return state
