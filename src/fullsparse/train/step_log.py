"""Per-step scalars (``--log-every N``): every N optimizer steps, one ``train.log`` line and
the trackers' ``train/*`` scalars.

The scalars of a logged step: ``loss`` (the mean training loss of the steps since the last
log or the epoch's start, over all ranks), ``lr`` (the step's), ``<unit>_per_second``
(examples per second over those steps), ``grad_norm`` (the global gradient norm of the
step, before clipping; after unscaling under fp16), ``skipped_steps`` (of the run so far),
``sparse_gemm_fraction`` (of the step's GEMM FLOPs, in the step's phase: dense warm-up and
finish steps count as dense) and ``epoch`` (fractional).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from fullsparse.sharding import whole
from fullsparse.train.distributed import all_reduce_sum
from fullsparse.train.protocol import TrainerView

__all__ = ["StepLog", "grad_norm"]


def grad_norm(model: nn.Module) -> float:
    """The global 2-norm of ``model``'s gradients (0 without any). Under FSDP every rank
    must call it (the shards' norms are combined)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    total_norm = getattr(nn.utils, "get_total_norm", None)
    if total_norm is not None:
        norm: Any = total_norm(grads)
    else:  # torch < 2.6
        norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads])
        )
    return float(whole(norm))  # a DTensor under FSDP2: gathered


class StepLog:
    """The running sums between two logged steps of one epoch, and the logging itself.

    Every rank calls it (the loss is all-reduced, and the gradient norm of FSDP shards is a
    collective); rank 0 writes.
    """

    def __init__(self, trainer: TrainerView) -> None:
        self.trainer = trainer
        self.every = trainer.config.log_every
        self.start_epoch()

    def start_epoch(self) -> None:
        self.loss_sum, self.count, self.mark = 0.0, 0.0, time.perf_counter()

    def due(self, global_step: int) -> bool:
        """Whether the step that makes ``global_step`` steps done is logged."""
        return bool(self.every) and global_step % self.every == 0

    def add(self, loss_sum: float, count: float) -> None:
        """A step that was taken: its summed loss and its examples (this rank's)."""
        self.loss_sum += loss_sum
        self.count += count

    def norm_if_due(self, global_step: int) -> float | None:
        """The gradient norm now (before the optimizer step; unscaled under fp16) when the
        step is logged and the guard does not measure it (no ``--grad-clip``), else None."""
        t = self.trainer
        if not self.due(global_step) or t.config.grad_clip:
            return None
        norm = grad_norm(t.raw_model)
        if t.scaler is not None:
            norm /= float(t.scaler.get_scale())
        return norm

    def after_step(self, global_step: int, lr: float, norm: float | None) -> None:
        """Log the step when it is due (``norm``: None for a skipped step)."""
        if self.due(global_step):
            self.emit(global_step, lr, norm)

    def emit(self, global_step: int, lr: float, norm: float | None) -> None:
        """Log the step that made ``global_step`` steps done: a train.log line (rank 0) and
        the trackers' ``train/*`` scalars."""
        t = self.trainer
        loss_sum, count = all_reduce_sum([self.loss_sum, self.count], t.dist, t.device)
        seconds = time.perf_counter() - self.mark
        unit = t.task.count_key
        total = t.config.epochs * t.steps_per_epoch
        fraction = t.schedule.step_fraction()
        values: dict[str, Any] = {
            "loss": loss_sum / count if count else float("nan"),
            "lr": lr,
            f"{unit}_per_second": count / seconds if seconds > 0 else 0.0,
            "grad_norm": norm,
            "skipped_steps": t.state.skipped_steps,
            "sparse_gemm_fraction": fraction,
            "epoch": global_step / t.steps_per_epoch,
        }
        self.start_epoch()
        if not t.dist.is_main:
            return
        parts = [f"loss {values['loss']:.4f}", f"lr {lr:.4g}"]
        parts.append(f"{values[f'{unit}_per_second']:.1f} {unit}/s")
        if norm is not None:
            parts.append(f"grad norm {norm:.4g}")
        parts.append(f"skipped {values['skipped_steps']}")
        if fraction is not None:
            parts.append(f"sparse GEMMs {fraction:.2f}")
        t.log.info(f"step {global_step}/{total}: {', '.join(parts)}")
        t.trackers.scalars({f"train/{k}": v for k, v in values.items()}, global_step)
