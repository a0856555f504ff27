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

__all__ = [
    "mvue_2to4",
    "mvue_2to4_channels",
    "mvue_key",
    "mvue_keep_probabilities",
    "mvue_planes",
    "mvue_uniforms",
    "topk_rows",
]


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


def _planar_terms(a: list[Tensor]) -> tuple[list[Tensor], Tensor]:
    """Keep probabilities of the four entries of every group, given as four planes of one
    shape, ``a[k] = |entry k|`` (see the module doc), and the magnitude ``S`` of a survivor
    that is not capped.

    The largest entry is capped at 1 when ``2·a_max > Σa``; the other three then share the
    second draw in proportion to their magnitudes (a second cap can only be needed when the
    two smaller entries are zero, and then it comes out as exactly 1 already). So
    ``p_k = min(1, a_k / S)`` with ``S = Σa / 2`` (not capped) or ``S = Σa − a_max``
    (capped), and a survivor ``t_k / p_k`` is ``t_k`` where ``p_k = 1`` and ``±S`` (the sign
    of ``t_k``) elsewhere: one division per group, not one per entry. Written with
    arithmetic only (a choice between two finite values is ``x·(1 − m) + y·m`` with ``m`` ∈
    {0, 1}, which is exact).
    """
    tiny = torch.finfo(a[0].dtype).tiny
    total = ((a[0] + a[1]) + a[2]) + a[3]
    top = torch.maximum(torch.maximum(a[0], a[1]), torch.maximum(a[2], a[3]))
    on = (2 * top > total).to(total.dtype)  # capped
    den = ((total - top) * on + total * (1 - on)).clamp_min_(tiny)
    inv = (2 - on) / den  # 1/S
    probabilities = [(ak * inv).clamp_max_(1.0) for ak in a]  # zero where a is zero
    return probabilities, den * (1 - 0.5 * (1 - on))


def _probabilities(a: Tensor) -> Tensor:
    """Keep probabilities for ``a = |values|`` of shape ``[..., 4]``."""
    return torch.stack(_planar_terms(list(a.unbind(-1)))[0], -1)


def mvue_keep_probabilities(t: Tensor, dim: int) -> Tensor:
    """The probability that :func:`mvue_2to4` keeps each entry of ``t`` (``t``'s shape).

    Each group of 4 along ``dim`` sums to ``min(2, number of nonzeros)``. Computed in
    ``t``'s dtype (float64 for exact tests).
    """
    _check(t, dim)
    groups, size = _groups_of_4(t.detach().abs(), dim % t.ndim)
    return _ungroup(_probabilities(groups), size, dim % t.ndim)


