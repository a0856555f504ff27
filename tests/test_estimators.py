"""The gradient sparsifiers of fullsparse.estimators against float64 references."""

from __future__ import annotations

import pytest
import torch

from fullsparse import estimators
from fullsparse.estimators import mvue_2to4, mvue_keep_probabilities, topk_rows
from fullsparse.masks import is_2to4
from reference import ref_mvue_uniform


def _reference_probabilities(group: list[float]) -> list[float]:
    """Water-filling by bisection: p_i = min(1, c·|a_i|) with Σp = min(2, nonzeros)."""
    a = [abs(x) for x in group]
    target = min(2, sum(1 for x in a if x > 0))
    if target == 0:
        return [0.0] * 4
    lo, hi = 0.0, 1e300
    for _ in range(3000):
        c = (lo + hi) / 2 if hi < 1e299 else max(lo * 2, 1.0)
        s = sum(min(1.0, c * x) for x in a)
        if s < target:
            lo = c
        else:
            hi = c
        if hi < 1e299 and hi - lo <= 1e-18 * hi:
            break
    return [min(1.0, hi * x) for x in a]


def _exact_expectation(t: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    """E[mvue_2to4(t, 0)] for a 1-D float64 tensor of 4 entries, integrated exactly over u.

    The draw is piecewise constant in u, with breaks where u or u + 1 crosses a cumulative
    probability; each piece is evaluated at its midpoint (by fixing the uniforms) and
    weighted by its length.
    """
    p = _reference_probabilities(t.tolist())
    cum, acc = [], 0.0
    for x in p:
        acc += x
        cum.append(acc)
    breaks = sorted({0.0, 1.0, *(c for c in cum if 0 < c < 1), *(c - 1 for c in cum if 1 < c < 2)})
    total = torch.zeros_like(t)
    for lo, hi in zip(breaks, breaks[1:], strict=False):
        mid = (lo + hi) / 2
        monkeypatch.setattr(
            estimators,
            "mvue_uniforms",
            lambda key, pre, post, groups, mid=mid: torch.full((pre, groups, post), mid),
        )
        total += (hi - lo) * mvue_2to4(t, 0)
    return total


CASES = [
    [1.0, 2.0, 3.0, 4.0],
    [10.0, 0.1, 0.2, 0.3],  # the largest is capped at p = 1
    [5.0, -5.0, 0.0, 0.0],  # exactly two nonzeros: both kept, unscaled
    [0.0, 0.0, -3.0, 0.0],  # one nonzero: kept with p = 1
    [0.0, 0.0, 0.0, 0.0],
    [1.0, 1.0, 1.0, 1.0],
    [-7.5, 1e-3, 2.0, -0.25],
]


@pytest.mark.parametrize("group", CASES)
def test_mvue_keep_probabilities_match_water_filling_reference(group: list[float]) -> None:
    t = torch.tensor(group, dtype=torch.float64)
    got = mvue_keep_probabilities(t, 0).tolist()
    want = _reference_probabilities(group)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert sum(got) == pytest.approx(min(2, sum(1 for x in group if x != 0)), abs=1e-12)


@pytest.mark.parametrize("group", CASES)
def test_mvue_is_exactly_unbiased(group: list[float], monkeypatch: pytest.MonkeyPatch) -> None:
    t = torch.tensor(group, dtype=torch.float64)
    expectation = _exact_expectation(t, monkeypatch)
    torch.testing.assert_close(expectation, t, rtol=1e-12, atol=1e-14)


def test_mvue_draws_are_2to4_and_rescaled_survivors() -> None:
    g = torch.Generator().manual_seed(0)
    t = torch.randn(6, 37, dtype=torch.float64, generator=g)  # 37: a partial last group
    out = mvue_2to4(t, 1, generator=g)
    assert out.shape == t.shape and out.dtype == t.dtype
    assert is_2to4(out, 1)
    p = mvue_keep_probabilities(t, 1)
    kept = out != 0
    torch.testing.assert_close(out[kept], (t / p)[kept], rtol=1e-12, atol=0)
    # every full group with at least two nonzeros keeps exactly two
    full = kept[:, :36].reshape(6, 9, 4).sum(-1)
    assert bool((full == 2).all())


def test_mvue_monte_carlo_mean_and_variance_match_theory() -> None:
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([[3.0, -1.0, 0.5, 2.0, 9.0, 0.1, 0.2, -0.3]], dtype=torch.float64)
    # 20,000 draws: 1,000 rows of t in each of 20 calls (each call draws a new key)
    rows = t.expand(1000, -1).contiguous()
    draws = torch.cat([mvue_2to4(rows, 1, generator=g) for _ in range(20)]).unsqueeze(1)
    p = mvue_keep_probabilities(t, 1)
    var_theory = t**2 / p - t**2
    torch.testing.assert_close(draws.mean(0), t, rtol=0, atol=0.06)
    torch.testing.assert_close(draws.var(0), var_theory, rtol=0.08, atol=0.02)
    freq = (draws != 0).double().mean(0)
    torch.testing.assert_close(freq, p, rtol=0, atol=0.015)


def test_mvue_variance_is_below_uniform_unbiased_sampling() -> None:
    t = torch.tensor([4.0, 1.0, 0.5, 0.25], dtype=torch.float64)
    p = mvue_keep_probabilities(t, 0)
    mvue_var = (t**2 / p - t**2).sum()
    uniform_var = (t**2 / 0.5 - t**2).sum()
    assert mvue_var < uniform_var


def test_mvue_along_an_inner_axis_and_low_precision() -> None:
    g = torch.Generator().manual_seed(2)
    t = torch.randn(3, 8, 5, generator=g).to(torch.bfloat16)
    out = mvue_2to4(t, 1, generator=g)
    assert out.dtype == torch.bfloat16
    assert is_2to4(out, 1)


def test_mvue_is_reproducible_from_the_generator_state() -> None:
    t = torch.randn(4, 16, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    a = mvue_2to4(t, 1, generator=g)
    g.set_state(state)
    b = mvue_2to4(t, 1, generator=g)
    assert torch.equal(a, b)


def test_mvue_uniforms_match_a_python_reference_and_their_counter_order() -> None:
    key = (0xDEADBEEF, 12345)
    pre, post, groups = 3, 5, 7
    u = estimators.mvue_uniforms(key, pre, post, groups)
    assert u.shape == (pre, groups, post) and u.dtype == torch.float32
    for p_, g_, q_ in [(0, 0, 0), (2, 6, 4), (1, 3, 2), (0, 6, 1)]:
        counter = (p_ * post + q_) * groups + g_
        assert float(u[p_, g_, q_]) == ref_mvue_uniform(counter, key)


def test_mvue_uniforms_look_uniform_and_independent() -> None:
    """Mean, variance, 64-bin histogram, neighbour correlation; other keys, other streams."""
    n = 1 << 18
    u = estimators.mvue_uniforms((7, 11), 1, 1, n).reshape(-1).double()
    assert abs(float(u.mean()) - 0.5) < 0.005
    assert abs(float(u.var()) - 1 / 12) < 0.002
    counts = torch.histc(u, bins=64, min=0, max=1)
    chi2 = float(((counts - n / 64) ** 2 / (n / 64)).sum())
    assert chi2 < 120  # 63 degrees of freedom: p ≈ 3e-5 above 120
    c = u - 0.5
    for lag in (1, 2, 4, 1024):
        assert abs(float((c[:-lag] * c[lag:]).mean()) * 12) < 0.01
    other = estimators.mvue_uniforms((8, 11), 1, 1, n).reshape(-1).double() - 0.5
    assert abs(float((c * other).mean()) * 12) < 0.01
    assert (u < 1).all() and (u >= 0).all()


def test_mvue_on_a_cpu_advances_the_generator_by_one_key() -> None:
    g = torch.Generator().manual_seed(5)
    t = torch.randn(64, 16)
    mvue_2to4(t, 0, generator=g)
    h = torch.Generator().manual_seed(5)
    torch.randint(0, 2**32, (2,), generator=h, dtype=torch.int64)
    assert torch.equal(g.get_state(), h.get_state())


def test_mvue_rejects_bad_input() -> None:
    with pytest.raises(TypeError):
        mvue_2to4(torch.ones(4, dtype=torch.int64), 0)
    with pytest.raises(ValueError, match="out of range"):
        mvue_2to4(torch.ones(4), 1)
    with pytest.raises(ValueError, match="scalar"):
        mvue_2to4(torch.tensor(1.0), 0)


def test_topk_rows_keeps_the_largest_magnitudes_per_row() -> None:
    t = torch.tensor([[1.0, -5.0, 3.0, 0.5], [2.0, 2.0, -2.0, 1.0]], dtype=torch.float64)
    out = topk_rows(t, 0.5)
    want = torch.tensor([[0.0, -5.0, 3.0, 0.0], [2.0, 2.0, 0.0, 0.0]], dtype=torch.float64)
    assert torch.equal(out, want)  # the tie in row 2 goes to the lower indices


def test_topk_rows_against_a_sorting_reference() -> None:
    g = torch.Generator().manual_seed(4)
    t = torch.randn(5, 3, 11, dtype=torch.float64, generator=g)
    out = topk_rows(t, 0.3)
    k = round(0.3 * 11)
    for row_in, row_out in zip(t.reshape(-1, 11), out.reshape(-1, 11), strict=True):
        keep = sorted(range(11), key=lambda i: -abs(float(row_in[i])))[:k]
        want = torch.zeros(11, dtype=torch.float64)
        want[keep] = row_in[keep]
        assert torch.equal(row_out, want)


def test_topk_rows_rejects_bad_fraction() -> None:
    with pytest.raises(ValueError, match="keep_fraction"):
        topk_rows(torch.ones(2, 4), 0.0)
