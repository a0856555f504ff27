"""What the parts of a run see of the running Trainer: :class:`TrainerView`.

The tasks, the non-finite guard, the run schedule, the run folder's checkpointer, the ASP
plug-in, the step log and the summary each take the running
:class:`~fullsparse.train.trainer.Trainer` as an argument. They are typed with this
protocol, which imports nothing of ``fullsparse.train``, so the dependencies of ``train/``
run one way: this protocol and the run config at the bottom, the task protocol
(:mod:`fullsparse.train.task`) and the plug-ins above them, the tasks above those, the
Trainer on top (it imports them; none imports it). A task of your own imports
:mod:`fullsparse.train.task` and nothing else of the trainer.

Attributes whose classes live above this module (the run config, the run log and state,
the schedule, the trackers, the task) are typed ``Any`` here.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from torch import nn

__all__ = ["TrainerView"]


class TrainerView(Protocol):
    """The running Trainer as its parts use it (:class:`fullsparse.train.trainer.Trainer`
    has every attribute once :meth:`~fullsparse.train.trainer.Trainer.setup` ran)."""

    #: the run's TrainConfig
    config: Any
    device: torch.device
    #: fullsparse.train.distributed.DistInfo: rank, world size, whether this is rank 0
    dist: Any
    world: int
    #: this process's batch per optimizer step (batch_size / world size)
    local_batch: int
    steps_per_epoch: int
    #: the checkpoint identity of the run (what the model and data are)
    identity: dict[str, Any]
    #: the user's module (under DDP / compile: ``model`` wraps it)
    raw_model: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    #: the fp16 GradScaler, or None
    scaler: Any
    #: the sparsify report of the model
    report: Any
    #: RunState: epochs done, history, best score, skipped steps
    state: Any
    #: RunLog: ``log.info(message, console=...)``
    log: Any
    #: RunSchedule: the phases and the FLOP account
    schedule: Any
    #: the metrics trackers (``scalars(values, step)``)
    trackers: Any
    #: the task plug-in
    task: Any
    #: the checkpoint being resumed, or None
    saved: dict[str, Any] | None
    status: str
    asp_hooks: list[Any]

    def amp(self) -> AbstractContextManager[Any]:
        """The step's autocast context."""
        ...
