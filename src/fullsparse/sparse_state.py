"""What a sparse module carries beyond its torch twin's parameters: the config, the backend,
the cached masks and their step clock, a fixed forward mask (ASP fine-tuning), and how that
state is saved and restored; and what a step is (:func:`count_optimizer_steps`).

:class:`fullsparse.nn.SparseConv2d` and :class:`~fullsparse.nn.SparseLinear` mix in
:class:`_SparseMixin`. The cached forward mask (``tsm_mask``: the TSM mask, or S_K when
``mask_interval > 1``), the cached S_Co mask (``gi_mask``, ``mask_interval > 1``) and the
clock (``tsm_step``) are non-persistent buffers (the ``state_dict`` keys stay those of the
torch module), saved with :func:`sparse_state_dict` and restored with
:func:`load_sparse_state_`.

What a step is. By default a sparse layer counts one step per training forward (training
mode, grad enabled): its mask clock advances and its backward adds the SR-STE decay each
time. Under gradient accumulation that is wrong: N micro-batches would advance the clock N
times and add the decay N times per optimizer step. :func:`count_optimizer_steps` switches a
model to counting optimizer steps: all training forwards between two ``optimizer.step()``
calls belong to one step, the first of them opens it (the clock advances, the masks are
recomputed when due, its backward adds the decay) and the others reuse the step's masks and
add no decay. :func:`end_optimizer_step` closes a step by hand (a loop that skips
``optimizer.step()``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Self, TypeVar

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from fullsparse.config import SparsityConfig
from fullsparse.kernels import check_backend
from fullsparse.operands import (
    SOFT,
    mask_co,
    mask_k,
    output_weight_mask,
    soft_output_weight,
    soft_scale,
    transposable_mask,
)
from fullsparse.recipes import resolve_config
from fullsparse.sampling import SAMPLED_MODES, AdaptiveState

__all__ = [
    "sparse_modules",
    "sparse_state_dict",
    "load_sparse_state_",
    "pruned_state_dict",
    "count_optimizer_steps",
    "end_optimizer_step",
    "StepCounting",
]


def _is_compiling() -> bool:
    # torch.compiler.is_compiling arrived in torch 2.3; torch._dynamo's in 2.1.
    check = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling
    return bool(check())


_M = TypeVar("_M", bound=nn.Module)


def share_parameters(new: _M, old: nn.Module) -> _M:
    """Give ``new`` (built on the meta device) ``old``'s weight and bias Parameters, its
    mode, and, for a sparse module, a fresh TSM clock on the weight's device."""
    new.weight = old.weight
    new.bias = old.bias
    if isinstance(new, _SparseMixin):
        new.tsm_step = torch.zeros((), dtype=torch.int64, device=old.weight.device)
    new.train(old.training)
    return new


