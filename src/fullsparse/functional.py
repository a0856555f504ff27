"""Sparse Conv2d and Linear as custom autograd functions (``docs/spec.md``, "Recipes").

Each layer is three GEMMs, written out in labelled sections of one ``backward`` per layer
kind:

- ``output``      (Eq. 1) ``y  = W_out · X``                   — reduction over K
- ``grad_input``  (Eq. 2) ``dX = W_giᵀ · dY_gi``               — reduction over Co
- ``grad_weight`` (Eq. 3) ``dW = dY_gw · X_gwᵀ`` (+ λ·(W − W_out)) — over N·Ho·Wo / tokens

A frozen :class:`~fullsparse.config.SparsityConfig` decides what each operand is, through
the one table :data:`~fullsparse.config.OPERAND_TABLE` (``config.operands``); the functions
never ask which recipe they run. The weight-side operands of a step (W_out, W_gi and the
SR-STE decay) are built once, in the forward, by :func:`fullsparse.operands.weight_operands`
and saved for the backward. A *kernel* object chosen before the autograd function runs
(:mod:`fullsparse.kernels`, the ``backend=`` argument) computes the ``output`` and
``grad_input`` GEMMs from them — dense PyTorch ops (``reference``) or 2:4 sparse tensor
cores (``semi_structured``) — and the functions never ask which. The FST weight gradient
is a half-size strided product — half the FLOPs on any hardware, no sparse kernel needed —
and is the same on every backend.

:mod:`fullsparse.reference_autograd` keeps the plain path (each operand built by its own
role function, in the backward where it is used); the two agree bit for bit.

Shapes: conv ``input [N, Ci, H, W]``, ``weight [Co, Ci/g, kh, kw]``, ``grad_output
[N, Co, Ho, Wo]``; linear ``input [..., T, d_in]`` (or ``[B, d_in]``), ``weight
[d_out, d_in]``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fullsparse.config import SparsityConfig
from fullsparse.entry_checks import (
    _autocast_dtype,
    _check_same_dtype,
    _checked_call,
    _not_a_view,
    autocast_off,
    cast,
    stash_forward,
)
from fullsparse.geometry import ConvGeometry, pair
from fullsparse.kernels import (
    REFERENCE_CONV,
    select_conv_kernel,
    select_linear_kernel,
)
from fullsparse.kernels.reference import conv_backward, conv_grad_input, conv_output
from fullsparse.operands import (
    WeightOperands,
    add_deferred_decay,
    decay_term,
    grad_input_weight,
    ir_grad_output,
    is_2to4_k,
    mask_channels,
    mask_co,
    mask_k,
    mask_spatial_conv,
    output_weight_mask,
    transposable_mask,
    weight_operands,
)
from fullsparse.roles import (
    _conv_dy_gi,
    _linear_dy_gi,
    conv_grad_input_for,
    conv_grad_weight,
    conv_grad_weight_for,
    linear_grad_input_for,
    linear_grad_weight,
    linear_grad_weight_for,
    sampling_args,
)

# Re-exported from their own modules (older import paths keep working).
__all__ = [
    "sparse_conv2d",
    "sparse_linear",
    "ConvGeometry",
    "output_weight_mask",
    "grad_input_weight",
    "conv_output",
    "conv_grad_input",
    "conv_grad_weight",
    "linear_grad_weight",
    "ir_grad_output",
    "mask_k",
    "is_2to4_k",
    "mask_co",
    "transposable_mask",
    "decay_term",
    "conv_grad_input_for",
    "conv_grad_weight_for",
    "linear_grad_input_for",
    "linear_grad_weight_for",
]

# older private names of two activation operands (fullsparse.operands)
_mask_channels, _mask_spatial_conv = mask_channels, mask_spatial_conv


# --------------------------------------------------------------------------- conv
class _SparseConv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        input: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        geo: ConvGeometry,
        config: SparsityConfig,
        forward_mask: Tensor | None,
        kernel: Any,
        soft_scale: Tensor | None = None,
        grad_input_mask: Tensor | None = None,
        gw_state: Tensor | None = None,
        add_decay: bool = True,
    ) -> Tensor:
        compute = _autocast_dtype(input.device.type) or input.dtype
        needs_dx, needs_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.gw_state = gw_state
        ops = weight_operands(
            weight, config, geo.groups, compute, forward_mask, grad_input=needs_dx,
            decay=needs_dw and add_decay, soft_scale=soft_scale, grad_input_mask=grad_input_mask,
        )  # fmt: skip
        x, b = stash_forward(ctx, input, weight, bias, config, compute, kernel)
        with autocast_off(input.device.type):
            y = _not_a_view(kernel.output(x, ops.output, b, geo))  # output (Eq. 1)
        # W_gi stands in for W's shape and dtype in the weight gradient when there is one
        w_bwd = ops.grad_input if ops.grad_input is not None else ops.output
        ctx.save_for_backward(x, w_bwd, _decay_source(ops, weight))
        ctx.decay_scale = ops.decay_scale
        ctx.geo = geo
        return y

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        x, w_gi, decay = ctx.saved_tensors
        geo, config, kernel = ctx.geo, ctx.config, ctx.kernel
        input_dtype, weight_dtype, bias_dtype = ctx.dtypes
        needs_dx, needs_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ops = config.operands
        dy = cast(grad_output, ctx.compute)
        grad_input = grad_weight = grad_bias = None
        with autocast_off(x.device.type):
            if needs_dx and needs_dw and _one_conv_backward(ops, kernel):
                # both gradients from one dY operand (dY, or meProp's TopK(dY)): one
                # convolution_backward call serves both
                dx, dw = conv_backward(_conv_dy_gi(config, dy, geo), x, w_gi, geo, "both")
                grad_input = cast(dx, input_dtype)
                grad_weight = _plus(cast(dw, weight_dtype), decay, ctx.decay_scale)
            else:
                # ---- grad_input (Eq. 2): dX = W_giᵀ · dY_gi
                if needs_dx:
                    dy_gi = _conv_dy_gi(config, dy, geo)
                    grad_input = cast(kernel.grad_input(dy_gi, x, w_gi, geo), input_dtype)
                # ---- grad_weight (Eq. 3): dW = dY_gw · X_gwᵀ, + λ·(W − W_out) (Eq. 6)
                if needs_dw:
                    mode, alpha = config.grad_weight_mode, config.ir_alpha
                    sampling = sampling_args(config, ctx.gw_state, conv=True)
                    dw = conv_grad_weight(x, dy, w_gi, geo, mode, alpha, **sampling)
                    grad_weight = _plus(cast(dw, weight_dtype), decay, ctx.decay_scale)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_bias = dy.sum((0, 2, 3)).to(bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None, None


def _one_conv_backward(ops: Any, kernel: Any) -> bool:
    """True when grad_input and grad_weight are both plain products with the same dY operand
    (dY, or TopK(dY)) and the reference kernel computes grad_input (dense, srste, tsm, fst2,
    meprop)."""
    same_dy = ops.grad_input_dy == ops.grad_weight_dy and ops.grad_input_dy in ("dY", "TopK(dY)")
    return same_dy and ops.grad_weight_input == "X" and kernel is REFERENCE_CONV


def _decay_source(ops: WeightOperands, weight: Tensor) -> Tensor | None:
    """What the backward needs for the SR-STE decay: the decay tensor, or W itself where the
    native weight side left the decay to the backward (``ops.decay_scale``)."""
    return weight if ops.decay_scale is not None else ops.decay


def _plus(grad: Tensor, decay: Tensor | None, scale: float | None) -> Tensor:
    """``grad + decay`` in place on the fresh ``grad`` (the SR-STE term of Eq. 6); with a
    ``scale``, ``decay`` is W and the term λ·(W − W·S_K(W)) is made from it."""
    if decay is None:
        return grad
    return grad.add_(decay) if scale is None else add_deferred_decay(grad, decay, scale)


def _same_padding(kernel: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) that keeps the size at stride 1, as torch does for 'same'."""
    total = [dilation[i] * (kernel[i] - 1) for i in range(2)]
    return (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2)


