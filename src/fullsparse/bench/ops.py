"""Everything the suites need from the layers below (config, functional), in one place.

The suites import these names from here only, so a change of the layers below touches this
file and nothing else in :mod:`fullsparse.bench`. :func:`weight_side_work` is the one
definition of "the weight-side work of a step" that ``bench steps`` reports.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fullsparse.config import SparsityConfig
from fullsparse.functional import (
    ConvGeometry,
    conv_grad_input,
    ir_grad_output,
    mask_co,
    mask_k,
    output_weight_mask,
    sparse_conv2d,
    sparse_linear,
)
from fullsparse.operands import add_deferred_decay, weight_operands
from fullsparse.recipes import RECIPES, recipe
from fullsparse.roles import (
    conv_grad_input_for,
    conv_grad_weight,
    conv_grad_weight_for,
    linear_grad_input_for,
    linear_grad_weight_for,
)

__all__ = [
    "RECIPES",
    "SparsityConfig",
    "recipe",
    "ConvGeometry",
    "conv_grad_input",
    "conv_grad_input_for",
    "conv_grad_weight",
    "conv_grad_weight_for",
    "ir_grad_output",
    "linear_grad_input_for",
    "linear_grad_weight_for",
    "mask_co",
    "mask_k",
    "output_weight_mask",
    "sparse_conv2d",
    "sparse_linear",
    "weight_side_work",
]


def weight_side_work(
    weight: Tensor,
    config: SparsityConfig,
    groups: int = 1,
    forward_mask: Tensor | None = None,
    grad_input_mask: Tensor | None = None,
    *,
    grad: Tensor | None = None,
) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """The per-step operands a sparse layer derives from its weight alone, computed as one
    training step computes them: the ``output`` mask (S_K(W), or the TSM mask, which a
    module passes in as ``forward_mask`` between its recomputations), the ``grad_input``
    weight operand (S_Co(W_src)·W_src, the forward operand, or W) and the SR-STE decay
    term λ·(W − S(W)). ``grad_input_mask``: a cached S_Co mask (``mask_interval > 1``).

    Returns ``(output mask or None, grad_input weight, decay or None)``. What is timed is
    exactly this function over every sparse layer of a model, so it must stay the same work
    the autograd functions do per step. Where the native weight side leaves the decay to
    the backward (``WeightOperands.decay_scale``), it is added here as the backward adds it
    to the weight gradient: to ``grad`` (a tensor of W's shape standing for that gradient,
    which then holds the sum), or else to a fresh tensor of −0 (the decay term, bit for bit).
    """
    ops = weight_operands(
        weight, config, groups, weight.dtype, forward_mask, grad_input_mask=grad_input_mask
    )
    decay = ops.decay
    if ops.decay_scale is not None:
        target = torch.full_like(weight, -0.0) if grad is None else grad
        decay = add_deferred_decay(target, weight, ops.decay_scale)
    return ops.out_mask, ops.grad_input, decay