def mvue_2to4(
    t: Tensor,
    dim: int,
    *,
    generator: torch.Generator | None = None,
    key: tuple[int, int] | None = None,
) -> Tensor:
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
        random draw is exactly ``t``. Survivors are ``t_i / p_i``. One uniform number per
        group, in float32 for every dtype (a float64 and a float32 tensor get the same
        draws): on a CPU the counter-based :func:`mvue_uniforms` of a key drawn from the
        generator (the generator advances by one draw of two integers per call); on other
        devices ``torch.rand`` (it advances by the number of groups).
        key: on a CPU, the key of the uniforms, already drawn by :func:`mvue_key` (the
            generator is then not touched): a caller that tried a fused form first.
    """
    _check(t, dim)
    if key is None:
        key = mvue_key(generator, t.device)
    return _mvue(t, dim % t.ndim, key, generator)


def mvue_2to4_channels(t: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """:func:`mvue_2to4` of ``t [N, C, H, W]`` along (n, h, w) per channel — the same draws
    as ``mvue_2to4(t.transpose(0, 1).reshape(C, -1), 1)``, returned in ``t``'s layout. On a
    CPU with ``H·W`` a multiple of 4, the native kernel reads a contiguous ``t`` in place
    (no transposed copy; the result is contiguous)."""
    _check(t, 0)
    if t.ndim != 4:
        raise ValueError(f"mvue_2to4_channels needs an [N, C, H, W] tensor, got {t.ndim}-D")
    n, c, h, w = t.shape
    key = mvue_key(generator, t.device)
    if key is not None and (h * w) % 4 == 0 and t.is_contiguous():
        fast = native.mvue(t.detach().view(n, c, h * w, 1), key)
        if fast is not None:
            return fast.view(t.shape)
    rows = t.transpose(0, 1).reshape(c, n * h * w)
    return _mvue(rows, 1, key, generator).reshape(c, n, h, w).transpose(0, 1)


def mvue_key(generator: torch.Generator | None, device: torch.device) -> tuple[int, int] | None:
    """The key of one call's :func:`mvue_uniforms` (two 32-bit integers drawn from
    ``generator``, torch's default CPU generator if None) on a CPU; None elsewhere (the
    draw then uses ``torch.rand`` on the device)."""
    if device.type != "cpu":
        return None
    k0, k1 = torch.randint(0, 2**32, (2,), generator=generator, dtype=torch.int64).tolist()
    return k0, k1


_MIX = (0x21F0AAAD, 0x735A2D97)
_LOW32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """``x·c mod 2³²`` for ``x`` in [0, 2³²) held in int64, without overflowing int64."""
    return ((x & 0xFFFF) * c + (((x >> 16) * c) & 0xFFFF) * 65536) & _LOW32


def _mix32(x: Tensor) -> Tensor:
    """A bijective 32-bit integer hash (xor-shift / multiply rounds)."""
    x = x ^ (x >> 16)
    x = _mul32(x, _MIX[0])
    x = x ^ (x >> 15)
    x = _mul32(x, _MIX[1])
    return x ^ (x >> 15)


def mvue_uniforms(key: tuple[int, int], pre: int, post: int, groups: int) -> Tensor:
    """The MVUE's uniforms on a CPU, ``[pre, groups, post]`` float32: group ``(p, g, q)``
    gets ``U(((p·post + q)·groups + g) mod 2³²)``, where ``U(i)`` is the top 24 bits of two
    keyed rounds of a bijective 32-bit hash, ``mix(mix(i ^ k0) ^ k1)``, over 2²⁴.
    Counter-based: any group's number is computed on its own (the native kernel draws them
    in place, the same bits); the hash is a bijection, so below 2³² groups no two groups
    share a 32-bit hash (counters wrap at 2³²). This is the reference the native kernel is
    tested against."""
    counter = torch.arange(pre * post * groups, dtype=torch.int64) & _LOW32
    h = _mix32(_mix32(counter ^ key[0]) ^ key[1])
    u = (h >> 8).to(torch.float32) * 2.0**-24
    return u.view(pre, post, groups).transpose(1, 2).contiguous()


def _mvue(
    t: Tensor, dim: int, key: tuple[int, int] | None, generator: torch.Generator | None
) -> Tensor:
    """:func:`mvue_2to4` after the key is drawn (None: ``torch.rand``)."""
    # Probabilities in float32 at least: bf16/fp16 rounding would break Σp = 2.
    work = t.detach()
    if work.dtype in (torch.float16, torch.bfloat16):
        work = work.float()
    # [pre, size, post] → groups [pre, G, 4, post]; the four entries of a group as planes
    size = work.shape[dim]
    pre, post = math.prod(work.shape[:dim]), math.prod(work.shape[dim + 1 :])
    g = (size + 3) // 4
    v = work.reshape(pre, size, post)
    if key is not None:
        fast = native.mvue(v.view(1, pre, size, post), key)  # one pass, the same bits
        if fast is not None:
            return fast.reshape(work.shape).to(t.dtype)
        u = mvue_uniforms(key, pre, post, g).to(work.dtype)
    else:
        # drawn in the order (pre, post, group) in float32 whatever t's dtype
        shape = (pre, post, g, 1)
        u = torch.rand(shape, generator=generator, device=t.device, dtype=torch.float32)
        u = u.view(pre, post, g).transpose(1, 2).to(work.dtype).contiguous()
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
    p, size = _planar_terms([c.abs() for c in x])
    u1 = u + 1
    end = torch.zeros_like(u)
    below_u = below_u1 = torch.zeros(u.shape, dtype=torch.bool, device=u.device)
    out = []
    for k in range(4):  # entry k's interval is [end_{k-1}, end_k): kept if u or u+1 is in it
        end = end + p[k]
        now_u, now_u1 = u < end, u1 < end
        keep = (now_u ^ below_u) | (now_u1 ^ below_u1)
        below_u, below_u1 = now_u, now_u1
        # t_k / p_k where kept (t_k where p_k = 1, else ±S), 0 elsewhere
        survivor = torch.where(p[k] >= 1, x[k], torch.copysign(size, x[k]))
        out.append(survivor * keep.to(planes.dtype))
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
