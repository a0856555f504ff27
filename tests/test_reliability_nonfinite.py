"""Non-finite gradients under a finite loss: stop naming the step and the layer with the last
good checkpoint byte-for-byte untouched, or skip the step with --skip-nonfinite.

The NaN/Inf *loss* cases are in tests/test_train.py
(test_nan_loss_stops_naming_step_and_layer_and_keeps_the_last_checkpoint,
test_skip_nonfinite_skips_the_bad_steps_and_counts_them).
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings

import pytest
import torch

from fullsparse.cli import main
from fullsparse.train import NonFiniteLossError, TrainConfig, load_checkpoint, train
from fullsparse.train import trainer as trainer_mod
from fullsparse.train.guard import first_nonfinite_gradient
from fullsparse.train.run_folder import Checkpointer
from tinyruns import tiny_classify

LAYER = "layer2.0.conv1"


def tiny(tmp_path, **kw) -> TrainConfig:
    return tiny_classify(tmp_path, **{"epochs": 2, **kw})


def _poison_gradient(monkeypatch, bad_calls: set[int], value: float = float("nan")) -> None:
    """Make ``LAYER``'s weight gradient non-finite on the given backward calls (1-based,
    counted from the model's construction); the loss stays finite."""
    real = trainer_mod.build_model

    def build(identity):
        model, report = real(identity)
        calls = {"n": 0}

        def hook(grad):
            calls["n"] += 1
            return grad * value if calls["n"] in bad_calls else grad

        model.get_submodule(LAYER).weight.register_hook(hook)
        return model, report

    monkeypatch.setattr(trainer_mod, "build_model", build)


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_nonfinite_gradient_stops_naming_step_and_layer_and_keeps_the_checkpoint(
    tmp_path, monkeypatch
):
    config = tiny(tmp_path)
    train(config.replace(stop_after=1))
    last = tmp_path / "run" / "last.pt"
    best = tmp_path / "run" / "best.pt"
    before = (_sha256(last), _sha256(best))
    # The resumed process's 3rd backward is epoch 2, step 3 (global step 7).
    _poison_gradient(monkeypatch, {3})
    with pytest.raises(NonFiniteLossError) as info:
        train(config.replace(resume=True))
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("non-finite gradient at epoch 2 step 3/4 (global step 7)")
    assert "is finite" in msg  # the loss was fine: the message says so
    assert f"first non-finite gradient (backward order): {LAYER} (SparseConv2d) weight; " in msg
    assert "; 1 of 65 gradients non-finite;" in msg
    assert f"the last good checkpoint {last} (epoch 1) is untouched" in msg
    assert (_sha256(last), _sha256(best)) == before
    assert load_checkpoint(last)["epoch"] == 1
    weights = load_checkpoint(last)["model"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_nonfinite_gradient_in_the_first_epoch_says_no_checkpoint_was_written(
    tmp_path, monkeypatch
):
    _poison_gradient(monkeypatch, {2}, value=float("inf"))
    with pytest.raises(NonFiniteLossError, match="step 2/4 .*no checkpoint was written"):
        train(tiny(tmp_path))
    assert not (tmp_path / "run" / "last.pt").exists()


def test_the_cli_prints_the_nonfinite_gradient_as_one_line(tmp_path, monkeypatch, capsys):
    _poison_gradient(monkeypatch, {1})
    argv = ["train", "--dataset", "synthetic", "--synthetic-train", "64", "--synthetic-test"]
    argv += ["32", "--image-size", "8", "--batch-size", "16", "--epochs", "1", "--quiet"]
    argv += ["--no-progress", "--no-plot", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: non-finite gradient at epoch 1 step 1")


def test_skip_nonfinite_skips_steps_with_nonfinite_gradients_and_completes(tmp_path, monkeypatch):
    _poison_gradient(monkeypatch, {2, 6})
    summary = train(tiny(tmp_path, skip_nonfinite=True))
    assert summary["status"] == "completed" and summary["epochs_done"] == 2
    assert summary["skipped_steps"] == 2
    assert math.isfinite(summary["final_train_loss"])
    weights = load_checkpoint(tmp_path / "run" / "last.pt")["model"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count("non-finite gradient at") == 2 and "step skipped" in log


def test_a_skipped_step_changes_nothing_but_the_schedule(tmp_path, monkeypatch):
    # Skipping must undo the step completely: BatchNorm statistics of the bad step's
    # forward included. Compare against a run that never saw that batch's update.
    base = tiny(tmp_path, epochs=1, synthetic_train=32, skip_nonfinite=True)  # 2 steps
    _poison_gradient(monkeypatch, {2})
    train(base.replace(out=str(tmp_path / "skip")))
    monkeypatch.undo()
    train(base.replace(out=str(tmp_path / "full")))
    skip = load_checkpoint(tmp_path / "skip" / "last.pt")["model"]
    full = load_checkpoint(tmp_path / "full" / "last.pt")["model"]
    changed = [k for k in skip if not torch.equal(skip[k], full[k])]
    # the 2nd step did happen in "full": every trained tensor differs, nothing is NaN
    assert changed and all(torch.isfinite(skip[k]).all() for k in changed)
    assert int(skip["bn1.num_batches_tracked"]) == 1
    assert int(full["bn1.num_batches_tracked"]) == 2


def test_finite_gradients_cost_one_check_and_pass():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    assert first_nonfinite_gradient(model) == ""  # no gradients yet
    model(torch.randn(3, 4)).sum().backward()
    assert first_nonfinite_gradient(model) == ""
    model[0].bias.grad[1] = float("inf")
    model[1].weight.grad[0, 0] = float("nan")
    # backward order: the layer nearest the loss first
    assert first_nonfinite_gradient(model) == (
        "first non-finite gradient (backward order): 1 (Linear) weight; 2 of 4 gradients non-finite"
    )
    big = torch.nn.Linear(2, 1)
    big(torch.ones(1, 2)).sum().backward()
    big.weight.grad.fill_(3e38)  # finite, but its norm overflows: not an error
    assert first_nonfinite_gradient(big) == ""


def _lrs(run_dir) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["lr"] for line in lines if line]


def test_a_skipped_first_step_keeps_the_schedule_and_does_not_warn(tmp_path, monkeypatch):
    # The skipped step uses up its place in the lr schedule, so every later step gets the
    # lr it would have had; PyTorch's "lr_scheduler.step() before optimizer.step()" warning
    # (about a mistake that is not being made) does not reach the user.
    config = tiny(tmp_path, epochs=3, skip_nonfinite=True, warmup_epochs=0)
    _poison_gradient(monkeypatch, {1})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        summary = train(config)
    assert summary["skipped_steps"] == 1
    monkeypatch.undo()
    train(config.replace(out=str(tmp_path / "clean")))
    skip_lr, clean_lr = _lrs(tmp_path / "run"), _lrs(tmp_path / "clean")
    assert len(skip_lr) == 3 and skip_lr == clean_lr
    assert skip_lr[0] > skip_lr[1] > skip_lr[2]  # the cosine really moved


def test_a_nonfinite_stop_after_a_step_checkpoint_names_that_checkpoint(tmp_path, monkeypatch):
    # 4 steps per epoch, a step checkpoint after step 2; the 3rd backward is poisoned. last.pt
    # is the step-2 checkpoint and stays byte-for-byte as it was.
    config = tiny(tmp_path, epochs=1, checkpoint_every=2)
    last = tmp_path / "run" / "last.pt"
    seen = {}
    real = Checkpointer.save_last

    def save_last(*args, **kwargs):
        real(*args, **kwargs)
        seen["sha"] = _sha256(last)

    monkeypatch.setattr(Checkpointer, "save_last", save_last)
    _poison_gradient(monkeypatch, {3})
    with pytest.raises(NonFiniteLossError) as info:
        train(config)
    msg = str(info.value)
    assert msg.startswith("non-finite gradient at epoch 1 step 3/4")
    assert f"the last good checkpoint {last} (after epoch 1 step 2) is untouched" in msg
    assert _sha256(last) == seen["sha"] and load_checkpoint(last)["step"] == 2
