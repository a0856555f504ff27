"""The detection task: ``train(TrainConfig(task="detection"))`` trains a torchvision detector.

The run folder and its guarantees are the classification loop's (``config.json``,
``train.log``, ``metrics.jsonl``, ``last.pt``/``best.pt``, ``summary.json``, resume,
``--stop-after``, ``--skip-nonfinite``); what differs is the data and what is measured:

* data (:mod:`fullsparse.data.detection`): generated shapes (``synthetic-det``) or COCO /
  VOC folders. Epoch ``e`` visits the training images in the order of a permutation drawn
  from ``generator(seed, e)`` and mirrors those that :func:`epoch_flips` picks, so a resumed
  run sees the same batches without a saved sampler state. The last incomplete batch is
  dropped (every step has ``batch_size`` images).
* model: :func:`fullsparse.models.detection.build_detection_model`, sparsified with
  :func:`fullsparse.models.detection.detection_filter` (every Conv2d/Linear but the
  class/box prediction layers).
* loss: the sum of the detector's own losses (e.g. FCOS: classification, box regression,
  centerness); each one's epoch mean is logged as ``train_<name>``.
* evaluation: COCO mAP (IoU 0.50:0.95), mAP@0.5 and mAP@0.75 from torchmetrics'
  ``MeanAveragePrecision`` (pycocotools backend) on the first ``test_subset`` test images
  (crowd / difficult boxes ignored). ``best.pt`` is the epoch with the highest mAP.

One process only (no DDP) and fp32 only; ``TrainConfig`` refuses the other flags.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from fullsparse.errors import UserError
from fullsparse.train.common import image_data_options, subset
from fullsparse.train.config import TrainConfig
from fullsparse.train.config_checks import layer_policy_identity
from fullsparse.train.protocol import TrainerView
from fullsparse.train.task import StepOutput, Task

__all__ = [
    "METRICS_HINT",
    "DetectionTask",
    "build_detection_data",
    "detection_identity",
    "build_sparse_detector",
    "evaluate_detection",
]

METRICS_HINT = (
    "detection mAP needs torchmetrics and pycocotools: pip install 'fullsparse[vision]' "
    "(or pip install torchmetrics pycocotools)"
)


def build_detection_data(config: TrainConfig) -> Any:
    """The DetectionBundle of ``config`` (generated, or read from ``data_dir``)."""
    from fullsparse.data.detection import build_detection_datasets

    return build_detection_datasets(config.dataset, config.data_dir, **image_data_options(config))


def detection_identity(config: TrainConfig, bundle: Any) -> dict[str, Any]:
    """What a checkpoint must agree on to be loaded into this run's model."""
    return {
        "task": "detection",
        "model": config.model,
        "model_kwargs": dict(config.model_kwargs),
        "dataset": config.dataset,
        "num_classes": int(bundle.num_classes),
        "image_size": config.image_size,
        "recipe": config.recipe,
        "sparsity": config.sparsity().to_dict(),
        **layer_policy_identity(config),
    }


def build_sparse_detector(identity: dict[str, Any]) -> tuple[nn.Module, Any]:
    """The detector an identity describes, sparsified with ``detection_filter``."""
    from fullsparse.config import SparsityConfig
    from fullsparse.models.detection import build_detection_model, detection_filter
    from fullsparse.nn import sparsify_

    model = build_detection_model(
        identity["model"], identity["num_classes"], identity["image_size"],
        **identity["model_kwargs"],
    )  # fmt: skip
    config = SparsityConfig(**identity["sparsity"])
    keep_dense = identity.get("keep_dense", ())
    report = sparsify_(model, config, detection_filter, keep_dense=keep_dense)
    return model, report


def _mean_average_precision() -> Any:
    try:
        from torchmetrics.detection import MeanAveragePrecision

        metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
    except (ImportError, ModuleNotFoundError) as exc:
        raise UserError(f"{METRICS_HINT} ({exc})") from None
    return metric


def _loader(dataset: Any, batches: list[list[int]], workers: int) -> Any:
    from fullsparse.data.detection import detection_collate

    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, collate_fn=detection_collate, num_workers=workers
    )


