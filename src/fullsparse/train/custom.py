"""Your own model, data and loss through the :class:`~fullsparse.train.trainer.Trainer`:
:class:`UserTask`, the task of ``TrainConfig(task="custom")``.

The Trainer then does for them what it does for the built-in tasks: sparsify the model with
the config's recipe and layer policy, the optimiser and lr schedule, dense warm-up / finish,
gradient accumulation, the non-finite guard, DDP, the run folder, checkpoints (``last.pt``,
``best.pt`` by validation loss), ``--resume`` (also mid-epoch, ``checkpoint_every``),
trackers and ``summary.json``::

    task = UserTask(model, train_data, loss, eval_data=val_data)
    summary = train(TrainConfig(task="custom", model="my-mlp", recipe="fst", ...), task=task)

``model`` is a dense ``nn.Module`` (sparsified in place when the run starts);
``train_data`` / ``eval_data`` map-style datasets (``len`` and ``[i]``), batched by the
Trainer with ``collate_fn`` (torch's default: tuples of stacked tensors), shuffled per epoch
from ``config.seed`` and sharded over DDP ranks as the built-in data is, so a resumed run
sees the same batches; ``loss(model, batch)`` returns the batch's mean loss (a scalar).
The batch's size is the first dimension of its first tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torch.utils.data.dataloader import default_collate

from fullsparse.errors import ConfigError
from fullsparse.train.config_checks import keep_dense_layers
from fullsparse.train.distributed import all_reduce_sum
from fullsparse.train.protocol import TrainerView
from fullsparse.train.task import StepOutput, Task, batch_len

__all__ = ["UserTask", "LossFn"]

#: ``loss(model, batch)``: the batch's mean loss, a scalar tensor to backpropagate.
LossFn = Callable[[nn.Module, Any], Tensor]


def _to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor moved to ``device`` (tuples, lists, dicts kept)."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _check_dataset(data: Any, name: str) -> None:
    if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        raise TypeError(
            f"UserTask {name} must be a map-style dataset (len() and [i]), got "
            f"{type(data).__name__}"
        )


class UserTask(Task):
    """A user's ``model``, ``train_data``, ``loss`` (and ``eval_data``) as a task.

    Epoch metrics: ``train_loss``; with ``eval_data``, ``val_loss`` (the mean of ``loss``
    over it, weighted by batch size), which picks ``best.pt`` (lower is better); without
    it, ``train_loss`` does.
    """

    best_key = "best_val_loss"
    higher_is_better = False
    count_key = "examples"
    bar_unit = "ex"
    bar_accuracy = False
    epoch_format = (
        "train loss {train_loss:.4f} | val loss {val_loss:.4f} | lr {lr:.4g} | "
        "{epoch_seconds:.1f} s ({examples_per_second:.0f} ex/s)"
    )
    result_format = (
        "best val loss {best_val_loss:.4f} (epoch {best_epoch}), final "
        "{final_val_loss:.4f}, {seconds_per_epoch:.1f} s/epoch"
    )

    def __init__(
        self,
        model: nn.Module,
        train_data: Any,
        loss: LossFn,
        *,
        eval_data: Any = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"UserTask model must be an nn.Module, got {type(model).__name__}")
        _check_dataset(train_data, "train_data")
        if eval_data is not None:
            _check_dataset(eval_data, "eval_data")
        if not callable(loss):
            raise TypeError("UserTask loss must be callable as loss(model, batch)")
        self.model, self.train_data, self.eval_data = model, train_data, eval_data
        self.loss, self.collate = loss, collate_fn or default_collate
        # the score: validation loss, or the training loss without validation data
        self.score_metric = "val_loss" if eval_data is not None else "train_loss"

    # -- setup ----------------------------------------------------------------------------
    def load_data(self) -> dict[str, Any]:
        config = self.config
        if len(self.train_data) < config.batch_size:
            raise ConfigError(
                f"batch_size={config.batch_size} is larger than the {len(self.train_data)} "
                "training examples: no full batch per epoch"
            )
        shapes = {n: list(p.shape) for n, p in self.model.named_parameters()}
        return {
            "task": "custom",
            "model": config.model,
            "dataset": config.dataset,
            "parameters": shapes,  # a checkpoint of another model is refused on resume
            "recipe": config.recipe,
            "sparsity": config.sparsity().to_dict(),
            "keep_dense": list(keep_dense_layers(config)),
        }

    def build_model(self, identity: dict[str, Any]) -> tuple[nn.Module, Any]:
        from fullsparse.config import SparsityConfig
        from fullsparse.nn import sparsify_

        sparsity = SparsityConfig(**identity["sparsity"])
        report = sparsify_(self.model, sparsity, keep_dense=tuple(identity["keep_dense"]))
        return self.model, report

    def _loader(self, data: Any, trainer: TrainerView, train: bool) -> DataLoader:
        from fullsparse.data.loader import ShardedBatchSampler

        sampler = ShardedBatchSampler(
            len(data), trainer.local_batch, train=train, seed=self.config.seed,
            rank=trainer.dist.rank, world_size=trainer.dist.world_size,
        )  # fmt: skip
        return DataLoader(
            data, batch_sampler=sampler, collate_fn=self.collate, num_workers=self.config.workers
        )

    def attach(self, model: nn.Module, trainer: TrainerView) -> None:
        self.device = trainer.device
        self.train_loader = self._loader(self.train_data, trainer, train=True)
        self.eval_loader = (
            None if self.eval_data is None else self._loader(self.eval_data, trainer, False)
        )

    def steps_per_epoch(self) -> int:
        return len(self.train_loader.batch_sampler)  # type: ignore[arg-type]

    def probe_batch(self, n: int) -> Any:
        return self.collate([self.train_data[i] for i in range(min(n, len(self.train_data)))])

    # -- training -------------------------------------------------------------------------
    def batches(self, epoch: int, first: int) -> Any:
        self.train_loader.batch_sampler.set_epoch(epoch, first)  # type: ignore[union-attr]
        return self.train_loader

    def to_device(self, batch: Any) -> Any:
        return _to_device(batch, self.device)

    def forward(self, model: nn.Module, batch: Any) -> StepOutput:
        loss = self.loss(model, batch)
        if not (isinstance(loss, Tensor) and loss.ndim == 0):
            raise TypeError(f"UserTask loss must return a scalar tensor, got {loss!r:.80}")
        return StepOutput(loss, batch_len(batch))

    # -- evaluation and reporting ---------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, trainer: TrainerView) -> dict[str, Any]:
        if self.eval_loader is None:
            return {"val_loss": float("nan")}
        was_training = model.training
        model.eval()
        self.eval_loader.batch_sampler.set_epoch(0)  # type: ignore[union-attr]
        total = count = 0.0
        try:
            for batch in self.eval_loader:
                batch = self.to_device(batch)
                with trainer.amp():
                    out = self.forward(model, batch)
                total += float(out.loss) * out.count
                count += out.count
        finally:
            model.train(was_training)
        total, count = all_reduce_sum([total, count], trainer.dist, trainer.device)
        return {"val_loss": total / count if count else float("nan")}

    def describe(self, trainer: TrainerView) -> list[str]:
        c = self.config
        n_sparse, n_layers = self.sparse_layer_counts(trainer.report)
        held = f", {len(self.eval_data)} validation" if self.eval_data is not None else ""
        return [
            f"fullsparse train: {c.model} (your model) on {c.dataset}, recipe {c.recipe!r} on "
            f"{n_sparse} of {n_layers} layers, {len(self.train_data)} training{held} examples",
            self.settings_line(trainer, f"global batch {c.batch_size}"),
        ]

    def scores(self, history: list[dict[str, Any]], best_epoch: int) -> dict[str, Any]:
        final = {"final_val_loss": "val_loss", "final_train_loss": "train_loss"}
        scores = self.best_and_final(history, {"best_val_loss": self.score_metric}, final)
        return {"best_val_loss": scores.pop("best_val_loss"), "best_epoch": best_epoch, **scores}

    def summary_extra(self, trainer: TrainerView) -> dict[str, Any]:
        return {
            "sparse_layers": self.sparse_layer_counts(trainer.report)[0],
            "world_size": trainer.world,
        }
