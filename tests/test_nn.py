"""Sparse modules, sparsify_/densify_, and the sparse state that checkpoints carry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fullsparse
from fullsparse import SparseConv2d, SparseLinear, densify_, recipe, sparsify_
from fullsparse.functional import sparse_conv2d, sparse_linear
from fullsparse.masks import is_2to4
from fullsparse.nn import load_sparse_state_, pruned_state_dict, sparse_state_dict


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)  # depthwise: stays dense
        self.g4 = nn.Conv2d(16, 16, 3, padding=1, groups=4)  # 4 inputs per group: sparse
        self.refl = nn.Conv2d(16, 8, 3, padding=1, padding_mode="reflect")
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.mlp = nn.Linear(8, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.refl(self.g4(self.dw(self.stem(x)).relu()).relu())  # [B, 8, H, W]
        t = x.flatten(2).transpose(1, 2)  # [B, T, 8]
        t = t + self.attn(t, t, t, need_weights=False)[0]
        t = self.mlp(t).relu()
        return self.head(t.mean(1))


class AllConvNet(nn.Module):
    """SqueezeNet's shape: the classifier is a 1x1 conv followed by pooling, no Linear."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
        self.classifier = nn.Sequential(nn.Conv2d(8, classes, 1), nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        return self.classifier(self.features(x).relu()).flatten(1)


def test_model_without_linear_keeps_its_output_conv_dense():
    model = AllConvNet()
    assert fullsparse.nn.head_name(model) == "classifier.0"
    report = sparsify_(model, "fst")
    assert report.sparse_names == ["features.0", "features.2"]
    assert "last Conv2d" in report["classifier.0"].reason
    assert type(model.classifier[0]) is nn.Conv2d
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert model.features[2].weight.grad is not None
    # a Linear anywhere makes the last Linear the head, as before
    model.classifier.append(nn.Flatten())
    model.classifier.append(nn.Linear(5, 5))
    assert fullsparse.nn.head_name(model) == "classifier.3"
    assert fullsparse.nn.head_name(nn.Sequential(nn.ReLU())) is None


def test_sparsify_report_lists_every_layer_with_a_reason():
    model = Net()
    report = sparsify_(model, "fst")
    rows = {r.name: r for r in report}
    assert set(rows) == {"stem", "dw", "g4", "refl", "attn", "attn.out_proj", "mlp", "head"}
    assert [n for n in rows if rows[n].sparse] == ["stem", "g4", "refl", "mlp"]
    assert "last Linear" in rows["head"].reason
    assert "1 input channel(s) per group" in rows["dw"].reason
    assert "MultiheadAttention" in rows["attn.out_proj"].reason
    assert "not supported" in rows["attn"].reason
    assert "K=27 zero-padded to 28" in rows["stem"].reason
    assert isinstance(model.stem, SparseConv2d) and isinstance(model.mlp, SparseLinear)
    assert type(model.head) is nn.Linear and type(model.dw) is nn.Conv2d
    text = str(report)
    assert "4 of 8 layers use 'fst'" in text and "classifier head" in text
    model(torch.randn(2, 3, 6, 6)).sum().backward()


def test_parameters_and_state_dict_are_unchanged_by_sparsify():
    torch.manual_seed(0)
    model = Net()
    params_before = list(model.parameters())
    keys_before = list(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsify_(model, "tsm")
    assert all(a is b for a, b in zip(params_before, model.parameters(), strict=True))
    assert list(model.state_dict()) == keys_before
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    before = model.stem.weight.detach().clone()
    opt.step()  # the optimizer built before sparsify_ updates the sparse layers' weights
    assert not torch.equal(before, model.stem.weight)
    report = densify_(model)
    assert {r.name for r in report} == {"stem", "g4", "refl", "mlp"}
    assert type(model.stem) is nn.Conv2d and type(model.mlp) is nn.Linear
    assert all(a is b for a, b in zip(params_before, model.parameters(), strict=True))


@pytest.mark.parametrize("name", fullsparse.RECIPES)
def test_modules_equal_the_functional_form(name):
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=True).double()
    lin = nn.Linear(12, 8).double()
    sconv = SparseConv2d.from_dense(conv, name)
    slin = SparseLinear.from_dense(lin, name)
    x = torch.randn(2, 8, 7, 7, dtype=torch.float64)
    y = sconv(x)
    torch.testing.assert_close(
        y, sparse_conv2d(x, conv.weight, conv.bias, 2, 1, config=name), rtol=0, atol=0
    )
    t = torch.randn(2, 5, 12, dtype=torch.float64)
    torch.testing.assert_close(
        slin(t), sparse_linear(t, lin.weight, lin.bias, config=name), rtol=0, atol=0
    )
    assert type(sconv.to_dense()) is nn.Conv2d and sconv.to_dense().weight is conv.weight
    assert f"recipe={name}" in repr(sconv)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(8, 12, 3, stride=2, padding=1),
        nn.Conv2d(8, 16, 3, padding="same", dilation=2, bias=False),
        nn.Conv2d(8, 16, (3, 1), stride=(2, 1), padding=(1, 0), groups=2),
        nn.Conv2d(4, 8, 3, padding=1, padding_mode="circular"),
    ],
    ids=["strided", "same-dilated-nobias", "rect-grouped", "circular"],
)
def test_from_dense_and_to_dense_keep_geometry_parameters_and_mode(conv):
    conv.eval()
    sconv = SparseConv2d.from_dense(conv, "dense")
    back = sconv.to_dense()
    for m in (sconv, back):
        assert m.weight is conv.weight and m.bias is conv.bias and not m.training
        assert m.extra_repr().startswith(conv.extra_repr())
    x = torch.randn(2, conv.in_channels, 9, 9)
    torch.testing.assert_close(sconv(x), conv(x))
    torch.testing.assert_close(back(x), conv(x))
    lin = nn.Linear(6, 4, bias=False)
    slin = SparseLinear.from_dense(lin, "fst")
    assert slin.weight is lin.weight and slin.bias is None and slin.training
    assert slin.to_dense().weight is lin.weight and repr(slin.to_dense()) == repr(lin)