def _to_device(targets: list[dict[str, Any]], device: torch.device) -> list[dict[str, Tensor]]:
    from fullsparse.data.detection import training_target

    return [{k: v.to(device) for k, v in training_target(t).items()} for t in targets]


@torch.no_grad()
def evaluate_detection(
    model: nn.Module, dataset: Any, batch_size: int, device: torch.device, *, workers: int = 0
) -> dict[str, float]:
    """COCO mAP (IoU .50:.95), mAP@0.5, mAP@0.75 of ``model`` on ``dataset`` (in %).

    Computed by torchmetrics' ``MeanAveragePrecision`` with the pycocotools backend;
    ground-truth boxes marked ``iscrowd`` (COCO crowds, VOC difficult) are ignored the COCO
    way (a detection on them is neither a hit nor a false positive).
    """
    metric = _mean_average_precision()
    was_training = model.training
    model.eval()
    indices = list(range(len(dataset)))
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    try:
        for images, targets in _loader(dataset, batches, workers):
            outputs = model([im.to(device) for im in images])
            preds = [{k: o[k].detach().cpu() for k in ("boxes", "scores", "labels")}
                     for o in outputs]  # fmt: skip
            truth = [{"boxes": t["boxes"], "labels": t["labels"], "iscrowd": t["iscrowd"]}
                     for t in targets]  # fmt: skip
            metric.update(preds, truth)
    finally:
        model.train(was_training)
    result = metric.compute()
    return {
        "map": 100.0 * float(result["map"]),
        "map_50": 100.0 * float(result["map_50"]),
        "map_75": 100.0 * float(result["map_75"]),
        "mar_100": 100.0 * float(result["mar_100"]),
        "images": len(dataset),
    }


class _Flipped(torch.utils.data.Dataset):
    """``dataset`` with the images that ``flips`` marks mirrored left-right."""

    def __init__(self, dataset: Any, flips: Tensor) -> None:
        self.dataset = dataset
        self.flips = flips.tolist()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        from fullsparse.data.detection import hflip

        image, target = self.dataset[index]
        return hflip(image, target) if self.flips[index] else (image, target)