def sparse_conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    *,
    config: SparsityConfig | str,
    forward_mask: Tensor | None = None,
    backend: str = "auto",
    soft_scale: Tensor | None = None,
    grad_input_mask: Tensor | None = None,
    gw_state: Tensor | None = None,
    add_decay: bool = True,
) -> Tensor:
    """2-D convolution whose three GEMMs follow ``config`` (a SparsityConfig or recipe name).

    Same arguments and result shape as :func:`torch.nn.functional.conv2d` (``padding`` may
    be an int, a pair, ``'valid'`` or ``'same'``). ``forward_mask``: a precomputed bool mask
    for the forward weight (a module's cached TSM mask); computed from ``weight`` if omitted.
    ``grad_input_mask``: a cached S_Co mask for the grad_input weight (``mask_interval``).
    ``backend``: how the ``output``/``grad_input`` GEMMs run — ``auto`` (default),
    ``reference``, ``semi_structured`` or ``emulation`` (:mod:`fullsparse.kernels`).
    ``soft_scale``: β of an ``output_weight='soft_2:4'`` operand (a module's fixed β);
    computed from ``weight`` if omitted. ``gw_state``: a module's state of the sampled weight
    gradients (:class:`fullsparse.sampling.AdaptiveState`; None = count nothing).
    ``add_decay=False``: the backward leaves out the SR-STE decay (a later micro-batch of an
    optimizer step whose first added it).

    Raises:
        ValueError: wrong ndim, mismatched channels or groups, non-float dtype, bad geometry,
            unknown backend.
        fullsparse.kernels.BackendUnavailableError: ``backend='semi_structured'`` where it
            cannot run (the message says why and how to get it).
    """
    *plan, padded = _conv_plan(
        input, weight, bias, stride, padding, dilation, groups, config, backend
    )
    layer, kernel, geo, _ = plan  # the input is padded already: once
    return apply_conv(
        padded, weight, bias, layer, kernel, geo, None, forward_mask, soft_scale,
        grad_input_mask, gw_state, add_decay,
    )  # fmt: skip