def test_reflect_padding_mode_matches_torch_with_dense_recipe():
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect")
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(SparseConv2d.from_dense(conv, "dense")(x), conv(x))


def test_tsm_mask_is_recomputed_every_interval_steps():
    torch.manual_seed(3)
    lin = SparseLinear(16, 8, config=recipe("tsm", tsm_interval=3))
    x = torch.randn(4, 16)
    masks = []
    for _ in range(7):
        lin(x).sum().backward()
        masks.append(lin.tsm_mask.clone())
        with torch.no_grad():
            lin.weight.add_(torch.randn_like(lin.weight))  # a big step changes the best mask
    assert int(lin.tsm_step) == 7
    # recomputed at steps 0, 3, 6: constant in between
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[1], masks[2])
    assert not torch.equal(masks[2], masks[3]) and torch.equal(masks[3], masks[5])
    assert not torch.equal(masks[5], masks[6])
    w = lin.weight.detach() * masks[6]
    assert is_2to4(w, 0) and is_2to4(w, 1)
    lin.eval()
    with torch.no_grad():
        lin(x)
    assert int(lin.tsm_step) == 7  # eval forwards are not training steps


def test_sparse_state_round_trip_restores_tsm_masks():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    sparsify_(model, recipe("tsm", tsm_interval=5))
    model(torch.randn(3, 16)).sum().backward()
    state = sparse_state_dict(model)
    assert set(state) == {"0.tsm_step", "0.tsm_mask"}
    other = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    sparsify_(other, recipe("tsm", tsm_interval=5))
    load_sparse_state_(other, state)
    assert torch.equal(other[0].tsm_mask, model[0].tsm_mask) and int(other[0].tsm_step) == 1
    with pytest.raises(KeyError, match="nope"):
        load_sparse_state_(other, {"nope.tsm_step": torch.tensor(1)})


def test_pruned_state_dict_is_2to4_and_loads_into_the_dense_model():
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 16),
        nn.ReLU(),
        nn.Linear(16, 3),
    )
    dense = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 16),
        nn.ReLU(),
        nn.Linear(16, 3),
    )
    sparsify_(model, "fst")
    state = pruned_state_dict(model)
    assert is_2to4(state["0.weight"].reshape(8, -1), 1) and is_2to4(state["3.weight"], 1)
    assert torch.equal(state["5.weight"], model[5].weight)  # the head stays dense
    dense.load_state_dict(state)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(dense(x), model(x))


def test_filter_fn_and_resparsify():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4))
    report = sparsify_(model, "srste", filter_fn=lambda name, m: name != "0")
    assert report.sparse_names == ["1", "2"]  # the filter may choose the head
    assert "filter_fn" in report["0"].reason
    report = sparsify_(model, "fst")  # again with another recipe: re-configured in place
    assert report.sparse_names == ["0", "1"] and type(model[2]) is nn.Linear
    assert model[1].config.name == "fst"


def test_shared_module_is_replaced_once():
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(8, 2))
    sparsify_(model, "fst")
    assert model[0] is model[2] and isinstance(model[0], SparseLinear)


def test_sparsify_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown recipe"):
        sparsify_(nn.Linear(4, 4), "nope")
    with pytest.raises(TypeError, match="nn.Module"):
        sparsify_("model", "fst")  # type: ignore[arg-type]
