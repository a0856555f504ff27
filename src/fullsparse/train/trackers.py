"""Metrics trackers of a run (``--report-to``): TensorBoard, Weights & Biases, MLflow, CSV.

Each tracker gets the run config as hyperparameters when the run folder opens, the per-step
scalars every ``--log-every`` optimizer steps (``train/loss``, ``train/lr``, ...) and the
per-epoch metrics (``epoch/<metric>``), each at the global optimizer step, on rank 0 only.
TensorBoard, W&B and MLflow are extras (``pip install 'fullsparse[tensorboard]'``), imported
only when asked for; a missing one is a one-line error before the run folder is written
(:func:`check_trackers`). The CSV tracker needs nothing.

Where each writes: ``scalars.csv`` (``step,name,value``) and ``tensorboard/`` in the run
folder; W&B under ``<run folder>/wandb`` (online or offline as ``WANDB_MODE`` says, project
``$WANDB_PROJECT`` or ``fullsparse``); MLflow to ``$MLFLOW_TRACKING_URI``, by default the
file store ``<run folder>/mlruns`` (experiment ``$MLFLOW_EXPERIMENT_NAME`` or
``fullsparse``).
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fullsparse.errors import ConfigError, UserError

__all__ = [
    "REPORTERS",
    "TRACKERS",
    "parse_report_to",
    "check_trackers",
    "open_trackers",
    "Tracker",
    "Trackers",
    "CsvTracker",
    "SCALARS_CSV",
]

#: The trackers, in the order they are opened.
TRACKERS = ("tensorboard", "wandb", "mlflow", "csv")
#: What ``--report-to`` accepts: the trackers, or ``none``.
REPORTERS = (*TRACKERS, "none")
#: The module each extra tracker imports (the extra has the tracker's name).
_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
#: The CSV tracker's file in the run folder.
SCALARS_CSV = "scalars.csv"


def parse_report_to(value: str) -> tuple[str, ...]:
    """The trackers named by ``value`` (comma-separated; ``none``: no tracker), each once,
    in the order given. One ConfigError line for an unknown name."""
    names = [n.strip().lower() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in REPORTERS]
    if unknown or not names:
        raise ConfigError(
            f"report_to={value!r}: {', '.join(map(repr, unknown)) or 'nothing'} is not one of "
            f"{', '.join(REPORTERS)} (comma-separated)"
        )
    if "none" in names and len(set(names)) > 1:
        raise ConfigError(f"report_to={value!r}: 'none' clashes with the trackers named with it")
    return tuple(dict.fromkeys(n for n in names if n != "none"))


def check_trackers(names: Iterable[str]) -> None:
    """One UserError line naming the extra of the first tracker that is not installed
    (found without importing it)."""
    for name in names:
        module = _MODULES.get(name)
        if module is not None and importlib.util.find_spec(module) is None:
            raise UserError(
                f"--report-to {name} needs the {module} package: pip install "
                f"'fullsparse[{name}]' (or drop {name} from --report-to)"
            )


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    """The finite-or-not real numbers of ``values`` (bools and None left out)."""
    return {
        k: float(v)
        for k, v in values.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def _flat_params(config: dict[str, Any]) -> dict[str, Any]:
    """Hyperparameters as trackers take them: str, int, float or bool (None and mappings
    as text)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, (bool, int, float, str)):
            out[key] = value
        else:
            out[key] = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    return out


