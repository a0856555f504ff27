"""Metrics trackers (``--report-to``) and per-step scalars (``--log-every``), read back from
what they wrote: the CSV always; TensorBoard, W&B and MLflow under their own markers
(``pytest -m tensorboard`` / ``wandb`` / ``mlflow``, each needing its extra)."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import math
from collections import defaultdict
from pathlib import Path

import pytest

from fullsparse.cli import build_parser, main
from fullsparse.commands.train import config_from_args
from fullsparse.errors import ConfigError, UserError
from fullsparse.train import TrainConfig, train
from fullsparse.train.common import lr_factor
from fullsparse.train.trackers import parse_report_to
from tinyruns import tiny_classify


def read_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """scalars.csv as {name: {step: value}}; a (name, step) written twice fails."""
    out: dict[str, dict[int, float]] = defaultdict(dict)
    with open(run_dir / "scalars.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "name", "value"]
    for step, name, value in rows[1:]:
        assert int(step) not in out[name], f"{name} at step {step} written twice"
        out[name][int(step)] = float(value)
    return out


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- the option
def test_report_to_takes_commas_lists_and_repeats() -> None:
    assert parse_report_to("csv, TensorBoard,csv") == ("csv", "tensorboard")
    assert parse_report_to("none") == ()
    assert TrainConfig(report_to=["csv", "tensorboard"]).report_to == "csv,tensorboard"
    args = build_parser().parse_args(["train", "--report-to", "csv", "--report-to", "mlflow,wandb"])
    assert parse_report_to(config_from_args(args).report_to) == ("csv", "mlflow", "wandb")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("csv,comet", "'comet' is not one of tensorboard, wandb, mlflow, csv, none"),
        ("none,csv", "'none' clashes with the trackers"),
        (",", "nothing is not one of"),
    ],
)
def test_bad_report_to_is_one_line(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        TrainConfig(report_to=value)
    assert "\n" not in str(info.value)


def test_missing_extra_is_named_before_the_run_folder_is_written(tmp_path, monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    config = tiny_classify(tmp_path, report_to="csv,wandb")
    with pytest.raises(
        UserError, match=r"needs the wandb package: pip install 'fullsparse\[wandb\]'"
    ):
        train(config)
    assert not (tmp_path / "run").exists()


def test_cli_missing_extra_exits_2_with_one_line(tmp_path, monkeypatch, capsys) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a)
    )
    out = tmp_path / "r"
    argv = ["train", "--dataset", "synthetic", "--report-to", "mlflow", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fullsparse[mlflow]" in err[0]
    assert not out.exists()


def test_a_tracker_that_fails_to_start_is_one_line(tmp_path, monkeypatch) -> None:
    from fullsparse.train import trackers

    class Refuses(trackers.Tracker):
        def __init__(self, run_dir: Path, resume_step: int | None) -> None:
            raise RuntimeError("no server at localhost:5000\ntraceback lines")

    monkeypatch.setitem(trackers._CLASSES, "csv", Refuses)
    with pytest.raises(UserError) as info:
        train(tiny_classify(tmp_path, report_to="csv"))
    want = "--report-to csv: the tracker did not start (RuntimeError: no server at localhost:5000)"
    assert str(info.value) == want


# --------------------------------------------------------------------------- CSV
def test_csv_holds_per_step_and_per_epoch_scalars(tmp_path) -> None:
    """64 images in batches of 16, 2 epochs, --log-every 2: train/* at steps 2, 4, 6, 8
    and epoch/* at 4 and 8, agreeing with metrics.jsonl and the lr schedule."""
    config = tiny_classify(tmp_path, epochs=2, report_to="csv", log_every=2)
    summary = train(config)
    run = tmp_path / "run"
    scalars = read_scalars(run)
    assert sorted(scalars["train/loss"]) == [2, 4, 6, 8]
    assert sorted(scalars["epoch/test_top1"]) == [4, 8]
    epochs = metrics(run)
    for index, step in enumerate((4, 8)):
        assert scalars["epoch/test_top1"][step] == epochs[index]["test_top1"]
        assert scalars["epoch/train_loss"][step] == pytest.approx(epochs[index]["train_loss"])
        # two logged steps of equal batches per epoch: their mean is the epoch's loss
        pair = (scalars["train/loss"][step - 2] + scalars["train/loss"][step]) / 2
        assert pair == pytest.approx(epochs[index]["train_loss"], rel=1e-9)
    for step in (2, 4, 6, 8):  # the lr the step used: factor of the 0-based step step-1
        want = config.peak_lr * lr_factor(step - 1, 8, 0)
        assert scalars["train/lr"][step] == pytest.approx(want, rel=1e-12)
        assert scalars["train/grad_norm"][step] > 0
        assert scalars["train/skipped_steps"][step] == 0
        assert scalars["train/epoch"][step] == step / 4
        assert scalars["train/images_per_second"][step] > 0
    fraction = summary["sparse_gemm_fraction"]["total"]
    assert scalars["train/sparse_gemm_fraction"][2] == pytest.approx(fraction, rel=1e-12)


def test_grad_norm_is_the_clipped_steps_norm_with_grad_clip(tmp_path) -> None:
    """With --grad-clip the logged norm is the guard's pre-clip norm; the epoch's mean
    grad_norm of metrics.jsonl is the mean of those of its steps."""
    config = tiny_classify(tmp_path, report_to="csv", log_every=1, grad_clip=0.5)
    train(config)
    norms = read_scalars(tmp_path / "run")["train/grad_norm"]
    assert sorted(norms) == [1, 2, 3, 4]
    mean = sum(norms.values()) / 4
    assert metrics(tmp_path / "run")[0]["grad_norm"] == pytest.approx(mean, rel=1e-6)


def test_dense_warmup_steps_log_a_dense_fraction(tmp_path) -> None:
    config = tiny_classify(tmp_path, report_to="csv", log_every=1, dense_warmup_steps=2)
    train(config)
    fraction = read_scalars(tmp_path / "run")["train/sparse_gemm_fraction"]
    assert fraction[1] == fraction[2] == 0.0
    assert fraction[3] == fraction[4] > 0.9


def test_resume_drops_the_rows_after_the_checkpoint(tmp_path) -> None:
    """A run stopped after epoch 1 whose CSV got rows past its checkpoint (a crash before
    the next one) resumes with every step logged exactly once."""
    config = tiny_classify(tmp_path, epochs=2, stop_after=1, report_to="csv", log_every=1)
    train(config)
    path = tmp_path / "run" / "scalars.csv"
    with open(path, "a", encoding="utf-8") as f:
        f.write("5,train/loss,123.0\n")  # logged after last.pt, then lost with the process
    train(config.replace(resume=True, stop_after=None))
    scalars = read_scalars(tmp_path / "run")  # fails on a step written twice
    assert sorted(scalars["train/loss"]) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert scalars["train/loss"][5] != 123.0
    assert sorted(scalars["epoch/test_top1"]) == [4, 8]


def test_log_every_writes_train_log_lines_at_the_log_level(tmp_path) -> None:
    train(tiny_classify(tmp_path, "info", log_every=2))
    lines = (tmp_path / "info" / "train.log").read_text().splitlines()
    steps = [line for line in lines if " step " in line and "loss " in line]
    assert [line.split(" step ")[1].split(":")[0] for line in steps] == ["2/4", "4/4"]
    assert "grad norm" in steps[0] and "images/s" in steps[0] and "sparse GEMMs" in steps[0]
    train(tiny_classify(tmp_path, "warn", log_every=2, log_level="warning"))
    assert (tmp_path / "warn" / "train.log").read_text() == ""
    assert not (tmp_path / "warn" / "scalars.csv").exists()  # report_to none: no tracker


def test_lines_go_through_the_fullsparse_train_logger(tmp_path) -> None:
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Keep()
    logging.getLogger("fullsparse.train").addHandler(handler)
    try:
        train(tiny_classify(tmp_path))
    finally:
        logging.getLogger("fullsparse.train").removeHandler(handler)
    assert any(line.startswith("epoch 1/1: train loss") for line in seen)
    assert any(line.startswith("results in ") for line in seen)


# --------------------------------------------------------------------------- extras
@pytest.mark.tensorboard
def test_tensorboard_events_hold_the_scalars_and_the_config(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny_classify(tmp_path, report_to="tensorboard,csv", log_every=2)
    train(config)
    run = tmp_path / "run"
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    loss = {e.step: e.value for e in events.Scalars("train/loss")}
    want = read_scalars(run)["train/loss"]
    assert sorted(loss) == [2, 4]
    for step, value in want.items():
        assert loss[step] == pytest.approx(value, rel=1e-6)  # float32 in the event file
    top1 = events.Scalars("epoch/test_top1")
    assert [(e.step, e.value) for e in top1] == [(4, metrics(run)[0]["test_top1"])]
    assert "config/text_summary" in events.Tags()["tensors"]
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"recipe": "fst"' in text
    plugins = events.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in plugins
    assert b"batch_size" in plugins["_hparams_/session_start_info"]


def wandb_records(path: Path) -> list:
    """The protobuf records of a W&B ``.wandb`` file: a 7-byte header (``:W&B``, magic,
    version), then records in 32 KiB blocks, each chunk with a 7-byte header (checksum,
    little-endian length, kind: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunk, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def _key(item: object) -> str:
    """A W&B record item's key: ``key``, or its ``nested_key`` parts joined."""
    return item.key or "/".join(item.nested_key)  # type: ignore[attr-defined]


@pytest.mark.wandb
def test_wandb_offline_run_holds_the_config_and_the_scalars(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb

    train(tiny_classify(tmp_path, report_to="wandb,csv", log_every=2))
    wandb.teardown()  # the W&B service writes the run file; stopping it flushes the file
    run = tmp_path / "run"
    (path,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(path)
    updates = [r.run.config.update for r in records if r.WhichOneof("record_type") == "run"]
    updates += [r.config.update for r in records if r.WhichOneof("record_type") == "config"]
    config = {_key(item): json.loads(item.value_json) for update in updates for item in update}
    assert config["recipe"] == "fst" and config["batch_size"] == 16
    history: dict[int, dict[str, float]] = defaultdict(dict)
    for r in records:
        if r.WhichOneof("record_type") == "history":
            for item in r.history.item:
                history[r.history.step.num][_key(item)] = json.loads(item.value_json)
    scalars = read_scalars(run)
    assert sorted(history) == [2, 4]
    for step in (2, 4):
        want = scalars["train/loss"][step]
        assert history[step]["train/loss"] == pytest.approx(want, rel=1e-12)
    assert history[4]["epoch/test_top1"] == metrics(run)[0]["test_top1"]


@pytest.mark.mlflow
def test_mlflow_file_store_holds_params_and_metric_history(tmp_path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    train(tiny_classify(tmp_path, report_to="mlflow,csv", log_every=2))
    run = tmp_path / "run"
    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("fullsparse")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.data.params["recipe"] == "fst" and found.data.params["batch_size"] == "16"
    history = client.get_metric_history(found.info.run_id, "train/loss")
    want = read_scalars(run)["train/loss"]
    assert {m.step: m.value for m in history} == pytest.approx(want, rel=1e-9)
    assert not any(math.isnan(m.value) for m in history)
