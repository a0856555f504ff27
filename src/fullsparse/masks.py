"""2:4 sparsity operators (``docs/spec.md``, "Operators").

- :func:`mask_2to4` — magnitude 2:4 along one axis (S_K, S_Co and S_T are this along K,
  Co and the spatial/token axis).
- :func:`transposable_mask_2to4` — 2:4 along both axes of a matrix (TSM baseline), exact per
  4×4 block over the 90 valid patterns.
- :func:`is_2to4` — the check every produced sparse operand must pass.

All are batched tensor code: no Python loop over groups or blocks.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

__all__ = [
    "mask_2to4",
    "magnitude_score",
    "mask_2to4_of_score",
    "transposable_mask_2to4",
    "is_2to4",
    "transposable_patterns",
    "prune_2to4",
]


def _check_float(t: torch.Tensor, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")


def _pad_last_to_multiple_of_4(t: torch.Tensor) -> torch.Tensor:
    pad = (-t.shape[-1]) % 4
    if pad:
        t = torch.nn.functional.pad(t, (0, pad))
    return t


def _keep_top2_of_4(score: Tensor, dim: int = -1) -> Tensor:
    """Mask of the two largest scores in each group of 4 along ``dim`` (of size 4).

    ``score`` has NaN already mapped to +inf. An element is kept when
    fewer than two others beat it; j beats i when ``score[j] > score[i]``, or when they are
    equal and ``j < i`` — so ties go to the lower index and exactly two are kept in every
    group, whatever the values. Six pairwise comparisons per group, no sort.
    """
    s0, s1, s2, s3 = score.unbind(dim)
    # cab: element a (the lower index) beats element b; b beats a exactly when not cab.
    c01, c02, c03 = s0 >= s1, s0 >= s2, s0 >= s3
    c12, c13, c23 = s1 >= s2, s1 >= s3, s2 >= s3
    # An element is kept when it beats at least two of the other three (a majority vote of
    # its three duels), decided per position on bool tensors a quarter of the scores' size;
    # one stack interleaves the four results.
    keep = (
        _majority(c01, c02, c03),
        _majority(~c01, c12, c13),
        _majority(~c02, ~c12, c23),
        _majority(~c03, ~c13, ~c23),
    )
    return torch.stack(keep, dim)


def _majority(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """At least two of three bool tensors are true."""
    return (a & b) | (c & (a | b))


def mask_2to4(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Magnitude 2:4 mask of ``t`` along ``dim``.

    In each group of 4 consecutive entries along ``dim`` keep the 2 of largest ``|value|``
    (ties to the lower index). Non-finite entries are kept first: ±inf and NaN all count as
    ``+inf`` (the largest magnitude, tied among themselves), so a NaN or an overflow stays
    visible in the pruned tensor instead of being silently zeroed. A ``dim``
    whose size is not a multiple of 4 is zero-padded at its end, and the padding is dropped
    again, so the last group may keep fewer than 2 real entries but never more.

    Args:
        t: any floating tensor.
        dim: the axis the 2:4 groups run along (the GEMM's reduction axis).

    Returns:
        A bool tensor of ``t``'s shape.
    """
    _check_float(t, "mask_2to4 input")
    if t.ndim == 0:
        raise ValueError("mask_2to4 needs a tensor with at least one dimension, got a scalar")
    return mask_2to4_of_score(magnitude_score(t), dim)


def magnitude_score(t: Tensor) -> Tensor:
    """``|t|`` as :func:`mask_2to4` ranks it: NaN and ±inf become ``+inf`` (a fresh tensor).

    Computed once, it serves masks along several axes of the same tensor (S_K and S_Co of
    one weight) through :func:`mask_2to4_of_score`.
    """
    score = t.detach().abs()
    if score.is_floating_point():
        # NaN scores as +inf; +inf stays +inf (nan_to_num's default would turn it into the
        # largest finite value, which then ties with real values and can lose to them).
        score = score.nan_to_num_(nan=float("inf"), posinf=float("inf"))  # abs() is fresh
    return score


