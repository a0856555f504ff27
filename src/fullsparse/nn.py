"""Sparse drop-in modules and the in-place model transforms ``sparsify_`` / ``densify_``.

:class:`SparseConv2d` and :class:`SparseLinear` subclass ``nn.Conv2d`` / ``nn.Linear``: the
same parameters (the very same ``Parameter`` objects after :meth:`from_dense`), the same
``state_dict`` keys, so optimizers and checkpoints see no difference. What is not a parameter
— the TSM mask and its step counter — lives in non-persistent buffers and is saved with
:func:`sparse_state_dict` / restored with :func:`load_sparse_state_`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fullsparse.config import SparsityConfig
from fullsparse.entry_checks import _autocast_dtype
from fullsparse.functional import apply_conv, apply_linear, conv_plan, linear_plan
from fullsparse.kernels import (
    REFERENCE_CONV,
    REFERENCE_LINEAR,
    BackendUnavailableError,
    LayerShape,
    check_backend,
    predict_plan,
)
from fullsparse.masked_decay import MaskedDecayHook, masked_decay_on_step, masked_grad_decay_
from fullsparse.nn_report import LayerReport, SparsifyReport
from fullsparse.recipes import resolve_config
from fullsparse.sparse_state import (
    StepCounting,
    _SparseMixin,
    count_optimizer_steps,
    end_optimizer_step,
    load_sparse_state_,
    pruned_state_dict,
    set_backend,
    sparse_modules,
    sparse_state_dict,
)

__all__ = [
    "SparseConv2d",
    "SparseLinear",
    "LayerReport",
    "SparsifyReport",
    "sparsify_",
    "densify_",
    "head_name",
    "KEEP_DENSE",
    "sparse_modules",
    "set_backend",
    "sparse_state_dict",
    "load_sparse_state_",
    "pruned_state_dict",
    "masked_grad_decay_",
    "masked_decay_on_step",
    "MaskedDecayHook",
    "count_optimizer_steps",
    "end_optimizer_step",
    "StepCounting",
]


def _conv2d_shape(m: nn.Conv2d) -> tuple[Any, ...]:
    """``nn.Conv2d``'s positional arguments that rebuild ``m``'s geometry."""
    return (
        m.in_channels,
        m.out_channels,
        m.kernel_size,
        m.stride,
        m.padding,
        m.dilation,
        m.groups,
        m.bias is not None,
        m.padding_mode,
    )


class SparseConv2d(_SparseMixin, nn.Conv2d):
    """``nn.Conv2d`` whose forward, grad_input and grad_weight follow a SparsityConfig."""

    _dense_cls = nn.Conv2d
    _dense_name = "an nn.Conv2d"

    @classmethod
    def _dense_args(cls, module: nn.Module) -> tuple[Any, ...]:
        return _conv2d_shape(module)  # type: ignore[arg-type]

    def forward(self, input: Tensor) -> Tensor:
        padding: Any = self.padding
        if self.padding_mode != "zeros":  # as nn.Conv2d does: pad explicitly, then padding 0
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        step = self._step_state()
        weight, bias = self.weight, self.bias
        geometry = (self.stride, padding, self.dilation, self.groups)
        key = lambda: (  # noqa: E731
            self.config, self.backend, geometry, input.dtype, input.device, input.shape,
            input.is_contiguous(memory_format=torch.channels_last), weight.dtype, weight.device,
            weight.shape, None if bias is None else (bias.dtype, bias.shape),
            _autocast_dtype(input.device.type),
        )  # fmt: skip
        plan = self._kept_plan(
            key,
            lambda: conv_plan(input, weight, bias, *geometry, self.config, self.backend),
            REFERENCE_CONV,
        )
        return apply_conv(input, weight, bias, *plan, *step)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._sparse_repr()}"


class SparseLinear(_SparseMixin, nn.Linear):
    """``nn.Linear`` whose forward, grad_input and grad_weight follow a SparsityConfig."""

    _dense_cls = nn.Linear
    _dense_name = "an nn.Linear"

    @classmethod
    def _dense_args(cls, module: nn.Module) -> tuple[Any, ...]:
        return (module.in_features, module.out_features, module.bias is not None)

    def forward(self, input: Tensor) -> Tensor:
        return linear_forward(self, input, self.weight)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._sparse_repr()}"


def linear_forward(module: _SparseMixin, input: Tensor, weight: Tensor) -> Tensor:
    """A sparse Linear-like module's forward with ``weight`` in the ``[d_out, d_in]`` layout:
    :func:`~fullsparse.functional.sparse_linear` on the module's step state.

    The checks and the kernel choice (:func:`~fullsparse.functional.linear_plan`) depend on
    the call's kind, not on its values: the module keeps the answer and, in eager mode, a
    call of the same kind (config, backend, dtypes, devices, shapes but the leading
    dimensions, autocast) goes straight to the autograd function. Kept only where the
    reference kernel runs: another kernel may look at the input's shape.
    """
    step = module._step_state()
    bias = module.bias
    key = lambda: (  # noqa: E731
        module.config, module.backend, input.dtype, input.device, input.shape[-1:],
        weight.dtype, weight.device, weight.shape,
        None if bias is None else (bias.dtype, bias.shape), _autocast_dtype(input.device.type),
    )  # fmt: skip
    layer, kernel = module._kept_plan(
        key,
        lambda: linear_plan(input, weight, bias, module.config, module.backend),
        REFERENCE_LINEAR,
    )
    return apply_linear(input, weight, bias, layer, kernel, *step)


def _sparse_twin(module: nn.Module) -> type[_SparseMixin] | None:
    """The sparse class that replaces ``module``, or None if fullsparse replaces no such
    layer."""
    if isinstance(module, nn.Conv2d):
        return SparseConv2d
    if isinstance(module, nn.Linear):
        return SparseLinear
    # Hugging Face Conv1D (GPT-2 family). Only a model built by transformers holds one, and
    # building it imported this module: a model without one never imports transformers.
    if "transformers.pytorch_utils" in sys.modules:
        from fullsparse.hf import Conv1D, SparseConv1D

        if isinstance(module, Conv1D):
            return SparseConv1D
    return None


# Layer types that hold GEMM weights but that fullsparse does not replace; listed in the
# report so that nothing is silently left dense.
_UNSUPPORTED = (
    nn.Conv1d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.MultiheadAttention,
    nn.Bilinear,
)


def _dense_reason(name: str, module: nn.Module, fused_children: set[str]) -> str | None:
    """Why ``module`` must stay dense whatever the filter says, or None if it can be sparse."""
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return "lazy module not initialised yet (run one forward first)"
    if name in fused_children:
        return "weight read directly by nn.MultiheadAttention's fused kernel"
    if not module.weight.is_floating_point():  # type: ignore[union-attr]
        return f"weight dtype {module.weight.dtype} is not floating point"  # type: ignore
    if isinstance(module, nn.Conv2d):
        cig = module.in_channels // module.groups
        if module.groups > 1 and cig < 4:
            return (
                f"grouped conv with {cig} input channel(s) per group (< 4): 2:4 groups would "
                "mix kernel taps of too few channels"
            )
    return None


def _find_head(named: list[tuple[str, nn.Module]]) -> tuple[str | None, str]:
    """The layer ``sparsify_`` keeps dense by default, and the report's reason.

    The last ``nn.Linear`` in ``named_modules()`` order; in a model with no Linear at all
    (SqueezeNet's 1×1-conv classifier, a fully convolutional net) the last ``nn.Conv2d``,
    which is then the layer that produces the output.
    """
    linears = [n for n, m in named if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1], "classifier head (last Linear)"
    convs = [n for n, m in named if isinstance(m, nn.Conv2d)]
    if convs:
        return convs[-1], "output head (last Conv2d; the model has no Linear)"
    return None, ""


def head_name(model: nn.Module) -> str | None:
    """Name of the head ``sparsify_`` keeps dense by default (see :func:`sparsify_`), or
    None when the model has no Conv2d or Linear."""
    return _find_head(list(model.named_modules(remove_duplicate=False)))[0]


def _fused_children(model: nn.Module) -> set[str]:
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            for child_name, _ in module.named_modules():
                if child_name:
                    names.add(f"{name}.{child_name}" if name else child_name)
    return names


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def sparsify_(
    model: nn.Module,
    config_or_recipe_name: SparsityConfig | str,
    filter_fn: Callable[[str, nn.Module], bool | str] | None = None,
    *,
    backend: str = "auto",
    compute_dtype: torch.dtype | None = None,
    keep_dense: Iterable[str] = (),
) -> SparsifyReport:
    """Replace Conv2d/Linear layers of ``model`` in place by sparse twins of ``config``.

    Default selection: every ``nn.Conv2d``, ``nn.Linear`` and Hugging Face ``Conv1D`` (a
    Linear whose weight is stored ``[d_in, d_out]``; :mod:`fullsparse.hf`) except the head:
    the last ``nn.Linear`` in ``named_modules()`` order (the classifier), or in a model
    without any Linear its last ``nn.Conv2d`` (:func:`head_name`). ``filter_fn(name,
    module)`` replaces that selection: True makes the layer sparse, False keeps it dense
    ("excluded by filter_fn"), and a string keeps it dense with that string as the report's
    reason.
    ``keep_dense`` (the layer policy, any of :data:`KEEP_DENSE`) keeps ``stem`` (the first
    ``nn.Conv2d`` in ``named_modules()`` order) and/or ``first_linear`` (the first Linear-like
    layer) dense whatever the filter says; the report gives "stem (layer policy)".
    Layers that cannot carry 2:4 meaningfully stay dense whatever the filter says. Layers
    already sparse get the new config. Parameters are shared, not copied: an optimizer
    built before the call keeps working.

    ``backend`` is given to every sparse layer (:mod:`fullsparse.kernels`): ``auto``
    (default) runs 2:4 sparse tensor cores where a layer's GEMMs fit them and the reference
    path elsewhere; ``semi_structured`` insists (and raises here, before changing anything,
    for what is already known not to fit: recipe, grouping, shapes; device and dtype are
    checked at the forward); ``reference`` / ``emulation`` as named. ``compute_dtype`` only
    informs the report's prediction (default: the weight's dtype if fp16/bf16, else bf16
    autocast is assumed).

    Returns:
        A :class:`SparsifyReport` with one row per Conv/Linear-like layer: what it got, why,
        and which backend its GEMMs will use and why.

    Raises:
        fullsparse.kernels.BackendUnavailableError: ``backend='semi_structured'`` and a
            chosen layer cannot run it (the message names every such layer).
    """
    config = resolve_config(config_or_recipe_name)
    check_backend(backend)
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsify_ needs an nn.Module, got {type(model).__name__}")
    report = SparsifyReport(recipe=config.name, backend=backend)
    named = list(model.named_modules(remove_duplicate=False))
    head, head_why = _find_head(named)
    fused = _fused_children(model)
    policy = _layer_policy(named, keep_dense)

    # Decide everything first, so that an explicit backend that cannot run fails before the
    # model is changed. One row per layer: (name, module, sparse?, why it stays dense).
    decisions: list[tuple[str, nn.Module, bool, str]] = []
    for name, module in named:
        if isinstance(module, _UNSUPPORTED):
            why = "layer type not supported (fullsparse replaces Conv2d and Linear)"
            decisions.append((name, module, False, why))
            continue
        if _sparse_twin(module) is None:
            continue
        if filter_fn is not None:
            verdict = filter_fn(name, module)
            if isinstance(verdict, str):  # a reason to stay dense, for the report
                chosen, why_not = False, verdict or "excluded by filter_fn"
            else:
                chosen, why_not = bool(verdict), "excluded by filter_fn"
        else:
            chosen, why_not = name != head, head_why
        if name in policy:
            chosen, why_not = False, policy[name]
        reason = _dense_reason(name, module, fused)
        sparse = chosen and reason is None
        decisions.append((name, module, sparse, "" if sparse else (reason or why_not)))
    plans: dict[str, tuple[str, str]] = {}
    failures = []
    for name, module, sparse, _ in decisions:
        if sparse:
            try:
                plans[name] = _predict_backend(module, config, backend, compute_dtype)
            except BackendUnavailableError as exc:
                failures.append(f"{name or '<model>'}: {exc}")
    if failures:
        raise BackendUnavailableError(
            f"sparsify_(backend='semi_structured'): {len(failures)} layer(s) cannot run it — "
            + " | ".join(failures)
        )

    replaced: dict[int, nn.Module] = {}  # a module registered under two names is swapped once
    for name, module, sparse, why in decisions:
        kind = type(module).__name__
        shape = _shape(module)
        if isinstance(module, _UNSUPPORTED):
            report.rows.append(LayerReport(name, kind, shape, False, why))
            continue
        if not sparse:
            if isinstance(module, _SparseMixin) and id(module) not in replaced:
                replaced[id(module)] = module.to_dense()  # type: ignore[attr-defined]
            if id(module) in replaced:
                _set_module(model, name, replaced[id(module)])
            report.rows.append(LayerReport(name, kind, shape, False, why))
            continue
        if id(module) not in replaced:
            if isinstance(module, _SparseMixin):
                module.config = config
                module.backend = backend
                module.tsm_mask = module.gi_mask = None
                replaced[id(module)] = module
            else:
                cls = _sparse_twin(module)
                replaced[id(module)] = cls.from_dense(  # type: ignore[union-attr]
                    module, config, backend=backend
                )
        _set_module(model, name, replaced[id(module)])
        chosen_backend, backend_reason = plans[name]
        note = _sparse_note(module, config)
        gw = _grad_weight_label(module, config)
        report.rows.append(
            LayerReport(name, kind, shape, True, note, chosen_backend, backend_reason, gw)
        )
    return report


# --------------------------------------------------------------------------- layer policy
#: Layers :func:`sparsify_` can keep dense by role (``keep_dense=``), and the report's reason.
KEEP_DENSE: dict[str, str] = {
    "stem": "stem (layer policy)",
    "first_linear": "first Linear (layer policy)",
}


def _layer_policy(named: list[tuple[str, nn.Module]], keep_dense: Iterable[str]) -> dict[str, str]:
    """Layer name -> reason, for the layers ``keep_dense`` keeps dense."""
    if isinstance(keep_dense, str):
        keep_dense = (keep_dense,)
    keep = tuple(keep_dense)
    unknown = [k for k in keep if k not in KEEP_DENSE]
    if unknown:
        raise ValueError(f"sparsify_: keep_dense={unknown} is not among {', '.join(KEEP_DENSE)}")
    candidates = [(n, m) for n, m in named if _sparse_twin(m) is not None]
    firsts = {
        "stem": next((n for n, m in candidates if isinstance(m, nn.Conv2d)), None),
        "first_linear": next((n for n, m in candidates if not isinstance(m, nn.Conv2d)), None),
    }
    return {firsts[k]: KEEP_DENSE[k] for k in keep if firsts[k] is not None}  # type: ignore[misc]


def _layer_kind(module: nn.Module) -> str:
    """``conv`` or ``linear``: the kind :meth:`SparsityConfig.for_kind` reads."""
    return "conv" if isinstance(module, nn.Conv2d) else "linear"


def _grad_weight_label(module: nn.Module, config: SparsityConfig) -> str:
    """The layer's weight-gradient estimator for the report: its mode, α for ``ir``."""
    layer = config.for_kind(_layer_kind(module))
    if layer.grad_weight_mode == "ir":
        return f"ir α={layer.ir_alpha:g}"
    return layer.grad_weight_mode


