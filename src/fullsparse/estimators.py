"""Random and top-k sparsifiers of a gradient operand.

- :func:`mvue_2to4` — the minimum-variance unbiased 2:4 sparsification (MVUE): in each group
  of 4 entries along an axis, exactly two survive (fewer where the group has fewer than two
  nonzeros), chosen at random so that ``E[mvue_2to4(t)] == t``, and with the smallest
  variance any such estimator has.
- :func:`mvue_keep_probabilities` — the keep probabilities it uses.
- :func:`topk_rows` — keep the ``k`` largest-magnitude entries of each row (unstructured; the
  meProp baseline's sparsifier of the output gradient).

Why MVUE: a fixed 2:4 mask of ``dY`` (the FST weight gradient) is biased — what it drops is
lost unless the neighbour restores it — while a random mask whose survivors are rescaled by
``1/p`` is right on average; the price is variance. The variance of one group is
``Σ a_i²/p_i − a_i²`` under ``Σ p_i = 2, 0 ≤ p_i ≤ 1``; it is smallest for ``p_i ∝ |a_i|``
with the largest entries capped at 1 (a water-filling; with four entries at most one cap
step is needed). Two entries with exactly these marginal probabilities are then drawn by
systematic sampling: one uniform ``u`` per group, the entries whose cumulative-probability
intervals contain ``u`` or ``u + 1``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["mvue_2to4", "mvue_keep_probabilities", "topk_rows"]


def _groups_of_4(t: Tensor, dim: int) -> tuple[Tensor, int]:
    """``t`` moved so ``dim`` is last, zero-padded to a multiple of 4, as ``[..., G, 4]``."""
    moved = t.movedim(dim, -1)
    size = moved.shape[-1]
    pad = (-size) % 4
    if pad:
        moved = torch.nn.functional.pad(moved, (0, pad))
    return moved.reshape(*moved.shape[:-1], -1, 4), size


def _ungroup(g: Tensor, size: int, dim: int) -> Tensor:
    flat = g.reshape(*g.shape[:-2], -1)[..., :size]
    return flat.movedim(-1, dim)


def _probabilities(a: Tensor) -> Tensor:
    """Keep probabilities for ``a = |values|`` of shape ``[..., 4]`` (see module doc)."""
    total = a.sum(-1, keepdim=True)
    p = 2 * a / total.clamp_min(torch.finfo(a.dtype).tiny)
    top, top_idx = a.max(-1, keepdim=True)
    # The largest entry is capped at 1 when 2·a_max > Σa; the other three then share the
    # second draw in proportion to their magnitudes. A second cap can only be needed when
    # the two smaller entries are zero, and then it comes out as exactly 1 already.
    capped = 2 * top > total
    rest = (total - top).clamp_min(torch.finfo(a.dtype).tiny)
    p_capped = (a / rest).scatter(-1, top_idx, torch.ones_like(top))
    p = torch.where(capped, p_capped, p)
    return torch.where(a > 0, p.clamp_max(1.0), torch.zeros_like(p))


def mvue_keep_probabilities(t: Tensor, dim: int) -> Tensor:
    """The probability that :func:`mvue_2to4` keeps each entry of ``t`` (``t``'s shape).

    Each group of 4 along ``dim`` sums to ``min(2, number of nonzeros)``. Computed in
    ``t``'s dtype (float64 for exact tests).
    """
    _check(t, dim)
    groups, size = _groups_of_4(t.detach().abs(), dim % t.ndim)
    return _ungroup(_probabilities(groups), size, dim % t.ndim)


def mvue_2to4(t: Tensor, dim: int, *, generator: torch.Generator | None = None) -> Tensor:
    """Minimum-variance unbiased 2:4 sparsification of ``t`` along ``dim``.

    Args:
        t: a floating tensor (any shape).
        dim: the axis the 2:4 groups run along (for a weight gradient: the token / spatial
            axis, the reduction axis of ``dW = dYᵀ · X``).
        generator: the random source (``None``: torch's default generator on ``t``'s
            device, whose state training checkpoints already save).

    Returns:
        A tensor of ``t``'s shape and dtype that is 2:4 along ``dim`` (at most two nonzeros in
        every group of 4; a last, partial group is zero-padded), whose expectation over the
        random draw is exactly ``t``. Survivors are ``t_i / p_i``. One uniform number is drawn
        per group, so the draw advances the generator by the number of groups.
    """
    _check(t, dim)
    dim = dim % t.ndim
    # Probabilities in float32 at least: bf16/fp16 rounding would break Σp = 2.
    work = t.detach()
    if work.dtype in (torch.float16, torch.bfloat16):
        work = work.float()
    groups, size = _groups_of_4(work, dim)
    p = _probabilities(groups.abs())
    end = p.cumsum(-1)
    start = end - p
    u = torch.rand(
        (*groups.shape[:-1], 1), generator=generator, device=t.device, dtype=groups.dtype
    )
    keep = ((start <= u) & (u < end)) | ((start <= u + 1) & (u + 1 < end))
    out = torch.where(keep, groups / torch.where(keep, p, torch.ones_like(p)), 0)
    return _ungroup(out, size, dim).to(t.dtype)


def topk_rows(t: Tensor, keep_fraction: float = 0.5) -> Tensor:
    """``t`` with all but the ``k`` largest-|value| entries of each row zeroed.

    Rows run along the last axis; ``k = max(1, round(keep_fraction · row length))``. Ties go
    to the lower index (a stable sort), so the result is deterministic.
    """
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise TypeError("topk_rows needs a floating torch.Tensor")
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"topk_rows: keep_fraction must be in (0, 1], got {keep_fraction}")
    if t.ndim == 0 or t.shape[-1] == 0:
        return t.clone()
    n = t.shape[-1]
    k = max(1, round(keep_fraction * n))
    if k >= n:
        return t.clone()
    order = torch.sort(t.detach().abs(), dim=-1, descending=True, stable=True).indices
    keep = torch.zeros(t.shape, dtype=torch.bool, device=t.device)
    keep.scatter_(-1, order[..., :k], True)
    return torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device))


def _check(t: object, dim: object) -> None:
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise TypeError("mvue_2to4 needs a floating torch.Tensor")
    if t.ndim == 0:
        raise ValueError("mvue_2to4 needs a tensor with at least one dimension, got a scalar")
    if not isinstance(dim, int) or isinstance(dim, bool) or not -t.ndim <= dim < t.ndim:
        raise ValueError(f"mvue_2to4: dim={dim!r} is out of range for a {t.ndim}-D tensor")
