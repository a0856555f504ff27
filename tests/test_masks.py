"""2:4 operators: hand-written masks, brute-force transposable masks, and the checks."""

from __future__ import annotations

import pytest
import torch

from fullsparse.masks import is_2to4, mask_2to4, transposable_mask_2to4, transposable_patterns
from reference import ref_mask_rows, ref_transposable_mask, valid_4x4_patterns


def test_mask_2to4_hand_written_4x4():
    w = torch.tensor(
        [
            [1.0, -5.0, 3.0, 2.0],  # keep |-5|, 3
            [0.0, 0.0, 0.0, 0.0],  # all tied: lowest two indices
            [2.0, 2.0, -2.0, 1.0],  # three tied at 2: indices 0 and 1
            [-0.5, 4.0, 4.0, -7.0],  # -7 then the lower of the two 4s
        ]
    )
    expected = torch.tensor(
        [
            [False, True, True, False],
            [True, True, False, False],
            [True, True, False, False],
            [False, True, False, True],
        ]
    )
    assert torch.equal(mask_2to4(w, dim=1), expected)
    # along dim 0 the same matrix transposed gives the transposed mask
    assert torch.equal(mask_2to4(w.t(), dim=0), expected.t())


def test_mask_2to4_pads_a_dim_that_is_not_a_multiple_of_4():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0, 9.0, -8.0, 7.0]])  # 7 = 4 + 3 (one zero pad)
    expected = torch.tensor([[False, False, True, True, True, True, False]])
    assert torch.equal(mask_2to4(w, 1), expected)
    tiny = torch.tensor([[5.0]])  # a single entry: the padding never displaces it
    assert torch.equal(mask_2to4(tiny, 1), torch.tensor([[True]]))


def test_mask_2to4_keeps_nan_visible_and_two_per_group():
    w = torch.tensor([[float("nan"), 1.0, 2.0, 3.0]])
    m = mask_2to4(w, 1)
    assert m.sum() == 2 and bool(m[0, 0]) and bool(m[0, 3])


def test_mask_2to4_keeps_inf_over_the_largest_finite_value():
    w = torch.tensor([[65504.0, 65504.0, float("inf"), 0.0]], dtype=torch.float16)
    assert mask_2to4(w, 1).tolist() == [[True, False, True, False]]
    w = torch.tensor([[3.0, float("-inf"), 1e38, 2.0]], dtype=torch.float32)
    assert mask_2to4(w, 1).tolist() == [[False, True, True, False]]


def test_mask_2to4_nonfinite_entries_rank_first_and_tie_to_the_lower_index():
    nan, inf = float("nan"), float("inf")
    w = torch.tensor(
        [
            [1.0, nan, 5.0, -inf],  # both non-finite kept
            [nan, inf, nan, 7.0],  # three non-finite: the two lowest indices
            [-inf, 2.0, 3.0, 1.0],  # one non-finite, then the largest finite
        ]
    )
    want = [[False, True, False, True], [True, True, False, False], [True, False, True, False]]
    assert mask_2to4(w, 1).tolist() == want


@pytest.mark.parametrize("shape,dim", [((6, 12), 1), ((12, 7), 0), ((3, 5, 9), 2), ((2, 8, 3), 1)])
def test_mask_2to4_matches_reference_loops(shape, dim):
    torch.manual_seed(0)
    t = torch.randn(shape, dtype=torch.float64)
    m = mask_2to4(t, dim)
    moved = t.movedim(dim, -1).reshape(-1, shape[dim])
    expected = ref_mask_rows(moved).reshape(t.movedim(dim, -1).shape).movedim(-1, dim)
    assert torch.equal(m, expected)
    assert is_2to4(t * m, dim)
    full_groups = shape[dim] // 4
    per_group = m.movedim(dim, -1)[..., : 4 * full_groups].reshape(-1, 4).sum(-1)
    assert bool((per_group == 2).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_mask_2to4_low_precision_dtypes(dtype):
    torch.manual_seed(1)
    t = torch.randn(8, 16).to(dtype)
    assert torch.equal(mask_2to4(t, 1), ref_mask_rows(t.double()))


def test_is_2to4():
    assert is_2to4(torch.tensor([[1.0, 0.0, 2.0, 0.0]]), 1)
    assert not is_2to4(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), 1)
    assert is_2to4(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), 0)  # groups run down the columns
    assert not is_2to4(torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0]]), 1)
    assert is_2to4(torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, 1.0]]), 1)


