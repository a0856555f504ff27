"""The image-classification task (``task="classify"``, the paper's setting).

Data: a :mod:`fullsparse.data` image dataset (optionally a fixed random training subset),
loaded by the project's loader (per-epoch shuffling from ``seed``; a mid-epoch resume
continues at the next batch). Loss: cross-entropy with label smoothing. Evaluation: test
top-1 / top-5 accuracy and loss; ``best.pt`` is the epoch with the highest top-1.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fullsparse.errors import ConfigError
from fullsparse.train.common import autocast, image_data_options, subset
from fullsparse.train.config import TrainConfig
from fullsparse.train.config_checks import layer_policy_identity
from fullsparse.train.distributed import DistInfo, all_reduce_sum
from fullsparse.train.plot import plot_curves
from fullsparse.train.protocol import TrainerView
from fullsparse.train.task import StepOutput, Task

__all__ = [
    "ClassifyTask",
    "evaluate",
    "build_data",
    "model_identity",
    "build_classifier",
    "check_model_name",
]


def build_data(config: TrainConfig) -> Any:
    """The DatasetBundle of ``config`` (missing data raises DataNotFoundError)."""
    from fullsparse.data import DATASETS, build_datasets

    if config.dataset not in DATASETS:
        raise ConfigError(
            f"unknown dataset {config.dataset!r}; choose one of {', '.join(DATASETS)}"
        )
    return build_datasets(config.dataset, config.data_dir, **image_data_options(config))


def check_model_name(name: str) -> None:
    from fullsparse.models import MODELS

    if name not in MODELS and not name.startswith(("tv:", "timm:")):
        raise ConfigError(
            f"unknown model {name!r}; choose one of {', '.join(MODELS)}, tv:<torchvision name> "
            "or timm:<timm name>"
        )


def model_identity(config: TrainConfig, bundle: Any) -> dict[str, Any]:
    """What a checkpoint must agree on to be loaded into this run's model."""
    return {
        "model": config.model,
        "model_kwargs": dict(config.model_kwargs),
        "dataset": config.dataset,
        "num_classes": int(bundle.num_classes),
        "in_channels": int(bundle.in_channels),
        "image_size": int(bundle.image_size),
        "recipe": config.recipe,
        "sparsity": config.sparsity().to_dict(),
        **layer_policy_identity(config),
    }


def to_device(x: Tensor, y: Tensor, device: torch.device, channels_last: bool) -> tuple:
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def probe_batch(dataset: Any, n: int) -> tuple[Tensor, Tensor]:
    n = max(1, min(n, len(dataset)))
    xs, ys = zip(*(dataset[i] for i in range(n)), strict=True)
    return torch.stack(xs), torch.as_tensor(ys, dtype=torch.int64)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    device: torch.device,
    *,
    amp: str = "none",
    channels_last: bool = False,
    dist_info: DistInfo | None = None,
) -> dict[str, float]:
    """Top-1/top-5 accuracy (%) and mean cross-entropy on ``loader`` (reduced over ranks)."""
    dist_info = dist_info or DistInfo()
    was_training = model.training
    model.eval()
    loss_sum = top1 = top5 = count = 0.0
    try:
        for x, y in loader:
            x, y = to_device(x, y, device, channels_last)
            with autocast(device, amp):
                logits = model(x)
            logits = logits.float()
            k = min(5, logits.shape[1])
            topk = logits.topk(k, dim=1).indices  # [B, k]
            hits = topk == y[:, None]
            stats = torch.stack(
                [
                    F.cross_entropy(logits, y, reduction="sum"),
                    hits[:, 0].sum().to(logits.dtype),
                    hits.any(dim=1).sum().to(logits.dtype),
                ]
            ).tolist()
            loss_sum += stats[0]
            top1 += stats[1]
            top5 += stats[2]
            count += y.numel()
    finally:
        model.train(was_training)
    loss_sum, top1, top5, count = all_reduce_sum([loss_sum, top1, top5, count], dist_info, device)
    if count == 0:
        return {"loss": float("nan"), "top1": 0.0, "top5": 0.0, "count": 0}
    return {
        "loss": loss_sum / count,
        "top1": 100.0 * top1 / count,
        "top5": 100.0 * top5 / count,
        "count": int(count),
    }


def build_classifier(identity: dict[str, Any]) -> nn.Module:
    """The (dense) image classifier an identity describes."""
    from fullsparse.models import build_model

    return build_model(
        identity["model"],
        identity["num_classes"],
        in_channels=identity["in_channels"],
        image_size=identity["image_size"],
        **identity["model_kwargs"],
    )


