"""A training process killed with SIGKILL loses nothing: the previous checkpoint is intact,
no half-written file is taken for a checkpoint, and ``--resume`` ends the run with the same
metrics and bit-identical weights as a run that was never interrupted.

The process is ``python -m fullsparse train`` started through a small wrapper (written
below) that pauses it at an exact point — inside a training step, or half-way through
writing a checkpoint — and touches a signal file; the test then kills it. The pause lives
in the test, not in fullsparse: the library has no test-only code path.

Both runs use one thread (OMP_NUM_THREADS=1 here, tests/conftest.py in-process): float sums
depend on the thread count, and bit-exactness needs the same one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fullsparse
from fullsparse.train import TrainConfig, load_checkpoint, train

SRC = str(Path(fullsparse.__file__).resolve().parents[1])
# 6 steps per epoch, 2 epochs; tsm with a mask interval of 4 so that the resume must also
# restore the sparse state (the mask of epoch 2's first steps comes from epoch 1).
FIELDS = dict(
    dataset="synthetic",
    synthetic_train=96,
    synthetic_test=32,
    image_size=8,
    batch_size=16,
    epochs=2,
    recipe="tsm",
    tsm_interval=4,
    deterministic=True,
    progress=False,
    quiet=True,
    plot=False,
)
ARGS = [
    "--dataset", "synthetic", "--synthetic-train", "96", "--synthetic-test", "32",
    "--image-size", "8", "--batch-size", "16", "--epochs", "2", "--recipe", "tsm",
    "--tsm-interval", "4", "--deterministic", "--no-progress", "--no-plot", "--quiet",
]  # fmt: skip
METRICS = ("epoch", "train_loss", "train_acc", "test_loss", "test_top1", "test_top5", "lr")

# Runs `python -m fullsparse ARGS` but pauses for good at $STALL_AT and touches
# $STALL_SIGNAL first:  step:N  the N-th training forward (epoch 2 step 3 is N = 9);
# write:N  the N-th checkpoint save, after half of its bytes reached the temp file.
WRAPPER = r"""
import io, os, runpy, sys, time
from pathlib import Path

import torch

mode, count = os.environ["STALL_AT"].split(":")
count, seen = int(count), [0]


def stall():
    Path(os.environ["STALL_SIGNAL"]).write_text(mode)
    time.sleep(600)


if mode == "write":
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("format") == "fullsparse-checkpoint":
            seen[0] += 1
            if seen[0] == count:
                buffer = io.BytesIO()
                real_save(obj, buffer, *args, **kwargs)
                data = buffer.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
                stall()
        return real_save(obj, f, *args, **kwargs)

    torch.save = save
elif mode == "step":
    from fullsparse.train import trainer

    real_build = trainer.build_model

    def build(identity):
        model, report = real_build(identity)

        def hook(module, inputs):
            if module.training and torch.is_grad_enabled():
                seen[0] += 1
                if seen[0] == count:
                    stall()

        model.register_forward_pre_hook(hook)
        return model, report

    trainer.build_model = build
sys.argv = ["fullsparse", *sys.argv[1:]]
runpy.run_module("fullsparse", run_name="__main__", alter_sys=True)
"""


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.pop("FULLSPARSE_DATA", None)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("straight") / "run"
    assert torch.get_num_threads() == 1  # tests/conftest.py; the subprocesses use 1 too
    train(TrainConfig(**FIELDS, out=str(run)))
    return run


def _kill_at(
    tmp_path: Path, run: Path, stall_at: str, sig: signal.Signals = signal.SIGKILL
) -> tuple[int, str]:
    """Run until ``stall_at``, send ``sig``; return the exit status and stderr."""
    wrapper = tmp_path / "stall_wrapper.py"
    wrapper.write_text(WRAPPER)
    signal_file = tmp_path / "stalled"
    env = _env(STALL_AT=stall_at, STALL_SIGNAL=str(signal_file))
    cmd = [sys.executable, str(wrapper), "train", *ARGS, "--out", str(run)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not signal_file.exists():
            if proc.poll() is not None:
                pytest.fail(f"the run ended before {stall_at}: {proc.stderr.read()[-2000:]!r}")
            if time.monotonic() > deadline:
                pytest.fail(f"the run never reached {stall_at}")
            time.sleep(0.05)
    finally:
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    return proc.returncode, err.decode()


def _resume(run: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fullsparse", "train", *ARGS, "--out", str(run), "--resume"]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)


def _metrics(run: Path) -> list[list]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [[m[k] for k in METRICS] for m in lines]


def _assert_same_outcome(resumed: Path, straight: Path) -> None:
    a = json.loads((resumed / "summary.json").read_text())
    b = json.loads((straight / "summary.json").read_text())
    assert a["status"] == b["status"] == "completed"
    for key in ("best_top1", "best_epoch", "final_top1", "final_top5", "final_train_loss"):
        assert a[key] == b[key], key
    assert _metrics(resumed) == _metrics(straight)
    wa, wb = load_checkpoint(resumed / "last.pt"), load_checkpoint(straight / "last.pt")
    assert wa["model"].keys() == wb["model"].keys()
    for key in wa["model"]:
        assert torch.equal(wa["model"][key], wb["model"][key]), key
    for key in wb["sparse_state"]:
        assert torch.equal(wa["sparse_state"][key], wb["sparse_state"][key]), key


def _checkpoint_files(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.endswith(".pt"))


def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path, uninterrupted):
    run = tmp_path / "run"
    _kill_at(tmp_path, run, "step:9")  # epoch 2, step 3 of 6
    state = load_checkpoint(run / "last.pt")  # intact and loadable
    assert state["epoch"] == 1 and len(_metrics(run)) == 1
    assert _checkpoint_files(run) == ["best.pt", "last.pt"]
    before = (run / "last.pt").read_bytes()

    proc = _resume(run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (run / "last.pt").read_bytes() != before  # epoch 2 was written on top, atomically
    _assert_same_outcome(run, uninterrupted)
    assert "resumed from" in (run / "train.log").read_text()


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, uninterrupted):
    run = tmp_path / "run"
    _kill_at(tmp_path, run, "write:2")  # epoch 2's checkpoint, half written
    temps = [p for p in run.iterdir() if p.name.endswith(".tmp")]
    assert [p.name.startswith(".last.pt.") for p in temps] == [True]  # the torn write
    assert _checkpoint_files(run) == ["best.pt", "last.pt"]  # the temp file is no .pt
    state = load_checkpoint(run / "last.pt")  # the previous checkpoint, intact
    assert state["epoch"] == 1
    # The stray epoch-2 line of metrics.jsonl (written before the checkpoint) is replaced
    # on resume by the checkpoint's own history.
    assert [m[0] for m in _metrics(run)] == [1, 2]

    proc = _resume(run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]  # cleaned up
    _assert_same_outcome(run, uninterrupted)


def test_sigterm_is_taken_like_ctrl_c_and_the_run_resumes_exactly(tmp_path, uninterrupted):
    run = tmp_path / "run"
    code, err = _kill_at(tmp_path, run, "step:9", signal.SIGTERM)  # epoch 2, step 3 of 6
    assert code == 143, err[-2000:]
    message = (
        f"interrupted: {run / 'last.pt'} holds the run after epoch 1; "
        f"continue with: fullsparse train --resume --out {run}"
    )
    assert message in err and err.rstrip().endswith("terminated")
    assert "Traceback" not in err
    assert message in (run / "train.log").read_text()
    assert _checkpoint_files(run) == ["best.pt", "last.pt"]

    proc = _resume(run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _assert_same_outcome(run, uninterrupted)
