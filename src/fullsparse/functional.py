"""Sparse Conv2d and Linear as custom autograd functions (``fst-spec.md``, recipes table).

Each layer is three GEMMs, written out below in labelled roles:

- ``output``      (Eq. 1) ``y  = W_out · X``                — reduction over K
- ``grad_input``  (Eq. 2) ``dX = W_giᵀ · dY_gi``             — reduction over Co
- ``grad_weight`` (Eq. 3) ``dW = dY · Xᵀ`` (+ λ·(W − W_out)) — reduction over N·Ho·Wo / tokens

A frozen :class:`~fullsparse.config.SparsityConfig` decides what each operand is; the
functions never ask which recipe they run. Operands are prepared here (2:4 operands as
masked dense tensors); a *kernel* object chosen before the autograd function runs
(:mod:`fullsparse.kernels`, the ``backend=`` argument) computes the ``output`` and
``grad_input`` GEMMs from them — dense PyTorch ops (``reference``) or 2:4 sparse tensor
cores (``semi_structured``) — and the functions never ask which. The FST weight gradient
is a half-size strided product — half the FLOPs on any hardware, no sparse kernel needed —
and is the same on every backend.

Shapes: conv ``input [N, Ci, H, W]``, ``weight [Co, Ci/g, kh, kw]``, ``grad_output
[N, Co, Ho, Wo]``; linear ``input [..., T, d_in]`` (or ``[B, d_in]``), ``weight
[d_out, d_in]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fullsparse.config import SparsityConfig, resolve_config
from fullsparse.kernels import (
    REFERENCE_CONV,
    REFERENCE_LINEAR,
    check_backend,
    select_conv_kernel,
    select_linear_kernel,
)
from fullsparse.kernels.reference import conv_backward, conv_grad_input, conv_output
from fullsparse.masks import is_2to4, mask_2to4, transposable_mask_2to4

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

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------- operands
def _weight_2d(weight: Tensor) -> Tensor:
    """``W2 = W.reshape(Co, K)``, the im2col layout (channel-major, then kh, then kw)."""
    return weight.reshape(weight.shape[0], -1)


def mask_k(weight: Tensor, conv_layout: str = "im2col") -> Tensor:
    """S_K: magnitude 2:4 mask along K (the forward operand's mask), ``weight``'s shape.

    ``conv_layout`` (:data:`~fullsparse.config.CONV_LAYOUT`) says how a conv weight
    ``[Co, Ci, kh, kw]`` is grouped: ``im2col`` — 4 consecutive entries of ``W2``'s row
    ``Ci·kh·kw`` (channel-major, so a group mixes taps when kh·kw is not a multiple of 4);
    ``channel`` — 4 consecutive input channels at each tap ``(co, kh, kw)``, which is what
    ASP/TensorRT sparse convolutions read. A Linear weight ``[d_out, d_in]`` and a 1×1 conv
    are grouped the same way under both.
    """
    if conv_layout == "channel" and weight.ndim == 4:
        return mask_2to4(weight, dim=1)
    if conv_layout not in ("im2col", "channel"):
        raise ValueError(f"conv_layout must be 'im2col' or 'channel', got {conv_layout!r}")
    return mask_2to4(_weight_2d(weight), dim=1).reshape(weight.shape)


def is_2to4_k(weight: Tensor, conv_layout: str = "im2col") -> bool:
    """Whether ``weight`` is 2:4 along K in ``conv_layout``'s groups (see :func:`mask_k`)."""
    if conv_layout == "channel" and weight.ndim == 4:
        return is_2to4(weight, dim=1)
    if conv_layout not in ("im2col", "channel"):
        raise ValueError(f"conv_layout must be 'im2col' or 'channel', got {conv_layout!r}")
    return is_2to4(_weight_2d(weight), dim=1)


def mask_co(weight: Tensor, groups: int = 1) -> Tensor:
    """S_Co: magnitude 2:4 mask along the output channels, within each group.

    The ``grad_input`` GEMM of group g reduces over that group's Co/g output channels, so
    the groups of 4 never straddle two conv groups.
    """
    co = weight.shape[0]
    per_group = weight.reshape(groups, co // groups, -1)  # [g, Co/g, K]
    return mask_2to4(per_group, dim=1).reshape(weight.shape)


def transposable_mask(weight: Tensor, groups: int = 1) -> Tensor:
    """TSM mask: 2:4 along K and along Co of each group's ``W2`` at once."""
    co = weight.shape[0]
    per_group = weight.reshape(groups, co // groups, -1)
    return transposable_mask_2to4(per_group).reshape(weight.shape)


def output_weight_mask(
    weight: Tensor, config: SparsityConfig, groups: int = 1, forward_mask: Tensor | None = None
) -> Tensor | None:
    """Mask of the ``output`` GEMM's weight operand, or ``None`` when it is dense.

    ``forward_mask`` (a module's cached TSM mask) is used as is when given.
    """
    if config.output == "dense":
        return None
    if forward_mask is not None:
        if forward_mask.shape != weight.shape or forward_mask.dtype != torch.bool:
            raise ValueError(
                f"forward_mask must be a bool tensor of the weight's shape {tuple(weight.shape)}"
                f", got {forward_mask.dtype} {tuple(forward_mask.shape)}"
            )
        return forward_mask
    if config.output == "2:4":
        return mask_k(weight, config.conv_layout)
    return transposable_mask(weight, groups)


def grad_input_weight(
    weight: Tensor, out_mask: Tensor | None, config: SparsityConfig, groups: int = 1
) -> Tensor:
    """Weight operand of the ``grad_input`` GEMM (Eq. 2) for ``config``.

    ``forward``: the forward operand (exact gradient of Eq. 1); ``2:4_co``: S_Co(W_src) with
    ``W_src`` = W (``grad_input_source='dense'``) or S_K(W) (``'pruned'``).
    """
    if config.grad_input == "dense":
        return weight
    if config.grad_input == "forward":
        return weight if out_mask is None else weight * out_mask
    src = weight
    if config.grad_input_source == "pruned" and out_mask is not None:
        src = weight * out_mask
    return src * mask_co(src, groups)


def _mask_channels(grad_output: Tensor, channel_dim: int, groups: int) -> Tensor:
    """S_Co(dY): 2:4 along the channel axis at every position, within each group."""
    moved = grad_output.movedim(channel_dim, -1)
    shape = moved.shape
    per_group = moved.reshape(*shape[:-1], groups, shape[-1] // groups)
    mask = mask_2to4(per_group, dim=-1).reshape(shape).movedim(-1, channel_dim)
    return grad_output * mask


def _mask_spatial_conv(t: Tensor) -> Tensor:
    """S_T for ``[N, C, H, W]``: 2:4 along N·H·W flattened per channel in (n, h, w) order."""
    n, c, h, w = t.shape
    rows = t.transpose(0, 1).reshape(c, n * h * w)
    mask = mask_2to4(rows, dim=1).reshape(c, n, h, w).transpose(0, 1)
    return t * mask


# --------------------------------------------------------------------------- geometry
def _pair(v: int | tuple[int, ...] | list[int], name: str) -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if (
        isinstance(v, (tuple, list))
        and len(v) == 2
        and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
    ):
        return (int(v[0]), int(v[1]))
    if isinstance(v, (tuple, list)) and len(v) == 1 and isinstance(v[0], int):
        return (int(v[0]), int(v[0]))
    raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")


@dataclass(frozen=True)
class ConvGeometry:
    """Stride, padding, dilation and groups of a 2-D convolution, normalised to pairs."""

    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    @classmethod
    def make(
        cls,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
    ) -> ConvGeometry:
        geo = cls(
            _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation"), groups
        )
        if min(geo.stride) < 1 or min(geo.dilation) < 1 or min(geo.padding) < 0:
            raise ValueError(
                f"conv needs stride >= 1, dilation >= 1 and padding >= 0, got stride="
                f"{geo.stride}, padding={geo.padding}, dilation={geo.dilation}"
            )
        if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
            raise ValueError(f"groups must be a positive int, got {groups!r}")
        return geo

    def output_size(self, hw: tuple[int, int], khw: tuple[int, int]) -> tuple[int, int]:
        return tuple(  # type: ignore[return-value]
            (hw[i] + 2 * self.padding[i] - self.dilation[i] * (khw[i] - 1) - 1) // self.stride[i]
            + 1
            for i in range(2)
        )


# --------------------------------------------------------------------------- the GEMMs
# conv_output (Eq. 1) and conv_grad_input (Eq. 2) live in fullsparse.kernels.reference (the
# reference kernel) and are re-exported above under their old names.


def _conv_weight_grad(
    grad_output: Tensor, input: Tensor, weight: Tensor, geo: ConvGeometry
) -> Tensor:
    return conv_backward(grad_output, input, weight, geo, "weight")


def ir_grad_output(grad_output: Tensor, alpha: float, dim: int) -> Tensor:
    """Information restoration (Eq. 10) along ``dim``: keep the even positions and add the
    gradient of each dropped odd neighbour to its kept partner.

    ``dY_ir[..., j] = dY[..., 2j] + α·dY[..., 2j+1]``; when the size is odd the last even
    position has no partner and is kept alone. The result has ``ceil(size/2)`` positions.
    """
    size = grad_output.shape[dim]
    dim = dim % grad_output.ndim
    index = [slice(None)] * grad_output.ndim
    index[dim] = slice(0, None, 2)
    out = grad_output[tuple(index)].clone()
    if alpha != 0.0 and size > 1:
        index[dim] = slice(1, None, 2)
        odd = grad_output[tuple(index)]
        out.narrow(dim, 0, odd.shape[dim]).add_(odd, alpha=alpha)
    return out


def conv_grad_weight(
    input: Tensor,
    grad_output: Tensor,
    weight: Tensor,
    geo: ConvGeometry,
    mode: str = "dense",
    alpha: float = 0.0,
) -> Tensor:
    """``grad_weight`` (Eq. 3) of a convolution in one of the config's modes.

    - ``dense``: ``dY · Xᵀ``.
    - ``ir``: ``(dY + α·dY·T) · F(Xᵀ)`` (Eq. 7-10) computed as what it equals: a weight
      gradient over the even output columns only, i.e. a convolution with stride
      ``(sh, 2·sw)`` against ``dY_ir`` of width ``ceil(Wo/2)`` — half the FLOPs.
    - ``2:4_grad_output``: ``S_T(dY) · Xᵀ`` (WG).
    - ``2:4_input``: ``dY · S_T(Xᵀ)`` (WX), on the explicit im2col matrix (the sparsity is on
      its columns, which no convolution can express) — a study recipe, not a fast one.

    ``weight`` gives the shape (and dtype) of the result.
    """
    if mode == "dense":
        return _conv_weight_grad(grad_output, input, weight, geo)
    if mode == "ir":
        dy_ir = ir_grad_output(grad_output, alpha, dim=3)
        if input.is_contiguous(memory_format=torch.channels_last):
            dy_ir = dy_ir.contiguous(memory_format=torch.channels_last)
        half = ConvGeometry(
            (geo.stride[0], 2 * geo.stride[1]), geo.padding, geo.dilation, geo.groups
        )
        return _conv_weight_grad(dy_ir, input, weight, half)
    if mode == "2:4_grad_output":
        return _conv_weight_grad(_mask_spatial_conv(grad_output), input, weight, geo)
    if mode == "2:4_input":
        return _conv_grad_weight_pruned_input(input, grad_output, weight, geo)
    raise ValueError(f"unknown grad_weight mode {mode!r}")


def _conv_grad_weight_pruned_input(
    input: Tensor, grad_output: Tensor, weight: Tensor, geo: ConvGeometry
) -> Tensor:
    co, cig, kh, kw = weight.shape
    g = geo.groups
    n = input.shape[0]
    cols = F.unfold(input, (kh, kw), geo.dilation, geo.padding, geo.stride)  # [N, Ci·kh·kw, L]
    l = cols.shape[-1]
    rows = cols.transpose(0, 1).reshape(cols.shape[1], n * l)  # [K_total, N·L], (n, l) order
    rows = rows * mask_2to4(rows, dim=1)
    rows = rows.reshape(g, cig * kh * kw, n * l)  # group g's channels are contiguous rows
    dy = grad_output.transpose(0, 1).reshape(g, co // g, n * l)  # [g, Co/g, N·L]
    dw = torch.bmm(dy, rows.transpose(1, 2))  # [g, Co/g, K]
    return dw.reshape(weight.shape)


def linear_grad_weight(
    input: Tensor, grad_output: Tensor, mode: str = "dense", alpha: float = 0.0
) -> Tensor:
    """``grad_weight`` (Eq. 3) of a linear layer: ``[d_out, d_in]``.

    ``ir`` pairs adjacent tokens ``(2j, 2j+1)`` along the token axis (dim -2) of a
    ``[..., T, d]`` input and multiplies by the even tokens only; a 2-D ``[B, d]`` input has
    no token axis, so its weight gradient stays dense. ``2:4_grad_output`` / ``2:4_input``
    apply S_T along the flattened leading axes (batch × tokens).
    """
    d_in, d_out = input.shape[-1], grad_output.shape[-1]
    if mode == "ir" and input.ndim >= 3:
        dy = ir_grad_output(grad_output, alpha, dim=-2)
        x = input[..., 0::2, :]
        return dy.reshape(-1, d_out).t().mm(x.reshape(-1, d_in))
    dy2, x2 = grad_output.reshape(-1, d_out), input.reshape(-1, d_in)
    if mode == "2:4_grad_output":
        dy2 = dy2 * mask_2to4(dy2, dim=0)
    elif mode == "2:4_input":
        x2 = x2 * mask_2to4(x2, dim=0)
    elif mode not in ("dense", "ir"):
        raise ValueError(f"unknown grad_weight mode {mode!r}")
    return dy2.t().mm(x2)


# --------------------------------------------------------------------------- per recipe
# The backward roles as a config reads them; the autograd functions and the benchmarks both
# call these, so what is timed is what trains. ``grad_output``/``input`` are in the compute
# dtype; ``weight`` is the master weight (masks are taken from it, in its own precision).


def decay_term(weight: Tensor, out_mask: Tensor | None, config: SparsityConfig) -> Tensor | None:
    """SR-STE (Eq. 6): ``λ·(W − S(W))`` = ``λ·W`` on the pruned entries, or None."""
    if not config.decay or out_mask is None:
        return None
    return config.decay * (weight * ~out_mask)


def conv_grad_input_for(
    config: SparsityConfig,
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor,
    out_mask: Tensor | None,
    geo: ConvGeometry,
    *,
    kernel: Any = REFERENCE_CONV,
) -> Tensor:
    """``grad_input`` (Eq. 2) of a conv: ``dX = W_giᵀ · dY_gi`` with the config's operands,
    computed by ``kernel`` (:mod:`fullsparse.kernels`; the reference conv by default)."""
    w_gi = grad_input_weight(weight, out_mask, config, geo.groups).to(grad_output.dtype)
    dy_gi = grad_output
    if config.grad_input_grad_output == "2:4_co":
        dy_gi = _mask_channels(grad_output, 1, geo.groups)
    return kernel.grad_input(dy_gi, input, w_gi, geo)


def conv_grad_weight_for(
    config: SparsityConfig,
    input: Tensor,
    grad_output: Tensor,
    weight: Tensor,
    out_mask: Tensor | None,
    geo: ConvGeometry,
) -> Tensor:
    """``grad_weight`` (Eq. 3) of a conv in the config's mode, plus the SR-STE decay; in the
    weight's dtype."""
    grad = conv_grad_weight(
        input,
        grad_output,
        weight.to(grad_output.dtype),
        geo,
        config.grad_weight,
        config.ir_alpha,
    ).to(weight.dtype)
    decay = decay_term(weight, out_mask, config)
    return grad if decay is None else grad + decay


def linear_grad_input_for(
    config: SparsityConfig,
    grad_output: Tensor,
    weight: Tensor,
    out_mask: Tensor | None,
    *,
    kernel: Any = REFERENCE_LINEAR,
) -> Tensor:
    """``grad_input`` (Eq. 2) of a linear layer: ``dX = dY_gi · W_gi``, computed by
    ``kernel`` (:mod:`fullsparse.kernels`; a dense matmul by default)."""
    w_gi = grad_input_weight(weight, out_mask, config, 1).to(grad_output.dtype)
    dy_gi = grad_output
    if config.grad_input_grad_output == "2:4_co":
        dy_gi = grad_output * mask_2to4(grad_output, dim=-1)
    return kernel.grad_input(dy_gi, w_gi)


def linear_grad_weight_for(
    config: SparsityConfig,
    input: Tensor,
    grad_output: Tensor,
    weight: Tensor,
    out_mask: Tensor | None,
) -> Tensor:
    """``grad_weight`` (Eq. 3) of a linear layer plus the SR-STE decay, in the weight's dtype."""
    grad = linear_grad_weight(input, grad_output, config.grad_weight, config.ir_alpha)
    grad = grad.to(weight.dtype)
    decay = decay_term(weight, out_mask, config)
    return grad if decay is None else grad + decay


# --------------------------------------------------------------------------- checks
def _check_tensor(t: object, what: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT:
        raise ValueError(
            f"{what} must be floating point (float16, bfloat16, float32 or float64), "
            f"got dtype {t.dtype}"
        )
    return t


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _check_same_dtype(input: Tensor, weight: Tensor, bias: Tensor | None, who: str) -> None:
    dtypes = {input.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set())
    if len(dtypes) > 1:
        raise ValueError(
            f"{who}: input ({input.dtype}), weight ({weight.dtype})"
            + (f" and bias ({bias.dtype})" if bias is not None else "")
            + " must share one dtype outside autocast"
        )


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
    ) -> Tensor:
        compute = _autocast_dtype(input.device.type) or input.dtype
        out_mask = output_weight_mask(weight, config, geo.groups, forward_mask)
        x = input.to(compute)
        w = weight.to(compute)
        w_out = w if out_mask is None else w * out_mask
        b = bias.to(compute) if bias is not None else None
        with torch.autocast(input.device.type, enabled=False):
            y = kernel.output(x, w_out, b, geo)  # output (Eq. 1)
        ctx.save_for_backward(x, weight, out_mask)
        ctx.geo, ctx.config, ctx.compute, ctx.kernel = geo, config, compute, kernel
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.input_dtype = input.dtype
        return y

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        x, weight, out_mask = ctx.saved_tensors
        geo, config, compute = ctx.geo, ctx.config, ctx.compute
        dy = grad_output.to(compute)
        grad_input = grad_weight = grad_bias = None
        with torch.autocast(x.device.type, enabled=False):
            # ---- grad_input (Eq. 2): dX = W_giᵀ · dY_gi
            if ctx.needs_input_grad[0]:  # grad_input (Eq. 2)
                grad_input = conv_grad_input_for(
                    config, dy, x, weight, out_mask, geo, kernel=ctx.kernel
                )
                grad_input = grad_input.to(ctx.input_dtype)
            if ctx.needs_input_grad[1]:  # grad_weight (Eq. 3) + SR-STE decay (Eq. 6)
                grad_weight = conv_grad_weight_for(config, x, dy, weight, out_mask, geo)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_bias = dy.sum((0, 2, 3)).to(ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None


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
) -> Tensor:
    """2-D convolution whose three GEMMs follow ``config`` (a SparsityConfig or recipe name).

    Same arguments and result shape as :func:`torch.nn.functional.conv2d` (``padding`` may
    be an int, a pair, ``'valid'`` or ``'same'``). ``forward_mask``: a precomputed bool mask
    for the forward weight (a module's cached TSM mask); computed from ``weight`` if omitted.
    ``backend``: how the ``output``/``grad_input`` GEMMs run — ``auto`` (default),
    ``reference``, ``semi_structured`` or ``emulation`` (:mod:`fullsparse.kernels`).

    Raises:
        ValueError: wrong ndim, mismatched channels or groups, non-float dtype, bad geometry,
            unknown backend.
        fullsparse.kernels.BackendUnavailableError: ``backend='semi_structured'`` where it
            cannot run (the message says why and how to get it).
    """
    config = resolve_config(config)
    check_backend(backend)
    _check_tensor(input, "sparse_conv2d input")
    _check_tensor(weight, "sparse_conv2d weight")
    if bias is not None:
        _check_tensor(bias, "sparse_conv2d bias")
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
    if isinstance(padding, str):
        dil = _pair(dilation, "dilation")
        if padding == "valid":
            padding = 0
        elif padding == "same":
            if _pair(stride, "stride") != (1, 1):
                raise ValueError("padding='same' needs stride 1 (as in torch.nn.functional.conv2d)")
            left, right, top, bottom = _same_padding((kh, kw), dil)
            if (left, top) == (right, bottom):
                padding = (top, left)
            else:  # asymmetric: pad the input explicitly, outside the sparse op
                input = F.pad(input, (left, right, top, bottom))
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
    return _SparseConv2dFn.apply(input, weight, bias, geo, config, forward_mask, kernel)


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
    ) -> Tensor:
        compute = _autocast_dtype(input.device.type) or input.dtype
        out_mask = output_weight_mask(weight, config, 1, forward_mask)
        x = input.to(compute)
        w = weight.to(compute)
        w_out = w if out_mask is None else w * out_mask
        b = bias.to(compute) if bias is not None else None
        with torch.autocast(input.device.type, enabled=False):
            y = kernel.output(x, w_out, b)  # output (Eq. 1)
        ctx.save_for_backward(x, weight, out_mask)
        ctx.config, ctx.compute, ctx.kernel = config, compute, kernel
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.input_dtype = input.dtype
        return y

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        x, weight, out_mask = ctx.saved_tensors
        config, compute = ctx.config, ctx.compute
        dy = grad_output.to(compute)
        grad_input = grad_weight = grad_bias = None
        with torch.autocast(x.device.type, enabled=False):
            # ---- grad_input (Eq. 2): dX = dY_gi · W_gi
            if ctx.needs_input_grad[0]:  # grad_input (Eq. 2)
                grad_input = linear_grad_input_for(config, dy, weight, out_mask, kernel=ctx.kernel)
                grad_input = grad_input.to(ctx.input_dtype)
            if ctx.needs_input_grad[1]:  # grad_weight (Eq. 3) + SR-STE decay (Eq. 6)
                grad_weight = linear_grad_weight_for(config, x, dy, weight, out_mask)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_bias = dy.reshape(-1, dy.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None


def sparse_linear(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    config: SparsityConfig | str,
    forward_mask: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Linear layer ``y = x · W_outᵀ + b`` whose three GEMMs follow ``config``.

    ``input`` is ``[..., T, d_in]`` (tokens on dim -2; the FST weight gradient pairs adjacent
    tokens) or ``[B, d_in]`` (no token axis: dense weight gradient) or ``[d_in]``.
    ``backend``: how the ``output``/``grad_input`` GEMMs run — ``auto`` (default),
    ``reference``, ``semi_structured`` or ``emulation`` (:mod:`fullsparse.kernels`).

    Raises:
        ValueError: wrong ndim, mismatched features, non-float dtype, unknown backend.
        fullsparse.kernels.BackendUnavailableError: ``backend='semi_structured'`` where it
            cannot run (the message says why and how to get it).
    """
    config = resolve_config(config)
    check_backend(backend)
    _check_tensor(input, "sparse_linear input")
    _check_tensor(weight, "sparse_linear weight")
    if bias is not None:
        _check_tensor(bias, "sparse_linear bias")
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
    kernel = select_linear_kernel(backend, config, input, weight, compute)
    if input.ndim == 1:
        return _SparseLinearFn.apply(
            input.unsqueeze(0), weight, bias, config, forward_mask, kernel
        )[0]
    return _SparseLinearFn.apply(input, weight, bias, config, forward_mask, kernel)