class ClassifyTask(Task):
    best_key = "best_top1"
    score_metric = "test_top1"
    higher_is_better = True
    count_key = "images"
    sum_keys = ("correct",)
    plot = staticmethod(plot_curves)

    epoch_format = (
        "train loss {train_loss:.4f} acc {train_acc:.2f}% | test top-1 "
        "{test_top1:.2f}% top-5 {test_top5:.2f}% | lr {lr:.4g} | "
        "{epoch_seconds:.1f} s ({images_per_second:.0f} img/s)"
    )
    result_format = (
        "best test top-1 {best_top1:.2f}% (epoch {best_epoch}), final "
        "{final_top1:.2f}%, {seconds_per_epoch:.1f} s/epoch"
    )

    def check(self, world: int, device: torch.device) -> None:
        if self.config.sync_bn and world > 1 and device.type != "cuda":
            raise ConfigError(
                "--sync-bn needs CUDA: torch's SyncBatchNorm runs on GPUs only; on CPU train "
                "without it (per-rank batch statistics) or use a model without BatchNorm"
            )

    def load_data(self) -> dict[str, Any]:
        config = self.config
        check_model_name(config.model)  # before loading data: a typo fails in no time
        self.bundle = build_data(config)
        return model_identity(config, self.bundle)

    def attach(self, model: nn.Module, trainer: TrainerView) -> None:
        from fullsparse.data import make_loader

        config, dist, bundle = self.config, trainer.dist, self.bundle
        self.device = trainer.device
        self.train_set = subset(bundle.train, config.train_subset, config.seed, random_pick=True)
        self.test_set = subset(bundle.test, config.test_subset, config.seed, random_pick=False)
        self.loaders = [
            make_loader(
                dataset,
                trainer.local_batch,
                train=train,
                seed=config.seed,
                rank=dist.rank,
                world_size=dist.world_size,
                workers=config.workers,
            )  # fmt: skip
            for dataset, train in ((self.train_set, True), (self.test_set, False))
        ]
        if len(self.loaders[0]) == 0:
            raise ConfigError(
                f"batch_size={config.batch_size} is larger than the {len(self.train_set)} "
                "training images: no full batch per epoch"
            )
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

    def steps_per_epoch(self) -> int:
        return len(self.loaders[0])

    def probe_batch(self, n: int) -> Any:
        return probe_batch(self.train_set, n)

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"mean": list(self.bundle.mean), "std": list(self.bundle.std)}

    def batches(self, epoch: int, first: int) -> Iterable[Any]:
        loader = self.loaders[0]
        loader.set_epoch(epoch, first)
        return loader

    def to_device(self, batch: Any) -> Any:
        return to_device(*batch, self.device, self.config.channels_last)

    def forward(self, model: nn.Module, batch: Any) -> StepOutput:
        x, y = batch
        logits = model(x)
        loss = self.criterion(logits.float(), y)
        return StepOutput(loss, y.numel(), {"correct": (logits.argmax(1) == y).sum()})

    def train_metrics(self, sums: dict[str, float]) -> dict[str, Any]:
        images = sums["images"]
        return {"train_acc": 100.0 * sums["correct"] / images if images else 0.0}

    def evaluate(self, model: nn.Module, trainer: TrainerView) -> dict[str, Any]:
        c = self.config
        test = evaluate(
            model, self.loaders[1], trainer.device, amp=c.amp, channels_last=c.channels_last,
            dist_info=trainer.dist,
        )  # fmt: skip
        return {"test_loss": test["loss"], "test_top1": test["top1"], "test_top5": test["top5"]}

    def describe(self, trainer: TrainerView) -> list[str]:
        c = self.config
        n_sparse, n_layers = self.sparse_layer_counts(trainer.report)
        return [
            f"fullsparse train: {c.model} on {c.dataset}, recipe {c.recipe!r} on {n_sparse} of "
            f"{n_layers} layers, {len(self.train_set)} train / {len(self.test_set)} test images",
            self.settings_line(trainer, f"global batch {c.batch_size}"),
        ]

    def scores(self, history: list[dict[str, Any]], best_epoch: int) -> dict[str, Any]:
        final = {"final_top1": "test_top1", "final_top5": "test_top5",
                 "final_train_loss": "train_loss"}  # fmt: skip
        scores = self.best_and_final(history, {"best_top1": "test_top1"}, final)
        return {"best_top1": scores.pop("best_top1"), "best_epoch": best_epoch, **scores}

    def summary_extra(self, trainer: TrainerView) -> dict[str, Any]:
        return {
            "sparse_layers": self.sparse_layer_counts(trainer.report)[0],
            "num_classes": trainer.identity["num_classes"],
            "world_size": trainer.world,
        }
