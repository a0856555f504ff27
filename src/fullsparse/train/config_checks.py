"""The task-dependent part of a run config: the values a task fills in for fields left
None, and the checks that a model, dataset and flags fit the task (one line naming the
clash). Used by :class:`fullsparse.train.config.TrainConfig` when it is built.
"""

from __future__ import annotations

from typing import Any

from fullsparse.errors import ConfigError

__all__ = [
    "task_defaults",
    "check_task_fields",
    "keep_dense_layers",
    "layer_policy_identity",
    "LM_DATASETS",
    "DETECTION_DATASETS",
]

#: Text corpora of the ``lm`` task: ``pystdlib`` is the running Python's standard library
#: (present on every machine), ``text`` a folder of .py/.txt/.md/.rst files (``data_dir``).
LM_DATASETS = ("pystdlib", "text")
#: Datasets of the ``detection`` task: generated shapes, or COCO / VOC folders (``data_dir``).
#: The same names as :data:`fullsparse.data.detection.DETECTION_DATASETS` (checked there).
DETECTION_DATASETS = ("synthetic-det", "coco", "voc")
#: Detection defaults (AdamW): decoupled weight decay and a clip that only catches the
#: rare early spike of a from-scratch detector's box loss.
DETECTION_WEIGHT_DECAY = 0.05
DETECTION_GRAD_CLIP = 10.0


def task_defaults(config: Any) -> dict[str, Any]:
    """The values the None-defaults of ``config`` take for its task."""
    if config.task == "detection":
        dataset = config.dataset or "synthetic-det"
        return {
            "model": "fcos_tiny",
            "dataset": dataset,
            "image_size": 128 if dataset == "synthetic-det" else None,
            "synthetic_classes": 3,
            "optimizer": "adamw",
            "weight_decay": DETECTION_WEIGHT_DECAY,
            "no_wd_bn_bias": True,
            "label_smoothing": 0.0,
            "warmup_epochs": min(1.0, 0.1 * config.epochs),
            "grad_clip": DETECTION_GRAD_CLIP,
        }
    if config.task == "custom":  # your own model and data (fullsparse.train.custom)
        return {
            "model": "custom",
            "dataset": "custom",
            "synthetic_classes": 10,  # unused; the value classify configs record
            "optimizer": "sgd",
            "weight_decay": 7e-5,
            "no_wd_bn_bias": False,
            "label_smoothing": 0.0,
            "warmup_epochs": 0.0,
            "grad_clip": 0.0,
        }
    if config.task == "lm":
        return {
            "model": "gpt_tiny",
            "dataset": "text" if config.data_dir is not None else "pystdlib",
            "synthetic_classes": 10,  # unused by lm; the value classify configs record
            "optimizer": "adamw",
            "steps_per_epoch": 200,
            "weight_decay": 0.1,
            "no_wd_bn_bias": True,
            "label_smoothing": 0.0,
            "warmup_epochs": 0.1 * config.epochs,
            "grad_clip": 1.0,
        }
    return {
        "model": "resnet20",
        "dataset": "fashion-mnist",
        "synthetic_classes": 10,
        "optimizer": "sgd",
        "weight_decay": 7e-5,
        "no_wd_bn_bias": False,
        "label_smoothing": 0.1,
        "warmup_epochs": 0.0,
        "grad_clip": 0.0,
    }


def check_backend_fields(config: Any) -> None:
    """``backend='cpu_sparse'`` runs float32 products on a CPU, eagerly, where the native
    kernels build (one line naming what clashes)."""
    if getattr(config, "backend", "auto") != "cpu_sparse":
        return
    clash = [
        name
        for name, on in (
            ("device='cuda'", config.device == "cuda"),
            (f"amp={config.amp!r} (the kernels are float32)", config.amp != "none"),
            ("compile (the kernels are opaque C calls)", config.compile),
        )
        if on
    ]
    if clash:
        raise ConfigError(f"backend='cpu_sparse' clashes with {', '.join(clash)}")
    from fullsparse.kernels.cpu_sparse import unavailable_reason

    why = unavailable_reason()
    if why:
        raise ConfigError(f"backend='cpu_sparse' cannot run here: {why}")


