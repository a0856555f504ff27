"""What a task plugs into the :class:`~fullsparse.train.trainer.Trainer`.

A task says what is trained and how it is measured; the Trainer does everything else (run
folder, optimiser, schedule, non-finite guard, checkpoints, DDP, resume). The methods run in
this order: :meth:`Task.load_data` (returns the checkpoint identity), the model is built
from that identity, :meth:`Task.attach`; then per epoch :meth:`Task.batches` →
:meth:`Task.forward` for each batch → :meth:`Task.train_metrics` → :meth:`Task.evaluate`;
at the end :meth:`Task.scores` and friends fill ``summary.json``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fullsparse.train.config import TrainConfig
from fullsparse.train.guard import diagnose_nonfinite
from fullsparse.train.protocol import TrainerView

__all__ = ["Task", "StepOutput", "split_batch", "batch_len"]


def split_batch(batch: Any, n: int) -> list[Any]:
    """A tensor, or a tuple/list/dict of them (nested), split into ``n`` parts along dim 0."""
    if isinstance(batch, Tensor):
        return list(batch.tensor_split(n))
    if isinstance(batch, Mapping):
        parts = {k: split_batch(v, n) for k, v in batch.items()}
        return [{k: v[i] for k, v in parts.items()} for i in range(n)]
    if isinstance(batch, (tuple, list)):
        columns = [split_batch(item, n) for item in batch]
        return [type(batch)(row) for row in zip(*columns, strict=True)]
    raise TypeError(
        f"cannot split a batch of type {type(batch).__name__} into micro-batches; a task "
        "with such batches overrides Task.micro_batches"
    )


def batch_len(batch: Any) -> int:
    """The number of examples of a batch: its first tensor's first dimension."""
    while not isinstance(batch, Tensor):
        batch = next(iter(batch.values())) if isinstance(batch, Mapping) else batch[0]
    return int(batch.shape[0]) if batch.ndim else 1


@dataclass
class StepOutput:
    """The loss of one batch (a scalar to backpropagate), how many examples it counts
    (``count``, the unit of :attr:`Task.count_key`) and per-batch sums to accumulate over
    the epoch (e.g. ``correct``: right predictions)."""

    loss: Tensor
    count: int
    sums: dict[str, Tensor] = field(default_factory=dict)


