"""Data-parallel training: 2 gloo processes under torchrun equal 1 process with the global batch.

The equality run uses ViT (LayerNorm normalises each example on its own): a BatchNorm model
would see per-rank batch statistics (8 images) instead of the global batch's (16), which is
a real difference, not a float tolerance; torch's SyncBatchNorm that would fix it is
CUDA-only, so ``--sync-bn`` is refused on CPU (tested below).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fullsparse
from fullsparse.errors import ConfigError
from fullsparse.train import TrainConfig, load_checkpoint, train
from fullsparse.train import trainer as trainer_mod
from fullsparse.train.distributed import DistInfo, all_reduce_sum, any_rank, init_distributed
from fullsparse.train.guard import StepGuard

SRC = str(Path(fullsparse.__file__).resolve().parents[1])
VIT = {"depth": 1, "embed_dim": 32, "num_heads": 2}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    """The two processes also accumulate (2 micro-batches of 4 per rank, the first without
    DDP's all-reduce) and log per-step scalars: rank 0 alone writes each step once."""
    args = dict(
        model="vit_tiny",
        model_kwargs=VIT,
        dataset="synthetic",
        synthetic_train=64,
        synthetic_test=33,  # odd: rank 0 gets one more test batch than rank 1
        image_size=8,
        batch_size=16,  # global: 2 ranks x 8
        epochs=2,
        lr=0.5,  # large enough that the weights move visibly in 8 steps
        recipe="fst",
        deterministic=True,
        progress=False,
        quiet=True,
        plot=False,
    )
    single = train(TrainConfig(out=str(tmp_path / "one"), **args))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "fullsparse", "train",
        "--model", "vit_tiny", "--model-kwargs", json.dumps(VIT), "--dataset", "synthetic",
        "--synthetic-train", "64", "--synthetic-test", "33", "--image-size", "8",
        "--batch-size", "16", "--epochs", "2", "--lr", "0.5", "--recipe", "fst",
        "--deterministic", "--no-progress", "--no-plot", "--quiet",
        "--grad-accum-steps", "2", "--report-to", "csv", "--log-every", "2",
        "--out", str(tmp_path / "two"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["world_size"] == 2 and single["world_size"] == 1

    m1 = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(m1) == len(m2) == 2
    for a, b in zip(m1, m2, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-5)
        assert b["train_images"] == a["train_images"] == 64  # each image once per epoch
        assert b["train_acc"] == a["train_acc"]
    assert m1[1]["train_loss"] != m1[0]["train_loss"]  # training did move

    w1 = load_checkpoint(tmp_path / "one" / "last.pt")["model"]
    w2 = load_checkpoint(tmp_path / "two" / "last.pt")["model"]
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-4, atol=1e-5, msg=key)
    # Rank 0 alone wrote the run folder: one header line in the log, no stray temp files.
    log = (tmp_path / "two" / "train.log").read_text()
    assert log.count("fullsparse train: vit_tiny") == 1
    rows = (tmp_path / "two" / "scalars.csv").read_text().splitlines()
    losses = [r for r in rows if ",train/loss," in r]
    assert [r.split(",")[0] for r in losses] == ["2", "4", "6", "8"]  # 4 steps per epoch
    assert not [p for p in (tmp_path / "two").iterdir() if p.name.startswith(".")]


def test_a_mid_epoch_checkpoint_resumes_under_two_processes(tmp_path, monkeypatch):
    # One process trains 64 images (4 steps of 16 per epoch) with a step checkpoint every
    # 2 steps and is killed at step 3; two gloo processes resume it. They must carry the
    # epoch's running sums once (rank 0 holds them), take the remaining steps in lockstep
    # (the step-2 checkpoint of epoch 2 all-reduces on every rank), and end where one
    # uninterrupted process ends.
    args = dict(
        model="vit_tiny", model_kwargs=VIT, dataset="synthetic", synthetic_train=64,
        synthetic_test=32, image_size=8, batch_size=16, epochs=2, lr=0.5, recipe="fst",
        deterministic=True, progress=False, quiet=True, plot=False,
    )  # fmt: skip
    train(TrainConfig(out=str(tmp_path / "one"), **args))
    real = StepGuard.step
    calls = {"n": 0}

    def step(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # a kill between the step checkpoint and the epoch end
        return real(self)

    monkeypatch.setattr(StepGuard, "step", step)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(out=str(tmp_path / "two"), checkpoint_every=2, **args))
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "two" / "last.pt")["step"] == 2
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "fullsparse", "train", "--resume",
        "--model", "vit_tiny", "--model-kwargs", json.dumps(VIT), "--dataset", "synthetic",
        "--synthetic-train", "64", "--synthetic-test", "32", "--image-size", "8",
        "--batch-size", "16", "--epochs", "2", "--lr", "0.5", "--recipe", "fst",
        "--deterministic", "--checkpoint-every", "2", "--no-progress", "--no-plot", "--quiet",
        "--out", str(tmp_path / "two"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m1 = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [m["train_images"] for m in m2] == [64, 64]
    for a, b in zip(m1, m2, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-5)
        assert b["train_acc"] == a["train_acc"]
    w1 = load_checkpoint(tmp_path / "one" / "last.pt")["model"]
    w2 = load_checkpoint(tmp_path / "two" / "last.pt")["model"]
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-4, atol=1e-5, msg=key)
    log = (tmp_path / "two" / "train.log").read_text()
    assert "at epoch 1 step 3" in log and "checkpoint: epoch 2 step 2/4" in log


