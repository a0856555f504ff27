"""``summary.json``: what a run did and how it ended, the same fields for every task."""

from __future__ import annotations

import platform
from typing import Any

import torch

from fullsparse.train import asp
from fullsparse.train.protocol import TrainerView

__all__ = ["run_summary"]


def run_summary(trainer: TrainerView) -> dict[str, Any]:
    """The ``summary.json`` of any task: what ran and how it ended, the task's scores,
    timing, the task's extras, then the environment."""
    config, run, task = trainer.config, trainer.state, trainer.task
    history = run.history
    seconds = [h["epoch_seconds"] for h in history]
    nan = float("nan")
    unit = task.count_key
    steps_run = run.epoch * trainer.steps_per_epoch
    total_steps = config.epochs * trainer.steps_per_epoch
    summary = {
        "status": trainer.status,
        "task": config.task,
        "recipe": config.recipe,
        "model": config.model,
        "dataset": config.dataset,
        "seed": config.seed,
        "epochs": config.epochs,
        "epochs_done": run.epoch,
        **task.scores(history, run.best_epoch),
        "seconds_per_epoch": sum(seconds) / len(seconds) if seconds else nan,
        "epoch_seconds": seconds,
        f"{unit}_per_second": (
            sum(h[f"train_{unit}"] for h in history) / sum(seconds) if seconds else nan
        ),
        "skipped_steps": run.skipped_steps,
        **task.summary_extra(trainer),
        "sparsity": trainer.identity["sparsity"],
        # steps per phase (warm-up / sparse / finish) and the FLOP account over them
        "schedule_steps": trainer.schedule.phase_steps(steps_run, total_steps),
        "sparse_gemm_fraction": trainer.schedule.account(steps_run, total_steps, trainer.raw_model),
        "device": str(trainer.device),
        "threads": torch.get_num_threads(),
        "torch": str(torch.__version__),
        "python": platform.python_version(),
        "run_dir": str(config.run_dir),
        "config": config.to_dict(),
    }
    summary.update(task.summary_details(trainer))
    summary.update(asp.summary_extra(trainer))  # recipe asp: the dense pre-training's cost
    return summary
