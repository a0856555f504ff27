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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fullsparse.errors import UserError
from fullsparse.train import checkpoint as ckpt
from fullsparse.train import loop as train_loop
from fullsparse.train.config import TrainConfig
from fullsparse.train.distributed import DistInfo
from fullsparse.train.loop import (
    _check_run_dir,
    _log_resume,
    _open_run_folder,
    _restore_run,
    _RunLog,
    _save_epoch,
    _seed_everything,
    _subset,
    _write_json,
    build_optimizer,
    lr_factor,
)
from fullsparse.train.progress import ProgressBar

__all__ = [
    "METRICS_HINT",
    "build_detection_data",
    "detection_identity",
    "build_sparse_detector",
    "evaluate_detection",
    "train_detection",
]

METRICS_HINT = (
    "detection mAP needs torchmetrics and pycocotools: pip install 'fullsparse[vision]' "
    "(or pip install torchmetrics pycocotools)"
)


def build_detection_data(config: TrainConfig) -> Any:
    """The DetectionBundle of ``config`` (generated, or read from ``data_dir``)."""
    from fullsparse.data.detection import build_detection_datasets

    return build_detection_datasets(
        config.dataset,
        config.data_dir,
        image_size=config.image_size,
        synthetic_train=config.synthetic_train,
        synthetic_test=config.synthetic_test,
        synthetic_classes=config.synthetic_classes,
        seed=config.seed,
    )


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
    report = sparsify_(model, SparsityConfig(**identity["sparsity"]), detection_filter)
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


@dataclass
class _State:
    epoch: int = 0  # completed epochs
    history: list[dict[str, Any]] = field(default_factory=list)
    best_map: float = -1.0
    best_epoch: int = 0
    skipped_steps: int = 0


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


def train_detection(
    config: TrainConfig, device: torch.device, dist_info: DistInfo, log: _RunLog
) -> dict[str, Any]:
    """The detection counterpart of the classification ``_train`` (called by ``train``)."""
    from fullsparse.data.detection import epoch_flips

    if dist_info.world_size > 1:
        raise UserError("--task detection runs in one process; start it without torchrun")
    run_dir = config.run_dir

    # -- setup: everything that can fail on bad input happens before a file is written ----
    resume_from = _check_run_dir(config)
    _seed_everything(config.seed)
    if config.deterministic:
        torch.use_deterministic_algorithms(True)
    _mean_average_precision()  # a missing torchmetrics/pycocotools fails now, not at epoch 1
    bundle = build_detection_data(config)
    identity = detection_identity(config, bundle)
    model, report = train_loop._build_model(identity)
    state = None
    if config.resume:
        path = run_dir / "last.pt" if config.resume is True else Path(config.resume)
        state = ckpt.load_checkpoint(path)
        ckpt.check_identity(path, state["identity"], identity)
        resume_from = path
    train_set = _subset(bundle.train, config.train_subset, config.seed, random_pick=True)
    test_set = _subset(bundle.test, config.test_subset, config.seed, random_pick=False)
    steps_per_epoch = len(train_set) // config.batch_size
    if steps_per_epoch == 0:
        raise UserError(
            f"batch_size={config.batch_size} is larger than the {len(train_set)} training "
            "images: no full batch per epoch"
        )

    # -- model, optimiser, schedule ---------------------------------------------------------
    raw_model = model.to(device)
    optimizer = build_optimizer(raw_model, config)
    total_steps = config.epochs * steps_per_epoch
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps)
    )
    run = _State()
    if state is not None:
        _restore_run(
            state, resume_from, raw_model, optimizer, scheduler, None, run, "best_map", -1.0
        )

    # -- the run folder: written only now that everything is known to work --------------------
    _open_run_folder(config, log, state, run, dist_info)

    n_sparse = len(report.sparse_names)
    n_params = sum(p.numel() for p in raw_model.parameters())
    size = config.image_size if config.image_size is not None else "the model's default"
    log.info(
        f"fullsparse train --task detection: {config.model} ({n_params / 1e6:.2f}M "
        f"parameters, input {size}) on {config.dataset} ({len(train_set)} train / "
        f"{len(test_set)} test images, {bundle.num_classes - 1} classes), recipe "
        f"{config.recipe!r} on {n_sparse} of {len(report.rows)} layers"
    )
    log.info(str(report), console=False)
    log.info(
        f"device {device}, batch {config.batch_size}, {config.optimizer} lr "
        f"{config.peak_lr:g} (warm-up {warmup_steps} steps, cosine), wd "
        f"{config.weight_decay:g}, grad clip {config.grad_clip:g}, {config.epochs} epochs of "
        f"{steps_per_epoch} steps" + (", deterministic" if config.deterministic else "")
    )
    log.info(f"run folder: {run_dir}")
    _log_resume(log, config, state, resume_from, run.epoch)

    # -- epochs -------------------------------------------------------------------------
    last_epoch = config.stop_after if config.stop_after is not None else config.epochs
    status = "completed"
    for epoch in range(run.epoch, config.epochs):
        if epoch >= last_epoch:
            status = f"stopped after epoch {run.epoch} of {config.epochs} (stop_after)"
            break
        flipped = _Flipped(train_set, epoch_flips(config.seed, epoch, len(train_set)))
        batches = _epoch_batches(len(train_set), config.batch_size, config.seed, epoch)
        metrics = _train_epoch(
            raw_model, _loader(flipped, batches, config.workers), steps_per_epoch, optimizer,
            scheduler, device, config, epoch, run, log,
        )  # fmt: skip
        eval_start = time.perf_counter()
        result = evaluate_detection(
            raw_model, test_set, config.batch_size, device, workers=config.workers
        )
        metrics.update(
            map=result["map"],
            map_50=result["map_50"],
            map_75=result["map_75"],
            mar_100=result["mar_100"],
            eval_seconds=time.perf_counter() - eval_start,
        )
        run.epoch = epoch + 1
        run.history.append(metrics)
        is_best = result["map"] > run.best_map
        if is_best:
            run.best_map, run.best_epoch = result["map"], epoch + 1
        log.info(
            f"epoch {epoch + 1}/{config.epochs}: train loss {metrics['train_loss']:.4f} | "
            f"mAP {result['map']:.2f} mAP@0.5 {result['map_50']:.2f} mAP@0.75 "
            f"{result['map_75']:.2f} | lr {metrics['lr']:.4g} | "
            f"{metrics['epoch_seconds']:.1f} s ({metrics['images_per_second']:.1f} img/s) + "
            f"eval {metrics['eval_seconds']:.1f} s"
        )
        _save_epoch(
            config, identity, run, metrics, raw_model, optimizer, scheduler, None, "best_map",
            is_best,
        )  # fmt: skip

    summary = _summary(config, identity, run, status, device, report)
    summary.update(
        parameters=n_params, data=bundle.summary(), train_images=len(train_set),
        test_images=len(test_set),
    )  # fmt: skip
    _write_json(run_dir / "summary.json", summary)
    log.info(
        f"{status}: best mAP {summary['best_map']:.2f} (epoch {summary['best_epoch']}), final "
        f"mAP {summary['final_map']:.2f} mAP@0.5 {summary['final_map_50']:.2f}, "
        f"{summary['seconds_per_epoch']:.1f} s/epoch"
    )
    log.info(f"results in {run_dir}/: summary.json, metrics.jsonl, last.pt, best.pt, train.log")
    return summary


