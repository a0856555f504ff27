"""The plain autograd path of a sparse layer, kept beside the fast one as its reference.

Here every operand is built by its own role function from the master weight, where it is
used: the forward mask in the forward, the grad_input weight and the SR-STE decay in the
backward, and each gradient by its own convolution. It reads like the spec and is what
:mod:`fullsparse.functional`'s autograd functions (operands built once per step, one
``convolution_backward`` for both gradients where possible) are tested against, bit for bit
(``tests/test_fused_path.py``). Same arguments as ``_SparseConv2dFn`` / ``_SparseLinearFn``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fullsparse.config import SparsityConfig
from fullsparse.entry_checks import _autocast_dtype, _not_a_view, stash_forward
from fullsparse.geometry import ConvGeometry
from fullsparse.operands import SOFT, output_weight_mask, soft_output_weight
from fullsparse.roles import (
    conv_grad_input_for,
    conv_grad_weight_for,
    linear_grad_input_for,
    linear_grad_weight_for,
)

__all__ = ["ReferenceConv2dFn", "ReferenceLinearFn"]


def _output_operand(
    weight: Tensor,
    config: SparsityConfig,
    groups: int,
    forward_mask: Tensor | None,
    compute: Any,
    soft_scale: Tensor | None = None,
) -> tuple[Tensor | None, Tensor]:
    out_mask = output_weight_mask(weight, config, groups, forward_mask)
    if config.operands.output_weight == SOFT:  # S-STE: β·soft_K(W)
        return out_mask, soft_output_weight(weight.detach(), soft_scale).to(compute)
    w = weight.to(compute)
    return out_mask, (w if out_mask is None else w * out_mask)


class ReferenceConv2dFn(torch.autograd.Function):
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
        gw_state: Tensor | None = None,
    ) -> Tensor:
        compute = _autocast_dtype(input.device.type) or input.dtype
        ctx.gw_state = gw_state
        out_mask, w_out = _output_operand(
            weight, config, geo.groups, forward_mask, compute, soft_scale
        )
        x, b = stash_forward(ctx, input, weight, bias, config, compute, kernel)
        ctx.soft_scale = soft_scale
        with torch.autocast(input.device.type, enabled=False):
            y = _not_a_view(kernel.output(x, w_out, b, geo))  # output (Eq. 1)
        ctx.save_for_backward(x, weight, out_mask)
        ctx.geo = geo
        return y

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        x, weight, out_mask = ctx.saved_tensors
        geo, config = ctx.geo, ctx.config
        dy = grad_output.to(ctx.compute)
        grad_input = grad_weight = grad_bias = None
        with torch.autocast(x.device.type, enabled=False):
            # ---- grad_input (Eq. 2): dX = W_giᵀ · dY_gi
            if ctx.needs_input_grad[0]:
                grad_input = conv_grad_input_for(
                    config,
                    dy,
                    x,
                    weight,
                    out_mask,
                    geo,
                    kernel=ctx.kernel,
                    soft_scale=ctx.soft_scale,
                ).to(ctx.dtypes[0])
            # ---- grad_weight (Eq. 3) + SR-STE decay (Eq. 6)
            if ctx.needs_input_grad[1]:
                grad_weight = conv_grad_weight_for(
                    config, x, dy, weight, out_mask, geo, ctx.gw_state
                )
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_bias = dy.sum((0, 2, 3)).to(ctx.dtypes[2])
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


class ReferenceLinearFn(torch.autograd.Function):
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
        gw_state: Tensor | None = None,
    ) -> Tensor:
        compute = _autocast_dtype(input.device.type) or input.dtype
        ctx.gw_state = gw_state
        out_mask, w_out = _output_operand(weight, config, 1, forward_mask, compute, soft_scale)
        x, b = stash_forward(ctx, input, weight, bias, config, compute, kernel)
        ctx.soft_scale = soft_scale
        with torch.autocast(input.device.type, enabled=False):
            y = _not_a_view(kernel.output(x, w_out, b))  # output (Eq. 1)
        ctx.save_for_backward(x, weight, out_mask)
        return y

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        x, weight, out_mask = ctx.saved_tensors
        config = ctx.config
        dy = grad_output.to(ctx.compute)
        grad_input = grad_weight = grad_bias = None
        with torch.autocast(x.device.type, enabled=False):
            # ---- grad_input (Eq. 2): dX = dY_gi · W_gi
            if ctx.needs_input_grad[0]:
                grad_input = linear_grad_input_for(
                    config, dy, weight, out_mask, kernel=ctx.kernel, soft_scale=ctx.soft_scale
                ).to(ctx.dtypes[0])
            # ---- grad_weight (Eq. 3) + SR-STE decay (Eq. 6)
            if ctx.needs_input_grad[1]:
                grad_weight = linear_grad_weight_for(config, x, dy, weight, out_mask, ctx.gw_state)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_bias = dy.reshape(-1, dy.shape[-1]).sum(0).to(ctx.dtypes[2])
        return grad_input, grad_weight, grad_bias, None, None, None, None, None
