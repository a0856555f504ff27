"""Gradient fidelity per layer, and the per-iteration overhead measurement."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fullsparse.analysis.fidelity import (
    capture_grads,
    compare_tensors,
    exact_twin,
    format_fidelity,
    grad_fidelity,
)
from fullsparse.analysis.overhead import format_overhead, measure_overhead
from fullsparse.config import RECIPES, recipe
from fullsparse.nn import sparsify_


class ResidualNet(nn.Module):
    """conv1 -> conv2 with an identity shortcut around conv2 -> linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = self.conv1(x).relu()
        h = self.conv2(h) + h
        h = self.bn(self.conv3(h)).relu()
        return self.fc(h.mean((2, 3)))


def _batches(n: int = 2, size: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(size, 2, 8, 8, generator=g), torch.randint(0, 4, (size,), generator=g))
        for _ in range(n)
    ]


def test_compare_tensors_by_hand():
    a = torch.tensor([1.0, 0.0])
    assert compare_tensors(a, a.clone()) == (1.0, 0.0)
    assert compare_tensors(torch.tensor([0.0, 2.0]), a) == (0.0, pytest.approx(math.sqrt(5)))
    cos, err = compare_tensors(-a, a)
    assert cos == -1.0 and err == pytest.approx(2.0)
    cos, err = compare_tensors(3 * a, a)
    assert cos == pytest.approx(1.0) and err == pytest.approx(2.0)
    assert math.isnan(compare_tensors(torch.zeros(2), a)[0])


def test_captured_grad_input_is_the_layers_own_product_not_the_shortcut_sum():
    torch.manual_seed(0)
    model = ResidualNet().train()
    x, y = _batches(1)[0]
    grads = capture_grads(model, x, y, ["conv2", "conv1"])
    # by hand: dX of conv2 alone = conv_transpose(dY2, W2)
    outputs = {}
    model.conv2.register_forward_hook(lambda m, a, out: outputs.update(y2=out))
    out = model(x)
    (dy2,) = torch.autograd.grad(F.cross_entropy(out, y), outputs["y2"])
    expected = torch.nn.grad.conv2d_input(
        x.shape[:1] + (8, 8, 8), model.conv2.weight, dy2, padding=1
    )
    torch.testing.assert_close(grads["conv2"]["grad_input"], expected)
    # conv2's input also feeds the shortcut, so the full gradient there is larger
    assert grads["conv2"]["grad_weight"].shape == model.conv2.weight.shape
    assert grads["conv1"]["grad_input"].shape == x.shape


def test_dense_recipe_has_cosine_exactly_one_in_both_modes():
    torch.manual_seed(0)
    result = grad_fidelity(ResidualNet(), _batches(), ["dense"])
    assert {r.mode for r in result.rows} == {"local", "accumulated"}
    assert len(result.select("dense", "accumulated")) == 4  # three convs and the head
    assert len(result.select("dense", "local")) == 3  # the head is never sparsified
    for row in result.rows:
        assert row.grad_input_cos == 1.0 and row.grad_weight_cos == 1.0
        assert row.grad_input_err == 0.0 and row.grad_weight_err == 0.0


def test_dense_recipe_on_resnet20_matches_torch_exactly():
    from fullsparse.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet20", 4, in_channels=1)
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(4, 1, 8, 8, generator=g), torch.randint(0, 4, (4,), generator=g))
    result = grad_fidelity(model, [batch], ["dense"], modes=["accumulated"])
    assert len(result.rows) == 22
    assert all(r.grad_input_cos == 1.0 and r.grad_weight_cos == 1.0 for r in result.rows)


def test_exact_backward_recipes_match_the_forward_reference_exactly():
    torch.manual_seed(0)
    result = grad_fidelity(ResidualNet(), _batches(1), ["srste", "tsm"], reference="forward")
    for row in result.rows:
        assert row.grad_input_cos == 1.0 and row.grad_weight_cos == 1.0, row