class Task:
    """The task protocol, with the defaults most tasks share. Subclasses set the class
    attributes and implement the methods that raise NotImplementedError."""

    #: The checkpoint key of the best score, and the metric (a key of an epoch's metrics)
    #: that picks ``best.pt``, and which way it improves.
    best_key: str = ""
    score_metric: str = ""
    higher_is_better: bool = True
    #: What ``StepOutput.count`` counts (``images``, ``tokens``): names ``train_<unit>``
    #: and ``<unit>_per_second`` in the metrics.
    count_key: str = "images"
    #: Per-step sums present from the first step (carried by mid-epoch checkpoints).
    sum_keys: tuple[str, ...] = ()
    #: Progress bar: the unit shown, and whether a ``correct`` sum gives an accuracy.
    bar_unit: str = "img"
    bar_accuracy: bool = True
    #: The log line of an epoch (``str.format`` over its metrics) and of the run's end
    #: (over ``summary.json``).
    epoch_format: str = ""
    result_format: str = ""
    #: ``plot(history, path, title=...)`` drawing ``curves.png`` (None: no curves).
    plot: Callable[..., bool] | None = None

    def __init__(self, config: TrainConfig) -> None:
        self.config = config

    # -- setup ----------------------------------------------------------------------------
    def check(self, world: int, device: torch.device) -> None:
        """Refuse settings the task cannot run (one line)."""

    def load_data(self) -> dict[str, Any]:
        """Load the data; return the identity a checkpoint must match (built into a model
        by :func:`fullsparse.train.tasks.build_sparse_model`)."""
        raise NotImplementedError

    def attach(self, model: nn.Module, trainer: TrainerView) -> None:
        """Everything that needs the built model or the trainer's batch (loaders, windows)."""

    def build_model(self, identity: dict[str, Any]) -> tuple[nn.Module, Any] | None:
        """The sparsified model and its sparsify report; None (the default): the built-in
        model the identity names (:func:`fullsparse.train.tasks.build_sparse_model`)."""
        return None

    def steps_per_epoch(self) -> int:
        raise NotImplementedError

    def probe_batch(self, n: int) -> Any:
        """A real batch of ``n`` examples for the probe step (flags that may not work);
        None: the task has no probe (it refuses those flags)."""
        return None

    def checkpoint_extra(self) -> dict[str, Any]:
        """Task values stored in every checkpoint besides the run state."""
        return {}

    # -- training -------------------------------------------------------------------------
    def batches(self, epoch: int, first: int) -> Iterable[Any]:
        """This rank's batches of ``epoch``, from step ``first`` (a mid-epoch resume)."""
        raise NotImplementedError

    def to_device(self, batch: Any) -> Any:
        raise NotImplementedError

    def micro_batches(self, batch: Any, n: int) -> list[tuple[Any, float]]:
        """``batch`` as ``n`` micro-batches (``--grad-accum-steps``), each with its share of
        the batch (its loss is weighted by it, so the micro-batches' gradients add up to the
        batch's). By default a tensor, or a tuple/list of tensors, is split along dim 0."""
        if n == 1:
            return [(batch, 1.0)]
        parts = split_batch(batch, n)
        sizes = [batch_len(p) for p in parts]
        total = sum(sizes)
        return [(p, size / total) for p, size in zip(parts, sizes, strict=True)]

    def forward(self, model: nn.Module, batch: Any) -> StepOutput:
        """Run ``model`` on ``batch`` (under the trainer's autocast) and return the loss."""
        raise NotImplementedError

    def explain_nonfinite(
        self, trainer: TrainerView, batch: Any, out: StepOutput, values: list[float]
    ) -> Callable[[], str]:
        """Where a non-finite loss came from, worked out only when called (it reruns the
        unwrapped model on the batch under the step's autocast)."""
        raw = trainer.raw_model

        def loss() -> Tensor:
            with trainer.amp():
                return self.forward(raw, batch).loss

        return functools.partial(diagnose_nonfinite, raw, loss, trainer.dist.enabled)

    def train_metrics(self, sums: dict[str, float]) -> dict[str, Any]:
        """Task metrics of the epoch's training sums (over all ranks)."""
        return {}

    # -- evaluation and reporting ---------------------------------------------------------
    def evaluate(self, model: nn.Module, trainer: TrainerView) -> dict[str, Any]:
        """Metrics of ``model`` on the held-out data (they join the epoch's metrics)."""
        raise NotImplementedError

    def describe(self, trainer: TrainerView) -> list[str]:
        """The lines that open ``train.log``: what is trained on what, and how."""
        raise NotImplementedError

    def scores(self, history: list[dict[str, Any]], best_epoch: int) -> dict[str, Any]:
        """The task's part of ``summary.json``: best and final scores."""
        raise NotImplementedError

    def summary_extra(self, trainer: TrainerView) -> dict[str, Any]:
        """Summary fields written after the timing."""
        return {}

    def summary_details(self, trainer: TrainerView) -> dict[str, Any]:
        """Summary fields written last (model size, data description)."""
        return {}

    def best_and_final(
        self, history: list[dict[str, Any]], best: dict[str, str], final: dict[str, str]
    ) -> dict[str, Any]:
        """Summary scores: ``{summary key: metric}`` of the best epoch (by the task's score) and
        of the final one; NaN when no epoch ran."""
        nan = float("nan")
        pick = max if self.higher_is_better else min
        top = pick(history, key=lambda h: h[self.score_metric]) if history else {}
        last = history[-1] if history else {}
        return {
            **{name: top.get(metric, nan) for name, metric in best.items()},
            **{name: last.get(metric, nan) for name, metric in final.items()},
        }

    @staticmethod
    def sparse_layer_counts(report: Any) -> tuple[int, int]:
        """(sparse layers, layers) of a sparsify report."""
        if report is None:
            return 0, 0
        return len([r for r in report.rows if r.sparse]), len(report.rows)

    @staticmethod
    def settings_line(trainer: TrainerView, batch: str) -> str:
        """The log line of device, batch, optimiser and schedule every task prints."""
        c = trainer.config
        warmup = round(c.warmup_epochs * trainer.steps_per_epoch)
        text = (
            f"device {trainer.device} x{trainer.world}, {batch}, {c.optimizer} lr {c.peak_lr:g} "
            f"(warm-up {warmup} steps, cosine), wd {c.weight_decay:g}, grad clip "
            f"{c.grad_clip:g}, {c.epochs} epochs of {trainer.steps_per_epoch} steps, amp {c.amp}"
        )
        flags = (
            ("channels-last", c.channels_last),
            ("compiled", c.compile),
            ("FSDP", c.fsdp),
            ("deterministic", c.deterministic),
        )
        return text + "".join(f", {name}" for name, on in flags if on)
