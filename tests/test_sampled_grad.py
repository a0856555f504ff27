"""The sampled weight gradients (rand_half, is_half, is_adaptive) against float64 math.

- unbiased: the expectation over every draw, enumerated exactly (the uniforms replaced by the
  midpoints of the intervals on which the kept units do not change, weighted by their
  lengths; keep probabilities from the reference's bisection), equals the dense ``dYᵀX``;
- the product's FLOPs are the kept share of the dense product's (counted by torch's
  FlopCounterMode);
- draws are seeded and a run resumed from saved state continues bit for bit;
- the adaptive keep count follows the variance budget, and the FLOP account reads it.
"""

from __future__ import annotations

import itertools
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fullsparse import SparseConv2d, SparseLinear, recipe, sampled_grad, sampling
from fullsparse.functional import conv_grad_weight, linear_grad_weight
from fullsparse.geometry import ConvGeometry
from fullsparse.nn import load_sparse_state_, sparse_state_dict
from fullsparse.sampling import AdaptiveState, keep_probabilities, select_units
from fullsparse.train.schedule import LayerFlops, flop_account, grad_weight_shares
from reference import (
    Geo,
    im2col,
    out_size,
    ref_block_scores,
    ref_keep_probabilities,
    ref_sample_scores,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = dict(rtol=1e-10, atol=1e-10)


def _breakpoint_draws(scores: list[float], k: int) -> list[tuple[float, float]]:
    """(u, probability) pairs covering [0, 1): one u inside each interval on which the
    systematic sample of one group (of 4, or of any size) is constant."""
    p = ref_keep_probabilities(scores, k)
    cuts = {0.0, 1.0}
    end = 0.0
    for pj in p[:-1]:
        end += pj
        cuts.add(end % 1.0)
    cuts = sorted(cuts)
    return [((a + b) / 2, b - a) for a, b in itertools.pairwise(cuts) if b - a > 1e-12]


def _expectation(run, group_scores: list[list[float]], k: int, monkeypatch) -> torch.Tensor:
    """E[run()] over every combination of the groups' draws, exactly."""
    per_group = [_breakpoint_draws(s, k) for s in group_scores]
    total = None
    for combo in itertools.product(*per_group):
        u = torch.tensor([c[0] for c in combo], dtype=torch.float32)
        weight = 1.0
        for c in combo:
            weight *= c[1]
        monkeypatch.setattr(sampling, "uniforms", lambda n, device, u=u: u[:n].clone())
        value = run() * weight
        total = value if total is None else total + value
    assert total is not None
    return total


def _groups(scores: list[float], size: int = 4) -> list[list[float]]:
    full = len(scores) // size * size
    return [scores[i : i + size] for i in range(0, full, size)]


def _linear_operands(seed: int, m: int = 10, d_in: int = 6, d_out: int = 5):
    gen = torch.Generator().manual_seed(seed)
    x2 = torch.randn(m, d_in, generator=gen, dtype=torch.float64)
    dy2 = torch.randn(m, d_out, generator=gen, dtype=torch.float64)
    x2[3] = 0.0  # a unit with score 0 (still unbiased: p > 0 everywhere)
    return x2, dy2


def _adaptive_state(keep: int) -> torch.Tensor:
    state = AdaptiveState.new()
    state[0], state[1], state[6] = keep, 1, 1  # measured once; next measurement far away
    return state


@pytest.mark.parametrize(("mode", "keep"), [("is_half", 2), ("is_adaptive", 3)])
def test_linear_importance_sampling_is_unbiased_exactly(mode, keep, monkeypatch):
    x2, dy2 = _linear_operands(0)
    scores = [float(dy2[r].norm() * x2[r].norm()) for r in range(x2.shape[0])]

    def run():
        state = _adaptive_state(keep) if mode == "is_adaptive" else None
        return linear_grad_weight(x2, dy2, mode, state=state, interval=10**6)

    expected = _expectation(run, _groups(scores), keep, monkeypatch)
    torch.testing.assert_close(expected, dy2.t() @ x2, **TOL)


@pytest.mark.parametrize(("mode", "group", "share", "keep"),
                         [("is_half", 8, 0.625, 5), ("is_half", 16, 0.5, 8),
                          ("is_adaptive", 8, 0.5, 6), ("is_half", 0, 0.5625, 9)])  # fmt: skip
def test_linear_grouped_sampling_is_unbiased_exactly(mode, group, share, keep, monkeypatch):
    """Groups of 8 (two of them and 2 rows kept whole), keeping 5 or 6 of each; a group of
    16 on 18 rows: the call's 16 rows in one group, 8 kept; group 0 (one per call): the
    same 16 rows, 9 kept."""
    x2, dy2 = _linear_operands(2, m=18)
    scores = [float(dy2[r].norm() * x2[r].norm()) for r in range(x2.shape[0])]
    kept = []

    def run():
        state = _adaptive_state(3) if mode == "is_adaptive" else None
        grad = linear_grad_weight(
            x2, dy2, mode, state=state, interval=10**6, group=group, share=share
        )
        if state is not None:
            kept.append(int(state[4]))
        return grad

    expected = _expectation(run, _groups(scores, min(group or 16, 16)), keep, monkeypatch)
    torch.testing.assert_close(expected, dy2.t() @ x2, **TOL)
    if kept:  # 3 of 4: 6 of each group of 8, and the 2 rows of the partial group
        assert set(kept) == {2 * 6 + 2}


def test_a_group_larger_than_the_call_takes_its_whole_groups_of_4():
    scores = torch.rand(22, dtype=torch.float64) + 0.1
    index, weight = sampling.sample_units(scores, 0.5, group=64)
    assert index.numel() == 10 + 2  # 10 of its 20 in one group, the last 2 kept whole
    assert index[-2:].tolist() == [20, 21] and weight[-2:].tolist() == [1.0, 1.0]
    index, _ = sampling.sample_units(scores[:3], 0.5, group=64)
    assert index.tolist() == [0, 1, 2]  # no whole group of 4: all kept


@pytest.mark.parametrize("units", [3, 22, 256, 5000])
def test_group_0_is_one_group_per_call_whatever_its_size(units):
    """``group=0`` draws as a group of at least the call's size does (same uniforms, same
    units), on calls of any size: 4096 would split the 5000 units, 0 does not."""
    scores = torch.rand(units, dtype=torch.float64) + 0.1
    draws = []
    for group in (0, 1 << 20):
        torch.manual_seed(7)
        draws.append(sampling.sample_units(scores, 0.59, group=group))
    for got, want in zip(draws[0], draws[1], strict=True):
        assert torch.equal(got, want)
    whole = units // 4 * 4
    assert draws[0][0].numel() == (round(0.59 * whole) if whole else 0) + units - whole
    if units > 4096:
        torch.manual_seed(7)
        split, _ = sampling.sample_units(scores, 0.59, group=4096)
        assert split.numel() == round(0.59 * 4096) + units - 4096


def test_linear_random_phase_is_unbiased_and_halves_the_rows(monkeypatch):
    x2, dy2 = _linear_operands(1, m=7)  # odd: the phases keep 4 and 3 rows
    total = torch.zeros(5, 6, dtype=torch.float64)
    for u in (0.25, 0.75):
        monkeypatch.setattr(sampling, "uniforms", lambda n, device, u=u: torch.full((n,), u))
        total += 0.5 * linear_grad_weight(x2, dy2, "rand_half")
    torch.testing.assert_close(total, dy2.t() @ x2, **TOL)


CONV_CASES = {
    # n, ci, h, w, co, (kh, kw), stride, padding, dilation, groups
    "3x3_s1_p1_w9": (2, 3, 5, 9, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    "3x3_s2_p0_w17": (2, 2, 6, 17, 4, (3, 3), (2, 2), (0, 0), (1, 1), 1),
    "dilation2_groups2": (1, 4, 7, 12, 4, (3, 3), (1, 1), (2, 2), (2, 2), 2),
    "1x1_s2": (3, 4, 4, 16, 8, (1, 1), (2, 2), (0, 0), (1, 1), 1),
    # one output column: every odd column block is empty (found by tests/test_properties.py)
    "one_output_column": (3, 2, 4, 1, 4, (1, 1), (1, 2), (0, 0), (1, 1), 1),
}


def _conv_case(case: str, seed: int = 0):
    n, ci, h, w, co, (kh, kw), s, p, d, g = CONV_CASES[case]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, ci, h, w, generator=gen, dtype=torch.float64)
    weight = torch.randn(co, ci // g, kh, kw, generator=gen, dtype=torch.float64)
    ref_geo = Geo(s, p, d, g)
    ho, wo = out_size(h, w, kh, kw, ref_geo)
    gy = torch.randn(n, co, ho, wo, generator=gen, dtype=torch.float64)
    return x, weight, gy, ConvGeometry.make(s, p, d, g), ref_geo


def _ref_dense_conv_grad(x, weight, gy, ref_geo) -> torch.Tensor:
    """dY·Xᵀ on the explicit im2col matrix, group by group (float64)."""
    co, cig, kh, kw = weight.shape
    xmat = im2col(x, kh, kw, ref_geo)
    dy2 = gy.permute(1, 0, 2, 3).reshape(co, -1)
    k, cog = cig * kh * kw, co // ref_geo.groups
    parts = [
        dy2[i * cog : (i + 1) * cog] @ xmat[i * k : (i + 1) * k].t() for i in range(ref_geo.groups)
    ]
    return torch.cat(parts).reshape(weight.shape)


@pytest.mark.parametrize("case", list(CONV_CASES))
@pytest.mark.parametrize(("mode", "keep"), [("is_half", 2), ("is_adaptive", 3)])
def test_conv_importance_sampling_is_unbiased_exactly(case, mode, keep, monkeypatch):
    x, weight, gy, geo, ref_geo = _conv_case(case)
    scores = ref_block_scores(x, gy, weight.shape[3], ref_geo)

    def run():
        state = _adaptive_state(keep) if mode == "is_adaptive" else None
        return conv_grad_weight(x, gy, weight, geo, mode, state=state, interval=10**6)

    expected = _expectation(run, _groups(scores), keep, monkeypatch)
    torch.testing.assert_close(expected, _ref_dense_conv_grad(x, weight, gy, ref_geo), **TOL)


def test_conv_grouped_sampling_is_unbiased_exactly(monkeypatch):
    """3 samples = 6 column-block units in one group of... 4 (the call's whole groups of 4)
    with a group of 8 asked; keeping 3 of them (share 0.75)."""
    x, weight, gy, geo, ref_geo = _conv_case("1x1_s2")
    scores = ref_block_scores(x, gy, weight.shape[3], ref_geo)

    def run():
        return conv_grad_weight(x, gy, weight, geo, "is_half", group=8, share=0.75)

    expected = _expectation(run, _groups(scores, 4), 3, monkeypatch)
    torch.testing.assert_close(expected, _ref_dense_conv_grad(x, weight, gy, ref_geo), **TOL)


@pytest.mark.parametrize(("case", "samples"), [("3x3_s2_p0_w17", 6), ("dilation2_groups2", 5)])
@pytest.mark.parametrize(("mode", "group", "share", "keep"),
                         [("is_half", 4, 0.5, 2), ("is_adaptive", 4, 0.5, 3),
                          ("is_half", 0, 0.75, 3)])  # fmt: skip
def test_conv_per_sample_sampling_is_unbiased_exactly(
    case, samples, mode, group, share, keep, monkeypatch
):
    """``unit="sample"``: whole samples, one group of 4 and the rest kept whole; group 0
    takes the call's whole groups of 4 too."""
    x, weight, gy, geo, ref_geo = _conv_case(case)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(samples, *x.shape[1:], generator=gen, dtype=torch.float64)
    gy = torch.randn(samples, *gy.shape[1:], generator=gen, dtype=torch.float64)
    x[1] = 0.0  # a sample with score 0
    scores = ref_sample_scores(x, gy)

    def run():
        state = _adaptive_state(keep) if mode == "is_adaptive" else None
        return conv_grad_weight(x, gy, weight, geo, mode, state=state, interval=10**6,
                                group=group, share=share, unit="sample")  # fmt: skip

    expected = _expectation(run, _groups(scores), keep, monkeypatch)
    torch.testing.assert_close(expected, _ref_dense_conv_grad(x, weight, gy, ref_geo), **TOL)


def test_per_sample_scores_match_the_reference():
    x, _, gy, _, _ = _conv_case("1x1_s2", seed=4)
    got = sampled_grad.sample_scores(x, gy)
    want = torch.tensor(ref_sample_scores(x, gy), dtype=torch.float64)
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_random_phase_is_unbiased_for_both_phases(case, monkeypatch):
    x, weight, gy, geo, ref_geo = _conv_case(case, seed=1)
    wo = gy.shape[3]
    halves = []
    for u in (0.25, 0.75):  # phase 0 and phase 1
        monkeypatch.setattr(sampling, "uniforms", lambda n, device, u=u: torch.full((n,), u))
        got = conv_grad_weight(x, gy, weight, geo, "rand_half")
        phase = int(u >= 0.5)
        keep = torch.tensor([2.0 if c % 2 == phase else 0.0 for c in range(wo)])
        want = _ref_dense_conv_grad(x, weight, gy * keep.double(), ref_geo)
        torch.testing.assert_close(got, want, **TOL)  # each phase: its own columns ×2
        halves.append(got)
    torch.testing.assert_close(
        (halves[0] + halves[1]) / 2, _ref_dense_conv_grad(x, weight, gy, ref_geo), **TOL
    )


# --------------------------------------------------------------------------- probabilities
@pytest.fixture(params=["capping", "sorting"])
def level(request, monkeypatch):
    """Each way of finding the water-filling level: ``keep_probabilities`` on a CPU caps,
    and sorts where capping does not settle (forced here by allowing no pass)."""
    if request.param == "sorting":
        monkeypatch.setattr(sampling, "CAPPING_PASSES", 0)
    return request.param


def test_keep_probabilities_sum_to_k_and_cap_at_one(level):
    scores = torch.tensor([[10.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 5.0], [1.0, 2.0, 3.0, 4.0]])
    for k in (1, 2, 3):
        p = keep_probabilities(scores.double(), k)
        torch.testing.assert_close(p.sum(-1), torch.full((3,), float(k), dtype=torch.float64))
        assert bool((p > 0).all()) and bool((p <= 1).all())
        for row in range(3):
            want = ref_keep_probabilities(scores[row].double().tolist(), k)
            torch.testing.assert_close(p[row], torch.tensor(want, dtype=torch.float64))


def test_keep_probabilities_match_the_bisection_on_random_groups(level):
    """Skewed, tied and zero scores, every keep count: the levels equal the float64
    bisection of the reference."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(300, 4, generator=gen, dtype=torch.float64) ** 6
    scores[:50, 1:] = 0.0  # one nonzero score
    scores[50:100, 2:] = 0.0  # two
    scores[100:150] = scores[100:150, :1]  # ties
    scores[150:200, 0] *= 1e4  # one far ahead
    for k in (1, 2, 3, 4):
        p = keep_probabilities(scores, k)
        want = [ref_keep_probabilities(row, k) for row in scores.tolist()]
        torch.testing.assert_close(p, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)


def test_keep_probabilities_of_one_large_group_match_the_bisection(level):
    """One group of 4,096 heavy-tailed scores (hundreds capped at 1, as a GPT layer's tokens
    at share 0.59), and groups of 64 with several far ahead."""
    gen = torch.Generator().manual_seed(1)
    big = torch.rand(1, 4096, generator=gen, dtype=torch.float64) ** 8
    small = torch.rand(32, 64, generator=gen, dtype=torch.float64)
    small[:, :5] *= 1e3
    for scores, k in ((big, 2417), (big, 1000), (small, 38), (small, 7)):
        p = keep_probabilities(scores, k)
        want = [ref_keep_probabilities(row, k) for row in scores.tolist()]
        assert int((p == 1).sum()) > scores.shape[0]  # the capping is exercised
        torch.testing.assert_close(p, torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=0)
        total = torch.full_like(p[:, 0], float(k))
        torch.testing.assert_close(p.sum(-1), total, rtol=1e-12, atol=0)


def test_the_capping_and_the_sort_agree_in_float32():
    gen = torch.Generator().manual_seed(2)
    scores = torch.rand(3, 4096, generator=gen) ** 6
    s = scores + (scores.mean(-1, keepdim=True) * 1e-6 + torch.finfo(torch.float32).tiny)
    capped = sampling._level_by_capping(s, 2417)
    assert capped is not None
    torch.testing.assert_close(capped, sampling._level_by_sorting(s, 2417), rtol=2e-6, atol=0)


def test_non_finite_scores_are_kept_for_sure():
    nan, inf = float("nan"), float("inf")
    scores = torch.tensor([[1.0, nan, 2.0, 3.0], [inf, nan, inf, 1.0], [4.0, 3.0, 2.0, 1.0]])
    p = keep_probabilities(scores, 2)
    assert p[0, 1] == 1 and p[1, :3].tolist() == [1.0, 1.0, 0.0] and p[1, 3] == 0
    torch.testing.assert_close(p[0, [0, 2, 3]].sum(), torch.tensor(1.0))
    torch.testing.assert_close(p.sum(-1), torch.full((3,), 2.0))
    torch.testing.assert_close(p[2], keep_probabilities(scores[2:], 2)[0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("mode", ["rand_half", "is_half", "is_adaptive"])
def test_a_non_finite_gradient_stays_visible_in_the_sampled_weight_gradient(bad, mode):
    """An overflow in one token of dY (or one sample of a convolution's X) must reach dW —
    never be dropped by the draw: the trainer and AMP's scaler look for it there."""
    geo = ConvGeometry.make((1, 1), (1, 1), (1, 1), 1)
    for seed in range(6):
        torch.manual_seed(seed)
        x, dy = torch.randn(64, 8), torch.randn(64, 6)
        dy[37, 2] = bad
        for group in (4, 0):
            g = sampled_grad.linear_sampled_grad_weight(x, dy, mode, group=group, share=0.5)
            assert not bool(torch.isfinite(g).all())
        xc, dyc, w = torch.randn(6, 3, 5, 5), torch.randn(6, 4, 5, 5), torch.zeros(4, 3, 3, 3)
        xc[4, 1, 2, 3] = bad  # column 3: not read by the even output columns of a 1x1
        w = torch.zeros(4, 3, 1, 1) if mode == "rand_half" else w
        geo = ConvGeometry.make((1, 1), (0, 0), (1, 1), 1) if mode == "rand_half" else geo
        for unit in ("block", "sample"):
            g = sampled_grad.conv_sampled_grad_weight(
                xc, dyc, w, geo, mode, group=0, share=0.5, unit=unit
            )
            assert not bool(torch.isfinite(g).all())


def test_systematic_sampling_keeps_exactly_k_with_the_marginals():
    p = keep_probabilities(torch.tensor([[4.0, 3.0, 2.0, 1.0]], dtype=torch.float64), 2)
    grid = torch.arange(20000, dtype=torch.float64) / 20000 + 0.5 / 20000
    kept = select_units(p.expand(len(grid), 4).clone(), grid.float(), 2)
    assert kept.sum(-1).tolist() == [2] * len(grid)
    torch.testing.assert_close(kept.double().mean(0), p[0], atol=2e-4, rtol=0)


# --------------------------------------------------------------------------- FLOPs
def _flops(fn, *args, op: str = "") -> int:
    """FLOPs of ``fn(*args)`` (only those of aten ops whose name holds ``op``), counted on
    the products as they run inside the custom operators (which torch's FLOP counter sees as
    one opaque call)."""
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    counts = counter.get_flop_counts()["Global"]
    return sum(v for k, v in counts.items() if op in str(k))


@pytest.mark.parametrize(("mode", "keep", "share"), [("rand_half", 2, 0.5), ("is_half", 2, 0.5),
                                                      ("is_adaptive", 3, 0.75)])  # fmt: skip
def test_the_product_flops_are_the_kept_share(mode, keep, share):
    torch.manual_seed(0)
    x2, dy2 = torch.randn(64, 32), torch.randn(64, 24)  # 64 tokens
    dense = _flops(lambda: dy2.t().mm(x2))
    assert dense == 2 * 64 * 32 * 24
    args = (x2, dy2, mode, _adaptive_state(keep), 1.0, 10**6)
    assert _flops(sampled_grad._linear_impl, *args) == share * dense
    x, weight = torch.randn(2, 8, 6, 16), torch.randn(8, 8, 3, 3)
    dy = torch.randn(2, 8, 6, 16)  # 16 output columns: 4 groups of 4
    geo = ConvGeometry.make(1, 1, 1, 1)
    conv_dense = _flops(lambda: conv_grad_weight(x, dy, weight, geo, "dense"))
    assert conv_dense == 2 * 8 * 8 * 9 * (2 * 6 * 16)
    conv_args = (x, dy, weight, geo, mode, _adaptive_state(keep), 1.0, 10**6)
    product = _flops(sampled_grad._conv_impl, *conv_args, op="convolution")
    assert product == share * conv_dense
    assert _flops(sampled_grad._conv_impl, *conv_args) == product  # no other product
    if mode != "rand_half":  # whole samples: 8 of them, 2 groups of 4
        x8, dy8 = x.repeat(4, 1, 1, 1), dy.repeat(4, 1, 1, 1)
        unit_args = (x8, dy8, weight, geo, mode, _adaptive_state(keep), 1.0, 10**6, 4, 0.5)
        product = _flops(sampled_grad._conv_impl, *unit_args, "sample", op="convolution")
        assert product == share * 4 * conv_dense
        assert _flops(sampled_grad._conv_impl, *unit_args, "sample") == product


# --------------------------------------------------------------------------- state, resume
class _Net(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.conv = SparseConv2d(4, 8, 3, padding=1, config=name)
        self.fc = SparseLinear(8 * 8, 16, config=name)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).mean(2)  # [N, 8, W=8]
        return self.head(torch.relu(self.fc(h.flatten(1).unsqueeze(1))).squeeze(1))


def _steps(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("name", ["fst_rand", "fst_is", "fst_adaptive", "fst_is+sample"])
def test_draws_are_seeded_and_resume_bit_exactly(name):
    cfg = recipe(name, variance_interval=2) if name == "fst_adaptive" else None
    if name == "fst_is+sample":  # whole samples, the batch of 6 in one group
        cfg = recipe("fst_is", conv_sample_unit="sample", sample_group=0, sample_share=0.59)
    cfg = cfg or recipe(name)
    gen = torch.Generator().manual_seed(5)
    batches = [(torch.randn(6, 4, 8, 8, generator=gen), torch.randint(0, 3, (6,), generator=gen))
               for _ in range(6)]  # fmt: skip

    def fresh():
        torch.manual_seed(1)
        model = _Net("dense")
        model.conv.config = model.fc.config = cfg
        return model, torch.optim.SGD(model.parameters(), lr=0.1)

    straight, opt = fresh()
    torch.manual_seed(2)
    _steps(straight, opt, batches)

    first, opt1 = fresh()
    torch.manual_seed(2)
    _steps(first, opt1, batches[:3])
    saved = (first.state_dict(), sparse_state_dict(first), opt1.state_dict(), torch.get_rng_state())
    resumed, opt2 = fresh()
    resumed.load_state_dict(saved[0])
    load_sparse_state_(resumed, saved[1])
    opt2.load_state_dict(saved[2])
    torch.set_rng_state(saved[3])
    _steps(resumed, opt2, batches[3:])
    for (key, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(),
                           strict=True):  # fmt: skip
        assert torch.equal(a, b), key
    assert torch.equal(straight.fc.gw_state, resumed.fc.gw_state)
    assert int(straight.fc.gw_state[1]) == 6  # six backward calls counted
    other, opt3 = fresh()
    torch.manual_seed(3)  # another seed: other draws, other weights
    _steps(other, opt3, batches)
    assert not torch.equal(other.fc.weight, straight.fc.weight)


# --------------------------------------------------------------------------- adaptive
@pytest.mark.parametrize(("budget", "keep"), [(1e6, 2), (1e-12, 4)])
def test_the_keep_count_follows_the_budget(budget, keep):
    torch.manual_seed(0)
    layer = SparseLinear(16, 8, config=recipe("fst_adaptive", variance_budget=budget))
    x = torch.randn(8, 8, 16)
    for _ in range(3):
        layer(x).square().sum().backward()
    state = layer.gw_state
    assert int(state[0]) == keep and int(state[6]) == 1  # measured at the first call only
    # the first call was exact (all 64 tokens) and drew one estimate at 2 and one at 3 of 4;
    # the next two kept k of every 4
    assert float(state[4]) == 64 * (1 + 2 / 4 + 3 / 4) + 2 * 64 * keep / 4
    assert float(state[5]) == 3 * 64


def test_measured_variances_match_their_definitions(monkeypatch):
    """V_s(k) = ‖Ĝ_k − G‖² of the draw made; V_b = ‖G_A − G_B‖² of the two half batches."""
    gen = torch.Generator().manual_seed(3)
    x2 = torch.randn(32, 6, generator=gen, dtype=torch.float64)
    dy2 = torch.randn(32, 5, generator=gen, dtype=torch.float64)
    u = 0.3
    monkeypatch.setattr(sampling, "uniforms", lambda n, device: torch.full((n,), u))
    state = AdaptiveState.new()
    grad = linear_grad_weight(x2, dy2, "is_adaptive", state=state, budget=1.0, interval=4)
    exact = dy2.t() @ x2
    torch.testing.assert_close(grad, exact, **TOL)  # a measuring call is exact
    noise = float((dy2[:16].t() @ x2[:16] - dy2[16:].t() @ x2[16:]).square().sum())
    scores = [float(dy2[r].norm() * x2[r].norm()) for r in range(32)]
    kept_units = 32
    for slot, k in ((2, 2), (3, 3)):
        weights = []
        for g in range(8):  # the reference's systematic sample at u, group by group
            p = ref_keep_probabilities(scores[4 * g : 4 * g + 4], k)
            start = 0.0
            for j in range(4):
                end = start + p[j] if j < 3 else float(k)
                kept = any(start <= u + i < end for i in range(k))
                weights.append(1.0 / p[j] if kept else 0.0)
                start = end
        kept_units += sum(w > 0 for w in weights)
        estimate = dy2.t() @ (torch.tensor(weights, dtype=torch.float64)[:, None] * x2)
        v_s = float((estimate - exact).square().sum())
        assert float(state[slot]) == pytest.approx(v_s / noise, rel=1e-9)
    assert float(state[4]) == kept_units and float(state[5]) == 32  # the draws' units counted


def test_flop_account_counts_the_kept_share():
    torch.manual_seed(0)
    model = nn.Sequential(SparseLinear(16, 16, config=recipe("fst_adaptive", variance_budget=1e6)))
    x = torch.randn(4, 8, 16)
    for _ in range(4):
        model(x).square().sum().backward()
    shares = grad_weight_shares(model)
    kept = (32 + 16 + 24 + 3 * 16) / (4 * 32)  # one exact call with its two draws, three at 2 of 4
    assert shares == {"0": pytest.approx(2 * (1 - kept))}
    layers = [LayerFlops("0", 100, model[0].config)]
    account = flop_account(layers, {"sparse": 4}, "backward", shares)
    assert account["grad_weight"] == pytest.approx(2 * (1 - kept))
    assert account["output"] == 1.0 and account["grad_input"] == 1.0


@pytest.mark.parametrize(
    "fields",
    [
        {"variance_budget": 0.0},
        {"variance_budget": float("nan")},
        {"variance_budget": float("inf")},
        {"variance_budget": True},
        {"variance_interval": 0},
        {"variance_interval": 2.5},
    ],
)
def test_bad_variance_fields_are_refused(fields):
    with pytest.raises(ValueError, match="variance_"):
        recipe("fst_adaptive", **fields)


def test_variance_fields_clash_with_other_modes():
    with pytest.raises(ValueError, match="only steer grad_weight_mode='is_adaptive'"):
        recipe("fst_is", variance_budget=0.5)


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"sample_group": 6}, "sample_group must be 0 (the whole call) or a multiple of 4"),
        ({"sample_group": -4}, "sample_group must be 0 (the whole call) or a multiple of 4"),
        ({"sample_group": 2}, "sample_group must be 0 (the whole call) or a multiple of 4"),
        ({"sample_group": True}, "sample_group must be 0 (the whole call) or a multiple of 4"),
        ({"sample_share": 0.0}, "sample_share must be a number in (0, 1]"),
        ({"sample_share": 1.5}, "sample_share must be a number in (0, 1]"),
        ({"sample_share": float("nan")}, "sample_share must be a number in (0, 1]"),
    ],
)
def test_bad_sampling_groups_are_refused(fields, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        recipe("fst_is", **fields)


def test_sampling_group_fields_clash_with_other_modes():
    assert recipe("fst_adaptive", sample_group=16).sample_group == 16
    assert recipe("fst_is", sample_group=0).sample_group == 0
    with pytest.raises(ValueError, match="only groups the units of 'is_half' and 'is_adaptive'"):
        recipe("fst_rand", sample_group=16)
    with pytest.raises(ValueError, match="only 'is_half' keeps a fixed share"):
        recipe("fst_adaptive", sample_share=0.75)
    assert recipe("fst_adaptive", conv_sample_unit="sample").conv_sample_unit == "sample"
    with pytest.raises(ValueError, match="only sets the units a convolution's 'is_half'"):
        recipe("fst_mvue", conv_sample_unit="sample")
    with pytest.raises(ValueError, match="conv_sample_unit='channel' is not one of"):
        recipe("fst_is", conv_sample_unit="channel")


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--recipe", "fst_adaptive", "--variance-budget", "-1"], "variance_budget"),
        (["--recipe", "fst_adaptive", "--variance-budget", "nan"], "variance_budget"),
        (["--recipe", "fst_adaptive", "--variance-interval", "0"], "variance_interval"),
        (["--recipe", "fst_is", "--variance-budget", "0.5"], "only steer"),
        (["--recipe", "fst_is", "--sample-group", "6"], "multiple of 4"),
        (["--recipe", "fst_is", "--sample-share", "0"], "sample_share"),
        (["--recipe", "fst_mvue", "--sample-group", "16"], "only groups the units"),
        (["--recipe", "fst_rand", "--conv-sample-unit", "sample"], "only sets the units"),
        (["--recipe", "fst_is", "--conv-sample-unit", "pixel"], "conv-sample-unit"),
    ],
)
def test_bad_variance_flags_get_one_line_and_exit_2(flags, says, tmp_path, capsys):
    from fullsparse.cli import main

    out = tmp_path / "run"
    try:
        rc = main(["train", *flags, "--out", str(out)])
    except SystemExit as exit_:  # argparse's own refusal (a choice not offered)
        rc = exit_.code
    assert rc == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1
    assert not out.exists()  # nothing written