def _epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    from fullsparse.data.seeding import generator

    order = torch.randperm(n, generator=generator(seed, epoch)).tolist()
    return [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


class DetectionTask(Task):
    best_key = "best_map"
    score_metric = "map"
    higher_is_better = True
    count_key = "images"
    bar_accuracy = False

    epoch_format = (
        "train loss {train_loss:.4f} | mAP {map:.2f} mAP@0.5 {map_50:.2f} "
        "mAP@0.75 {map_75:.2f} | lr {lr:.4g} | {epoch_seconds:.1f} s "
        "({images_per_second:.1f} img/s) + eval {eval_seconds:.1f} s"
    )
    result_format = (
        "best mAP {best_map:.2f} (epoch {best_epoch}), final mAP "
        "{final_map:.2f} mAP@0.5 {final_map_50:.2f}, "
        "{seconds_per_epoch:.1f} s/epoch"
    )

    def check(self, world: int, device: torch.device) -> None:
        if world > 1:
            raise UserError("--task detection runs in one process; start it without torchrun")

    def load_data(self) -> dict[str, Any]:
        _mean_average_precision()  # a missing torchmetrics/pycocotools fails now, not later
        self.bundle = build_detection_data(self.config)
        return detection_identity(self.config, self.bundle)

    def attach(self, model: nn.Module, trainer: TrainerView) -> None:
        config, bundle = self.config, self.bundle
        self.device = trainer.device
        self.train_set = subset(bundle.train, config.train_subset, config.seed, random_pick=True)
        self.test_set = subset(bundle.test, config.test_subset, config.seed, random_pick=False)
        if len(self.train_set) < config.batch_size:
            raise UserError(
                f"batch_size={config.batch_size} is larger than the {len(self.train_set)} "
                "training images: no full batch per epoch"
            )
        self.parameters = sum(p.numel() for p in model.parameters())

    def steps_per_epoch(self) -> int:
        return len(self.train_set) // self.config.batch_size

    def batches(self, epoch: int, first: int) -> Iterable[Any]:
        from fullsparse.data.detection import epoch_flips

        c = self.config
        flipped = _Flipped(self.train_set, epoch_flips(c.seed, epoch, len(self.train_set)))
        batches = _epoch_batches(len(self.train_set), c.batch_size, c.seed, epoch)
        return _loader(flipped, batches[first:], c.workers)

    def to_device(self, batch: Any) -> Any:
        images, targets = batch
        return [im.to(self.device) for im in images], _to_device(targets, self.device)

    def forward(self, model: nn.Module, batch: Any) -> StepOutput:
        images, targets = batch  # each image [3, H, W]
        losses = model(images, targets)  # {name: scalar}
        n = len(images)
        sums = {"steps": torch.ones(())} | {k: v.detach() * n for k, v in losses.items()}
        return StepOutput(sum(losses.values()), n, sums)

    def explain_nonfinite(
        self, trainer: TrainerView, batch: Any, out: StepOutput, values: list[float]
    ) -> Callable[[], str]:
        parts = dict(zip(out.sums, values[1:], strict=True))
        parts.pop("steps")
        named = ", ".join(f"{k} {v / out.count:.4g}" for k, v in parts.items())
        return functools.partial(str, f"losses: {named}")

    def train_metrics(self, sums: dict[str, float]) -> dict[str, Any]:
        images = sums["images"]
        parts = {k: v for k, v in sums.items() if k not in ("loss_sum", "images", "steps")}
        metrics: dict[str, Any] = {f"train_{k}": v / images for k, v in parts.items()}
        return metrics | {"steps": int(sums.get("steps", 0))}

    def evaluate(self, model: nn.Module, trainer: TrainerView) -> dict[str, Any]:
        c = self.config
        result = evaluate_detection(
            model, self.test_set, c.batch_size, self.device, workers=c.workers
        )
        return {k: result[k] for k in ("map", "map_50", "map_75", "mar_100")}

    def describe(self, trainer: TrainerView) -> list[str]:
        c, report = self.config, trainer.report
        size = c.image_size if c.image_size is not None else "the model's default"
        return [
            f"fullsparse train --task detection: {c.model} ({self.parameters / 1e6:.2f}M "
            f"parameters, input {size}) on {c.dataset} ({len(self.train_set)} train / "
            f"{len(self.test_set)} test images, {self.bundle.num_classes - 1} classes), recipe "
            f"{c.recipe!r} on {len(report.sparse_names)} of {len(report.rows)} layers",
            self.settings_line(trainer, f"batch {c.batch_size}"),
        ]

    def scores(self, history: list[dict[str, Any]], best_epoch: int) -> dict[str, Any]:
        best = {"best_map": "map", "best_map_50": "map_50"}
        final = {"final_map": "map", "final_map_50": "map_50", "final_map_75": "map_75"}
        scores = self.best_and_final(history, best, final)
        return {
            **{k: scores.pop(k) for k in best},
            "best_epoch": best_epoch,
            **scores,
            "first_train_loss": history[0]["train_loss"] if history else float("nan"),
            "final_train_loss": history[-1]["train_loss"] if history else float("nan"),
            "train_loss_per_epoch": [h["train_loss"] for h in history],
            "map_50_per_epoch": [h["map_50"] for h in history],
        }

    def summary_extra(self, trainer: TrainerView) -> dict[str, Any]:
        try:
            import torchvision

            tv_version = str(torchvision.__version__)
        except ImportError:  # pragma: no cover - a detector was built, so it is there
            tv_version = None
        report = trainer.report
        return {
            "sparse_layers": len(report.sparse_names),
            "layers": len(report.rows),
            "dense_layers": {r.name: r.reason for r in report.rows if not r.sparse},
            "num_classes": trainer.identity["num_classes"],
            "image_size": trainer.identity["image_size"],
            "torchvision": tv_version,
        }

    def summary_details(self, trainer: TrainerView) -> dict[str, Any]:
        return {
            "parameters": self.parameters,
            "data": self.bundle.summary(),
            "train_images": len(self.train_set),
            "test_images": len(self.test_set),
        }
