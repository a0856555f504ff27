"""The backward roles of a sparse layer outside its autograd function: the weight gradient
of every ``grad_weight_mode`` (Eq. 3) for Conv2d and Linear, and the ``grad_input`` /
``grad_weight`` roles as a :class:`~fullsparse.config.SparsityConfig` reads them, each from
the master weight (``docs/spec.md``, "Recipes").

:mod:`fullsparse.functional`'s autograd functions call these for the weight gradient; the
plain reference path (:mod:`fullsparse.reference_autograd`) and the benchmarks call the
per-role functions. :mod:`fullsparse.functional` re-exports every public name here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fullsparse.config import SparsityConfig
from fullsparse.estimators import mvue_key
from fullsparse.geometry import ConvGeometry
from fullsparse.kernels import REFERENCE_CONV, REFERENCE_LINEAR
from fullsparse.kernels.reference import conv_backward
from fullsparse.masks import mask_2to4
from fullsparse.operands import (
    decay_term,
    grad_input_weight,
    ir_grad_output,
    mask_channels,
    mask_spatial_conv,
    mvue_spatial_conv,
    mvue_tokens,
    topk_channels,
)
from fullsparse.sampled_grad import conv_sampled_grad_weight, linear_sampled_grad_weight
from fullsparse.sampling import SAMPLED_MODES

__all__ = [
    "conv_grad_weight",
    "linear_grad_weight",
    "conv_grad_input_for",
    "conv_grad_weight_for",
    "linear_grad_input_for",
    "linear_grad_weight_for",
    "sampling_args",
]


# --------------------------------------------------------------------------- grad_weight
# conv_output (Eq. 1) and conv_grad_input (Eq. 2) live in fullsparse.kernels.reference (the
# reference kernel) and are re-exported above.


def conv_grad_weight(
    input: Tensor,
    grad_output: Tensor,
    weight: Tensor,
    geo: ConvGeometry,
    mode: str = "dense",
    alpha: float = 0.0,
    *,
    state: Tensor | None = None,
    budget: float = 0.2,
    interval: int = 50,
    group: int = 4,
    share: float = 0.5,
    unit: str = "block",
) -> Tensor:
    """``grad_weight`` (Eq. 3) of a convolution in one of the config's modes.

    - ``dense``: ``dY · Xᵀ``.
    - ``ir``: ``(dY + α·dY·T) · F(Xᵀ)`` (Eq. 7-10) computed as what it equals: a weight
      gradient over the even output columns only, i.e. a convolution with stride
      ``(sh, 2·sw)`` against ``dY_ir`` of width ``ceil(Wo/2)`` — half the FLOPs.
    - ``2:4_grad_output``: ``S_T(dY) · Xᵀ`` (WG).
    - ``2:4_input``: ``dY · S_T(Xᵀ)`` (WX), on the explicit im2col matrix (the sparsity is on
      its columns, which no convolution can express) — a study recipe, not a fast one.
    - ``mvue``: ``MVUE_T(dY) · Xᵀ``, dY sparsified at random, 2:4 along N·Ho·Wo per output
      channel and unbiased (one draw from torch's default generator per call).
    - ``topk_grad_output``: ``TopK(dY) · Xᵀ`` (meProp; top-k along Co at each position).
    - ``rand_half`` / ``is_half`` / ``is_adaptive``: the product over a random sample of the
      output columns, unbiased (:mod:`fullsparse.sampled_grad`; ``state``, ``budget`` and
      ``interval``: the layer's adaptive state and its config's variance budget; ``group``
      and ``share``: its sampling groups and the share ``is_half`` keeps; ``unit``: column
      blocks or whole samples).

    ``weight`` gives the shape (and dtype) of the result; its values are not read.
    """
    if mode in SAMPLED_MODES:
        return conv_sampled_grad_weight(
            input, grad_output, weight, geo, mode, state, budget, interval, group, share, unit
        )
    if mode == "dense":
        return conv_backward(grad_output, input, weight, geo, "weight")
    if mode == "ir":
        dy_ir = ir_grad_output(grad_output, alpha, dim=3)
        if input.is_contiguous(memory_format=torch.channels_last):
            dy_ir = dy_ir.contiguous(memory_format=torch.channels_last)
        half = geo.with_stride((geo.stride[0], 2 * geo.stride[1]))
        return conv_backward(dy_ir, input, weight, half, "weight")
    if mode == "2:4_grad_output":
        return conv_backward(mask_spatial_conv(grad_output), input, weight, geo, "weight")
    if mode == "2:4_input":
        return _conv_grad_weight_pruned_input(input, grad_output, weight, geo)
    if mode == "mvue":
        dy_mvue = mvue_spatial_conv(grad_output)
        if input.is_contiguous(memory_format=torch.channels_last):
            dy_mvue = dy_mvue.contiguous(memory_format=torch.channels_last)
        return conv_backward(dy_mvue, input, weight, geo, "weight")
    if mode == "topk_grad_output":
        return conv_backward(topk_channels(grad_output, 1), input, weight, geo, "weight")
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
    input: Tensor,
    grad_output: Tensor,
    mode: str = "dense",
    alpha: float = 0.0,
    *,
    state: Tensor | None = None,
    budget: float = 0.2,
    interval: int = 50,
    group: int = 4,
    share: float = 0.5,
    gemm: Any = None,
) -> Tensor:
    """``grad_weight`` (Eq. 3) of a linear layer: ``[d_out, d_in]``.

    ``ir`` pairs adjacent tokens ``(2j, 2j+1)`` along the token axis (dim -2) of a
    ``[..., T, d]`` input and multiplies by the even tokens only; a 2-D ``[B, d]`` input has
    no token axis, so its weight gradient stays dense. ``2:4_grad_output`` / ``2:4_input``
    apply S_T, and ``mvue`` its random unbiased counterpart, along the flattened leading axes
    (batch × tokens; the batch axis of a 2-D input); ``topk_grad_output`` keeps
    the top-k of each token's dY along d_out (meProp). The sampled modes
    (:data:`~fullsparse.sampling.SAMPLED_MODES`) keep a random sample of the rows of the
    flattened leading axes, unbiased (:mod:`fullsparse.sampled_grad`).

    ``gemm``: a backend's GEMM (``cpu_sparse``) whose ``weight_product(dy2, x2)`` /
    ``mvue_weight_product(dy2, x2, key)`` compute ``dy2ᵀ · x2`` on a 2:4 kernel for the modes
    whose dY is 2:4 along the tokens (``2:4_grad_output``, ``mvue``: the same draws), or
    return None to leave it to the dense product.
    """
    d_in, d_out = input.shape[-1], grad_output.shape[-1]
    if mode in SAMPLED_MODES:
        x2, dy2 = input.reshape(-1, d_in), grad_output.reshape(-1, d_out)
        return linear_sampled_grad_weight(x2, dy2, mode, state, budget, interval, group, share)
    if mode == "ir" and input.ndim >= 3:
        dy = ir_grad_output(grad_output, alpha, dim=-2)
        x = input[..., 0::2, :]
        return dy.reshape(-1, d_out).t().mm(x.reshape(-1, d_in))
    dy2, x2 = grad_output.reshape(-1, d_out), input.reshape(-1, d_in)
    if mode == "2:4_grad_output":
        dy2 = dy2 * mask_2to4(dy2, dim=0)
    elif mode == "2:4_input":
        x2 = x2 * mask_2to4(x2, dim=0)
    elif mode == "mvue":
        key = mvue_key(None, dy2.device)
        fused = getattr(gemm, "mvue_weight_product", None)
        product = None if fused is None or key is None else fused(dy2, x2, key)
        if product is not None:
            return product
        dy2 = mvue_tokens(dy2, key=key)
    elif mode == "topk_grad_output":
        dy2 = topk_channels(dy2, -1)
    elif mode not in ("dense", "ir"):
        raise ValueError(f"unknown grad_weight mode {mode!r}")
    if mode == "2:4_grad_output" and hasattr(gemm, "weight_product"):
        product = gemm.weight_product(dy2, x2)
        if product is not None:
            return product
    return dy2.t().mm(x2)


# --------------------------------------------------------------------------- per role
# The backward roles as a config reads them, each from the master weight: the plain
# reference path (fullsparse.reference_autograd) and the benchmarks call these.
# ``grad_output``/``input`` are in the compute dtype; ``weight`` is the master weight.


def conv_grad_input_for(
    config: SparsityConfig,
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor,
    out_mask: Tensor | None,
    geo: ConvGeometry,
    *,
    kernel: Any = REFERENCE_CONV,
    soft_scale: Tensor | None = None,
) -> Tensor:
    """``grad_input`` (Eq. 2) of a conv: ``dX = W_giᵀ · dY_gi`` with the config's operands,
    computed by ``kernel`` (:mod:`fullsparse.kernels`; the reference conv by default)."""
    w_gi = grad_input_weight(weight, out_mask, config, geo.groups, soft_scale)
    w_gi = w_gi.to(grad_output.dtype)
    return kernel.grad_input(_conv_dy_gi(config, grad_output, geo), input, w_gi, geo)


def conv_grad_weight_for(
    config: SparsityConfig,
    input: Tensor,
    grad_output: Tensor,
    weight: Tensor,
    out_mask: Tensor | None,
    geo: ConvGeometry,
    gw_state: Tensor | None = None,
) -> Tensor:
    """``grad_weight`` (Eq. 3) of a conv in the config's mode, plus the SR-STE decay; in the
    weight's dtype."""
    mode, alpha = config.grad_weight_mode, config.ir_alpha
    w = weight.to(grad_output.dtype)
    grad = conv_grad_weight(
        input, grad_output, w, geo, mode, alpha, **sampling_args(config, gw_state, conv=True)
    )
    grad = grad.to(weight.dtype)
    decay = decay_term(weight, out_mask, config)
    return grad if decay is None else grad + decay


def linear_grad_input_for(
    config: SparsityConfig,
    grad_output: Tensor,
    weight: Tensor,
    out_mask: Tensor | None,
    *,
    kernel: Any = REFERENCE_LINEAR,
    soft_scale: Tensor | None = None,
) -> Tensor:
    """``grad_input`` (Eq. 2) of a linear layer: ``dX = dY_gi · W_gi``, computed by
    ``kernel`` (:mod:`fullsparse.kernels`; a dense matmul by default)."""
    w_gi = grad_input_weight(weight, out_mask, config, 1, soft_scale).to(grad_output.dtype)
    return kernel.grad_input(_linear_dy_gi(config, grad_output), w_gi)


def linear_grad_weight_for(
    config: SparsityConfig,
    input: Tensor,
    grad_output: Tensor,
    weight: Tensor,
    out_mask: Tensor | None,
    gw_state: Tensor | None = None,
) -> Tensor:
    """``grad_weight`` (Eq. 3) of a linear layer plus the SR-STE decay, in the weight's dtype."""
    config = config.for_kind("linear")
    mode, alpha = config.grad_weight_mode, config.ir_alpha
    grad = linear_grad_weight(input, grad_output, mode, alpha, **sampling_args(config, gw_state))
    grad = grad.to(weight.dtype)
    decay = decay_term(weight, out_mask, config)
    return grad if decay is None else grad + decay


def sampling_args(
    config: SparsityConfig, state: Tensor | None, conv: bool = False
) -> dict[str, Any]:
    """The sampled weight gradients' keyword arguments: a layer's adaptive state, its
    config's variance budget and its sampling groups (and a convolution's units)."""
    args = {
        "state": state,
        "budget": config.variance_budget,
        "interval": config.variance_interval,
        "group": config.sample_group,
        "share": config.sample_share,
    }
    if conv:
        args["unit"] = config.conv_sample_unit
    return args


def _conv_dy_gi(config: SparsityConfig, grad_output: Tensor, geo: ConvGeometry) -> Tensor:
    """The dY operand of a conv's ``grad_input`` GEMM: dY, S_Co(dY) or TopK(dY)."""
    if config.operands.grad_input_dy == "S_Co(dY)":
        return mask_channels(grad_output, 1, geo.groups)
    if config.operands.grad_input_dy == "TopK(dY)":
        return topk_channels(grad_output, 1)
    return grad_output


def _linear_dy_gi(config: SparsityConfig, grad_output: Tensor) -> Tensor:
    """The dY operand of a linear layer's ``grad_input`` GEMM: dY, S_Co(dY) or TopK(dY)."""
    if config.operands.grad_input_dy == "S_Co(dY)":
        return grad_output * mask_2to4(grad_output, dim=-1)
    if config.operands.grad_input_dy == "TopK(dY)":
        return topk_channels(grad_output, -1)
    return grad_output