def test_sampling_work_is_the_products_own_operands():
    """The benchmark's sampling work (``sampling_work``) prepares exactly the operands the
    product then multiplies: the same draw gives the same gradient."""
    gen = torch.Generator().manual_seed(8)
    x2, dy2 = torch.randn(40, 6, generator=gen), torch.randn(40, 5, generator=gen)
    w2 = torch.zeros(5, 6)
    for mode in ("rand_half", "is_half"):
        torch.manual_seed(1)
        dy_kept, x_kept = sampled_grad.sampling_work(mode, x2, dy2, w2)
        scale = 2.0 if mode == "rand_half" else 1.0
        torch.manual_seed(1)
        torch.testing.assert_close(
            scale * dy_kept.t() @ x_kept, linear_grad_weight(x2, dy2, mode), rtol=1e-6, atol=1e-6
        )
    x, weight, dy = torch.randn(4, 3, 6, 9), torch.randn(4, 3, 3, 3), torch.randn(4, 4, 6, 9)
    geo = ConvGeometry.make(1, 1, 1, 1)
    torch.manual_seed(2)
    parts = sampled_grad.sampling_work("is_half", x, dy, weight, geo)
    torch.manual_seed(2)
    want = conv_grad_weight(x, dy, weight, geo, "is_half")
    torch.testing.assert_close(sampled_grad._products(weight, parts), want, rtol=1e-6, atol=1e-6)
    torch.manual_seed(3)
    x_kept, dy_kept = sampled_grad.sampling_work("is_half", x, dy, weight, geo, unit="sample")
    assert x_kept.shape[0] == 2  # 2 of the 4 samples
    torch.manual_seed(3)
    want = conv_grad_weight(x, dy, weight, geo, "is_half", unit="sample")
    got = sampled_grad._products(weight, [(x_kept, dy_kept, geo)])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _read_by_kept_columns(hw, khw, geo, phase):
    """Which input entries the output columns ``phase, phase + 2, …`` read (float64
    autograd through a convolution of ones: the reference of ``_reads_all_of``)."""
    x = torch.zeros(1, 1, *hw, dtype=torch.float64, requires_grad=True)
    y = F.conv2d(x + 1, torch.ones(1, 1, *khw, dtype=torch.float64), None, geo.stride,
                 geo.padding, geo.dilation)  # fmt: skip
    y[..., phase::2].sum().backward()
    return x.grad[0, 0] > 0