def test_there_are_exactly_90_transposable_patterns():
    pats = transposable_patterns()
    assert pats.shape == (90, 4, 4)
    assert bool((pats.sum(1) == 2).all()) and bool((pats.sum(2) == 2).all())
    assert len({tuple(p.flatten().tolist()) for p in pats}) == 90
    assert len(valid_4x4_patterns()) == 90


@pytest.mark.parametrize("shape", [(4, 4), (8, 12), (12, 8), (6, 10), (16, 16)])
def test_transposable_mask_matches_brute_force(shape):
    torch.manual_seed(sum(shape))
    w = torch.randn(shape, dtype=torch.float64)
    m = transposable_mask_2to4(w)
    assert torch.equal(m, ref_transposable_mask(w))
    assert is_2to4(w * m, 0) and is_2to4(w * m, 1)


def test_transposable_mask_is_optimal_not_greedy():
    # Row-wise top-2 here is not transposable (column 0 would keep three); the exact search
    # must still reach the best of the 90 patterns.
    w = torch.tensor(
        [[10.0, 9.0, 0.0, 0.0], [10.0, 9.0, 0.0, 0.0], [10.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0]]
    )
    m = transposable_mask_2to4(w)
    kept = float((w.abs() * m).sum())
    best = max(
        float((w.abs() * torch.tensor(p, dtype=torch.float32)).sum()) for p in valid_4x4_patterns()
    )
    assert kept == best


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_transposable_mask_ranks_a_weight_exactly_in_its_own_precision(dtype):
    w = torch.ones(4, 4, dtype=dtype)
    # just above 1 (lost in a float32 sum of such values), at a place that the first of the
    # 90 patterns (the answer when all tie) drops
    w[0, 0] = 1 + 1e-9 if dtype == torch.float64 else 1 + 2**-23
    m = transposable_mask_2to4(w)
    assert bool(m[0, 0]) and torch.equal(m, ref_transposable_mask(w.double()))


def test_transposable_mask_keeps_nonfinite_first_then_maximises_the_finite_sum():
    torch.manual_seed(5)
    w = torch.randn(8, 8, dtype=torch.float64)
    w[0, 1], w[5, 6], w[6, 6] = float("inf"), float("nan"), float("-inf")
    m = transposable_mask_2to4(w)
    assert bool(m[0, 1]) and bool(m[5, 6]) and bool(m[6, 6])
    assert is_2to4(m.double(), 0) and is_2to4(m.double(), 1)
    # apart from the non-finite entries (each forced in), the finite kept sum is the best:
    # the brute force with the non-finite entries replaced by one value above all others
    stand_in = w.abs().nan_to_num(nan=0.0, posinf=0.0).sum() + 1
    big = w.abs().nan_to_num(nan=stand_in.item(), posinf=stand_in.item())
    assert torch.equal(m, ref_transposable_mask(big))


def test_transposable_mask_batched_equals_per_matrix():
    torch.manual_seed(3)
    w = torch.randn(3, 8, 12)
    m = transposable_mask_2to4(w)
    for i in range(3):
        assert torch.equal(m[i], transposable_mask_2to4(w[i]))


def test_mask_errors_are_clear():
    with pytest.raises(ValueError, match="out of range"):
        mask_2to4(torch.randn(4, 4), 2)
    with pytest.raises(ValueError, match="scalar"):
        mask_2to4(torch.tensor(1.0), 0)
    with pytest.raises(ValueError, match="2-D matrix"):
        transposable_mask_2to4(torch.randn(2, 2, 4, 4))
    with pytest.raises(TypeError, match="torch.Tensor"):
        mask_2to4([[1.0, 2.0]], 1)  # type: ignore[arg-type]