def mask_2to4_of_score(score: Tensor, dim: int) -> Tensor:
    """:func:`mask_2to4` from a :func:`magnitude_score`: the 2 largest of every 4 along
    ``dim`` (ties to the lower index, zero padding at the end)."""
    if score.ndim == 0:
        raise ValueError("mask_2to4 needs a tensor with at least one dimension, got a scalar")
    dim = _normalize_dim(dim, score.ndim, "mask_2to4")
    size = score.shape[dim]
    if size % 4 == 0:  # groups in place, along any axis: no copy of the scores
        shape = score.shape
        groups = score.reshape(*shape[:dim], size // 4, 4, *shape[dim + 1 :])
        return _keep_top2_of_4(groups, dim + 1).reshape(shape)
    moved = _pad_last_to_multiple_of_4(score.movedim(dim, -1))
    groups = moved.reshape(*moved.shape[:-1], -1, 4)
    keep = _keep_top2_of_4(groups).reshape(moved.shape)[..., :size]
    return keep.movedim(-1, dim)


def prune_2to4(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``t`` with its magnitude 2:4 mask along ``dim`` applied (differentiable in ``t``)."""
    return t * mask_2to4(t, dim)


def is_2to4(t: torch.Tensor, dim: int) -> bool:
    """True when every group of 4 consecutive entries along ``dim`` has at most 2 nonzeros.

    A ``dim`` whose size is not a multiple of 4 is checked with zero padding at its end,
    the same convention :func:`mask_2to4` uses.
    """
    _check_float(t, "is_2to4 input")
    if t.ndim == 0:
        raise ValueError("is_2to4 needs a tensor with at least one dimension, got a scalar")
    dim = _normalize_dim(dim, t.ndim, "is_2to4")
    nz = _pad_last_to_multiple_of_4((t.detach().movedim(dim, -1) != 0).to(torch.uint8))
    counts = nz.reshape(*nz.shape[:-1], -1, 4).sum(-1)
    return bool((counts <= 2).all())


def _normalize_dim(dim: int, ndim: int, who: str) -> int:
    if not isinstance(dim, int) or isinstance(dim, bool):
        raise TypeError(f"{who}: dim must be an int, got {dim!r}")
    if not -ndim <= dim < ndim:
        raise ValueError(f"{who}: dim={dim} is out of range for a {ndim}-D tensor")
    return dim % ndim


_PATTERN_CACHE: dict[torch.device, torch.Tensor] = {}


def transposable_patterns(device: torch.device | str | None = None) -> torch.Tensor:
    """All 90 4×4 0/1 patterns with exactly two ones in every row and every column.

    Returned as a float tensor ``[90, 4, 4]`` in a fixed (lexicographic) order, so ties
    between equally good patterns are broken deterministically (first in this order).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    cached = _PATTERN_CACHE.get(device)
    if cached is None:
        rows = [r for r in itertools.product((0, 1), repeat=4) if sum(r) == 2]  # 6 row choices
        pats = [
            p
            for p in itertools.product(rows, repeat=4)
            if all(sum(p[i][j] for i in range(4)) == 2 for j in range(4))
        ]
        cached = torch.tensor(pats, dtype=torch.float32, device=device)
        if cached.shape != (90, 4, 4):  # pragma: no cover - a combinatorial fact
            raise AssertionError(f"expected 90 transposable patterns, got {cached.shape[0]}")
        _PATTERN_CACHE[device] = cached
    return cached


def transposable_mask_2to4(w2d: torch.Tensor) -> torch.Tensor:
    """Transposable 2:4 mask of a matrix (or a batch of matrices): 2:4 along both axes.

    Per 4×4 block the mask is the best of the 90 valid patterns, maximising the kept
    ``Σ|w|`` (exact, not greedy; ties to the first pattern of
    :func:`transposable_patterns`). Scores are summed in float64 (float32 only where the
    device has no float64), so float64 weights are ranked exactly as they are. Non-finite
    entries (±inf, NaN) come first, as in :func:`mask_2to4`: the pattern keeps as many of
    them as it can, then maximises ``Σ|w|`` over the finite ones. Both axes are zero-padded
    to multiples of 4 and the padding is dropped again.

    Args:
        w2d: ``[R, C]`` or ``[B, R, C]`` (e.g. a grouped conv's per-group ``W2``).

    Returns:
        A bool tensor of ``w2d``'s shape.
    """
    _check_float(w2d, "transposable_mask_2to4 input")
    if w2d.ndim not in (2, 3):
        raise ValueError(
            f"transposable_mask_2to4 needs a 2-D matrix [R, C] (or a batch [B, R, C]), "
            f"got shape {tuple(w2d.shape)}"
        )
    batched = w2d.ndim == 3
    w = w2d.detach() if batched else w2d.detach().unsqueeze(0)
    b, r, c = w.shape
    exact = torch.float32 if w.device.type == "mps" else torch.float64  # mps has no float64
    magnitude = w.abs().to(exact)
    nonfinite = ~torch.isfinite(magnitude)
    # The finite magnitudes, and the non-finite entries counted apart (inf·0 in the pattern
    # products below would be NaN, and a large stand-in value would swallow the finite ones).
    score = torch.stack([magnitude.masked_fill(nonfinite, 0.0), nonfinite.to(exact)])
    pr, pc = (-r) % 4, (-c) % 4
    if pr or pc:
        score = torch.nn.functional.pad(score, (0, pc, 0, pr))
    rb, cb = score.shape[2] // 4, score.shape[3] // 4
    # [2, B, R/4, 4, C/4, 4] -> [2, B, R/4, C/4, 4, 4]: one 4×4 block per (row, col) block
    blocks = score.reshape(2, b, rb, 4, cb, 4).permute(0, 1, 2, 4, 3, 5)
    patterns = transposable_patterns(w.device)
    # kept magnitude / kept non-finite count of every pattern on every block (autocast off:
    # a bf16 einsum would round the sums and pick other patterns)
    with torch.autocast(w.device.type, enabled=False):
        kept_finite, kept_nonfinite = torch.einsum("sbxyij,pij->sbxyp", blocks, patterns.to(exact))
    # patterns that keep fewer non-finite entries than the block's best are out of the race;
    # ties go to the first pattern (argmax returns the first maximum)
    most = kept_nonfinite.amax(-1, keepdim=True)
    kept = kept_finite.masked_fill(kept_nonfinite < most, -1.0)
    best = kept.argmax(-1)  # [B, R/4, C/4]
    mask = patterns[best].bool()  # [B, R/4, C/4, 4, 4]
    mask = mask.permute(0, 1, 3, 2, 4).reshape(b, rb * 4, cb * 4)[:, :r, :c]
    return mask if batched else mask[0]