def check_task_fields(config: Any) -> None:
    """Model, dataset and steps_per_epoch must fit the task (one line naming the clash)."""
    from fullsparse.models import LM_MODELS, MODELS
    from fullsparse.train.asp import check_config as check_asp

    keep_dense_layers(config)  # the layer policy names known roles
    check_asp(config)
    model, dataset = config.model, config.dataset
    if config.fsdp and config.compile:
        raise ConfigError("fsdp and compile clash: a sharded model runs eagerly; drop --compile")
    check_backend_fields(config)
    if config.checkpoint_every and config.task not in ("classify", "custom"):
        raise ConfigError(
            f"checkpoint_every={config.checkpoint_every} is for task='classify'; task="
            f"{config.task!r} checkpoints at epoch ends (choose shorter epochs with "
            "steps_per_epoch)"
        )
    if config.task == "detection":
        check_detection_fields(config)
        return
    if config.task == "custom":  # model and dataset are the user's own: names, not ours
        if config.steps_per_epoch is not None:
            raise ConfigError(
                f"steps_per_epoch={config.steps_per_epoch} clashes with task='custom': an "
                "epoch is one pass over train_data"
            )
        return
    if config.task == "lm":
        if model not in LM_MODELS:
            kind = (
                "an image classifier"
                if model in MODELS or str(model).startswith(("tv:", "timm:"))
                else "not a known model"
            )
            raise ConfigError(
                f"task='lm' clashes with model={model!r} ({kind}); language models: "
                f"{', '.join(LM_MODELS)}"
            )
        if dataset not in LM_DATASETS:
            raise ConfigError(
                f"task='lm' clashes with dataset={dataset!r}; text corpora: "
                f"{', '.join(LM_DATASETS)} (text = the folder given as data_dir)"
            )
        if dataset == "text" and config.data_dir is None:
            raise ConfigError("dataset='text' needs data_dir: a folder of .py/.txt/.md/.rst files")
        if dataset == "pystdlib" and config.data_dir is not None:
            raise ConfigError(
                f"dataset='pystdlib' clashes with data_dir={config.data_dir!r}: pystdlib is "
                "the running Python's standard library; for a folder use dataset='text' "
                "(the lm default when data_dir is given)"
            )
        return
    from fullsparse.models.detection import DETECTION_MODELS

    if model in DETECTION_MODELS or dataset in DETECTION_DATASETS:
        what = f"model={model!r}" if model in DETECTION_MODELS else f"dataset={dataset!r}"
        raise ConfigError(
            f"{what} is for object detection: it needs task='detection' (--task detection), "
            f"not task={config.task!r}"
        )
    if config.synthetic_classes < 2:
        raise ConfigError(
            f"synthetic_classes must be >= 2 for task={config.task!r}, "
            f"got {config.synthetic_classes}"
        )
    if model in LM_MODELS:
        raise ConfigError(
            f"model={model!r} is a language model: it needs task='lm' (--task lm), "
            f"not task={config.task!r}"
        )
    if dataset in LM_DATASETS:
        raise ConfigError(
            f"dataset={dataset!r} is a text corpus: it needs task='lm' (--task lm), "
            f"not task={config.task!r}"
        )
    if config.steps_per_epoch is not None:
        raise ConfigError(
            f"steps_per_epoch={config.steps_per_epoch} clashes with task={config.task!r}: a "
            "classify epoch is one pass over the training images (use train_subset)"
        )


# --------------------------------------------------------------------------- layer policy
def keep_dense_layers(config: Any) -> tuple[str, ...]:
    """The roles ``config.keep_dense`` (``"stem"``, ``"first_linear"``, comma-separated)
    keeps dense, for :func:`fullsparse.sparsify_`'s ``keep_dense``."""
    from fullsparse.nn import KEEP_DENSE

    if not config.keep_dense:
        return ()
    roles = tuple(r.strip() for r in config.keep_dense.split(","))
    unknown = [r for r in roles if r not in KEEP_DENSE]
    if unknown:
        raise ConfigError(
            f"keep_dense={config.keep_dense!r}: {', '.join(map(repr, unknown))} is not a layer "
            f"role; choose from {', '.join(KEEP_DENSE)} (comma-separated)"
        )
    return tuple(dict.fromkeys(roles))


def layer_policy_identity(config: Any) -> dict[str, Any]:
    """The layer policy's part of a checkpoint identity: empty without one, so checkpoints
    from before the policy existed still match a run without it."""
    roles = keep_dense_layers(config)
    return {"keep_dense": list(roles)} if roles else {}


def check_detection_fields(config: Any) -> None:
    """task='detection': a detector, a detection dataset, and no flag it does not support."""
    from fullsparse.models.detection import DETECTION_MODELS, SSD_MIN_SIZE

    if config.model not in DETECTION_MODELS:
        raise ConfigError(
            f"task='detection' clashes with model={config.model!r}; detectors: "
            f"{', '.join(DETECTION_MODELS)}"
        )
    if config.dataset not in DETECTION_DATASETS:
        raise ConfigError(
            f"task='detection' clashes with dataset={config.dataset!r}; detection datasets: "
            f"{', '.join(DETECTION_DATASETS)} (coco and voc read data_dir)"
        )
    if config.dataset == "synthetic-det" and config.data_dir is not None:
        raise ConfigError(
            f"dataset='synthetic-det' clashes with data_dir={config.data_dir!r}: it is "
            "generated; for a folder use dataset='coco' or 'voc'"
        )
    if config.synthetic_classes > 5:
        raise ConfigError(
            f"synthetic_classes={config.synthetic_classes} clashes with task='detection': "
            "synthetic-det has 5 shape classes at most"
        )
    if config.grad_accum_steps > 1:
        raise ConfigError(
            f"grad_accum_steps={config.grad_accum_steps} clashes with task='detection': "
            "gradient accumulation is for classify and lm"
        )
    if config.steps_per_epoch is not None:
        raise ConfigError(
            f"steps_per_epoch={config.steps_per_epoch} clashes with task='detection': an "
            "epoch is one pass over the training images (use train_subset)"
        )
    if config.label_smoothing:
        raise ConfigError(
            f"label_smoothing={config.label_smoothing} clashes with task='detection': the "
            "detectors' losses take none"
        )
    if config.model == "ssd300_vgg16" and (config.image_size or 300) < SSD_MIN_SIZE:
        raise ConfigError(
            f"image_size={config.image_size} clashes with model='ssd300_vgg16': it needs "
            f">= {SSD_MIN_SIZE} pixels"
        )
    unsupported = [
        flag
        for flag, on in (
            ("amp", config.amp != "none"),
            ("channels_last", config.channels_last),
            ("compile", config.compile),
            ("sync_bn", config.sync_bn),
            ("fsdp", config.fsdp),
        )
        if on
    ]
    if unsupported:
        raise ConfigError(
            f"{', '.join(unsupported)} clash(es) with task='detection': not supported for "
            "detectors yet (they run in fp32, eagerly)"
        )