def test_local_error_is_the_layers_own_and_accumulated_error_flows_upstream():
    torch.manual_seed(0)
    result = grad_fidelity(ResidualNet(), _batches(1), ["fst2"], reference="forward")
    # fst2's grad_weight is exact (dY·Xᵀ); alone in the model its dY is exact too
    for row in result.select("fst2", "local"):
        assert row.grad_weight_cos == 1.0
        assert row.grad_input_cos < 1.0  # S_Co(W) differs from the forward's S_K(W)
    acc = {r.layer: r for r in result.select("fst2", "accumulated")}
    assert acc["conv3"].grad_weight_cos == 1.0  # the last conv: nothing sparse after it
    assert acc["conv1"].grad_weight_cos < 1.0  # receives conv2/conv3's approximate dX


def test_grad_fidelity_runs_every_recipe_and_formats_a_table():
    torch.manual_seed(0)
    result = grad_fidelity(ResidualNet(), _batches(1, 4), RECIPES, modes=["accumulated"])
    assert result.recipes == list(RECIPES)
    for row in result.rows:
        assert -1.0 <= row.grad_input_cos <= 1.0 and row.grad_weight_err >= 0.0
    text = format_fidelity(result)
    assert text.count("\n| dense | 1.0000 | 1.0000 | 0.0000 | 1.0000 |") == 1
    assert "**accumulated, grad_weight: cosine to the reference, per layer**" in text


def test_decay_is_excluded_unless_asked():
    torch.manual_seed(0)
    model = ResidualNet()
    with_decay = grad_fidelity(
        model, _batches(1), ["srste"], modes=["local"], reference="forward", include_decay=True
    )
    # the exact twin has no decay, so srste differs from it only by λ·(W − S(W))
    assert all(r.grad_weight_cos < 1.0 for r in with_decay.rows)
    assert all(r.grad_input_cos == 1.0 for r in with_decay.rows)


def test_exact_twin_keeps_the_forward_and_makes_the_backward_exact():
    twin = exact_twin(recipe("gx", decay=0.0))
    assert (twin.output_weight, twin.grad_input_weight, twin.grad_weight_mode) == (
        "2:4",
        "forward",
        "dense",
    )
    assert twin.grad_input_dy == "dense" and twin.decay == 0.0
    assert exact_twin(recipe("tsm")).output_weight == "transposable"


def test_grad_fidelity_leaves_the_model_untouched():
    torch.manual_seed(0)
    model = ResidualNet()
    sparsify_(model, "fst")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grad_fidelity(model, _batches(1), ["wx"], modes=["accumulated"])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert type(model.conv1).__name__ == "SparseConv2d"


def test_grad_fidelity_rejects_unknown_modes_and_references():
    with pytest.raises(ValueError, match="unknown mode 'global'"):
        grad_fidelity(ResidualNet(), _batches(1), ["dense"], modes=["global"])
    with pytest.raises(ValueError, match="unknown reference"):
        grad_fidelity(ResidualNet(), _batches(1), ["dense"], reference="sparse")


# --------------------------------------------------------------------------- overhead
def test_overhead_counts_every_sparse_layer_and_operator():
    torch.manual_seed(0)
    model = ResidualNet()
    x, y = _batches(1, 4)[0]
    result = measure_overhead(model, x, y, warmup=0, repeats=1, model_name="residual")
    ops = {o.key: o for o in result.operators}
    assert list(ops) == ["s_w", "s_wt", "shift", "s_xt_im2col", "s_x", "s_dy"]
    assert result.layers == 3  # the three convs; the head stays dense
    weights = 2 * 8 * 9 + 8 * 8 * 9 + 8 * 8 * 9
    assert ops["s_w"].elements == ops["s_wt"].elements == weights
    outputs = 4 * 8 * (8 * 8 + 8 * 8 + 4 * 4)
    assert ops["shift"].elements == ops["s_dy"].elements == outputs
    assert ops["s_x"].elements == 4 * (2 + 8 + 8) * 64
    assert ops["s_xt_im2col"].elements == 4 * (2 * 9 * 64 + 8 * 9 * 64 + 8 * 9 * 16)
    for o in result.operators:
        assert o.ms > 0 and o.percent == pytest.approx(100 * o.ms / result.iteration_ms)
    assert result.fst_total_ms == pytest.approx(sum(ops[k].ms for k in ("s_w", "s_wt", "shift")))
    text = format_overhead(result)
    assert "| **FST total** |" in text and "| S(Wᵀ) |" in text
    assert result.to_dict()["fst_total_percent"] > 0