def _fake_world(monkeypatch, world_size: int) -> None:
    monkeypatch.setattr(
        trainer_mod, "init_distributed", lambda device_type: DistInfo(0, world_size, 0)
    )


def test_sync_bn_is_refused_on_cpu_under_ddp(tmp_path, monkeypatch):
    _fake_world(monkeypatch, 2)
    config = TrainConfig(dataset="synthetic", sync_bn=True, device="cpu", out=str(tmp_path / "r"))
    with pytest.raises(ConfigError, match="--sync-bn needs CUDA"):
        train(config)
    assert not (tmp_path / "r").exists()


def test_global_batch_must_divide_over_the_processes(tmp_path, monkeypatch):
    _fake_world(monkeypatch, 3)
    config = TrainConfig(dataset="synthetic", batch_size=16, out=str(tmp_path / "r"))
    with pytest.raises(ConfigError, match="batch_size=16 is the global batch.*3 processes"):
        train(config)


def test_single_process_helpers_are_no_ops(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_distributed("cpu")
    assert info == DistInfo() and info.is_main and not info.enabled
    assert all_reduce_sum([1.0, 2.0], info, torch.device("cpu")) == [1.0, 2.0]
    assert any_rank(True, info, torch.device("cpu")) is True


def test_world_size_without_a_rendezvous_address_is_a_clear_error(monkeypatch):
    from fullsparse.errors import UserError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(UserError, match="MASTER_ADDR is not set.*torchrun"):
        init_distributed("cpu")


def test_ddp_with_batchnorm_and_uneven_test_shards_reports_the_global_test_accuracy(tmp_path):
    # 33 test images over 2 ranks x batch 8: rank 0 runs 3 test batches, rank 1 runs 3 with
    # one image less — evaluation must neither hang (BatchNorm buffers, DDP broadcasts) nor
    # miscount: its top-1 equals a single-process evaluation of the saved checkpoint.
    from fullsparse.train import evaluate_checkpoint

    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "fullsparse", "train", "--model", "resnet20", "--dataset", "synthetic",
        "--synthetic-train", "64", "--synthetic-test", "33", "--image-size", "8",
        "--batch-size", "16", "--epochs", "1", "--recipe", "fst", "--lr", "0.1",
        "--no-progress", "--no-plot", "--quiet", "--out", str(tmp_path / "bn"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "bn" / "metrics.jsonl").read_text().splitlines()[0])
    single = evaluate_checkpoint(tmp_path / "bn" / "last.pt", device="cpu")
    assert single["images"] == 33
    assert metrics["test_top1"] == pytest.approx(single["top1"])
    assert metrics["test_loss"] == pytest.approx(single["loss"], rel=1e-5)
