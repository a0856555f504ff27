"""The run folder: its log, its files, and the checkpoints a run writes and resumes from.

A run folder holds::

    config.json     the resolved TrainConfig (``--config`` and ``--resume`` read it back)
    train.log       everything printed, plus the sparsify report
    metrics.jsonl   one JSON object per epoch
    scalars.csv     per-step and per-epoch scalars (--report-to csv); tensorboard/: events
    last.pt         checkpoint after the latest epoch (atomic), best.pt: the best epoch's
    shards/         under --fsdp: the model and optimizer shards that last.pt/best.pt name
    summary.json    the run's outcome (also ``train``'s return value)
    curves.png      loss/accuracy/lr curves (when matplotlib is installed)

Nothing is written before the run's setup has succeeded; a folder that holds no checkpoint
and no summary (a start that failed or was interrupted before its first checkpoint) holds
nothing a rerun could lose, so a rerun replaces it without ``--force``.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from fullsparse.errors import CheckpointError, UserError
from fullsparse.train import checkpoint as ckpt
from fullsparse.train.config import TrainConfig
from fullsparse.train.protocol import TrainerView

__all__ = [
    "RESULT_FILES",
    "RunLog",
    "RunState",
    "Checkpointer",
    "check_run_dir",
    "write_json",
]

#: Files a run writes into its folder; ``force`` removes exactly these (never the folder).
RESULT_FILES = (
    "config.json",
    "train.log",
    "metrics.jsonl",
    "last.pt",
    "best.pt",
    "shards",
    "summary.json",
    "curves.png",
    "scalars.csv",
)
#: Tracker folders a replaced run removes with its files (--report-to tensorboard).
RESULT_DIRS = ("tensorboard",)
#: The files that make a folder a run worth keeping: a checkpoint or a finished summary.
_KEPT_FILES = ("last.pt", "best.pt", "summary.json")


#: The logger of every run's console and train.log lines; attach a handler to it to get them.
LOGGER = "fullsparse.train"


class _Console(logging.StreamHandler):  # type: ignore[type-arg]
    """stdout as it is when a line is written (a test or a notebook may replace it)."""

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stdout

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


class RunLog:
    """The run's lines through the ``fullsparse.train`` logger: to stdout (rank 0, unless
    quiet) and to the run folder's ``train.log``, at ``level`` and above; lines logged
    before the folder exists are kept and written when it opens. ``console=False`` lines go
    to train.log only."""

    def __init__(self, enabled: bool, quiet: bool, level: str = "info") -> None:
        self.enabled = enabled
        self.quiet = quiet
        self.level = getattr(logging, level.upper())
        self.file: TextIO | None = None
        self._pending: list[logging.LogRecord] = []
        self.logger = logging.getLogger(LOGGER)
        self.logger.setLevel(logging.DEBUG)
        self.logger.propagate = False  # one copy of each line, whatever the root logger has
        self._handlers: list[logging.Handler] = []
        if enabled and not quiet:
            console = _Console()
            console.setLevel(self.level)
            console.addFilter(lambda record: getattr(record, "console", True))
            self._add(console)
        if enabled:
            self._add(_Buffer(self))

    def _add(self, handler: logging.Handler) -> None:
        self.logger.addHandler(handler)
        self._handlers.append(handler)

    def open(self, path: Path, append: bool) -> None:
        if not self.enabled:
            return
        handler = logging.FileHandler(path, mode="a" if append else "w", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        handler.setLevel(self.level)
        self.file = handler.stream
        for record in self._pending:
            if record.levelno >= self.level:
                handler.handle(record)
        self._pending.clear()
        for old in [h for h in self._handlers if isinstance(h, _Buffer)]:
            self.logger.removeHandler(old)
            self._handlers.remove(old)
        self._add(handler)

    def log(self, level: int, message: str, *, console: bool = True) -> None:
        if self.enabled:
            self.logger.log(level, message, extra={"console": console})

    def info(self, message: str, *, console: bool = True) -> None:
        self.log(logging.INFO, message, console=console)

    def debug(self, message: str, *, console: bool = True) -> None:
        self.log(logging.DEBUG, message, console=console)

    def warning(self, message: str, *, console: bool = True) -> None:
        self.log(logging.WARNING, message, console=console)

    def close(self) -> None:
        for handler in self._handlers:
            self.logger.removeHandler(handler)
            handler.close()
        self._handlers = []
        self.file = None


class _Buffer(logging.Handler):
    """Keeps the records logged before the run folder exists (written when it opens)."""

    def __init__(self, log: RunLog) -> None:
        super().__init__(logging.DEBUG)
        self.run_log = log

    def emit(self, record: logging.LogRecord) -> None:
        self.run_log._pending.append(record)


@dataclass
class RunState:
    """Where a run stands: completed epochs, their metrics, the best score so far.

    ``best_key`` names the score in checkpoints (``best_top1``, ``best_val_loss``,
    ``best_map``); ``higher_is_better`` says which way it improves.
    """

    best_key: str
    higher_is_better: bool
    epoch: int = 0  # completed epochs
    history: list[dict[str, Any]] = field(default_factory=list)
    best: float = 0.0
    best_epoch: int = 0
    skipped_steps: int = 0
    #: Steps done in epoch ``epoch`` (a mid-epoch checkpoint, --checkpoint-every) and the
    #: epoch's running sums up to there (summed over ranks).
    step: int = 0
    partial: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.best = -1.0 if self.higher_is_better else float("inf")

    def improves(self, score: float) -> bool:
        return score > self.best if self.higher_is_better else score < self.best


def write_json(path: Path, obj: Any) -> None:
    ckpt.atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def _write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(h) + "\n" for h in history)
    ckpt.atomic_write_bytes(path, text.encode())


def check_run_dir(config: TrainConfig) -> tuple[Path | None, bool]:
    """Refuse to touch an existing run's results unless resuming or forced.

    Returns (the checkpoint to resume from or None, whether the folder's files are to be
    replaced when the run folder opens).
    """
    run_dir = config.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} exists and is not a folder")
    existing = [f for f in RESULT_FILES if (run_dir / f).exists()]
    unfinished = bool(existing) and not any(f in existing for f in _KEPT_FILES)
    if config.resume:
        path = run_dir / "last.pt" if config.resume is True else Path(config.resume)
        if config.resume is True and unfinished:
            return None, True  # stopped before its first checkpoint: start it again
        if not path.is_file():
            raise CheckpointError(f"nothing to resume: checkpoint {path} does not exist")
        own = run_dir / "last.pt"
        if existing and not (own.exists() and own.resolve() == path.resolve()):
            raise UserError(
                f"run folder {run_dir} already holds another run ({', '.join(existing)}); "
                f"resume {path} into a new --out folder"
            )
        return path, False
    if existing and not unfinished and not config.force:
        raise UserError(
            f"run folder {run_dir} already holds a run ({', '.join(existing)}); "
            "pass --resume to continue it, --force to replace it, or --out for a new folder"
        )
    return None, bool(existing)


def open_run_folder(config: TrainConfig, log: RunLog, replace: bool, history: Any) -> None:
    """Create (or reopen) the run folder once setup has succeeded (rank 0 only).

    ``replace``: remove the folder's result files first (``--force``, or a start that never
    reached a checkpoint). ``history``: a resumed run's epochs (metrics.jsonl is rewritten
    from them, dropping any line written after the checkpoint); None for a new run.
    """
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    keep_log = replace and not config.force  # an unfinished start's log tells its story
    if replace:
        for name in RESULT_FILES:
            if (run_dir / name).is_dir():
                shutil.rmtree(run_dir / name)
            elif not (keep_log and name == "train.log"):
                (run_dir / name).unlink(missing_ok=True)
        for name in RESULT_DIRS:
            if (run_dir / name).is_dir():
                shutil.rmtree(run_dir / name)
    ckpt.remove_stale_temp_files(run_dir, RESULT_FILES)
    log.open(run_dir / "train.log", append=history is not None or keep_log)
    write_json(run_dir / "config.json", config.to_dict())
    if history is not None:
        _write_metrics(run_dir / "metrics.jsonl", history)


def interrupted_message(run_dir: Path, state: RunState) -> str:
    """What a Ctrl-C leaves behind in ``run_dir``, and the command that continues the run."""
    last = run_dir / "last.pt"
    if not last.exists():
        saved = f"no checkpoint was written yet ({run_dir} holds the run's config)"
    else:
        at = (
            f"at epoch {state.epoch + 1} step {state.step}"
            if state.step
            else f"after epoch {state.epoch}"
        )
        saved = f"{last} holds the run {at}"
    return f"interrupted: {saved}; continue with: fullsparse train --resume --out {run_dir}"


def written_files(run_dir: Path) -> list[str]:
    """The result files present in ``run_dir``, in the order of :data:`RESULT_FILES`, then
    the tracker folders (``tensorboard/``)."""
    files = [name for name in RESULT_FILES if (run_dir / name).exists()]
    return files + [f"{name}/" for name in RESULT_DIRS if (run_dir / name).is_dir()]


class Checkpointer:
    """Writes ``last.pt`` (every epoch end, and every ``checkpoint_every`` steps) and
    ``best.pt``, and restores a run from a checkpoint. Rank 0 writes; every rank restores.

    The checkpoint keys are the format's (``fullsparse.train.checkpoint``); the task adds
    its own extras (a classifier's input normalisation) through ``checkpoint_extra``.
    """

    def __init__(self, trainer: TrainerView) -> None:
        self.trainer = trainer
        self.run_dir = trainer.config.run_dir
        #: Under --fsdp: the shards folder that last.pt / best.pt name (read when unknown).
        self.shards: dict[str, str | None] = {}

    def states(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The model's and optimizer's state dicts (unsharded) on rank 0, None elsewhere.
        Every rank calls it. Under FSDP it writes every rank's shards instead (a
        collective) and gives rank 0 empty dicts: ``last.pt`` names the shards folder."""
        t = self.trainer
        self.shards["last.pt"] = None
        if t.config.fsdp:
            from fullsparse.train.fsdp import save_sharded_states

            # no gather: every rank writes its shards; last.pt names their folder
            self.shards["last.pt"] = save_sharded_states(t.raw_model, t.optimizer, self.run_dir)
            return ({}, {}) if t.dist.is_main else None
        return (t.raw_model.state_dict(), t.optimizer.state_dict()) if t.dist.is_main else None

    def save_last(self) -> None:
        """Write ``last.pt`` atomically: everything a resume needs, at an epoch end or (with
        ``state.step`` > 0) inside epoch ``state.epoch``. Every rank calls it; rank 0
        writes."""
        from fullsparse.nn import sparse_state_dict

        t, run = self.trainer, self.trainer.state
        states = self.states()
        if states is None:
            return
        ckpt.save_checkpoint(
            self.run_dir / "last.pt",
            {
                "identity": t.identity,
                "config": t.config.to_dict(),
                "epoch": run.epoch,
                "loader_epoch": run.epoch,
                "step": run.step,
                "partial": dict(run.partial),
                "model": states[0],
                "sparse_state": sparse_state_dict(t.raw_model),
                "optimizer": states[1],
                "scheduler": t.scheduler.state_dict(),
                "scaler": t.scaler.state_dict() if t.scaler is not None else None,
                "rng": ckpt.capture_rng(),
                "history": run.history,
                run.best_key: run.best,
                "best_epoch": run.best_epoch,
                "skipped_steps": run.skipped_steps,
                **t.task.checkpoint_extra(),
                "torch_version": str(torch.__version__),
                "threads": torch.get_num_threads(),
                **({"shards": self.shards["last.pt"]} if self.shards["last.pt"] else {}),
            },
        )
        self.remove_unused_shards()

    def save_epoch(self, metrics: dict[str, Any], is_best: bool) -> None:
        """Append the epoch's metrics line, write ``last.pt``, copy it to ``best.pt``.
        Every rank calls it; rank 0 writes."""
        main = self.trainer.dist.is_main
        if main:
            with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(metrics) + "\n")
        self.save_last()
        if main and is_best:
            ckpt.copy_checkpoint(self.run_dir / "last.pt", self.run_dir / "best.pt")
            self.shards["best.pt"] = self.shards["last.pt"]
            self.remove_unused_shards()

    def remove_unused_shards(self) -> None:
        """Delete the shards folders that neither ``last.pt`` nor ``best.pt`` names (those
        of older checkpoints, of a save that was interrupted before its ``last.pt``, or of
        an FSDP run's checkpoints that a resume without ``--fsdp`` replaced). Rank 0, after
        every rank has written its shards."""
        from fullsparse.train.sharded_checkpoint import SHARDS

        folder = self.run_dir / SHARDS
        if not folder.is_dir():
            return
        for name in ("last.pt", "best.pt"):
            if name not in self.shards:
                self.shards[name] = _shards_named(self.run_dir / name)
        keep = {n for n in self.shards.values() if n is not None}
        for sub in folder.iterdir():
            if f"{SHARDS}/{sub.name}" not in keep:
                shutil.rmtree(sub, ignore_errors=True)

    def _shards_loader(self, state: dict[str, Any], path: Path) -> Any:
        """The function that loads the model and optimizer state of sharded checkpoint
        ``path``: each rank its own shards under --fsdp, else the whole states (read in this
        process). Refuses a missing or unsafe folder now (CheckpointError)."""
        from fullsparse.train.fsdp import (
            is_sharded,
            load_model_state_,
            load_optimizer_state_,
            load_sharded_states_,
        )
        from fullsparse.train.sharded_checkpoint import read_full_states, shards_folder

        t = self.trainer
        folder = shards_folder(path, state)
        if is_sharded(t.raw_model):
            return lambda: load_sharded_states_(t.raw_model, t.optimizer, folder, path)
        model_state, optim_state = read_full_states(path, state)

        def load() -> None:
            load_model_state_(t.raw_model, model_state)
            load_optimizer_state_(t.raw_model, t.optimizer, optim_state)

        return load

    def restore(self, state: dict[str, Any], path: Path) -> None:
        """Load a checkpoint's model, masks, optimiser and schedule, then the run's counters.

        The RNG state is restored last: nothing after this call may draw random numbers
        before the first step, or a resumed run would differ from an uninterrupted one.
        """
        from fullsparse.checkpoint_guard import state_dict_mismatch
        from fullsparse.nn import load_sparse_state_
        from fullsparse.train.fsdp import is_sharded, load_model_state_, load_optimizer_state_

        t, run = self.trainer, self.trainer.state
        sparsity = (
            "sparsity state",
            lambda: load_sparse_state_(t.raw_model, state["sparse_state"]),
        )
        schedule = (
            "learning-rate schedule",
            lambda: t.scheduler.load_state_dict(state["scheduler"]),
        )
        if "shards" in state:  # sharded (loaded with shards=False): each rank reads its part
            load_shards = self._shards_loader(state, path)
            parts: tuple[tuple[str, Any], ...] = (
                ("model weights and optimizer state", load_shards),
                sparsity,
                schedule,
            )
        else:
            if not is_sharded(t.raw_model):
                mismatch = state_dict_mismatch(t.raw_model, state["model"])
                if mismatch:
                    raise CheckpointError(
                        f"checkpoint {path} does not fit this run: its model weights do not "
                        f"match this model: {mismatch}"
                    )
            parts = (
                ("model weights", lambda: load_model_state_(t.raw_model, state["model"])),
                sparsity,
                (
                    "optimizer state",
                    lambda: load_optimizer_state_(t.raw_model, t.optimizer, state["optimizer"]),
                ),
                schedule,
            )
        if t.scaler is not None and state.get("scaler"):
            parts += (("gradient scaler", lambda: t.scaler.load_state_dict(state["scaler"])),)
        for part, load in parts:
            try:
                load()
            except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
                raise CheckpointError(
                    f"checkpoint {path} does not fit this run: its {part} do not match this "
                    f"model{_first_clash(exc)}"
                ) from None
        run.epoch = int(state["epoch"])
        run.history = list(state.get("history", []))
        run.best = float(state.get(run.best_key, run.best))
        run.best_epoch = int(state.get("best_epoch", 0))
        run.skipped_steps = int(state.get("skipped_steps", 0))
        if state.get("step"):  # a mid-epoch checkpoint (--checkpoint-every)
            run.step = int(state["step"])
            run.partial = {k: float(v) for k, v in state.get("partial", {}).items()}
        ckpt.restore_rng(state["rng"])


