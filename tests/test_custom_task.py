"""Your own model, data and loss through the Trainer (``TrainConfig(task="custom")`` with a
``UserTask``): the run folder, resume, schedules, accumulation and trackers as for the
built-in tasks."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from fullsparse.errors import CheckpointError, ConfigError
from fullsparse.train import TrainConfig, UserTask, train

QUIET = dict(progress=False, quiet=True, plot=False)


def _mlp(width: int = 32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 4)
    )


def _data() -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 16, generator=g)
    y = x[:, :4].argmax(1)
    return TensorDataset(x[:192], y[:192]), TensorDataset(x[192:], y[192:])


def cross_entropy(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def make_task(width: int = 32) -> UserTask:
    train_data, val_data = _data()
    return UserTask(_mlp(width), train_data, cross_entropy, eval_data=val_data)


def config(tmp_path, name: str = "run", **fields) -> TrainConfig:
    base = dict(task="custom", model="mlp", dataset="blobs", epochs=3, batch_size=32, lr=0.1)
    return TrainConfig(out=str(tmp_path / name), **{**QUIET, **base, **fields})


def test_own_model_trains_into_a_run_folder(tmp_path) -> None:
    summary = train(config(tmp_path, report_to="csv", log_every=3), task=make_task())
    run = tmp_path / "run"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    assert summary["best_val_loss"] == min(m["val_loss"] for m in lines)
    assert summary["sparse_layers"] == 2  # two hidden Linear layers; the head stays dense
    assert summary["sparse_gemm_fraction"]["total"] > 0.5
    assert (run / "best.pt").is_file() and (run / "scalars.csv").is_file()
    saved = torch.load(run / "last.pt", weights_only=True)
    assert saved["identity"]["task"] == "custom"
    assert saved["identity"]["parameters"]["0.weight"] == [32, 16]


def test_resume_continues_bit_for_bit(tmp_path) -> None:
    """Stopped after epoch 1 and resumed with freshly built objects (a new process would
    build them again): the same weights as 3 epochs straight."""
    fields = dict(deterministic=True, recipe="fst", mask_interval=2)
    train(config(tmp_path, "straight", **fields), task=make_task())
    stopped = config(tmp_path, "resumed", stop_after=1, **fields)
    train(stopped, task=make_task())
    train(stopped.replace(stop_after=None, resume=True), task=make_task())
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for key, value in a["sparse_state"].items():
        assert torch.equal(value, b["sparse_state"][key]), key


def test_a_checkpoint_of_another_model_is_refused(tmp_path) -> None:
    first = config(tmp_path, stop_after=1)
    train(first, task=make_task(width=32))
    with pytest.raises(CheckpointError, match="belongs to another run.*parameters"):
        train(first.replace(stop_after=None, resume=True), task=make_task(width=64))


def test_task_custom_needs_a_task_object_and_only_it_takes_one(tmp_path) -> None:
    with pytest.raises(ConfigError, match="task='custom' trains your own model") as info:
        train(config(tmp_path))
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="a task object needs task='custom'"):
        train(TrainConfig(out=str(tmp_path / "c"), **QUIET), task=make_task())
    assert not (tmp_path / "run").exists() and not (tmp_path / "c").exists()


def test_a_batch_larger_than_the_data_is_one_line(tmp_path) -> None:
    with pytest.raises(ConfigError, match="batch_size=512 is larger than the 192 training"):
        train(config(tmp_path, batch_size=512), task=make_task())
    assert not (tmp_path / "run").exists()


class DictData(Dataset):
    """Examples as dicts (as Hugging Face datasets give them)."""

    def __init__(self, data: TensorDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x, y = self.data[i]
        return {"x": x, "label": y}


def test_dict_batches_under_gradient_accumulation_equal_one_batch(tmp_path) -> None:
    def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(model(batch["x"]), batch["label"])

    def task() -> UserTask:
        train_data, _ = _data()
        return UserTask(_mlp(), DictData(train_data), loss)

    for n in (1, 4):
        train(config(tmp_path, f"n{n}", recipe="srste", grad_accum_steps=n, epochs=1), task=task())
    a = torch.load(tmp_path / "n1" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "n4" / "last.pt", weights_only=True)["model"]
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=1e-5, atol=1e-6)
    assert not torch.equal(a["0.weight"], _mlp().state_dict()["0.weight"])  # it trained


def test_cli_task_custom_is_one_line_exit_2(tmp_path, capsys) -> None:
    from fullsparse.cli import main

    assert main(["train", "--task", "custom", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "UserTask(model, train_data, loss)" in err[0]
    assert not (tmp_path / "r").exists()


def test_killed_mid_epoch_resumes_from_the_step_checkpoint_bit_for_bit(tmp_path, monkeypatch):
    """6 steps per epoch, last.pt every 2 steps, killed at the 9th step (epoch 2 step 3):
    the resumed run skips the done batches and ends where 3 epochs straight end."""
    from test_checkpoint import _kill_at_step, _Killed

    fields = dict(deterministic=True, recipe="fst", checkpoint_every=2)
    train(config(tmp_path, "straight", **fields), task=make_task())
    cut = config(tmp_path, "cut", **fields)
    _kill_at_step(monkeypatch, 9)
    with pytest.raises(_Killed):
        train(cut, task=make_task())
    monkeypatch.undo()
    saved = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["step"]) == (1, 2)
    train(cut.replace(resume=True), task=make_task())
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    lines = {
        run: [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("straight", "cut")
    }
    assert [m["train_loss"] for m in lines["cut"]] == [m["train_loss"] for m in lines["straight"]]
