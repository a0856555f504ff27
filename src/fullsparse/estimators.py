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
intervals ``[p_0 + … + p_{k-1}, p_0 + … + p_k)`` contain ``u`` or ``u + 1``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fullsparse import native
from fullsparse.fused import fused_or_eager

__all__ = ["mvue_2to4", "mvue_keep_probabilities", "mvue_planes", "topk_rows"]


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


def _planar_probabilities(a: list[Tensor]) -> list[Tensor]:
    """Keep probabilities of the four entries of every group, given as four planes of one
    shape, ``a[k] = |entry k|`` (see the module doc).

    Written with arithmetic only (no ``torch.where``, which is many times slower than a
    multiply on CPU): a choice between two finite values is ``x·(1 − m) + y·m`` with
    ``m`` ∈ {0, 1}, which is exact.
    """
    tiny = torch.finfo(a[0].dtype).tiny
    total = ((a[0] + a[1]) + a[2]) + a[3]
    top = torch.maximum(torch.maximum(a[0], a[1]), torch.maximum(a[2], a[3]))
    # The largest entry is capped at 1 when 2·a_max > Σa; the other three then share the
    # second draw in proportion to their magnitudes. A second cap can only be needed when
    # the two smaller entries are zero, and then it comes out as exactly 1 already.
    capped = 2 * top > total
    on = capped.to(total.dtype)
    off = 1 - on
    rest = (total - top).clamp_min_(tiny)
    total = total.clamp_min(tiny)
    probabilities = []
    for ak in a:
        # 2·a/Σa where not capped, a/(Σa − a_max) where capped (finite when not chosen)
        p = ((2 * ak) / total * off).add_((ak / rest) * on).clamp_max_(1.0)
        is_top = ((ak == top) & capped).to(p.dtype)
        probabilities.append(p.mul_(1 - is_top).add_(is_top))  # zero where a is zero
    return probabilities


def _probabilities(a: Tensor) -> Tensor:
    """Keep probabilities for ``a = |values|`` of shape ``[..., 4]``."""
    return torch.stack(_planar_probabilities(list(a.unbind(-1))), -1)


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
        per group (in float32 for every dtype), so the draw advances the generator by the number
        of groups.
    """
    _check(t, dim)
    dim = dim % t.ndim
    # Probabilities in float32 at least: bf16/fp16 rounding would break Σp = 2.
    work = t.detach()
    if work.dtype in (torch.float16, torch.bfloat16):
        work = work.float()
    # [pre, size, post] → groups [pre, G, 4, post]; the four entries of a group as planes
    size = work.shape[dim]
    pre, post = math.prod(work.shape[:dim]), math.prod(work.shape[dim + 1 :])
    g = (size + 3) // 4
    # one uniform per group, drawn in the order (pre, post, group) and in float32 whatever
    # t's dtype, so that a float64 and a float32 tensor get the same draws
    u = torch.rand((pre, post, g, 1), generator=generator, device=t.device, dtype=torch.float32)
    u = u.view(pre, post, g).transpose(1, 2).to(work.dtype).contiguous()
    v = work.reshape(pre, size, post)
    fast = native.mvue(v, u)  # float32 on a CPU: one pass in t's own layout, the same bits
    if fast is not None:
        return fast.reshape(work.shape).to(t.dtype)
    if size % 4:
        v = torch.cat([v, v.new_zeros(pre, (-size) % 4, post)], 1)
    v = v.view(pre, g, 4, post)
    if post == 1:  # contiguous planes (entries of a group are adjacent in memory)
        planes = v.view(pre, g, 4).permute(2, 0, 1).contiguous().unsqueeze(-1)
    else:
        planes = v.permute(2, 0, 1, 3)
    out = fused_or_eager(mvue_planes, planes)(planes, u)
    out = out.permute(1, 2, 0, 3).reshape(pre, g * 4, post)[:, :size]
    return out.reshape(work.shape).to(t.dtype)


def mvue_planes(planes: Tensor, u: Tensor) -> Tensor:
    """The MVUE of groups given as four planes ``planes [4, ...]`` (entry k of every group
    in plane k) with one uniform per group ``u [...]``: ``[4, ...]``, survivors ``t/p``.

    Pure elementwise arithmetic, so :mod:`fullsparse.fused` may run it compiled; this eager
    form is the reference.
    """
    x = planes.unbind(0)
    p = _planar_probabilities([c.abs() for c in x])
    u1 = u + 1
    tiny = torch.finfo(planes.dtype).tiny
    end = torch.zeros_like(u)
    below_u = below_u1 = torch.zeros(u.shape, dtype=torch.bool, device=u.device)
    out = []
    for k in range(4):  # entry k's interval is [end_{k-1}, end_k): kept if u or u+1 is in it
        end = end + p[k]
        now_u, now_u1 = u < end, u1 < end
        keep = (now_u ^ below_u) | (now_u1 ^ below_u1)
        below_u, below_u1 = now_u, now_u1
        # t_k / p_k where kept, 0 elsewhere (finite: p_k is 0 only where t_k is)
        out.append((x[k] / p[k].clamp_min(tiny)) * keep.to(planes.dtype))
    return torch.stack(out)


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