class Tracker:
    """What a tracker does; each method may be left as is."""

    def hparams(self, config: dict[str, Any]) -> None:
        """The run config, once, when the run folder opens."""

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Scalars at global optimizer step ``step``."""

    def close(self) -> None:
        """Flush and close (the end of the run, or an interruption)."""


class CsvTracker(Tracker):
    """``scalars.csv``: one ``step,name,value`` row per scalar. A resumed run first drops
    the rows after its checkpoint's step (they are logged again)."""

    def __init__(self, run_dir: Path, resume_step: int | None) -> None:
        self.path = run_dir / SCALARS_CSV
        rows: list[list[str]] = []
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline="", encoding="utf-8") as f:
                rows = [r for r in list(csv.reader(f))[1:] if int(r[0]) <= resume_step]
        self.file = open(self.path, "w", newline="", encoding="utf-8")  # noqa: SIM115
        self.writer = csv.writer(self.file)
        self.writer.writerows([["step", "name", "value"], *rows])
        self.file.flush()

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.writer.writerows([[step, name, repr(value)] for name, value in values.items()])
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoardTracker(Tracker):
    """Event files in ``<run folder>/tensorboard`` (a resume purges the events after its
    step); the config as TensorBoard hyperparameters and as a text summary."""

    def __init__(self, run_dir: Path, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(
            log_dir=str(run_dir / "tensorboard"),
            purge_step=None if resume_step is None else resume_step + 1,
        )

    def hparams(self, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        params = _flat_params(config)
        for summary in hparams(params, {}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```")

    def scalars(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """A W&B run in ``<run folder>/wandb``, named after the folder, started with the config
    (:meth:`hparams`, called right after opening)."""

    def __init__(self, run_dir: Path, resume_step: int | None) -> None:
        import wandb

        self.wandb, self.run_dir, self.run = wandb, run_dir, None

    def hparams(self, config: dict[str, Any]) -> None:
        self.run = self.wandb.init(
            project=os.environ.get("WANDB_PROJECT", "fullsparse"),
            dir=str(self.run_dir),
            name=self.run_dir.name,
            config=_flat_params(config),
        )

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.run is not None:
            self.run.log(values, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class MlflowTracker(Tracker):
    """An MLflow run (``$MLFLOW_TRACKING_URI``, default the file store
    ``<run folder>/mlruns``), named after the folder."""

    def __init__(self, run_dir: Path, resume_step: int | None) -> None:
        import mlflow

        self.mlflow = mlflow
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # the file store in the run folder (MLflow 3 asks to allow it)
            uri = (run_dir / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "fullsparse"))
        self.run = mlflow.start_run(run_name=run_dir.name)

    def hparams(self, config: dict[str, Any]) -> None:
        params = {k: str(v)[:6000] for k, v in _flat_params(config).items()}
        self.mlflow.log_params(params)

    def scalars(self, values: dict[str, float], step: int) -> None:
        finite = {k: v for k, v in values.items() if math.isfinite(v)}
        self.mlflow.log_metrics(finite, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


_CLASSES: dict[str, type[Tracker]] = {
    "tensorboard": TensorBoardTracker,
    "wandb": WandbTracker,
    "mlflow": MlflowTracker,
    "csv": CsvTracker,
}


class Trackers:
    """The run's trackers as one (none: every call does nothing)."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def hparams(self, config: dict[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.hparams(config)

    def scalars(self, values: dict[str, Any], step: int) -> None:
        numbers = _numbers(values)
        if numbers:
            for tracker in self.trackers:
                tracker.scalars(numbers, step)

    def close(self) -> None:
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close()


def open_trackers(
    names: Iterable[str], run_dir: Path, resume_step: int | None, config: dict[str, Any]
) -> Trackers:
    """The trackers ``names`` writing for ``run_dir``, each given the run ``config`` as
    hyperparameters; ``resume_step``: the global step a resumed run continues after (None:
    a new run). A tracker that fails to start is one UserError line."""
    opened: list[Tracker] = []
    for name in TRACKERS:
        if name not in names:
            continue
        try:
            tracker = _CLASSES[name](run_dir, resume_step)
            opened.append(tracker)
            tracker.hparams(config)
        except Exception as exc:  # a login, a server, a file: one line, the others closed
            Trackers(opened).close()
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise UserError(
                f"--report-to {name}: the tracker did not start ({type(exc).__name__}: {first})"
            ) from None
    return Trackers(opened)