def test_the_kept_columns_read_all_of_x_exactly_where_the_reference_says():
    """rand_half checks X for a NaN or an infinity only where its kept columns' windows
    skip some of X: the rule agrees with autograd on every small geometry."""
    answers = []
    for h, w, kh, kw, s, p, d in itertools.product(
        (4, 5), (5, 6, 7), (1, 3), (1, 2, 3), (1, 2), (0, 1, 2), (1, 2)
    ):
        geo = ConvGeometry.make((s, s), (p, p), (d, d), 1)
        ho, wo = geo.output_size((h, w), (kh, kw))
        if ho < 1 or wo < 1:
            continue
        for phase in (0, 1):
            want = bool(_read_by_kept_columns((h, w), (kh, kw), geo, phase).all())
            assert sampled_grad._reads_all_of((h, w), (kh, kw), geo, phase, wo) is want
            answers.append(want)
    assert answers.count(True) > 10 and answers.count(False) > 10  # both answers occur


@pytest.mark.parametrize("native_on", [True, False])
@pytest.mark.parametrize("phase", [0, 1])
def test_rand_half_keeps_a_non_finite_value_of_dy_or_x_visible(native_on, phase, monkeypatch):
    """A NaN or an infinity in a dropped column of dY, or anywhere in X, reaches a
    convolution's rand_half weight gradient, with the native pass and without it."""
    if not native_on:
        monkeypatch.setenv("FULLSPARSE_NATIVE", "off")
    monkeypatch.setattr(sampling, "uniforms", lambda n, device: torch.full((n,), 0.25 + phase / 2))
    geo = ConvGeometry.make((1, 1), (1, 1), (1, 1), 1)  # 3x3: the kept columns read all of X
    w = torch.zeros(4, 3, 3, 3)
    for bad in (float("nan"), float("inf")):
        for where in ("dy", "x"):
            x, dy = torch.randn(6, 3, 5, 6), torch.randn(6, 4, 5, 6)
            (dy if where == "dy" else x)[4, 1, 2, 1 - phase if where == "dy" else 3] = bad
            g = sampled_grad.conv_sampled_grad_weight(x, dy, w, geo, "rand_half")
            assert not bool(torch.isfinite(g).all())
    x, dy = torch.randn(6, 3, 5, 6), torch.randn(6, 4, 5, 6)
    g = sampled_grad.conv_sampled_grad_weight(x, dy, w, geo, "rand_half")
    assert bool(torch.isfinite(g).all())  # and nothing is flagged without a cause