class _SparseMixin:
    """What both sparse modules share: the config, the cached TSM mask and its clock."""

    config: SparsityConfig
    weight: nn.Parameter
    training: bool
    #: How the output / grad_input GEMMs run: "auto", "reference", "semi_structured" or
    #: "emulation" (fullsparse.kernels). Not part of the state_dict: it is a runtime choice.
    backend: str

    #: The torch module class this one replaces, and how messages name it.
    _dense_cls: ClassVar[type[nn.Module]]
    _dense_name: ClassVar[str]

    def __init__(
        self, *args: Any, config: SparsityConfig | str = "fst", backend: str = "auto", **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._init_sparse(config, backend)

    @classmethod
    def _dense_args(cls, module: nn.Module) -> tuple[Any, ...]:
        """The dense class's positional arguments that rebuild ``module``'s shape."""
        raise NotImplementedError

    @classmethod
    def from_dense(
        cls, module: nn.Module, config: SparsityConfig | str, *, backend: str = "auto"
    ) -> Self:
        """A sparse twin of ``module`` sharing its ``weight`` and ``bias`` Parameters."""
        if not isinstance(module, cls._dense_cls):
            raise TypeError(
                f"{cls.__name__}.from_dense needs {cls._dense_name}, got {type(module)}"
            )
        with torch.device("meta"):  # no memory: the Parameters come from ``module``
            new = cls(*cls._dense_args(module), config=config, backend=backend)
        return share_parameters(new, module)

    def to_dense(self) -> nn.Module:
        """The plain dense module with the same (latent, unpruned) Parameters."""
        with torch.device("meta"):
            dense = self._dense_cls(*self._dense_args(self))  # type: ignore[arg-type]
        return share_parameters(dense, self)

    def _init_sparse(self, config: SparsityConfig | str, backend: str = "auto") -> None:
        self.config = resolve_config(config)
        self.backend = check_backend(backend)
        # Non-persistent: the state_dict keys stay those of the torch module this replaces.
        self.register_buffer("tsm_mask", None, persistent=False)  # type: ignore[attr-defined]
        self.register_buffer(  # type: ignore[attr-defined]
            "tsm_step", torch.zeros((), dtype=torch.int64), persistent=False
        )
        # S-STE's per-tensor β of a soft_2:4 forward, fixed at the first training step
        self.register_buffer("soft_scale", None, persistent=False)  # type: ignore[attr-defined]
        # the cached S_Co mask of grad_input's weight (mask_interval > 1), on the same clock
        self.register_buffer("gi_mask", None, persistent=False)  # type: ignore[attr-defined]
        # ASP: a 2:4 forward mask set once (fullsparse.train.asp) and used at every step
        self.register_buffer("fixed_mask", None, persistent=False)  # type: ignore[attr-defined]
        # the sampled weight gradients' state (fullsparse.sampling.AdaptiveState): a CPU
        # tensor, not a buffer, so reading the keep count never waits for a GPU; made here,
        # not at first use, so that torch.compile sees it as an input of the graph
        self.gw_state: Tensor = AdaptiveState.new()
        # count_optimizer_steps: whether a step is an optimizer step (not each forward), and
        # whether the current optimizer step has had its first training forward
        self.counts_optimizer_steps = False
        self.step_open = False

    def _groups(self) -> int:
        return int(getattr(self, "groups", 1))

    def _gemm_weight(self) -> Tensor:
        """The weight as the GEMMs read it: ``[Co, Ci/g, kh, kw]`` or ``[d_out, d_in]``.

        The TSM mask has this shape. A module whose Parameter is stored in another layout
        (Hugging Face ``Conv1D``: ``[d_in, d_out]``) returns a view.
        """
        return self._gemm_layout(self.weight)  # type: ignore[arg-type]

    def _gemm_layout(self, t: Tensor) -> Tensor:
        """``t``, a tensor in the weight Parameter's layout (its gradient), as a view in the
        GEMM layout of :meth:`_gemm_weight` (a module that stores it otherwise overrides
        this: the layout is the module's fact, not the shape's — a square weight looks the
        same either way)."""
        return t

    @classmethod
    def _gemm_weight_of(cls, dense: nn.Module) -> Tensor:
        """:meth:`_gemm_weight` of the dense module this class replaces."""
        return dense.weight  # type: ignore[return-value]

    # -- the cached forward mask: TSM (every tsm_interval steps) or S_K (mask_interval) ----
    def _cached_mask_rule(self) -> tuple[int, Callable[[Tensor], Tensor]] | None:
        """(interval, mask of W) of the forward mask this module caches, or None.

        The TSM mask is always cached (every ``tsm_interval`` steps); S_K is cached when
        ``mask_interval > 1``. Both live in the ``tsm_mask`` / ``tsm_step`` buffers (the
        names checkpoints already hold).
        """
        if self.config.uses_transposable_mask:
            return self.config.tsm_interval, lambda w: transposable_mask(w, self._groups())
        if self.config.mask_interval > 1 and self.config.operands.output_weight == "S_K(W)":
            return self.config.mask_interval, mask_k
        return None

    def _step_state(
        self,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, bool]:
        """``(forward_mask, soft_scale, grad_input_mask, gw_state, add_decay)`` of this
        forward: the forward mask (updated first, on the module's clock), S-STE's β, the
        cached S_Co mask, the sampled weight gradient's state, and whether the backward adds
        the SR-STE decay. A training forward that does not open a step (a later micro-batch
        under :func:`count_optimizer_steps`) keeps the step's masks and leaves out the
        decay, which the step's first backward added already."""
        training = self.training and torch.is_grad_enabled()
        opens = training and self._opens_step()
        forward_mask = self._forward_mask(opens)
        caches_gi, soft, samples = self._config_facts()
        return (
            forward_mask,
            self._soft_scale() if soft else None,
            self.gi_mask if caches_gi else None,  # type: ignore[has-type]
            self.gw_state if samples else None,
            opens or not training,
        )

    def _config_facts(self) -> tuple[bool, bool, bool]:
        """``(caches the S_Co mask, soft_2:4 forward, samples its weight gradient)`` of the
        module's config, worked out once per config object (a forward reads them)."""
        facts: tuple[SparsityConfig, tuple[bool, bool, bool]] | None = self.__dict__.get("_facts")
        if facts is None or facts[0] is not self.config:
            modes = {self.config.grad_weight_mode, self.config.for_kind("linear").grad_weight_mode}
            answer = (
                self._caches_grad_input_mask(),
                self.config.operands.output_weight == SOFT,
                bool(modes & set(SAMPLED_MODES)),
            )
            facts = (self.config, answer)
            self.__dict__["_facts"] = facts
        return facts[1]

    def _kept_plan(
        self,
        key: Callable[[], tuple[Any, ...]],
        make: Callable[[], tuple[Any, ...]],
        reference: Any,
    ) -> tuple[Any, ...]:
        """The plan of this forward (checks done, kernel chosen: ``plan[1]``): the one kept
        from the last call of the same kind (``key()``: config, backend, dtypes, devices,
        shapes, autocast), else ``make()``, kept when its kernel is ``reference`` (another
        kernel may look at the input's shape). While compiling, or when ``key()`` fails (an
        argument that is not a tensor: ``make()`` says so in one line), nothing is kept. A
        deep copy's kept kernel is a copy, not ``reference``: its plan is made again."""
        if _is_compiling():  # traced once: the checks and the choice as they are
            return make()
        try:
            kind = key()
        except AttributeError:
            return make()
        kept = self.__dict__.get("_call_plan")
        if kept is not None and kept[0] == kind and kept[1][1] is reference:
            return kept[1]
        plan = make()
        if plan[1] is reference:
            self.__dict__["_call_plan"] = (kind, plan)
        return plan

    def _opens_step(self) -> bool:
        """Whether this training forward opens a step (always, unless the module counts
        optimizer steps and the current one is open already)."""
        if not self.counts_optimizer_steps:
            return True
        if self.step_open:
            return False
        self.step_open = True
        return True

    def _forward_mask(self, stepping: bool) -> Tensor | None:
        """The cached forward mask, recomputed every ``interval`` training steps.

        ``stepping``: this forward opens a training step (:meth:`_opens_step`). Without a cached
        rule (S_K with ``mask_interval=1``) masks are not cached: they follow the weight at
        every step (the cost is in the overhead benchmark).
        A fixed mask (ASP), when set, is used as is and never recomputed.
        """
        fixed: Tensor | None = getattr(self, "fixed_mask", None)
        if fixed is not None:
            return fixed
        rule = self._cached_mask_rule()
        if rule is None:
            return None
        if _is_compiling():
            return self._forward_mask_traceable(*rule, stepping)
        interval, make = rule
        mask: Tensor | None = self.tsm_mask  # type: ignore[has-type]
        due = stepping and int(self.tsm_step) % interval == 0
        weight = self._gemm_weight().detach()
        if mask is None or due or mask.shape != weight.shape:
            mask = make(weight)
            self.tsm_mask = mask
            self.gi_mask = None
        if self._caches_grad_input_mask() and self.gi_mask is None:  # type: ignore[has-type]
            self.gi_mask = self._mask_co_of(weight, mask)
        if stepping:
            self.tsm_step += 1  # type: ignore[has-type]
        return mask

    def _forward_mask_traceable(
        self, interval: int, make: Callable[[Tensor], Tensor], stepping: bool
    ) -> Tensor:
        """:meth:`_forward_mask` as torch.compile can trace it: the same masks, no graph break.

        ``int(tsm_step)`` is data-dependent control flow: a graph break in every sparse
        layer's forward, after which each layer's forward is compiled alone, once per weight
        shape — past the recompile limit (8) the remaining layers silently ran eagerly. Here
        the "is a recompute due" test stays a tensor and ``torch.where`` picks the new or the
        cached mask; the candidate mask is computed every step (about 6·R·C flops, small next
        to the GEMMs), but only a due step keeps it, exactly as in eager mode.
        """
        mask: Tensor | None = self.tsm_mask  # type: ignore[has-type]
        weight = self._gemm_weight().detach()
        gi: Tensor | None = self.gi_mask  # type: ignore[has-type]
        caches_gi = self._caches_grad_input_mask()
        if mask is None or mask.shape != weight.shape:
            mask = make(weight)
            gi = self._mask_co_of(weight, mask) if caches_gi else None
        elif stepping:
            due = self.tsm_step % interval == 0  # type: ignore[has-type]
            mask = torch.where(due, make(weight), mask)
            if caches_gi:
                fresh = self._mask_co_of(weight, mask)
                gi = fresh if gi is None else torch.where(due, fresh, gi)
        self.tsm_mask, self.gi_mask = mask, gi
        if stepping:
            self.tsm_step += 1  # type: ignore[has-type]
        return mask

    # ---- decay and forward variants
    def _soft_scale(self) -> Tensor | None:
        """S-STE's β of a ``soft_2:4`` forward (None for other recipes): fixed once, from the
        weights of the first training step (the initial weights, as S-STE computes it), and
        kept in the ``soft_scale`` buffer. Before that (evaluation of an untrained layer) it is
        computed from the current weights without being kept."""
        if self.config.operands.output_weight != SOFT:
            return None
        scale: Tensor | None = self.soft_scale  # type: ignore[has-type]
        if scale is None:
            scale = soft_scale(self._gemm_weight())
            if self.training and torch.is_grad_enabled():
                self.soft_scale = scale
        return scale

    def _caches_grad_input_mask(self) -> bool:
        """Whether S_Co of grad_input's weight is cached (``mask_interval > 1`` with an S_K
        forward): recomputed with the forward mask, from the same W."""
        ops = self.config.operands
        return (
            self.config.mask_interval > 1
            and ops.output_weight == "S_K(W)"
            and ops.grad_input_weight.startswith("S_Co(")
        )

    def _mask_co_of(self, weight: Tensor, out_mask: Tensor) -> Tensor:
        """S_Co of grad_input's source: W, or the pruned S_K(W) (``grad_input_source``)."""
        pruned = self.config.operands.grad_input_weight == "S_Co(S_K(W))"
        return mask_co(weight * out_mask if pruned else weight, self._groups())

    def pruned_weight(self) -> Tensor:
        """The weight operand of the forward GEMM (``S_K(W)``, TSM-masked W, or W), detached,
        shaped like the weight Parameter (what ``load_state_dict`` takes); a module whose
        Parameter is not in the GEMM layout (:meth:`_gemm_weight`) overrides this to
        transpose it back."""
        weight = self._gemm_weight().detach()
        if self.config.operands.output_weight == SOFT:
            return soft_output_weight(weight, self._soft_scale())
        out = self.forward_weight_mask()
        return weight if out is None else weight * out

    def forward_weight_mask(self) -> Tensor | None:
        """The forward GEMM's mask of the weight as it stands, in the GEMM layout (None: a
        dense forward): a fixed mask, the cached TSM mask or S_K mask (``mask_interval >
        1``: the one the step's forward used), else S_K(W) (the positions S-STE's soft
        operand keeps). Between a training forward and its optimizer step this is the mask
        that forward applied."""
        mask = self.tsm_mask if self._cached_mask_rule() is not None else None  # type: ignore
        if getattr(self, "fixed_mask", None) is not None:
            mask = self.fixed_mask  # type: ignore[attr-defined]
        weight = self._gemm_weight().detach()
        return output_weight_mask(weight, self.config, self._groups(), mask)

    def _sparse_repr(self) -> str:
        return f"recipe={self.config.name}, backend={self.backend}"


#: The optional per-module state :func:`sparse_state_dict` saves (besides ``tsm_step``).
_STATE_ATTRS = ("tsm_mask", "gi_mask", "soft_scale", "fixed_mask", "gw_state")


def sparse_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` for every SparseConv2d / SparseLinear in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, _SparseMixin):
            yield name, module


def set_backend(model: nn.Module, backend: str) -> int:
    """Give every sparse layer of ``model`` the backend ``backend``
    (:mod:`fullsparse.kernels`; each layer chooses its kernel again at its next call).
    Returns how many layers it set; an unknown name raises ``ValueError``."""
    check_backend(backend)
    layers = 0
    for _, module in sparse_modules(model):
        module.backend = backend
        layers += 1
    return layers


def sparse_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The sparse state that is not in ``model.state_dict()``: TSM masks, step clocks and
    fixed (ASP) masks.

    Plain tensors only, so checkpoints load with ``torch.load(weights_only=True)``.
    """
    state: dict[str, Tensor] = {}
    for name, module in sparse_modules(model):
        state[f"{name}.tsm_step"] = module.tsm_step.detach().cpu().clone()  # type: ignore
        for attr in _STATE_ATTRS:  # masks, S-STE's β, the sampled weight gradient's state
            if attr == "gw_state" and int(module.gw_state[1]) == 0:  # type: ignore[index]
                continue  # never used (the recipe samples nothing): nothing to save
            if getattr(module, attr, None) is not None:
                state[f"{name}.{attr}"] = getattr(module, attr).detach().cpu().clone()
    return state


def load_sparse_state_(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Restore what :func:`sparse_state_dict` saved (in place). Unknown keys raise KeyError."""
    modules = dict(sparse_modules(model))
    for key, value in state.items():
        name, _, attr = key.rpartition(".")
        if name not in modules or attr not in ("tsm_step", *_STATE_ATTRS):
            raise KeyError(f"sparse state key {key!r} matches no sparse module of the model")
        module = modules[name]
        device = module.weight.device
        gemm_shape = tuple(module._gemm_weight().shape)  # type: ignore[operator]
        if attr in ("tsm_mask", "gi_mask", "fixed_mask") and tuple(value.shape) != gemm_shape:
            raise ValueError(
                f"sparse state {key!r} has shape {tuple(value.shape)}, but the layer's weight "
                f"is {gemm_shape}"
            )
        if attr == "gw_state":  # a CPU tensor, whatever the layer's device
            if tuple(value.shape) != (len(AdaptiveState.SLOTS),):
                raise ValueError(f"sparse state {key!r} has shape {tuple(value.shape)}")
            module.gw_state = value.to(torch.float64).clone()
            continue
        setattr(module, attr, value.to(device=device))
    for name, module in modules.items():
        if f"{name}.gw_state" not in state:
            module.gw_state = AdaptiveState.new()
        for attr in _STATE_ATTRS[:-1]:  # not saved: unset
            if f"{name}.{attr}" not in state:
                setattr(module, attr, None)
        module.step_open = False  # saved states are taken between optimizer steps


def pruned_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` with each sparse layer's weight replaced by its pruned forward
    weight (what inference uses); loads into the dense model."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, module in sparse_modules(model):
        key = f"{name}.weight" if name else "weight"
        if key in state:
            state[key] = module.pruned_weight().clone()  # type: ignore[attr-defined]
    return state


# --------------------------------------------------------------------------- steps
def end_optimizer_step(model: nn.Module) -> None:
    """Close the current optimizer step of every sparse layer of ``model`` (counting
    optimizer steps): the next training forward opens a new one. :func:`count_optimizer_steps`
    does this after each ``optimizer.step()``; call it yourself where a step ends without
    one (a skipped step)."""
    for _, module in sparse_modules(model):
        module.step_open = False  # type: ignore[assignment]


class OptimizerHook:
    """An optimizer hook of the library: :meth:`remove` (or the end of a ``with`` block)
    takes it off."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class StepCounting(OptimizerHook):
    """What :func:`count_optimizer_steps` returns: :meth:`remove` (or the end of a ``with``
    block) goes back to counting one step per training forward."""

    def __init__(self, model: nn.Module, handle: Any) -> None:
        super().__init__(handle)
        self.model = model

    def remove(self) -> None:
        super().remove()
        for _, module in sparse_modules(self.model):
            module.counts_optimizer_steps = False  # type: ignore[assignment]
            module.step_open = False  # type: ignore[assignment]


def count_optimizer_steps(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> StepCounting:
    """Make the sparse layers of ``model`` count optimizer steps instead of forward passes:
    the rule for gradient accumulation in your own loop (or under a framework's).

    Every training forward between two optimizer steps is a micro-batch of one step: the
    first opens the step (the mask clock of ``tsm_interval`` / ``mask_interval`` advances
    once, due masks are recomputed, S-STE's β is fixed, and its backward adds the SR-STE
    decay λ·(W − S(W)) once); the others reuse the step's masks and add no decay. So N
    micro-batches whose losses are each divided by N give the gradient of the whole batch.

    A step ends at each ``step()`` of ``optimizer``, or, with ``optimizer=None``, of any
    optimizer that holds one of the model's sparse weights (a global optimizer hook: it
    also sees an optimizer a framework builds later, such as the Hugging Face ``Trainer``'s,
    and one wrapped by accelerate). A step that is skipped without ``optimizer.step()`` (a
    GradScaler's inf step) stays open: call :func:`end_optimizer_step` where your loop
    skips one. Call this after :func:`fullsparse.sparsify_`; the returned handle's
    ``remove()`` undoes it (it is also a context manager).
    """
    modules = [m for _, m in sparse_modules(model)]
    for module in modules:
        module.counts_optimizer_steps = True  # type: ignore[assignment]
        module.step_open = False  # type: ignore[assignment]

    def stepped(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if optimizer is None:
            held = {id(p) for group in opt.param_groups for p in group["params"]}
            if not any(id(m.weight) in held for m in modules):
                return
        end_optimizer_step(model)

    if optimizer is None:
        handle = register_optimizer_step_post_hook(stepped)
    else:
        handle = optimizer.register_step_post_hook(stepped)
    return StepCounting(model, handle)