def _layer_shape(module: nn.Module) -> LayerShape:
    """The static GEMM facts of a Conv2d / Linear-like layer for the backend rules."""
    weight = _sparse_twin(module)._gemm_weight_of(module)  # type: ignore[union-attr]
    if isinstance(module, nn.Conv2d):
        padding: Any = module.padding
        if isinstance(padding, str):  # 'valid' is 0; 'same' pads unless the kernel is 1x1
            size1 = tuple(module.kernel_size) == (1, 1)
            padding = (0, 0) if padding == "valid" or size1 else (1, 1)
        return LayerShape(
            "conv",
            tuple(weight.shape),
            tuple(module.stride),  # type: ignore[arg-type]
            tuple(padding),
            tuple(module.dilation),  # type: ignore[arg-type]
            module.groups,
        )
    return LayerShape("linear", tuple(weight.shape))


def _predict_backend(
    module: nn.Module, config: SparsityConfig, backend: str, compute_dtype: torch.dtype | None
) -> tuple[str, str]:
    weight = module.weight  # type: ignore[union-attr]
    return predict_plan(
        _layer_shape(module), config, backend, weight.device, weight.dtype, compute_dtype
    )


def _shape(module: nn.Module) -> tuple[int, ...]:
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor) and not isinstance(weight, nn.parameter.UninitializedParameter):
        return tuple(weight.shape)
    return ()