def _shards_named(path: Path) -> str | None:
    """The ``shards`` field of checkpoint ``path``; None for a single file, a missing or an
    unreadable one."""
    try:
        return ckpt.load_checkpoint(path, shards=False).get("shards")
    except CheckpointError:
        return None


def _first_clash(exc: BaseException) -> str:
    """`` (first: <what>)`` for a state-dict mismatch, naming the first parameter torch
    complains about; ``""`` when its message names none (a bare ``KeyError: 101``)."""
    import re

    found = re.search(
        r"(size mismatch for [\w.]+|(?:Missing|Unexpected) key\(s\)[^\"]*\"[\w.]+)", str(exc)
    )
    if not found:
        return ""
    return f" (first: {found.group(1).replace(' in state_dict: ', ' ').replace(chr(34), '')})"


#: Config fields that may change between a run and its resume without changing the maths.
RUN_CONTROL = (
    "resume", "force", "out", "stop_after", "checkpoint_every", "progress", "quiet", "plot",
    "workers", "threads", "report_to", "log_every", "log_level",
)  # fmt: skip


def log_resume(log: RunLog, config: TrainConfig, state: dict[str, Any], path: Path) -> None:
    """Say where a resumed run continues from and what changed since its checkpoint."""
    old, new = state["config"], config.to_dict()
    changed = [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if k not in ("resume", "force") and old.get(k, new.get(k)) != new.get(k)
    ]
    epoch, step = int(state["epoch"]), int(state.get("step", 0))
    where = f"at epoch {epoch + 1} step {step + 1}" if step else f"after epoch {epoch}"
    log.info(f"resumed from {path} {where}")
    if changed:
        log.info(f"config changed since the checkpoint: {'; '.join(changed)}")
    threads = state.get("threads")
    if config.deterministic and threads is not None and threads != torch.get_num_threads():
        log.info(
            f"note: the checkpoint was written with {threads} CPU threads, this process "
            f"uses {torch.get_num_threads()}; float sums depend on it, so the resumed run "
            "is not bit-identical to an uninterrupted one (pass --threads to match)"
        )


