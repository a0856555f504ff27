"""A run's lifecycle from the command line: a flagless ``--resume`` continues the saved run
bit for bit, flags that would change the run are refused, a run stopped before its first
checkpoint restarts from the beginning, and Ctrl-C says what was saved and how to continue.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from fullsparse.cli import main
from fullsparse.train import TrainConfig, load_checkpoint, train
from fullsparse.train.guard import StepGuard
from fullsparse.train.trainer import Trainer

CLASSIFY = [
    "--dataset", "synthetic", "--synthetic-train", "64", "--synthetic-test", "32",
    "--image-size", "8", "--batch-size", "16", "--epochs", "2", "--deterministic",
    "--no-progress", "--no-plot", "--quiet",
]  # fmt: skip
GPT_SMALL = {"context": 16, "depth": 1, "embed_dim": 32, "num_heads": 2}


def _corpus(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(30):
        (folder / f"mod{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * 12)
    return folder


def _lm_args(tmp_path: Path) -> list[str]:
    corpus = _corpus(tmp_path / "corpus")
    return [
        "--task", "lm", "--data-dir", str(corpus), "--model-kwargs", json.dumps(GPT_SMALL),
        "--batch-size", "8", "--steps-per-epoch", "4", "--epochs", "2", "--test-subset", "16",
        "--deterministic", "--no-progress", "--no-plot", "--quiet",
    ]  # fmt: skip


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = load_checkpoint(a / "last.pt")["model"], load_checkpoint(b / "last.pt")["model"]
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("task", ["classify", "lm"])
def test_a_flagless_resume_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path, task):
    args = CLASSIFY if task == "classify" else _lm_args(tmp_path)
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", *args, "--out", str(straight)]) == 0
    assert main(["train", *args, "--out", str(split), "--stop-after", "1"]) == 0
    assert main(["train", "--resume", "--out", str(split)]) == 0  # nothing else given
    _same_weights(straight, split)
    assert _metrics(split) == [
        {**m, **{k: n[k] for k in m if "seconds" in k or "per_second" in k}}
        for m, n in zip(_metrics(straight), _metrics(split), strict=True)
    ]
    a = json.loads((straight / "summary.json").read_text())
    b = json.loads((split / "summary.json").read_text())
    assert a["config"]["task"] == b["config"]["task"] == task
    assert b["status"] == "completed" and b["epochs_done"] == 2
    assert "resumed from" in (split / "train.log").read_text()


def test_resume_refuses_a_flag_that_changes_the_run_and_applies_more_epochs(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *CLASSIFY, "--out", str(run), "--stop-after", "1"]) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert main(["train", "--resume", "--out", str(run), "--lr", "0.5", "--recipe", "dense"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --recipe ('fst' in the saved run, 'dense'")
    assert "--lr (None in the saved run, 0.5 now)" in err[0] and "another --out" in err[0]
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    assert main(["train", "--resume", "--out", str(run), "--epochs", "1"]) == 2
    assert "--epochs (2 in the saved run, 1 now)" in capsys.readouterr().err
    assert main(["train", "--resume", "--out", str(run), "--epochs", "3", "--threads", "1"]) == 0
    assert json.loads((run / "summary.json").read_text())["epochs_done"] == 3
    log = (run / "train.log").read_text()
    changed = "epochs: 2 -> 3; stop_after: 1 -> None; threads: None -> 1"
    assert f"config changed since the checkpoint: {changed}" in log


def _interrupt_at_step(monkeypatch, n: int) -> None:
    real = StepGuard.step
    calls = {"n": 0}

    def step(self):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(StepGuard, "step", step)


def test_ctrl_c_before_the_first_checkpoint_then_resume_starts_the_saved_run(
    tmp_path, capsys, monkeypatch
):
    straight, run = tmp_path / "straight", tmp_path / "run"
    assert main(["train", *CLASSIFY, "--out", str(straight)]) == 0
    _interrupt_at_step(monkeypatch, 2)
    assert main(["train", *CLASSIFY, "--out", str(run)]) == 130
    monkeypatch.undo()
    err = capsys.readouterr().err
    expected = (
        f"interrupted: no checkpoint was written yet ({run} holds the run's config); "
        f"continue with: fullsparse train --resume --out {run}"
    )
    assert expected in err
    assert expected in (run / "train.log").read_text()
    assert not (run / "last.pt").exists() and (run / "config.json").exists()
    assert main(["train", "--resume", "--out", str(run)]) == 0
    log = (run / "train.log").read_text()
    assert "holds no checkpoint (the run stopped before its first one): starting the saved " in log
    _same_weights(straight, run)


def test_ctrl_c_after_a_checkpoint_names_it_and_the_command_that_continues(
    tmp_path, capsys, monkeypatch
):
    run = tmp_path / "run"
    _interrupt_at_step(monkeypatch, 6)  # 4 steps per epoch: in epoch 2
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig.from_dict(_config_of(CLASSIFY, run)))
    message = (
        f"interrupted: {run / 'last.pt'} holds the run after epoch 1; "
        f"continue with: fullsparse train --resume --out {run}"
    )
    assert message in capsys.readouterr().err
    assert message in (run / "train.log").read_text()


def test_a_failed_start_leaves_nothing_that_blocks_the_rerun(tmp_path, monkeypatch):
    run = tmp_path / "run"

    def broken(self, epoch):
        raise OSError("a bad image file")

    monkeypatch.setattr(Trainer, "train_epoch", broken)
    with pytest.raises(OSError):
        train(TrainConfig.from_dict(_config_of(CLASSIFY, run)))
    monkeypatch.undo()
    assert (run / "config.json").exists()  # the folder was made before the data failed
    summary = train(TrainConfig.from_dict(_config_of(CLASSIFY, run)))  # no --force needed
    assert summary["epochs_done"] == 2


def _config_of(args: list[str], out: Path) -> dict:
    """The config the ``train`` flags ``args`` give, as a dict, with ``out``."""
    from fullsparse.cli import build_parser
    from fullsparse.commands.train import config_from_args

    return config_from_args(build_parser().parse_args(["train", *args])).to_dict() | {
        "out": str(out)
    }


def test_compare_warns_of_a_busy_machine_and_says_how_to_reprint(tmp_path, capsys, monkeypatch):
    compare_mod = sys.modules["fullsparse.train.compare"]  # the package exports compare()
    monkeypatch.setattr(compare_mod, "_load_average", lambda: 99.0)
    out = tmp_path / "cmp"
    loud = [a for a in CLASSIFY if a != "--quiet"]
    argv = ["compare", *loud, "--epochs", "1", "--threads", "1", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "note: the machine was busy: load average 99.0 above the 1 threads" in printed
    assert "the machine was busy" in json.loads((out / "compare.json").read_text())["notes"][-1]
    assert json.loads((out / "fst" / "summary.json").read_text())["threads"] == 1
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "cat compare.md to reprint its table" in err


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"hello world\n", "the file is not a torch checkpoint"),
        (bytes(range(256)) * 4, "the weights-only unpickler finds no torch checkpoint in it"),
        ("truncated", "the file ends early or its zip archive is damaged"),
    ],
    ids=["text", "garbage-pickle", "truncated"],
)
def test_a_corrupt_or_foreign_checkpoint_is_one_whole_readable_sentence(tmp_path, content, reason):
    from fullsparse.errors import CheckpointError

    path = tmp_path / "bad.pt"
    if content == "truncated":
        torch.save({"weights": torch.zeros(1000)}, path)
        content = path.read_bytes()[:1500]
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"cannot read checkpoint {path}") and message.endswith(reason)
    for internal in ("KeyError", "miniz", "PytorchStreamReader", "operand", "Traceback"):
        assert internal not in message
    assert "\n" not in message


def test_step_callbacks_see_every_step_of_the_run_across_a_resume(tmp_path):
    from tinyruns import tiny_classify

    seen: list[tuple[int, int]] = []

    def record(step: int, total: int, trainer: Trainer) -> None:
        assert trainer.optimizer.param_groups[0]["lr"] > 0
        seen.append((step, total))

    config = tiny_classify(tmp_path, epochs=2)  # 4 steps per epoch
    train(config.replace(stop_after=1), step_callbacks=[record])
    train(config.replace(resume=True), step_callbacks=[record])
    assert seen == [(step, 8) for step in range(8)]


def test_an_mvue_run_with_a_layer_policy_resumes_bit_for_bit(tmp_path):
    # the MVUE weight gradient draws from torch's generator every step: the checkpoints'
    # RNG state makes a resumed run draw what the uninterrupted run drew
    args = [*CLASSIFY, "--recipe", "fst", "--grad-weight-mode", "mvue", "--keep-dense", "stem"]
    straight, split, other = tmp_path / "straight", tmp_path / "split", tmp_path / "other"
    assert main(["train", *args, "--out", str(straight)]) == 0
    assert main(["train", *args, "--out", str(split), "--stop-after", "1"]) == 0
    assert main(["train", "--resume", "--out", str(split)]) == 0
    _same_weights(straight, split)
    assert _metrics(split)[-1]["train_loss"] == _metrics(straight)[-1]["train_loss"]
    state = load_checkpoint(split / "last.pt")
    assert state["identity"]["keep_dense"] == ["stem"]
    assert state["identity"]["sparsity"]["grad_weight_mode"] == "mvue"
    assert state["identity"]["sparsity"]["ir_alpha"] == 0.0
    # and the draws matter: the same run with the paper's weight gradient ends elsewhere
    assert (
        main(["train", *CLASSIFY, "--recipe", "fst", "--keep-dense", "stem", "--out", str(other)])
        == 0
    )
    assert _metrics(other)[-1]["train_loss"] != _metrics(straight)[-1]["train_loss"]


def test_keep_dense_names_an_unknown_role_in_one_line(tmp_path, capsys):
    assert main(["train", *CLASSIFY, "--keep-dense", "stem,neck", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "'neck' is not a layer role; choose from stem, first_linear" in err
    assert len(err.splitlines()) == 1
