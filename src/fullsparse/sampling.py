"""Unbiased reduced-size weight gradients: sample *units*, not entries.

``dW = dYᵀ · X`` is a sum over units — tokens of a Linear layer (rows of the flattened
``[M, d]`` operands), output columns of a convolution (every ``(n, ho)`` of one ``wo``). Keeping
a share of the units, the *same* ones for every output channel, and dividing each kept unit
by its keep probability gives an unbiased estimate that is a smaller *dense* product: half
the FLOPs at 2 of every 4 units, on any hardware, no sparse kernel needed.

Three ``grad_weight_mode`` values use it (:data:`SAMPLED_MODES`):

- ``rand_half``: FST's keep pattern (every second unit) with a random phase drawn per call,
  survivors ×2 — the strided half-size product of ``ir`` without its bias;
- ``is_half``: in every group of 4 consecutive units keep 2, with probabilities ∝
  ``‖dY_u‖·‖X_u‖`` water-filled as the MVUE does (capped at 1, Σp = 2), survivors ×1/p;
  the config's ``sample_group`` (a multiple of 4, or 0: one group per call) and
  ``sample_share`` (0.5) set the group and the share kept of it — in larger groups the
  probabilities follow the scores further;
- ``is_adaptive``: the same with a keep count k ∈ {2, 3, 4} per layer (a share k/4 of
  every group), chosen every ``variance_interval`` calls against a variance budget
  (:class:`AdaptiveState`).

Units that do not fill a last group are always kept (p = 1). Draws come from torch's
default generator (:func:`uniforms`: one float32 uniform per group), whose state training
checkpoints save, so a resumed run draws the same units.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fullsparse import native
from fullsparse.clock import sampling_part

__all__ = [
    "SAMPLED_MODES",
    "uniforms",
    "keep_probabilities",
    "select_units",
    "draw_plan",
    "sample_units",
    "AdaptiveState",
]

#: The ``grad_weight_mode`` values that sample units (see the module doc).
SAMPLED_MODES = ("rand_half", "is_half", "is_adaptive")


def uniforms(n: int, device: torch.device) -> Tensor:
    """``n`` uniforms in [0, 1) from torch's default generator, drawn in float32 (the one
    place this module draws: tests replace it to enumerate the draws)."""
    return torch.rand(n, device=device, dtype=torch.float32)


def keep_probabilities(scores: Tensor, k: int) -> Tensor:
    """Keep probabilities ``[G, g]`` of the units of each group for keeping ``k`` of its g
    (4 unless the config's ``sample_group`` says otherwise).

    ``p_i = min(1, c·s_i)`` with ``Σ p = k``: the variance ``Σ s_i²/p_i`` is smallest there
    (the MVUE's water-filling, for any k). Every score is raised by a tiny share of its
    group's mean first, so every p is positive and Σp = k exactly even in a group with fewer
    than k nonzero scores: the estimator stays unbiased whatever the scores are.

    On a CPU the level comes from :func:`_level_by_capping` (a few passes over the scores),
    elsewhere, and where that does not settle, from :func:`_level_by_sorting` (one sort);
    both give the same probabilities up to rounding.
    """
    s = scores.clamp_min(0)
    if k >= s.shape[-1]:
        return torch.ones_like(s)
    finite = torch.isfinite(s)
    if not bool(finite.all()):
        return _non_finite_kept(s, k, finite)
    tiny = torch.finfo(s.dtype).tiny
    s = s + (s.mean(-1, keepdim=True) * 1e-6 + tiny)
    if s.device.type == "cpu":
        p = _level_by_capping(s, k)
        if p is not None:
            return p
    return _level_by_sorting(s, k)


def _non_finite_kept(s: Tensor, k: int, finite: Tensor) -> Tensor:
    """Probabilities where some scores are NaN or infinite (an overflow in dY or X): in each
    such group its first k non-finite units are kept for sure (p = 1), so the weight
    gradient carries the non-finite value instead of dropping it, and the group's other
    units share what is left of k; the other groups as :func:`keep_probabilities`."""
    p = torch.empty_like(s)
    whole = finite.all(-1)
    if bool(whole.any()):
        p[whole] = keep_probabilities(s[whole], k)
    for row in (~whole).nonzero().flatten().tolist():
        bad = ~finite[row]
        sure = bad & (bad.cumsum(0) <= k)
        q = sure.to(s.dtype)
        left = k - int(sure.sum())
        if left > 0:
            q[~bad] = keep_probabilities(s[row][~bad][None], left)[0]
        p[row] = q
    return p


#: passes :func:`_level_by_capping` makes before it leaves the level to the sort
CAPPING_PASSES = 12


def _level_by_capping(s: Tensor, k: int) -> Tensor | None:
    """Water-filling by repeated capping: with the capped set C (empty at first), the level
    is ``c = (k − |C|) / Σ_{i∉C} s_i``, and every unit with ``c·s_i > 1`` joins C. The
    level only rises, so C only grows, and it settles at the optimum, usually within 2–5
    passes of a few elementwise ops: on a CPU a sort of a large group costs several times
    more (its comparisons are unpredictable branches). Returns None if it has not settled
    within :data:`CAPPING_PASSES` passes, or if it would cap k units of a group."""
    capped = torch.zeros_like(s, dtype=torch.bool)
    for _ in range(CAPPING_PASSES):
        n_capped = capped.sum(-1, keepdim=True)
        c = (k - n_capped).to(s.dtype) / s.masked_fill(capped, 0).sum(-1, keepdim=True)
        scaled = c * s
        grown = capped | (scaled > 1)
        if torch.equal(grown, capped):
            if bool((n_capped >= k).any()):
                return None
            return scaled.masked_fill_(capped, 1.0)
        capped = grown
    return None


def _level_by_sorting(s: Tensor, k: int) -> Tensor:
    """Water-filling in closed form over the sorted scores (any device)."""
    # With the j largest capped at 1, the rest share k − j: c_j = (k − j) / Σ_{i≥j} s_(i)
    # (scores sorted descending). The level is the first c_j under which the largest
    # uncapped score stays ≤ 1; c_{k−1} always qualifies (s_(k) ≤ Σ_{i≥k−1} s_(i)).
    desc = s.sort(-1, descending=True).values
    tail = desc.flip(-1).cumsum(-1).flip(-1)[..., :k]
    c = torch.arange(k, 0, -1, dtype=s.dtype, device=s.device) / tail
    first = (c * desc[..., :k] <= 1).to(torch.int8).argmax(-1, keepdim=True)
    return (c.gather(-1, first) * s).clamp_max_(1.0)


def select_units(p: Tensor, u: Tensor, k: int) -> Tensor:
    """Systematic sampling: unit i of a group is kept when one of ``u, u+1, …, u+k−1`` falls
    in its interval ``[p_0 + … + p_{i−1}, p_0 + … + p_i)``. Exactly k per group, each unit
    with probability ``p_i``. ``p [G, g]`` (Σ = k), ``u [G]``; returns bool ``[G, g]``."""
    ends = p.cumsum(-1)
    ends[:, -1] = k  # Σp = k up to rounding: the last interval closes the group exactly
    count = torch.ceil(ends - u.to(p.dtype)[:, None]).clamp_(0, k)
    return torch.diff(count, dim=-1, prepend=torch.zeros_like(count[:, :1])) > 0


def draw_plan(n_units: int, share: float, group: int = 4) -> tuple[int, int] | None:
    """``(group, kept)`` of :func:`sample_units` for ``n_units`` units: the group size it
    draws in and how many of each group it keeps; None where it keeps every unit."""
    whole = n_units // 4 * 4
    group = whole if group == 0 else min(group, whole)
    kept = max(1, round(share * group))
    return None if kept >= group or group == 0 else (group, kept)


@sampling_part
def sample_units(
    scores: Tensor, share: float, group: int = 4, u: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Which units to keep, and their weights 1/p: ``(index [m] long, weight [m])``.

    ``scores [U]``: one per unit (for ``rand_half`` the scores are not read). Units are
    grouped by ``group`` in order (fewer when the call has fewer, and ``group`` 0: the
    call's whole groups of 4 in one), and ``share`` of every group is kept: the nearest
    whole number of units, at least one (:func:`draw_plan`). A last, partial group is kept
    whole with weight 1. Draws one uniform per full group (:func:`uniforms`), unless ``u``
    gives them.
    """
    n_units = scores.shape[0]
    device = scores.device
    plan = draw_plan(n_units, share, group)
    if plan is None:
        index = torch.arange(n_units, device=device)
        return index, torch.ones(n_units, dtype=scores.dtype, device=device)
    group, kept = plan
    full = n_units // group * group
    u = uniforms(full // group, device) if u is None else u
    drawn = native.draw(scores[:full].reshape(-1, group).contiguous(), kept, u)
    if drawn is not None:  # the same draw in one native call (float32 on a CPU)
        index, weight = drawn
    else:
        p = keep_probabilities(scores[:full].reshape(-1, group), kept)
        keep = select_units(p, u, kept)
        index = keep.view(-1).nonzero().squeeze(1)
        weight = p.view(-1)[index].reciprocal_()
    if full < n_units:  # the partial group: kept whole
        rest = torch.arange(full, n_units, device=device)
        index = torch.cat([index, rest])
        weight = torch.cat([weight, weight.new_ones(n_units - full)])
    return index, weight


def random_phase(device: torch.device) -> int:
    """``rand_half``'s phase, 0 or 1 with probability 1/2 each (one uniform)."""
    return int(uniforms(1, device).item() >= 0.5)  # the float32 value, compared exactly


#: the slots :meth:`AdaptiveState.count` adds to: calls, kept units, total units
_COUNT_SLOTS = torch.tensor([1, 4, 5])


class AdaptiveState:
    """A layer's ``is_adaptive`` state, in one float64 CPU tensor (saved in checkpoints by
    :func:`fullsparse.sparse_state_dict`): the keep count, a call counter, the smoothed ratios
    of sampling variance to minibatch noise for k = 2 and 3, and the kept / total units of
    every sampled call (the run's FLOP account).

    Every ``interval`` calls (the first included) the layer computes its exact weight gradient
    as two half-batch products ``G = G_A + G_B``; ``‖G_A − G_B‖²`` estimates the minibatch
    noise ``V_b`` (the variance of G over batches of i.i.d. samples), and one draw of the
    estimator per k, ``‖Ĝ_k − G‖²``, its variance ``V_s(k)`` on the same batch (the
    sampler's own variance, covariances included: on convolutions the closed form
    ``Σ s²(1/p − 1)`` from the block scores overstates it many times). The keep count becomes the
    smallest k whose smoothed ``V_s(k)/V_b`` is within ``budget`` (4, the exact product, if
    none is).
    """

    SLOTS = ("keep", "calls", "ratio2", "ratio3", "kept_units", "total_units", "measured")
    #: weight of the newest measurement in the smoothed ratios
    SMOOTHING = 0.5

    @staticmethod
    def new() -> Tensor:
        state = torch.zeros(len(AdaptiveState.SLOTS), dtype=torch.float64, device="cpu")
        state[0] = 2
        return state

    @staticmethod
    def keep(state: Tensor) -> int:
        return int(state[0])

    @staticmethod
    def due(state: Tensor, interval: int) -> bool:
        """Whether this call measures (the first one, then every ``interval``)."""
        return int(state[1]) % interval == 0

    @staticmethod
    def count(state: Tensor | None, kept: int, total: int) -> None:
        """Count one call: ``kept`` of ``total`` units went into the product."""
        if state is None or native.count(state, kept, total):  # one native call
            return
        # one op, not three indexed updates (this runs in every layer's every backward)
        counts = torch.tensor([1.0, kept, total], dtype=torch.float64)
        state.index_add_(0, _COUNT_SLOTS, counts)

    @staticmethod
    def measure(state: Tensor, variances: dict[int, float], noise: float, budget: float) -> None:
        """Fold one measurement in (``variances``: ``V_s(k)`` for k = 2 and 3; ``noise``:
        ``V_b``) and choose the keep count."""
        new = state[6] == 0
        for slot, k in ((2, 2), (3, 3)):
            ratio = min(variances[k] / max(noise, 1e-300), 1e6)
            a = 1.0 if new else AdaptiveState.SMOOTHING
            state[slot] = a * ratio + (1 - a) * float(state[slot])
        state[6] += 1
        keep = 4
        for slot, k in ((2, 2), (3, 3)):
            if float(state[slot]) <= budget:
                keep = k
                break
        state[0] = keep

    @staticmethod
    def kept_share(state: Tensor) -> float | None:
        """The share of units that went into the weight-gradient products so far."""
        total = float(state[5])
        return float(state[4]) / total if total else None


def half_count(n_units: int, phase: int) -> int:
    """How many units ``rand_half`` keeps at ``phase`` (every second, from ``phase``)."""
    return math.ceil((n_units - phase) / 2)
