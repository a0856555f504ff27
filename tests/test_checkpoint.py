"""Checkpoints: atomic writes, weights_only loading, identity checks and bit-exact resume."""

from __future__ import annotations

import json
import pickle
import random

import pytest
import torch

from fullsparse.errors import CheckpointError, ConfigError, UserError
from fullsparse.train import TrainConfig, load_checkpoint, train
from fullsparse.train import checkpoint as ckpt
from fullsparse.train.guard import StepGuard
from tinyruns import tiny_classify


def tiny(tmp_path, name="run", **kw) -> TrainConfig:
    fields = dict(synthetic_train=96, epochs=2, deterministic=True)
    return tiny_classify(tmp_path, name, **{**fields, **kw})


def _metrics(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def _assert_same_run(a, b):
    """Two run folders ended in bit-identical states with identical metrics."""
    ca, cb = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    assert ca["model"].keys() == cb["model"].keys()
    for key in ca["model"]:
        assert torch.equal(ca["model"][key], cb["model"][key]), key
    assert ca["sparse_state"].keys() == cb["sparse_state"].keys()
    for key in ca["sparse_state"]:
        assert torch.equal(ca["sparse_state"][key], cb["sparse_state"][key]), key
    for sa, sb in zip(
        ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values(), strict=True
    ):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert torch.equal(ca["rng"]["torch"], cb["rng"]["torch"])
    ma, mb = _metrics(a / "metrics.jsonl"), _metrics(b / "metrics.jsonl")
    keys = ("epoch", "train_loss", "train_acc", "test_loss", "test_top1", "test_top5", "lr")
    assert [[m[k] for k in keys] for m in ma] == [[m[k] for k in keys] for m in mb]


@pytest.mark.parametrize("recipe, extra", [("fst", {}), ("tsm", {"tsm_interval": 4})])
def test_two_epochs_straight_equal_one_epoch_resume_one_epoch_bit_for_bit(tmp_path, recipe, extra):
    # 6 steps per epoch; with tsm_interval=4 the TSM mask of epoch 2's first steps comes
    # from step 4 of epoch 1, so the resume must restore the sparse state to match.
    base = tiny(tmp_path, recipe=recipe, **extra)
    straight = train(base.replace(out=str(tmp_path / "a")))
    first = train(base.replace(out=str(tmp_path / "b"), stop_after=1))
    assert first["status"].startswith("stopped after epoch 1 of 2")
    assert len(_metrics(tmp_path / "b" / "metrics.jsonl")) == 1
    resumed = train(base.replace(out=str(tmp_path / "b"), resume=True))
    _assert_same_run(tmp_path / "a", tmp_path / "b")
    assert resumed["final_top1"] == straight["final_top1"]
    assert resumed["best_top1"] == straight["best_top1"]
    assert resumed["final_train_loss"] == straight["final_train_loss"]
    assert "resumed from" in (tmp_path / "b" / "train.log").read_text()


class _Killed(Exception):
    pass


def _kill_at_step(monkeypatch, n: int) -> None:
    """Make the n-th optimizer step of this process (1-based) raise, as a kill would."""
    real = StepGuard.step
    calls = {"n": 0}

    def step(self):
        calls["n"] += 1
        if calls["n"] == n:
            raise _Killed(f"killed at step {n}")
        return real(self)

    monkeypatch.setattr(StepGuard, "step", step)


@pytest.mark.parametrize(
    "recipe, extra, kill, saved",
    [
        ("fst", {}, 9, (1, 2)),  # epoch 2, step 3: last.pt from epoch 2 step 2
        ("tsm", {"tsm_interval": 4}, 5, (0, 4)),  # epoch 1: before, no checkpoint at all
        # a random weight gradient: the saved generator state makes the resumed draws equal
        ("fst2", {"grad_weight_mode": "mvue"}, 9, (1, 2)),
        # micro-batches and masks cached on the optimizer-step clock
        ("fst", {"grad_accum_steps": 2, "mask_interval": 3}, 9, (1, 2)),
    ],
)
def test_a_run_killed_mid_epoch_resumes_from_the_step_checkpoint_bit_for_bit(
    tmp_path, monkeypatch, recipe, extra, kill, saved
):
    # 6 steps per epoch, a step checkpoint every 2 steps (after steps 2 and 4; step 6 is the
    # epoch end's own checkpoint). The resumed run must end exactly where an uninterrupted
    # run ends: weights, TSM state, optimizer, RNG and every metrics line.
    base = tiny(tmp_path, recipe=recipe, **extra)
    straight = train(base.replace(out=str(tmp_path / "a")))
    cut = base.replace(out=str(tmp_path / "b"), checkpoint_every=2)
    _kill_at_step(monkeypatch, kill)
    with pytest.raises(_Killed):
        train(cut)
    monkeypatch.undo()
    state = load_checkpoint(tmp_path / "b" / "last.pt")
    assert (state["epoch"], state["step"]) == saved
    assert state["partial"]["images"] == 16 * saved[1]
    resumed = train(cut.replace(resume=True))
    _assert_same_run(tmp_path / "a", tmp_path / "b")
    assert resumed["final_train_loss"] == straight["final_train_loss"]
    assert resumed["epochs_done"] == 2 and load_checkpoint(tmp_path / "b" / "last.pt")["step"] == 0
    metrics = _metrics(tmp_path / "b" / "metrics.jsonl")
    assert [m["train_images"] for m in metrics] == [96, 96]
    log = (tmp_path / "b" / "train.log").read_text()
    assert (
        f"resumed from {tmp_path / 'b' / 'last.pt'} at epoch {saved[0] + 1} step {saved[1] + 1}"
        in log
    )
    assert "checkpoint: epoch" in log


def test_checkpoint_every_is_refused_where_it_does_not_apply():
    with pytest.raises(ConfigError, match="checkpoint_every=5 is for task='classify'"):
        TrainConfig(task="lm", checkpoint_every=5)
    with pytest.raises(ConfigError, match="checkpoint_every"):
        TrainConfig(checkpoint_every=-1)


def test_resume_without_the_sparse_state_would_differ(tmp_path, monkeypatch):
    # The equality test above is sensitive: dropping the TSM state changes the result.
    base = tiny(tmp_path, recipe="tsm", tsm_interval=4)
    train(base.replace(out=str(tmp_path / "a")))
    train(base.replace(out=str(tmp_path / "b"), stop_after=1))
    import fullsparse.nn

    monkeypatch.setattr(fullsparse.nn, "load_sparse_state_", lambda model, state: None)
    train(base.replace(out=str(tmp_path / "b"), resume=True))
    a = load_checkpoint(tmp_path / "a" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "last.pt")["model"]
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_holds_everything_a_resume_needs_and_loads_weights_only(tmp_path):
    train(tiny(tmp_path, epochs=1, recipe="tsm"))
    path = tmp_path / "run" / "last.pt"
    state = torch.load(path, weights_only=True)  # no code runs on load
    assert state["format"] == ckpt.FORMAT and state["version"] == ckpt.VERSION
    for key in (
        "identity", "config", "epoch", "loader_epoch", "model", "sparse_state", "optimizer",
        "scheduler", "scaler", "rng", "history", "best_top1",
    ):  # fmt: skip
        assert key in state, key
    assert state["identity"]["recipe"] == "tsm" and state["identity"]["sparsity"]["name"] == "tsm"
    assert any(k.endswith("tsm_mask") for k in state["sparse_state"])
    assert state["scheduler"]["last_epoch"] == 6
    assert state["epoch"] == state["loader_epoch"] == 1
    assert (tmp_path / "run" / "best.pt").read_bytes() == path.read_bytes()


def test_rng_capture_and_restore_round_trip():
    torch.manual_seed(1)
    random.seed(1)
    state = ckpt.capture_rng()
    a = (torch.rand(3), random.random())
    torch.manual_seed(2)
    random.seed(2)
    ckpt.restore_rng(state)
    b = (torch.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "last.pt"
    ckpt.atomic_write_bytes(path, b"old")

    def boom(f):
        f.write(b"half of a new file")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ckpt._atomic_write(path, boom)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("good")
    train(tiny(tmp, epochs=1))
    return tmp / "run" / "last.pt"


class _Evil:
    def __reduce__(self):
        return (print, ("code ran on load",))


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda p, good: p.write_bytes(good[: len(good) // 2]), "truncated, corrupt"),
        (lambda p, good: p.write_bytes(b"\x00garbage" * 10), "truncated, corrupt"),
        (lambda p, good: p.write_bytes(pickle.dumps(_Evil())), "cannot read checkpoint"),
        (lambda p, good: torch.save({"weights": torch.zeros(2)}, p), "not a fullsparse checkpoint"),
        (
            lambda p, good: torch.save({"format": ckpt.FORMAT, "version": 99}, p),
            "format version 99",
        ),
        (
            lambda p, good: torch.save({"format": ckpt.FORMAT, "version": 1}, p),
            "incomplete: missing identity",
        ),
    ],
    ids=["truncated", "garbage", "foreign-pickle", "plain-state-dict", "newer", "incomplete"],
)
def test_bad_checkpoints_raise_one_line_checkpoint_errors(
    tmp_path, capsys, good_checkpoint, make, needle
):
    good = good_checkpoint.read_bytes()
    bad = tmp_path / "bad.pt"
    make(bad, good)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(bad)
    assert needle in str(info.value) and "\n" not in str(info.value)
    assert "code ran on load" not in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"recipe": "srste"}, "recipe 'fst' != 'srste'"),
        ({"ir_alpha": 0.5}, "sparsity"),
        ({"model": "resnet32"}, "model 'resnet20' != 'resnet32'"),
        ({"synthetic_classes": 5}, "num_classes 10 != 5"),
        ({"image_size": 12}, "image_size 8 != 12"),
    ],
)
def test_resume_refuses_a_checkpoint_of_another_run(tmp_path, change, needle):
    base = tiny(tmp_path)
    train(base.replace(stop_after=1))
    before = (tmp_path / "run" / "last.pt").read_bytes()
    with pytest.raises(CheckpointError) as info:
        train(base.replace(resume=True, **change))
    assert "belongs to another run" in str(info.value) and needle in str(info.value)
    assert (tmp_path / "run" / "last.pt").read_bytes() == before


