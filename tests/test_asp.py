"""Recipe asp: prune a trained dense model once to 2:4, fine-tune with the mask fixed."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fullsparse import sparsify_
from fullsparse.errors import ConfigError
from fullsparse.masks import is_2to4
from fullsparse.nn import sparse_modules
from fullsparse.operands import mask_k
from fullsparse.train import checkpoint as ckpt
from fullsparse.train import train
from fullsparse.train.asp import keep_pruned_zero, prune_once_
from tinyruns import tiny_classify


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(288, 16), nn.Linear(16, 8)
    )
    sparsify_(model, "asp")  # the conv and the first Linear; the head stays dense
    return model


def _optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    return torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_mask_never_changes_and_pruned_weights_stay_exactly_zero(kind):
    model = _model()
    before = {n: m.weight.detach().clone() for n, m in sparse_modules(model)}
    masks = prune_once_(model)
    for name, module in sparse_modules(model):
        assert torch.equal(masks[name], mask_k(before[name]))
        assert is_2to4(module.weight.detach().reshape(module.weight.shape[0], -1), 1)
    opt = _optimizer(kind, model)
    keep_pruned_zero(model, opt)
    x = torch.randn(16, 4, 6, 6)
    for _ in range(5):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    for name, module in sparse_modules(model):
        mask = module.fixed_mask
        assert torch.equal(mask, masks[name])  # the mask never changed
        weight = module.weight.detach()
        assert torch.equal(weight[~mask], torch.zeros_like(weight[~mask]))
        assert not torch.equal(weight[mask], before[name][mask])  # the kept ones trained
        assert torch.equal(module.pruned_weight(), weight)  # the model is its own 2:4 model
        state = opt.state[module.weight]
        for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
            if key in state:  # optimiser state of pruned weights stays zero too
                assert not state[key][~mask].any(), key


def test_without_hooks_momentum_and_decay_would_revive_pruned_weights():
    """The check above can fail: without the hooks the pruned weights move."""
    model = _model()
    prune_once_(model)
    opt = _optimizer("sgd", model)
    model(torch.randn(4, 4, 6, 6)).square().mean().backward()
    opt.step()
    conv = next(m for _, m in sparse_modules(model))
    assert conv.weight.detach()[~conv.fixed_mask].abs().sum() > 0


def test_asp_run_prunes_the_init_run_once_and_records_its_cost(tmp_path):
    dense = train(tiny_classify(tmp_path, "dense", recipe="dense", epochs=2))
    init = ckpt.load_checkpoint(tmp_path / "dense" / "last.pt")["model"]
    summary = train(tiny_classify(tmp_path, "asp", recipe="asp", init_from=str(tmp_path / "dense")))
    saved = ckpt.load_checkpoint(tmp_path / "asp" / "last.pt")
    masks = {k[: -len(".fixed_mask")]: v for k, v in saved["sparse_state"].items() if "fixed" in k}
    assert masks and len(masks) == summary["sparse_layers"]
    for name, mask in masks.items():
        assert torch.equal(mask, mask_k(init[f"{name}.weight"]))  # S_K of the trained weights
        weight = saved["model"][f"{name}.weight"]
        assert not weight[~mask].any()
    pre = summary["pretraining"]
    assert (pre["recipe"], pre["epochs"]) == ("dense", 2)
    assert pre["train_seconds"] == pytest.approx(sum(dense["epoch_seconds"]))
    assert summary["total_epochs"] == 3
    written = json.loads((tmp_path / "asp" / "summary.json").read_text())
    assert written["total_epochs"] == 3


def test_asp_resume_keeps_the_fixed_mask(tmp_path):
    train(tiny_classify(tmp_path, "dense", recipe="dense"))
    fields = dict(recipe="asp", init_from=str(tmp_path / "dense"), epochs=2)
    whole = train(tiny_classify(tmp_path, "whole", **fields))
    train(tiny_classify(tmp_path, "split", stop_after=1, **fields))
    resumed = train(tiny_classify(tmp_path, "split", resume=True, **fields))
    assert resumed["final_train_loss"] == pytest.approx(whole["final_train_loss"], rel=1e-5)
    a = ckpt.load_checkpoint(tmp_path / "whole" / "last.pt")["sparse_state"]
    b = ckpt.load_checkpoint(tmp_path / "split" / "last.pt")["sparse_state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "fields,needle",
    [
        (dict(recipe="asp"), "give --init-from"),
        (dict(recipe="fst", init_from="x"), "--init-from is for recipe asp"),
    ],
)
def test_asp_config_errors(tmp_path, fields, needle):
    with pytest.raises(ConfigError, match=needle):
        tiny_classify(tmp_path, **fields)


def test_asp_init_from_missing_checkpoint(tmp_path):
    from fullsparse.errors import CheckpointError

    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(tiny_classify(tmp_path, "asp", recipe="asp", init_from=str(tmp_path / "nope")))