def _train_epoch(
    model: nn.Module,
    loader: Any,
    steps: int,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    device: torch.device,
    config: TrainConfig,
    epoch: int,
    run: _State,
    log: _RunLog,
) -> dict[str, Any]:
    model.train()
    bar = ProgressBar(
        steps,
        f"epoch {epoch + 1}/{config.epochs}",
        enabled=config.progress and not config.quiet,
        accuracy=False,
    )
    guard = train_loop._StepGuard(
        model, optimizer, scheduler, None, config, DistInfo(), device, run, log, epoch, steps
    )
    loss_sum = 0.0
    parts: dict[str, float] = {}
    images_done = done = 0
    start = time.perf_counter()
    with bar:
        for step, (images, targets) in enumerate(loader):
            images = [im.to(device) for im in images]  # each [3, H, W]
            targets = _to_device(targets, device)
            guard.snapshot()
            losses = model(images, targets)  # {name: scalar}
            loss = sum(losses.values())
            values = torch.stack([loss.detach(), *(v.detach() for v in losses.values())])
            values = values.tolist()
            problem = guard.backward(loss, values[0])
            if problem:
                named = ", ".join(f"{k} {v:.4g}" for k, v in zip(losses, values[1:], strict=True))
                guard.resolve(problem, step, values[0], functools.partial(str, f"losses: {named}"))
                continue
            guard.step()
            n = len(images)
            loss_sum += values[0] * n
            for k, v in zip(losses, values[1:], strict=True):
                parts[k] = parts.get(k, 0.0) + v * n
            images_done += n
            done += 1
            bar.update(n, values[0], 0)
    seconds = time.perf_counter() - start
    metrics: dict[str, Any] = {
        "epoch": epoch + 1,
        "train_loss": loss_sum / images_done if images_done else float("nan"),
    }
    metrics.update({f"train_{k}": v / images_done for k, v in parts.items()})
    metrics.update(
        lr=optimizer.param_groups[0]["lr"],
        grad_norm=guard.mean_norm,
        epoch_seconds=seconds,
        images_per_second=images_done / seconds if seconds > 0 else 0.0,
        train_images=images_done,
        steps=done,
        skipped_steps=guard.skipped,
    )
    return metrics


def _summary(
    config: TrainConfig,
    identity: dict[str, Any],
    run: _State,
    status: str,
    device: torch.device,
    report: Any,
) -> dict[str, Any]:
    history = run.history
    nan = float("nan")
    best = max(history, key=lambda h: h["map"]) if history else None
    final = history[-1] if history else None
    try:
        import torchvision

        tv_version = str(torchvision.__version__)
    except ImportError:  # pragma: no cover - a detector was built, so it is there
        tv_version = None
    scores = {
        "best_map": best["map"] if best else nan,
        "best_map_50": best["map_50"] if best else nan,
        "best_epoch": run.best_epoch,
        "final_map": final["map"] if final else nan,
        "final_map_50": final["map_50"] if final else nan,
        "final_map_75": final["map_75"] if final else nan,
        "first_train_loss": history[0]["train_loss"] if history else nan,
        "final_train_loss": final["train_loss"] if final else nan,
        "train_loss_per_epoch": [h["train_loss"] for h in history],
        "map_50_per_epoch": [h["map_50"] for h in history],
    }
    extra = {
        "sparse_layers": len(report.sparse_names),
        "layers": len(report.rows),
        "dense_layers": {r.name: r.reason for r in report.rows if not r.sparse},
        "num_classes": identity["num_classes"],
        "image_size": identity["image_size"],
        "torchvision": tv_version,
    }
    return train_loop._summary_fields(
        config, identity, run, status, device, scores,
        rate=("images_per_second", "train_images"), extra=extra,
    )  # fmt: skip