def test_resume_with_nothing_to_resume_and_resume_of_a_finished_run(tmp_path):
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(tiny(tmp_path, resume=True))
    done = train(tiny(tmp_path, epochs=1))
    again = train(tiny(tmp_path, epochs=1, resume=True))
    assert again["final_top1"] == done["final_top1"] and again["epochs_done"] == 1


def test_resume_rewrites_metrics_from_the_checkpoint_history(tmp_path):
    base = tiny(tmp_path)
    train(base.replace(stop_after=1))
    metrics = tmp_path / "run" / "metrics.jsonl"
    # A crash after writing metrics but before the checkpoint leaves a stray line.
    metrics.write_text(metrics.read_text() + '{"epoch": 2, "stray": true}\n')
    train(base.replace(resume=True))
    assert [m["epoch"] for m in _metrics(metrics)] == [1, 2]
    assert all("stray" not in m for m in _metrics(metrics))


def test_resume_from_an_explicit_checkpoint_path_into_a_new_folder(tmp_path):
    base = tiny(tmp_path)
    train(base.replace(out=str(tmp_path / "a")))
    train(base.replace(out=str(tmp_path / "b"), stop_after=1))
    train(base.replace(out=str(tmp_path / "c"), resume=str(tmp_path / "b" / "last.pt")))
    _assert_same_run(tmp_path / "a", tmp_path / "c")


def test_resume_from_another_checkpoint_into_an_occupied_folder_is_refused(tmp_path):
    base = tiny(tmp_path, epochs=1)
    train(base.replace(out=str(tmp_path / "a")))
    train(base.replace(out=str(tmp_path / "b")))
    before = (tmp_path / "b" / "last.pt").read_bytes()
    with pytest.raises(UserError, match="already holds another run"):
        train(base.replace(out=str(tmp_path / "b"), resume=str(tmp_path / "a" / "last.pt")))
    assert (tmp_path / "b" / "last.pt").read_bytes() == before