def _sparse_note(module: nn.Module, config: SparsityConfig) -> str:
    if config.is_dense:
        return "dense recipe (same math as torch)"
    notes = []
    weight = _sparse_twin(module)._gemm_weight_of(module)  # type: ignore[union-attr]
    k = weight[0].numel()
    ci = weight.shape[1]
    channel = config.conv_layout == "channel" and isinstance(module, nn.Conv2d)
    if channel and ci % 4:
        notes.append(f"Ci={ci} zero-padded to {ci + (-ci) % 4} at each tap")
    elif not channel and k % 4:
        notes.append(f"K={k} zero-padded to {k + (-k) % 4}")
    co = weight.shape[0]
    if co % 4 and config.grad_input_weight == "2:4_co":
        notes.append(f"Co={co} zero-padded to {co + (-co) % 4} for the grad_input mask")
    if not isinstance(module, nn.Conv2d) and config.for_kind("linear").grad_weight_mode == "ir":
        notes.append("IR pairs tokens (dim -2); dense grad_weight for 2-D inputs")
    return "; ".join(notes) or "2:4"


def densify_(model: nn.Module) -> SparsifyReport:
    """Turn every sparse module of ``model`` back into its torch type, in place.

    Parameters are shared (latent, unpruned weights); to keep the pruned weights, load
    :func:`pruned_state_dict` into the result.
    """
    report = SparsifyReport(recipe="dense")
    restored: dict[int, nn.Module] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if isinstance(module, _SparseMixin):
            if id(module) not in restored:
                restored[id(module)] = module.to_dense()  # type: ignore[attr-defined]
            dense = restored[id(module)]
            _set_module(model, name, dense)
            report.rows.append(
                LayerReport(
                    name,
                    type(dense).__name__,
                    _shape(dense),
                    False,
                    f"restored from {type(module).__name__} ({module.config.name})",
                )
            )
    return report