def conv_plan(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: int | tuple[int, int],
    padding: int | tuple[int, int] | str,
    dilation: int | tuple[int, int],
    groups: int,
    config: SparsityConfig | str,
    backend: str,
) -> tuple[SparsityConfig, Any, ConvGeometry, tuple[int, int, int, int] | None]:
    """What :func:`sparse_conv2d` checks and chooses before its autograd function: the conv
    layers' config, the kernel, the geometry, and the input's explicit padding (an
    asymmetric ``'same'``; None: none). A module keeps the answer for the next calls of
    the same kind (:meth:`fullsparse.nn.SparseConv2d.forward`)."""
    return _conv_plan(input, weight, bias, stride, padding, dilation, groups, config, backend)[:4]


def _conv_plan(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: int | tuple[int, int],
    padding: int | tuple[int, int] | str,
    dilation: int | tuple[int, int],
    groups: int,
    config: SparsityConfig | str,
    backend: str,
) -> tuple[SparsityConfig, Any, ConvGeometry, tuple[int, int, int, int] | None, Tensor]:
    """:func:`conv_plan`, and the input with that padding applied (the kernel choice looks at
    it; :func:`sparse_conv2d` runs on it)."""
    config = _checked_call("sparse_conv2d", "conv", config, backend, input, weight, bias)
    if weight.ndim != 4:
        raise ValueError(
            f"sparse_conv2d weight must be 4-D [Co, Ci/groups, kh, kw], got shape "
            f"{tuple(weight.shape)}"
        )
    if input.ndim != 4:
        hint = " (unbatched input: use input.unsqueeze(0))" if input.ndim == 3 else ""
        raise ValueError(
            f"sparse_conv2d input must be 4-D [N, C, H, W], got shape {tuple(input.shape)}{hint}"
        )
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    co, cig, kh, kw = weight.shape
    if input.shape[1] != cig * groups:
        raise ValueError(
            f"sparse_conv2d: input has {input.shape[1]} channels but weight "
            f"{tuple(weight.shape)} with groups={groups} expects {cig * groups} "
            f"(= weight.shape[1] × groups)"
        )
    if co % groups:
        raise ValueError(f"sparse_conv2d: out channels {co} must be divisible by groups={groups}")
    if bias is not None and tuple(bias.shape) != (co,):
        raise ValueError(f"sparse_conv2d: bias must have shape ({co},), got {tuple(bias.shape)}")
    if _autocast_dtype(input.device.type) is None:
        _check_same_dtype(input, weight, bias, "sparse_conv2d")
    pad: tuple[int, int, int, int] | None = None
    if isinstance(padding, str):
        dil = pair(dilation, "dilation")
        if padding == "valid":
            padding = 0
        elif padding == "same":
            if pair(stride, "stride") != (1, 1):
                raise ValueError("padding='same' needs stride 1 (as in torch.nn.functional.conv2d)")
            left, right, top, bottom = _same_padding((kh, kw), dil)
            if (left, top) == (right, bottom):
                padding = (top, left)
            else:  # asymmetric: pad the input explicitly, outside the sparse op
                pad = (left, right, top, bottom)
                input = F.pad(input, pad)
                padding = 0
        else:
            raise ValueError(f"padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
    geo = ConvGeometry.make(stride, padding, dilation, groups)
    ho, wo = geo.output_size(tuple(input.shape[2:]), (kh, kw))
    if ho < 1 or wo < 1:
        raise ValueError(
            f"sparse_conv2d: input {tuple(input.shape)} is smaller than the dilated kernel "
            f"{(kh, kw)} (padding={geo.padding}, dilation={geo.dilation}): output would be "
            f"{ho}x{wo}"
        )
    compute = _autocast_dtype(input.device.type) or input.dtype
    kernel = select_conv_kernel(backend, config, input, weight, geo, compute)
    return config, kernel, geo, pad, input


def apply_conv(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    config: SparsityConfig,
    kernel: Any,
    geo: ConvGeometry,
    pad: tuple[int, int, int, int] | None = None,
    forward_mask: Tensor | None = None,
    soft_scale: Tensor | None = None,
    grad_input_mask: Tensor | None = None,
    gw_state: Tensor | None = None,
    add_decay: bool = True,
) -> Tensor:
    """The sparse convolution's autograd function on arguments :func:`conv_plan` has checked
    (its config, kernel, geometry and padding)."""
    if pad is not None:
        input = F.pad(input, pad)
    return _SparseConv2dFn.apply(
        input, weight, bias, geo, config, forward_mask, kernel, soft_scale, grad_input_mask,
        gw_state, add_decay,
    )  # fmt: skip


# --------------------------------------------------------------------------- linear
class _SparseLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        input: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        config: SparsityConfig,
        forward_mask: Tensor | None,
        kernel: Any,
        soft_scale: Tensor | None = None,
        grad_input_mask: Tensor | None = None,
        gw_state: Tensor | None = None,
        add_decay: bool = True,
    ) -> Tensor:
        config = config.for_kind("linear")  # the Linear layers' weight-gradient estimator
        ctx.gw_state = gw_state
        compute = _autocast_dtype(input.device.type) or input.dtype
        needs_dx, needs_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ops = weight_operands(
            weight, config, 1, compute, forward_mask, grad_input=needs_dx,
            decay=needs_dw and add_decay, soft_scale=soft_scale, grad_input_mask=grad_input_mask,
        )  # fmt: skip
        x, b = stash_forward(ctx, input, weight, bias, config, compute, kernel)
        with autocast_off(input.device.type):
            y = _not_a_view(kernel.output(x, ops.output, b))  # output (Eq. 1)
        ctx.save_for_backward(x, ops.grad_input, _decay_source(ops, weight))
        ctx.decay_scale = ops.decay_scale
        return y

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        x, w_gi, decay = ctx.saved_tensors
        config = ctx.config
        input_dtype, weight_dtype, bias_dtype = ctx.dtypes
        dy = cast(grad_output, ctx.compute)
        grad_input = grad_weight = grad_bias = None
        with autocast_off(x.device.type):
            # ---- grad_input (Eq. 2): dX = dY_gi · W_gi
            if ctx.needs_input_grad[0]:
                dy_gi = _linear_dy_gi(config, dy)
                grad_input = cast(ctx.kernel.grad_input(dy_gi, w_gi), input_dtype)
            # ---- grad_weight (Eq. 3): dW = dY_gwᵀ · X_gw, + λ·(W − W_out) (Eq. 6)
            if ctx.needs_input_grad[1]:
                mode, alpha = config.grad_weight_mode, config.ir_alpha
                sampling = sampling_args(config, ctx.gw_state)
                gemm = getattr(ctx.kernel, "gemm", None)
                dw = linear_grad_weight(x, dy, mode, alpha, **sampling, gemm=gemm)
                dw = cast(dw, weight_dtype)
                grad_weight = _plus(dw, decay, ctx.decay_scale)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_bias = dy.reshape(-1, dy.shape[-1]).sum(0).to(bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


def sparse_linear(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    config: SparsityConfig | str,
    forward_mask: Tensor | None = None,
    backend: str = "auto",
    soft_scale: Tensor | None = None,
    grad_input_mask: Tensor | None = None,
    gw_state: Tensor | None = None,
    add_decay: bool = True,
) -> Tensor:
    """Linear layer ``y = x · W_outᵀ + b`` whose three GEMMs follow ``config``.

    ``input`` is ``[..., T, d_in]`` (tokens on dim -2; the FST weight gradient pairs adjacent
    tokens) or ``[B, d_in]`` (no token axis: dense weight gradient) or ``[d_in]``.
    ``forward_mask`` / ``grad_input_mask``: cached masks, as for :func:`sparse_conv2d`.
    ``backend``: how the ``output``/``grad_input`` GEMMs run — ``auto`` (default),
    ``reference``, ``semi_structured`` or ``emulation`` (:mod:`fullsparse.kernels`).
    ``soft_scale``: β of a ``soft_2:4`` forward operand; computed from ``weight`` if omitted.
    ``gw_state``: as for :func:`sparse_conv2d`.
    ``add_decay=False``: no SR-STE decay in the backward, as for :func:`sparse_conv2d`.

    Raises ``ValueError`` (wrong ndim, mismatched features, non-float dtype, unknown
    backend) and ``BackendUnavailableError`` as :func:`sparse_conv2d` does.
    """
    layer, kernel = linear_plan(input, weight, bias, config, backend)
    return apply_linear(
        input, weight, bias, layer, kernel, forward_mask, soft_scale, grad_input_mask, gw_state,
        add_decay,
    )  # fmt: skip


def linear_plan(
    input: Tensor, weight: Tensor, bias: Tensor | None, config: SparsityConfig | str, backend: str
) -> tuple[SparsityConfig, Any]:
    """What :func:`sparse_linear` checks and chooses before its autograd function: the
    Linear layers' config and the kernel. A module keeps the answer for the next calls of
    the same kind (:meth:`fullsparse.nn.SparseLinear.forward`)."""
    config = _checked_call("sparse_linear", "linear", config, backend, input, weight, bias)
    if weight.ndim != 2:
        raise ValueError(
            f"sparse_linear weight must be 2-D [d_out, d_in], got shape {tuple(weight.shape)}"
        )
    if input.ndim < 1:
        raise ValueError("sparse_linear input must have at least 1 dimension, got a scalar")
    if input.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"sparse_linear: input has {input.shape[-1]} features (last dim of "
            f"{tuple(input.shape)}) but weight {tuple(weight.shape)} expects {weight.shape[1]}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"sparse_linear: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}"
        )
    if _autocast_dtype(input.device.type) is None:
        _check_same_dtype(input, weight, bias, "sparse_linear")
    compute = _autocast_dtype(input.device.type) or input.dtype
    return config.for_kind("linear"), select_linear_kernel(backend, config, input, weight, compute)


def apply_linear(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    config: SparsityConfig,
    kernel: Any,
    forward_mask: Tensor | None = None,
    soft_scale: Tensor | None = None,
    grad_input_mask: Tensor | None = None,
    gw_state: Tensor | None = None,
    add_decay: bool = True,
) -> Tensor:
    """The sparse Linear layer's autograd function on arguments :func:`linear_plan` has
    checked (``config`` and ``kernel`` as it returned them)."""
    if input.ndim == 1:  # [d_in]: a batch of one
        return _SparseLinearFn.apply(
            input.unsqueeze(0), weight, bias, config, forward_mask, kernel, soft_scale,
            grad_input_mask, gw_state, add_decay,
        )[0]  # fmt: skip
    return _SparseLinearFn.apply(
        input, weight, bias, config, forward_mask, kernel, soft_scale, grad_input_mask, gw_state,
        add_decay,
    )  # fmt: skip
