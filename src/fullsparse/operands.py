"""The operands of a sparse layer's three GEMMs, built as :data:`~fullsparse.config.OPERAND_TABLE`
says (``docs/spec.md``, "Operators").

Two ways to build the weight-side operands, always equal bit for bit (a test holds them to
it):

- the plain per-role functions (:func:`output_weight_mask`, :func:`grad_input_weight`,
  :func:`decay_term`), each from the master weight, as the spec reads; the reference
  autograd path (:mod:`fullsparse.reference_autograd`) and the benchmarks call them;
- :func:`weight_operands`, what the autograd functions call once per step in the forward:
  ``|W|`` is scored once for both S_K(W) and S_Co(W), W is cast to the compute dtype once,
  the forward operand doubles as the grad_input operand where the recipe says so, and the
  SR-STE decay is made with one temporary.

Activation-side operands (S_Co(dY), S_T, information restoration, meProp's TopK(dY)) are here
too: they are applied in the backward, on that step's gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fullsparse.clock import sampling_part
from fullsparse.config import MEPROP_KEEP, SparsityConfig
from fullsparse.estimators import mvue_2to4, mvue_2to4_channels, topk_rows
from fullsparse.masks import (
    is_2to4,
    magnitude_score,
    mask_2to4,
    mask_2to4_of_score,
    transposable_mask_2to4,
)

__all__ = [
    "mask_k",
    "is_2to4_k",
    "mask_co",
    "transposable_mask",
    "output_weight_mask",
    "grad_input_weight",
    "decay_term",
    "add_deferred_decay",
    "soft_threshold_k",
    "soft_scale",
    "soft_output_weight",
    "WeightOperands",
    "weight_operands",
    "mask_channels",
    "mask_spatial_conv",
    "mvue_spatial_conv",
    "mvue_tokens",
    "ir_grad_output",
    "topk_channels",
]


# --------------------------------------------------------------------------- weight masks
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
    return _mask_k_of_score(magnitude_score(weight), conv_layout)


def _mask_k_of_score(score: Tensor, conv_layout: str) -> Tensor:
    if conv_layout == "channel" and score.ndim == 4:
        return mask_2to4_of_score(score, dim=1)
    if conv_layout not in ("im2col", "channel"):
        raise ValueError(f"conv_layout must be 'im2col' or 'channel', got {conv_layout!r}")
    return mask_2to4_of_score(_weight_2d(score), dim=1).reshape(score.shape)


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
    return _mask_co_of_score(magnitude_score(weight), groups)


def _mask_co_of_score(score: Tensor, groups: int) -> Tensor:
    per_group = score.reshape(groups, score.shape[0] // groups, -1)  # [g, Co/g, K]
    return mask_2to4_of_score(per_group, dim=1).reshape(score.shape)


def transposable_mask(weight: Tensor, groups: int = 1) -> Tensor:
    """TSM mask: 2:4 along K and along Co of each group's ``W2`` at once."""
    co = weight.shape[0]
    per_group = weight.reshape(groups, co // groups, -1)
    return transposable_mask_2to4(per_group).reshape(weight.shape)


def _check_forward_mask(forward_mask: Tensor, weight: Tensor) -> Tensor:
    if forward_mask.shape != weight.shape or forward_mask.dtype != torch.bool:
        raise ValueError(
            f"forward_mask must be a bool tensor of the weight's shape {tuple(weight.shape)}"
            f", got {forward_mask.dtype} {tuple(forward_mask.shape)}"
        )
    return forward_mask


# --------------------------------------------------------------------------- per role (plain)
def output_weight_mask(
    weight: Tensor, config: SparsityConfig, groups: int = 1, forward_mask: Tensor | None = None
) -> Tensor | None:
    """Mask of the ``output`` GEMM's weight operand, or ``None`` when it is dense.

    ``forward_mask`` (a module's cached TSM mask) is used as is when given.
    """
    operand = config.operands.output_weight
    if operand == "W":
        return None
    if forward_mask is not None:
        return _check_forward_mask(forward_mask, weight)
    if operand in ("S_K(W)", SOFT):  # S-STE's soft operand keeps S_K's positions
        return mask_k(weight, config.conv_layout)
    return transposable_mask(weight, groups)


def grad_input_weight(
    weight: Tensor,
    out_mask: Tensor | None,
    config: SparsityConfig,
    groups: int = 1,
    soft_scale: Tensor | None = None,
) -> Tensor:
    """Weight operand of the ``grad_input`` GEMM (Eq. 2) for ``config``, in ``weight``'s dtype.

    The forward operand (exact gradient of Eq. 1), W, or S_Co(W_src) with ``W_src`` = W
    (``grad_input_source='dense'``) or S_K(W) (``'pruned'``). ``soft_scale``: β of a
    ``soft_2:4`` forward operand (:func:`soft_output_weight`).
    """
    ops = config.operands
    if ops.grad_input_weight == "W":
        return weight
    if ops.grad_input_weight == ops.output_weight:
        if ops.output_weight == SOFT:
            return soft_output_weight(weight, soft_scale)
        return weight if out_mask is None else weight * out_mask
    src = weight
    if ops.grad_input_weight == "S_Co(S_K(W))" and out_mask is not None:
        src = weight * out_mask
    return src * mask_co(src, groups)


def decay_term(weight: Tensor, out_mask: Tensor | None, config: SparsityConfig) -> Tensor | None:
    """SR-STE (Eq. 6): ``λ·(W − S(W))`` = ``λ·W`` on the pruned entries, or None (also for
    ``decay_kind='masked_grad'``, which is applied in the optimizer step instead)."""
    if not config.operands.decay or out_mask is None:
        return None
    return config.decay * (weight * ~out_mask)


# --------------------------------------------------------------------------- S-STE forward
# Decay and forward variants: S-STE's soft-threshold forward operand (Hu, Zhu, Chen,
# NeurIPS 2024). Its gradient is straight-through: dL/dW = dL/dW_out, neither the soft
# threshold nor β is differentiated (as in the authors' code), so the backward GEMMs are
# those of the other recipes.

#: the operand symbol of ``output_weight='soft_2:4'`` (config.OPERAND_TABLE)
SOFT = "β·soft_K(W)"


def soft_threshold_k(weight: Tensor) -> Tensor:
    """soft_K(W): in each group of 4 along K of ``W2`` (zero-padded like S_K), every entry
    shrunk toward zero by ``t``, the group's 3rd-largest ``|w|``:
    ``sign(w)·max(|w| − t, 0)``. At most the two largest stay nonzero (2:4 along K) and the
    result is continuous in W. ``weight``'s shape and dtype."""
    w2 = _weight_2d(weight.detach())
    co, k = w2.shape
    mag = torch.nn.functional.pad(w2.abs(), (0, (-k) % 4)).reshape(co, -1, 4)
    third = mag.sort(dim=-1).values[..., 1:2]  # the 2nd smallest of 4 = the 3rd largest
    t = third.expand(mag.shape).reshape(co, -1)[:, :k]
    return (torch.sign(w2) * (w2.abs() - t).clamp_min_(0)).reshape(weight.shape)


def soft_scale(weight: Tensor) -> Tensor:
    """S-STE's per-tensor scale β = ⟨W, soft_K(W)⟩ / ⟨soft_K(W), soft_K(W)⟩ (the least-squares
    fit of W by β·soft_K(W)), computed in float64, a scalar in float32 (float64 for a float64
    weight); 1 when soft_K(W) is 0."""
    w = weight.detach().double()
    s = soft_threshold_k(w)
    den = (s * s).sum()
    beta = torch.where(den > 0, (w * s).sum() / den.clamp_min(1e-300), torch.ones_like(den))
    return beta.to(torch.promote_types(weight.dtype, torch.float32))


def soft_output_weight(weight: Tensor, scale: Tensor | None = None) -> Tensor:
    """The ``soft_2:4`` forward operand ``β·soft_K(W)`` in ``weight``'s dtype; β is ``scale``
    (a layer's fixed β) or, when None, :func:`soft_scale` of this weight."""
    beta = soft_scale(weight) if scale is None else scale
    return soft_threshold_k(weight) * beta.to(device=weight.device, dtype=weight.dtype)


# --------------------------------------------------------------------------- once per step
@dataclass
class WeightOperands:
    """The weight side of one step: what the three GEMMs take from W."""

    #: mask of the ``output`` operand (bool, the weight's shape), None when it is W or when
    #: the native kernel made the operand without materializing its mask
    out_mask: Tensor | None
    #: ``output`` weight operand W_out, in the compute dtype
    output: Tensor
    #: ``grad_input`` weight operand W_gi, in the compute dtype (None if not asked for)
    grad_input: Tensor | None
    #: SR-STE decay λ·(W − W_out), in the weight's dtype (None without decay, or when the
    #: backward adds it from W itself: ``decay_scale``)
    decay: Tensor | None
    #: λ of a decay the backward adds from W (:func:`add_deferred_decay`), where the native
    #: weight side made the operands: no decay tensor is kept from the forward to the backward
    decay_scale: float | None = None


def weight_operands(
    weight: Tensor,
    config: SparsityConfig,
    groups: int,
    compute: torch.dtype,
    forward_mask: Tensor | None = None,
    *,
    grad_input: bool = True,
    decay: bool = True,
    soft_scale: Tensor | None = None,
    grad_input_mask: Tensor | None = None,
) -> WeightOperands:
    """All weight-side operands of a step, in one pass over W where the recipe allows.

    Equal bit for bit to :func:`output_weight_mask`, :func:`grad_input_weight` (cast to
    ``compute``) and :func:`decay_term` (the decay up to the sign of its zeros, where the
    compute dtype is W's: there it is ``λ·(W − W_out)``): masking commutes with the cast (it
    multiplies by 0 or 1), and one magnitude score serves both S_K and S_Co. ``grad_input``
    / ``decay``: whether the backward will need them (not in evaluation, or when W has no
    gradient).
    ``grad_input_mask``: a module's cached S_Co mask (``mask_interval > 1``), used as is for
    an S_Co grad_input operand.
    """
    ops = config.operands
    # the native kernels read W's memory: no detached alias to make (a call per layer)
    native = _native_operands(weight, config, groups, compute, forward_mask, grad_input_mask,
                              grad_input, decay)  # fmt: skip
    if native is not None:
        return native
    w = weight.detach()
    score: Tensor | None = None
    out_mask: Tensor | None = None
    if ops.output_weight != "W":
        if forward_mask is not None:
            out_mask = _check_forward_mask(forward_mask, w)
        elif ops.output_weight in ("S_K(W)", SOFT):
            score = magnitude_score(w)
            out_mask = _mask_k_of_score(score, config.conv_layout)
        else:
            out_mask = transposable_mask(w, groups)
    w_c = w.to(compute)
    if ops.output_weight == SOFT:  # S-STE: β·soft_K(W), cast like the reference path
        w_out = soft_output_weight(w, soft_scale).to(compute)
    else:
        w_out = w_c if out_mask is None else w_c * out_mask
    w_gi: Tensor | None = None
    if grad_input:
        operand = ops.grad_input_weight
        if operand == "W":
            w_gi = w_c
        elif operand == ops.output_weight:
            w_gi = w_out
        elif grad_input_mask is not None:  # a cached S_Co mask (of W or of S_K(W))
            mask = _check_forward_mask(grad_input_mask, w)
            w_gi = w_c * mask if operand == "S_Co(W)" else w_out * mask
        elif operand == "S_Co(W)":
            score = magnitude_score(w) if score is None else score
            w_gi = w_c * _mask_co_of_score(score, groups)
        else:  # S_Co(S_K(W)): the mask of the pruned weight, on the forward operand
            assert out_mask is not None
            w_gi = w_out * mask_co(w * out_mask, groups)
    term: Tensor | None = None
    if decay and ops.decay and out_mask is not None:
        if w_out.dtype == w.dtype and ops.output_weight != SOFT:
            # W − W_out is W where pruned and 0 where kept, exactly: no second pass over
            # the mask (a bool mask costs a conversion to W's dtype in every product)
            term = (w - w_out).mul_(config.decay)
        else:
            term = (w * ~out_mask).mul_(config.decay)
    return WeightOperands(out_mask, w_out, w_gi, term)


def _native_operands(
    w: Tensor,
    config: SparsityConfig,
    groups: int,
    compute: torch.dtype,
    forward_mask: Tensor | None,
    grad_input_mask: Tensor | None,
    grad_input: bool,
    decay: bool,
) -> WeightOperands | None:
    """:func:`weight_operands` of an S_K(W) forward by a native kernel (one pass over W, the
    same bits): :func:`fullsparse.native.fst_weight_side`, or with the module's cached masks
    :func:`fullsparse.native.masked_weight_side`. None where neither applies (another
    operand, dtype, layout or shape)."""
    ops = config.operands
    if ops.output_weight != "S_K(W)" or compute != w.dtype:
        return None
    if not w.is_contiguous():  # e.g. channels_last: the eager path keeps its memory format
        return None
    operand = ops.grad_input_weight if grad_input else None
    if operand not in (None, "W", "S_K(W)", "S_Co(W)"):
        return None
    co_mask = operand == "S_Co(W)"
    from fullsparse import native

    with_decay = decay and ops.decay
    if forward_mask is not None:  # cached masks (mask_interval > 1)
        if co_mask and grad_input_mask is None:
            return None
        masks = _check_forward_mask(forward_mask, w), grad_input_mask if co_mask else None
        made = native.masked_weight_side(w, *masks, config.decay, with_decay)
    else:
        if grad_input_mask is not None or (w.ndim == 4 and config.conv_layout != "im2col"):
            return None
        if co_mask and (w.shape[0] // groups) % 4:
            return None  # groups of 4 output channels would straddle two conv groups
        # the decay is left to the backward (add_deferred_decay): one tensor of W's size
        # less to write now and to keep until then
        made = native.fst_weight_side(w, config.decay, co_mask, False)  # in w's shape
    if made is None:
        return None
    out, gi, term = made
    w_gi = {None: None, "S_K(W)": out, "S_Co(W)": gi}[operand] if operand != "W" else w.detach()
    deferred = config.decay if with_decay and forward_mask is None else None
    return WeightOperands(forward_mask, out, w_gi, term, deferred)


def add_deferred_decay(grad: Tensor, weight: Tensor, scale: float) -> Tensor:
    """``grad + λ·(W − W·S_K(W))``, in place on the fresh ``grad`` (W's shape and dtype): the
    SR-STE decay of an S_K(W) forward whose operands the native weight side made
    (``WeightOperands.decay_scale``), from W itself — the same bits as adding the decay
    tensor :func:`weight_operands` would otherwise have kept from the forward (W does not
    change in between: autograd's version check guards it)."""
    from fullsparse import native

    if native.add_fst_decay(grad, weight, scale):  # W read in place: no detach, no reshape
        return grad
    made = native.fst_weight_side(weight.detach(), scale, False, True)
    if made is not None and made[2] is not None:
        return grad.add_(made[2].view(grad.shape))
    w = weight.detach()  # no native library now: the eager S_K(W), the same mask
    w_out = w * _mask_k_of_score(magnitude_score(w), "im2col")
    return grad.add_((w - w_out).mul_(scale))


# --------------------------------------------------------------------------- activations
def mask_channels(grad_output: Tensor, channel_dim: int, groups: int) -> Tensor:
    """S_Co(dY): 2:4 along the channel axis at every position, within each group."""
    moved = grad_output.movedim(channel_dim, -1)
    shape = moved.shape
    per_group = moved.reshape(*shape[:-1], groups, shape[-1] // groups)
    mask = mask_2to4(per_group, dim=-1).reshape(shape).movedim(-1, channel_dim)
    return grad_output * mask


def mask_spatial_conv(t: Tensor) -> Tensor:
    """S_T for ``[N, C, H, W]``: 2:4 along N·H·W flattened per channel in (n, h, w) order."""
    n, c, h, w = t.shape
    rows = t.transpose(0, 1).reshape(c, n * h * w)
    mask = mask_2to4(rows, dim=1).reshape(c, n, h, w).transpose(0, 1)
    return t * mask


@sampling_part
def mvue_spatial_conv(t: Tensor) -> Tensor:
    """MVUE_T for ``[N, C, H, W]``: the random unbiased 2:4 sparsification along N·H·W per
    channel, in (n, h, w) order (S_T's layout), drawn from torch's default generator on
    ``t``'s device."""
    return mvue_2to4_channels(t)


@sampling_part
def mvue_tokens(t2: Tensor, key: tuple[int, int] | None = None) -> Tensor:
    """MVUE_T for a Linear layer's ``[M, d_out]`` gradient: along the flattened leading
    (batch × token) axis M, per output feature, from torch's default generator (``key``: the
    uniforms' key, already drawn from it)."""
    return mvue_2to4(t2, dim=0, key=key)


def ir_grad_output(grad_output: Tensor, alpha: float, dim: int) -> Tensor:
    """Information restoration (Eq. 10) along ``dim``: keep the even positions and add the
    gradient of each dropped odd neighbour to its kept partner.

    ``dY_ir[..., j] = dY[..., 2j] + α·dY[..., 2j+1]``; when the size is odd the last even
    position has no partner and is kept alone. The result has ``ceil(size/2)`` positions.
    """
    from fullsparse import native

    fast = native.ir_half(grad_output, alpha, dim)  # float32 on a CPU: one native pass
    if fast is not None:
        return fast
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


def topk_channels(grad_output: Tensor, channel_dim: int, keep: float = MEPROP_KEEP) -> Tensor:
    """TopK(dY) (meProp): at every output position, the ``round(keep · C)`` largest-|value|
    channels of ``grad_output`` kept and the rest zeroed (unstructured; ties to the lower
    channel). Groups are ignored: the channels of all groups compete."""
    return topk_rows(grad_output.movedim(channel_dim, -1), keep).movedim(-1, channel_dim)