#: Fields a resume may change besides RUN_CONTROL: more epochs (the schedule is stretched
#: from the checkpoint on) and where it runs (an FSDP checkpoint holds unsharded states).
_RESUME_MAY_CHANGE = (*RUN_CONTROL, "epochs", "device", "fsdp")


def resume_config(config_file: str | Path | None, given: dict[str, Any]) -> TrainConfig:
    """The config of ``fullsparse train --resume``: the run folder's saved ``config.json``,
    with the flags given now applied where they may change (more epochs, threads, output).

    A flag that would change what the run is (model, data, recipe, optimiser, ...) is
    refused in one line. Without ``--resume`` (or with a checkpoint path, or with no saved
    config yet) this is :func:`config_from_sources`.
    """
    from fullsparse.train.config import config_from_sources, load_config_file

    asked = dict(given)
    if config_file is not None:
        asked = {str(k).replace("-", "_"): v for k, v in load_config_file(config_file).items()}
        asked.update(given)
    if asked.get("resume") is True and isinstance(asked.get("out"), str):
        run_dir = Path(asked["out"])  # the saved config, not these flags, must be valid
    else:
        config = config_from_sources(config_file, given)
        if config.resume is not True:
            return config
        run_dir = config.run_dir
    saved_path = run_dir / "config.json"
    if not saved_path.is_file():
        return config_from_sources(config_file, given)
    try:
        saved = TrainConfig.from_dict(json.loads(saved_path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:  # ConfigError is a ValueError too
        raise UserError(f"cannot resume from {saved_path}: {exc}") from None
    # stop_after ended an earlier invocation; it does not carry over to this one
    merged = saved.to_dict() | {"stop_after": None} | asked | {"resume": True, "force": False}
    candidate = TrainConfig.from_dict(merged, source=f"resume of {run_dir}")
    old, new = saved.to_dict(), candidate.to_dict()
    clashes = [
        f"--{k.replace('_', '-')} ({old[k]!r} in the saved run, {new[k]!r} now)"
        for k in new
        if k not in _RESUME_MAY_CHANGE and old.get(k) != new[k]
    ]
    if candidate.epochs < saved.epochs:
        clashes.append(f"--epochs ({saved.epochs} in the saved run, {candidate.epochs} now)")
    if clashes:
        raise UserError(
            f"{', '.join(clashes)} would change the run saved in {run_dir}; resume "
            "with only --epochs (more), --threads, --stop-after or output flags, or start a "
            "new run with another --out"
        )
    return candidate
