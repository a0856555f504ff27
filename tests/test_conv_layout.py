"""The conv layout of S_K (``SparsityConfig.conv_layout``) and exports inference stacks read.

``im2col``: groups of 4 along a conv weight's flattened ``Ci·kh·kw`` row (the paper's
``W2``); ``channel``: 4 consecutive input channels at each kernel tap ``(co, kh, kw)``, the
layout ASP/TensorRT sparse convolutions need. Both masks are checked against a plain float64
loop over the groups; the export is checked tap by tap.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fullsparse
from fullsparse import SparseConv2d, recipe
from fullsparse.cli import main
from fullsparse.functional import ConvGeometry, is_2to4_k, mask_k, sparse_conv2d
from fullsparse.kernels import LayerShape, Platform, plan_layer
from fullsparse.models import build_model

TINY = [
    "--dataset", "synthetic", "--synthetic-train", "64", "--synthetic-test", "32",
    "--image-size", "8", "--batch-size", "16", "--epochs", "1",
    "--no-progress", "--no-plot", "--quiet",
]  # fmt: skip


def _top2_of(values: list[float]) -> list[bool]:
    """Keep the two largest |v| of a group (padded with zeros to 4; ties to the lower index)."""
    padded = values + [0.0] * (4 - len(values))
    order = sorted(range(4), key=lambda i: (-abs(padded[i]), i))
    return [i in order[:2] for i in range(len(values))]


def _reference_mask(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """S_K as a plain loop over groups, in float64."""
    w = weight.double()
    co, ci, kh, kw = w.shape
    mask = torch.zeros(w.shape, dtype=torch.bool)
    if layout == "channel":  # 4 consecutive input channels at a fixed (co, kh, kw)
        for o, y, x in itertools.product(range(co), range(kh), range(kw)):
            for start in range(0, ci, 4):
                chans = list(range(start, min(start + 4, ci)))
                keep = _top2_of([float(w[o, c, y, x]) for c in chans])
                for c, k in zip(chans, keep, strict=True):
                    mask[o, c, y, x] = k
    else:  # 4 consecutive entries of the row W2[o] = W[o].flatten() (ci, then kh, then kw)
        flat = mask.view(co, -1)
        for o in range(co):
            row = w[o].flatten().tolist()
            for start in range(0, len(row), 4):
                keep = _top2_of(row[start : start + 4])
                for j, k in enumerate(keep):
                    flat[o, start + j] = k
    return mask


@pytest.mark.parametrize("layout", ["im2col", "channel"])
@pytest.mark.parametrize("shape", [(4, 8, 3, 3), (3, 6, 1, 5), (8, 3, 2, 2), (5, 4, 1, 1)])
def test_mask_k_matches_the_float64_group_loop(layout, shape):
    torch.manual_seed(sum(shape))
    weight = torch.randn(shape)
    weight[0, :2] = 0.5  # ties go to the lower index in both
    mask = mask_k(weight, layout)
    assert torch.equal(mask, _reference_mask(weight, layout))
    assert is_2to4_k(weight * mask, layout)


def test_the_two_layouts_differ_for_a_3x3_conv_and_agree_for_1x1_and_linear():
    torch.manual_seed(0)
    w3 = torch.randn(8, 16, 3, 3)
    channel, im2col = w3 * mask_k(w3, "channel"), w3 * mask_k(w3, "im2col")
    assert is_2to4_k(channel, "channel") and not is_2to4_k(channel, "im2col")
    assert is_2to4_k(im2col, "im2col") and not is_2to4_k(im2col, "channel")
    w1, lin = torch.randn(8, 16, 1, 1), torch.randn(8, 16)
    assert torch.equal(mask_k(w1, "channel"), mask_k(w1, "im2col"))
    assert torch.equal(mask_k(lin, "channel"), mask_k(lin, "im2col"))
    with pytest.raises(ValueError, match="conv_layout must be"):
        mask_k(w3, "rows")


def test_config_validates_the_layout_and_its_clashes():
    assert recipe("fst").conv_layout == "im2col"
    assert recipe("fst", conv_layout="channel").conv_layout == "channel"
    with pytest.raises(ValueError, match="conv_layout='rows' is not one of"):
        recipe("fst", conv_layout="rows")
    for name in ("dense", "tsm"):
        with pytest.raises(ValueError, match="conv_layout='channel' clashes with output_weight="):
            recipe(name, conv_layout="channel")


def test_channel_layout_conv_output_is_the_float64_conv_of_the_reference_mask():
    torch.manual_seed(1)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    cfg = recipe("fst", conv_layout="channel")
    y = sparse_conv2d(x, w, None, 1, 1, config=cfg, backend="reference")
    expected = F.conv2d(x.detach(), w.detach() * _reference_mask(w.detach(), "channel"), None, 1, 1)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()
    # the emulated 2:4 GEMM checks its packed operand: the 3x3 output GEMM stays off it
    y_emulated = sparse_conv2d(x, w, None, 1, 1, config=cfg, backend="emulation")
    torch.testing.assert_close(y_emulated, expected, rtol=1e-12, atol=1e-12)


def test_kxk_convs_in_the_channel_layout_keep_the_output_gemm_off_the_im2col_kernel():
    h100 = Platform("cuda", "NVIDIA H100 80GB HBM3", (9, 0), cusparselt=True)
    cfg = recipe("fst", conv_layout="channel")
    geo = ConvGeometry.make(1, 1, 1, 1)
    layer = LayerShape.conv((64, 64, 3, 3), geo)
    for backend in ("auto", "semi_structured"):
        plan = plan_layer(layer, cfg, backend, h100, torch.bfloat16)
        assert not plan.output and plan.grad_input  # S_Co(W) is the same in both layouts
    assert "output on reference: conv_layout='channel'" in plan.reason
    pointwise = LayerShape.conv((64, 64, 1, 1), ConvGeometry.make(1, 0, 1, 1))
    assert plan_layer(pointwise, cfg, "auto", h100, torch.bfloat16, True).output


def test_compare_gives_the_layout_to_recipes_with_a_magnitude_mask_only(tmp_path):
    from fullsparse.train import TrainConfig
    from fullsparse.train.compare import recipe_configs

    config = TrainConfig(conv_layout="channel")
    configs, notes = recipe_configs(config, ["dense", "fst", "tsm"], tmp_path)
    assert [c.sparsity().conv_layout for c in configs] == ["im2col", "channel", "im2col"]
    assert notes == [
        "conv_layout=channel does not apply to dense (kept its default)",
        "conv_layout=channel does not apply to tsm (kept its default)",
    ]


def _train(tmp_path: Path, *extra: str) -> Path:
    run = tmp_path / "run"
    assert main(["train", *TINY, "--recipe", "fst", *extra, "--out", str(run)]) == 0
    return run


def test_export_in_the_channel_layout_is_2to4_along_input_channels_at_every_tap(tmp_path, capsys):
    run = _train(tmp_path, "--conv-layout", "channel")
    out = tmp_path / "w.pt"
    argv = ["export", "--checkpoint", str(run / "last.pt"), "--out", str(out)]
    assert main([*argv, "--layout", "channel"]) == 0
    printed = capsys.readouterr().out
    assert "2:4 along K (channel)" in printed and "all verified" in printed
    weights = torch.load(out, weights_only=True)
    meta = json.loads(Path(f"{out}.json").read_text())
    assert meta["conv_layout"] == "channel" and meta["file_format"] == "pt"
    model = build_model("resnet20", meta["num_classes"], meta["in_channels"], meta["image_size"])
    model.load_state_dict(weights)
    checked = 0
    for name, module in model.named_modules():
        if not (isinstance(module, torch.nn.Conv2d) and module.kernel_size == (3, 3)):
            continue
        if module.in_channels < 4:
            continue  # the stem: one input channel, a group of 1 keeps it
        w = weights[f"{name}.weight"]  # [Co, Ci, 3, 3]
        for o, y, x in itertools.product(range(w.shape[0]), range(3), range(3)):
            for start in range(0, w.shape[1], 4):
                assert int((w[o, start : start + 4, y, x] != 0).sum()) == 2, (name, o, y, x)
        checked += 1
    assert checked == 18  # every 3x3 conv of the three stages
    # the run's weights are not 2:4 in the other layout: refused, nothing written
    other = tmp_path / "im2col.pt"
    argv = ["export", "--checkpoint", str(run / "last.pt"), "--out", str(other)]
    assert main([*argv, "--layout", "im2col"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "conv_layout='channel'" in err
    assert not other.exists()


def test_safetensors_export_holds_the_same_weights_and_needs_its_package(
    tmp_path, capsys, monkeypatch
):
    run = _train(tmp_path)
    pt, st = tmp_path / "w.pt", tmp_path / "w.safetensors"
    base = ["export", "--checkpoint", str(run / "last.pt")]
    assert main([*base, "--out", str(pt)]) == 0
    assert main([*base, "--out", str(st), "--format", "safetensors"]) == 0
    from safetensors.torch import load_file

    a, b = torch.load(pt, weights_only=True), load_file(str(st))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads(Path(f"{st}.json").read_text())
    assert meta["file_format"] == "safetensors" and "load_file" in meta["load_with"]
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import now raises ImportError
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    missing = tmp_path / "x.safetensors"
    assert main([*base, "--out", str(missing), "--format", "safetensors"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'fullsparse[export]'" in err
    assert not missing.exists()


def test_a_checkpoint_written_before_the_layout_field_still_resumes(tmp_path):
    run = _train(tmp_path)
    state = torch.load(run / "last.pt", weights_only=True)
    del state["identity"]["sparsity"]["conv_layout"]  # as written before the field existed
    torch.save(state, run / "last.pt")
    argv = ["train", *TINY, "--recipe", "fst", "--out", str(run), "--epochs", "2", "--resume"]
    assert main(argv) == 0
    assert json.loads((run / "summary.json").read_text())["epochs_done"] == 2


def test_report_notes_the_padding_of_the_layouts_groups():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 3))
    im2col = fullsparse.sparsify_(model, "fst")
    assert "K=27 zero-padded to 28" in im2col["0"].reason
    channel = fullsparse.sparsify_(model, recipe("fst", conv_layout="channel"))
    assert "Ci=3 zero-padded to 4 at each tap" in channel["0"].reason
    assert "padded" not in channel["1"].reason


def test_sparse_module_prunes_in_its_configs_layout():
    conv = torch.nn.Conv2d(8, 4, 3)
    sparse = SparseConv2d.from_dense(conv, recipe("fst2", conv_layout="channel"))
    w = sparse.weight.detach()
    assert torch.equal(sparse.pruned_weight(), w * mask_k(w, "channel"))
