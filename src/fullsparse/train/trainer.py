"""The training loop behind ``fullsparse train``: :func:`train` runs a :class:`TrainConfig`.

A :class:`Trainer` owns the run's state (model, optimiser, schedule, non-finite guard, run
folder, checkpoints, metrics) and runs it in one order for every task::

    fit():  set up -> resume -> epochs (train, evaluate, checkpoint) -> summary

What differs between tasks (data, model, the loss of a batch, evaluation, the score that
picks ``best.pt``) lives in a task plug-in (:class:`fullsparse.train.tasks.Task`):
``classify``, ``lm`` and ``detection``.

One code path for every setting: single process or ``torchrun`` (DDP or FSDP2), CPU or CUDA,
fp32 or autocast, eager or compiled. Optimisation follows the paper (§7.1) by default: SGD with
momentum 0.9, lr 0.1 × batch/256, cosine decay to 0 per step after an optional linear
warm-up, weight decay 7e-5, label smoothing 0.1.

Step callbacks: every function in :attr:`Trainer.step_callbacks` is called as
``callback(step, total_steps, trainer)`` before each optimizer step (``step`` counts from 0
over the whole run, across epochs and resumes). That is the one place where schedules over
the run plug in for every task (a dense warm-up, a dense finish, a mask-update interval).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fullsparse.errors import ConfigError, UserError
from fullsparse.sparse_state import count_optimizer_steps, set_backend
from fullsparse.train import asp, tasks
from fullsparse.train import checkpoint as ckpt
from fullsparse.train.common import (
    autocast,
    build_optimizer,
    build_scheduler,
    check_capabilities,
    probe_step,
    resolve_device,
    seed_everything,
    wrap_model,
)
from fullsparse.train.config import TrainConfig
from fullsparse.train.distributed import (
    DistInfo,
    all_reduce_sum,
    any_rank,
    barrier,
    broadcast_buffers,
    init_distributed,
    shutdown_distributed,
)
from fullsparse.train.fsdp import check_fsdp, shard_model_, unsharded
from fullsparse.train.guard import StepGuard
from fullsparse.train.plot import MATPLOTLIB_HINT
from fullsparse.train.progress import ProgressBar
from fullsparse.train.run_folder import (
    Checkpointer,
    RunLog,
    RunState,
    check_run_dir,
    interrupted_message,
    log_resume,
    open_run_folder,
    write_json,
    written_files,
)
from fullsparse.train.schedule import RunSchedule
from fullsparse.train.step_log import StepLog
from fullsparse.train.summary import run_summary
from fullsparse.train.trackers import Trackers, check_trackers, open_trackers, parse_report_to

__all__ = ["Trainer", "StepCallback", "train", "build_model"]

#: ``callback(step, total_steps, trainer)``, called before each optimizer step.
StepCallback = Callable[[int, int, "Trainer"], None]


def build_model(identity: dict[str, Any]) -> tuple[nn.Module, Any]:
    """The sparsified model of ``identity`` and its sparsify report (a seam for tests)."""
    return tasks.build_sparse_model(identity)


def make_task(config: TrainConfig, task: tasks.Task | None) -> tasks.Task:
    """The task plug-in of ``config``: the built-in one its ``task`` names, or for
    ``task="custom"`` the one given (a :class:`fullsparse.train.custom.UserTask`)."""
    if config.task != "custom":
        if task is not None:
            raise ConfigError(
                f"a task object needs task='custom', not task={config.task!r} (whose task "
                "is built in)"
            )
        return tasks.TASKS[config.task](config)
    if not isinstance(task, tasks.Task):
        raise ConfigError(
            "task='custom' trains your own model and data from Python: "
            "fullsparse.train.train(config, task=UserTask(model, train_data, loss))"
        )
    task.config = config
    return task


class Trainer:
    """One training run of ``config`` on ``device``; :meth:`fit` runs it.

    Attributes set by :meth:`setup` (and read by the task, the guard and the checkpointer):
    ``identity``, ``raw_model`` (the user's module), ``model`` (wrapped in DDP/compile),
    ``optimizer``, ``scheduler``, ``scaler``, ``state`` (:class:`RunState`), ``local_batch``,
    ``steps_per_epoch``.
    """

    def __init__(
        self,
        config: TrainConfig,
        device: torch.device,
        dist: DistInfo,
        log: RunLog,
        task: tasks.Task | None = None,
    ) -> None:
        self.config, self.device, self.dist, self.log = config, device, dist, log
        self.task: tasks.Task = task if task is not None else make_task(config, None)
        self.world = dist.world_size
        self.state = RunState(self.task.best_key, self.task.higher_is_better)
        self.checkpoints = Checkpointer(self)
        self.step_log = StepLog(self)  # --log-every
        # schedules over the run (dense warm-up / finish) and the FLOP account
        self.schedule = RunSchedule(
            config.dense_warmup_steps, config.dense_finish, config.dense_finish_mode
        )
        self.step_callbacks: list[StepCallback] = [self.schedule]
        self.resume_from: Path | None = None
        self.replace_folder = False
        self.saved: dict[str, Any] | None = None  # the checkpoint being resumed
        self.scaler: Any = None
        self.status = "completed"
        self.asp_hooks: list[Any] = []  # recipe asp: optimiser hooks keeping pruned weights 0
        self.report_to = parse_report_to(config.report_to)
        self.trackers = Trackers([])  # opened with the run folder (rank 0)

    # -- the run, start to end --------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        self.setup()
        self.resume()
        self.probe()
        self.open_run()
        for epoch in self.epochs():
            metrics = self.train_epoch(epoch)
            metrics.update(self.evaluate())
            self.end_epoch(epoch, metrics)
        return self.finish()

    # -- set up: everything that can fail on bad input happens before a file is written ----
    def setup(self) -> None:
        config, task = self.config, self.task
        if config.batch_size % self.world:
            raise ConfigError(
                f"batch_size={config.batch_size} is the global batch and must divide evenly "
                f"over {self.world} processes"
            )
        check_trackers(self.report_to)  # a missing extra: one line, before any file
        self.local_batch = config.batch_size // self.world
        if self.local_batch % config.grad_accum_steps:
            raise ConfigError(
                f"batch_size={config.batch_size} is {self.local_batch} per process over "
                f"{self.world} processes, which does not split into grad_accum_steps="
                f"{config.grad_accum_steps} equal micro-batches"
            )
        task.check(self.world, self.device)
        if config.fsdp:
            check_fsdp(self.world)
        error: BaseException | None = None
        model = None
        try:
            # every rank reads the folder (read-only): all of them load the checkpoint
            self.resume_from, self.replace_folder = check_run_dir(config)
            seed_everything(config.seed)
            if config.deterministic:
                torch.use_deterministic_algorithms(True)
            self.identity = task.load_data()
            built = task.build_model(self.identity)  # a user's own model (task custom)
            model, self.report = build_model(self.identity) if built is None else built
            set_backend(model, config.backend)
            task.attach(model, self)
            if config.resume and self.resume_from is not None:
                self.saved = ckpt.load_checkpoint(self.resume_from, shards=not config.fsdp)
                ckpt.check_identity(self.resume_from, self.saved["identity"], self.identity)
        except Exception as exc:  # synchronised below so no rank waits for a failed one
            error = exc
        if any_rank(error is not None, self.dist, self.device):
            if error is not None:
                raise error
            raise UserError("another process of this distributed run failed during setup")
        assert model is not None
        self.steps_per_epoch = task.steps_per_epoch()
        raw_model = model
        if config.sync_bn and self.world > 1:
            raw_model = nn.SyncBatchNorm.convert_sync_batchnorm(raw_model)
        raw_model.to(self.device)
        if config.channels_last:
            raw_model.to(memory_format=torch.channels_last)
        if config.fsdp:  # before the optimizer, which must hold the sharded parameters
            shard_model_(raw_model)
        self.raw_model = raw_model
        self.optimizer = build_optimizer(raw_model, config)
        # the sparse layers' masks, clocks and SR-STE decay follow optimizer steps, so the
        # micro-batches of --grad-accum-steps are one step (the guard also ends skipped ones)
        count_optimizer_steps(raw_model, self.optimizer)
        self.scheduler = build_scheduler(self.optimizer, config, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler("cuda") if config.amp == "fp16" else None

    def resume(self) -> None:
        """Load the checkpoint found by :meth:`setup` (if any), then wrap the model."""
        if self.saved is not None:
            assert self.resume_from is not None
            self.checkpoints.restore(self.saved, self.resume_from)
        asp.start(self)  # recipe asp: init weights, prune once (new run), fixed-mask hooks
        config = self.config
        self.model = wrap_model(
            self.raw_model, self.world, self.device, config.compile, config.fsdp
        )
        # Evaluation needs no gradient sync, and under DDP the ranks' last test batches may
        # differ in number: DDP's per-forward buffer broadcast would then wait forever.
        self.eval_model = self.model if self.world == 1 else self.raw_model

    def amp(self) -> contextlib.AbstractContextManager[Any]:
        return autocast(self.device, self.config.amp)

    def probe(self) -> None:
        """One step with every state restored, when a flag may not work with this model
        (CUDA has ops without deterministic kernels: find out now, not mid-epoch)."""
        config = self.config
        if config.compile:
            self.log.info("torch.compile: the first steps compile the model (minutes on a CPU)")
        risky = config.deterministic and self.device.type == "cuda"
        if not (config.compile or config.amp != "none" or config.channels_last or risky):
            return
        batch = self.task.probe_batch(self.local_batch // config.grad_accum_steps)
        if batch is None:
            return
        batch = self.task.to_device(batch)
        error = None
        try:
            probe_step(
                self.model, self.raw_model, lambda m: self.task.forward(m, batch).loss,
                self.amp, config, self.device,
            )  # fmt: skip
        except UserError as exc:
            error = exc
        if any_rank(error is not None, self.dist, self.device):
            raise error or UserError("another process failed its first training step")

    def open_run(self) -> None:
        """The run folder, written only now that everything is known to work."""
        config = self.config
        if self.dist.is_main:
            history = self.state.history if self.saved is not None else None
            open_run_folder(config, self.log, self.replace_folder or config.force, history)
        if self.dist.is_main and self.report_to:
            resumed = self.state.epoch * self.steps_per_epoch + self.state.step
            self.trackers = open_trackers(
                self.report_to,
                config.run_dir,
                resumed if self.saved is not None else None,
                config.to_dict(),  # the run config as hyperparameters
            )
        barrier(self.dist)
        if config.resume and self.saved is None:
            self.log.info(
                f"{config.run_dir} holds no checkpoint (the run stopped before its first "
                "one): starting the saved run from the beginning"
            )
        elif self.replace_folder and not config.force:
            self.log.info(f"{config.run_dir} held a start that wrote no checkpoint: starting over")
        for line in self.task.describe(self):
            self.log.info(line)
        self.log.info(str(self.report), console=False)
        self.log.info(f"run folder: {config.run_dir}")
        if self.saved is not None and self.resume_from is not None:
            log_resume(self.log, config, self.saved, self.resume_from)

    # -- epochs ---------------------------------------------------------------------------
    def epochs(self) -> Iterator[int]:
        config = self.config
        last = config.stop_after if config.stop_after is not None else config.epochs
        for epoch in range(self.state.epoch, config.epochs):
            if epoch >= last:
                self.status = (
                    f"stopped after epoch {self.state.epoch} of {config.epochs} (stop_after)"
                )
                return
            yield epoch

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass of the task's batches: forward, guarded backward, step; the epoch's
        training metrics. A resumed mid-epoch checkpoint continues at ``state.step`` with
        the epoch's sums so far (summed over ranks: rank 0 carries them, so the final
        all-reduce counts them once)."""
        config, task, run = self.config, self.task, self.state
        first = run.step
        prior = run.partial if first else {}
        model = self.model
        model.train()
        steps = self.steps_per_epoch
        bar = ProgressBar(
            steps - first, f"epoch {epoch + 1}/{config.epochs}",
            enabled=config.progress and not config.quiet and self.dist.is_main,
            unit=task.bar_unit, accuracy=task.bar_accuracy,
        )  # fmt: skip
        guard = StepGuard(self, epoch, steps)
        guard.skipped = int(prior.get("skipped", 0))
        guard.norm_sum, guard.norms = prior.get("norm_sum", 0.0), int(prior.get("norms", 0))
        keys = ("loss_sum", task.count_key, *task.sum_keys)
        carried = prior if self.dist.is_main else {}
        sums = {k: float(carried.get(k, 0.0)) for k in keys}
        before = prior.get("seconds", 0.0)
        start = time.perf_counter()
        self.step_log.start_epoch()
        with bar:
            for step, batch in enumerate(task.batches(epoch, first), start=first):
                batch = task.to_device(batch)
                for callback in self.step_callbacks:
                    callback(epoch * steps + step, config.epochs * steps, self)
                guard.snapshot()
                step_sums = guard.forward_backward(batch, step)
                done = epoch * steps + step + 1  # optimizer steps done after this one
                lr = self.optimizer.param_groups[0]["lr"]
                if step_sums is None:  # a skipped step (--skip-nonfinite)
                    self.step_log.after_step(done, lr, None)
                    continue
                norm = self.step_log.norm_if_due(done)  # --log-every without --grad-clip
                clipped = guard.step()
                count = step_sums.pop(task.count_key)
                loss = step_sums.pop("loss_sum")
                self.step_log.add(loss, count)
                self.step_log.after_step(done, lr, clipped if config.grad_clip else norm)
                sums["loss_sum"] += loss
                sums[task.count_key] += count
                for key, value in step_sums.items():
                    sums[key] = sums.get(key, 0.0) + value
                mean_loss = loss / count if count else float("nan")
                bar.update(count, mean_loss, int(step_sums.get("correct", 0)))
                due = config.checkpoint_every and (step + 1) % config.checkpoint_every == 0
                if due and step + 1 < steps:
                    self._save_step(step, epoch, guard, sums, before + time.perf_counter() - start)
        seconds = before + time.perf_counter() - start
        keys = tuple(sums)  # the task's sums may appear at the first step (detection's)
        reduced = all_reduce_sum([sums[k] for k in keys], self.dist, self.device)
        sums = dict(zip(keys, reduced, strict=True))
        count = sums[task.count_key]
        unit = task.count_key
        return {
            "epoch": epoch + 1,
            "train_loss": sums["loss_sum"] / count if count else float("nan"),
            **task.train_metrics(sums),
            "lr": self.optimizer.param_groups[0]["lr"],
            # mean global gradient norm before clipping (None without --grad-clip)
            "grad_norm": guard.mean_norm,
            "epoch_seconds": seconds,
            f"{unit}_per_second": count / seconds if seconds > 0 else 0.0,
            f"train_{unit}": int(count),
            "skipped_steps": guard.skipped,
        }

    def _save_step(
        self, step: int, epoch: int, guard: StepGuard, sums: dict[str, float], seconds: float
    ) -> None:
        """--checkpoint-every: ``last.pt`` inside an epoch, with the epoch's sums so far."""
        keys = list(sums)
        total = all_reduce_sum([sums[k] for k in keys], self.dist, self.device)
        self.state.step = step + 1
        self.state.partial = {
            **dict(zip(keys, total, strict=True)),
            "norm_sum": guard.norm_sum,
            "norms": guard.norms,
            "skipped": guard.skipped,
            "seconds": seconds,
        }
        self.checkpoints.save_last()  # every rank: gathering FSDP shards is a collective
        self.log.info(f"checkpoint: {guard.where(step)}", console=False)

    def evaluate(self) -> dict[str, Any]:
        """The task's evaluation of this epoch's model (and how long it took)."""
        start = time.perf_counter()
        broadcast_buffers(self.raw_model, self.dist)
        with unsharded(self.raw_model):  # FSDP: no all-gather in a forward, ranks may differ
            metrics = self.task.evaluate(self.eval_model, self)
        metrics["eval_seconds"] = time.perf_counter() - start
        return metrics

    def end_epoch(self, epoch: int, metrics: dict[str, Any]) -> None:
        """Record the epoch, log it, write ``metrics.jsonl``, ``last.pt`` and ``best.pt``."""
        run = self.state
        run.step, run.partial = 0, {}
        run.epoch = epoch + 1
        run.history.append(metrics)
        score = metrics[self.task.score_metric]
        is_best = run.improves(score)
        if is_best:
            run.best, run.best_epoch = score, epoch + 1
        line = self.task.epoch_format.format(**metrics)
        self.log.info(f"epoch {epoch + 1}/{self.config.epochs}: {line}")
        step = (epoch + 1) * self.steps_per_epoch
        scalars = {f"epoch/{k}": v for k, v in metrics.items() if k != "epoch"}
        self.trackers.scalars(scalars, step)
        self.checkpoints.save_epoch(metrics, is_best)  # every rank; rank 0 writes
        barrier(self.dist)

    # -- summary --------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        """``summary.json``, the curves, and the lines that say where everything is."""
        run_dir = self.config.run_dir
        summary = self.summary()
        if not self.dist.is_main:
            return summary
        write_json(run_dir / "summary.json", summary)
        self.plot()
        self.log.info(f"{self.status}: {self.task.result_format.format(**summary)}")
        self.log.info(f"results in {run_dir}/: {', '.join(written_files(run_dir))}")
        return summary

    def plot(self) -> None:
        config, history = self.config, self.state.history
        if not config.plot or not history or self.task.plot is None:
            return
        path = config.run_dir / "curves.png"
        title = f"{config.model} / {config.dataset} / {config.recipe}"
        try:
            drawn = self.task.plot(history, path, title=title)
        except Exception as exc:  # a plotting problem must not fail a finished run
            self.log.info(f"curves.png failed ({type(exc).__name__}: {exc}); results are intact")
            return
        if not drawn:
            self.log.info(f"curves.png skipped: matplotlib is not installed; {MATPLOTLIB_HINT}")

    def summary(self) -> dict[str, Any]:
        """The ``summary.json`` of any task (:func:`fullsparse.train.summary.run_summary`)."""
        return run_summary(self)

    def interrupted(self) -> str:
        """What a Ctrl-C leaves behind, and the command that continues the run."""
        return interrupted_message(self.config.run_dir, self.state)


def train(
    config: TrainConfig,
    step_callbacks: Sequence[StepCallback] = (),
    task: tasks.Task | None = None,
) -> dict[str, Any]:
    """Train ``config.model`` on ``config.dataset`` with ``config.recipe``; return the summary.

    ``task``: with ``config.task="custom"``, your own model, data and loss
    (:class:`fullsparse.train.custom.UserTask`).

    ``step_callbacks`` are called as ``callback(step, total_steps, trainer)`` before each
    optimizer step (see :class:`Trainer`).

    Writes the run folder (see :mod:`fullsparse.train.run_folder`) on rank 0. Under
    ``torchrun`` every rank calls this; each gets the same summary.

    Raises:
        UserError (and its subclasses ConfigError, DataNotFoundError, CheckpointError,
        NonFiniteLossError): a problem the user can fix; nothing was overwritten.
        KeyboardInterrupt: after logging what was saved and how to continue.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"train() needs a TrainConfig, got {type(config).__name__}")
    task = make_task(config, task)  # before anything starts: a missing task is one line
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device, int(os.environ.get("LOCAL_RANK", "0") or 0))
    check_capabilities(config, device)
    if config.deterministic and device.type == "cuda":
        # cuBLAS needs this before its first call to be deterministic.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    dist = init_distributed(device.type)
    log = RunLog(enabled=dist.is_main, quiet=config.quiet, level=config.log_level)
    trainer = Trainer(config, device, dist, log, task)
    trainer.step_callbacks.extend(step_callbacks)
    finished = False
    try:
        summary = trainer.fit()
        finished = True
        return summary
    except KeyboardInterrupt:
        if log.file is not None:  # the run folder exists: say what it holds
            message = trainer.interrupted()
            log.info(message, console=False)
            print(message, file=sys.stderr, flush=True)
        raise
    finally:
        trainer.trackers.close()
        log.close()
        torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)
        torch.set_num_threads(threads)
        shutdown_distributed(dist, synchronize=finished)
