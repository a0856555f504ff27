"""Building blocks of a training run that do not depend on the task: the device, autocast,
the model wrappers (DDP, compile), the optimiser and its schedule, seeding, subsets, and the
probe step that makes a bad flag fail before the run folder is written.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import shutil
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fullsparse.errors import ConfigError, UserError
from fullsparse.train import checkpoint as ckpt
from fullsparse.train.config import TrainConfig

__all__ = [
    "resolve_device",
    "autocast",
    "unwrap",
    "wrap_model",
    "param_groups",
    "build_optimizer",
    "build_scheduler",
    "lr_factor",
    "seed_everything",
    "check_capabilities",
    "subset",
    "probe_step",
    "image_data_options",
]


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("device 'cuda' requested but CUDA is not available; use --device cpu")
        return torch.device("cuda", local_rank)
    if name == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"unknown device {name!r}; choose auto, cpu or cuda")


def subset(dataset: Any, n: int | None, seed: int, *, random_pick: bool) -> Any:
    """The first ``n`` examples (test) or a fixed seeded random ``n`` (train).

    Keeps the dataset's type where the loader depends on it (batched in-memory indexing,
    per-example augmentation seeds of image folders).
    """
    if n is None or n >= len(dataset):
        return dataset
    if random_pick:
        g = torch.Generator().manual_seed(seed)
        indices = torch.randperm(len(dataset), generator=g)[:n].sort().values
    else:
        indices = torch.arange(n)
    from fullsparse.data import ImageFolderDataset, TensorImageDataset

    if isinstance(dataset, TensorImageDataset):
        return TensorImageDataset(
            dataset.images[indices],
            dataset.labels[indices],
            dataset.mean,
            dataset.std,
            dataset.augmentation,
        )
    if isinstance(dataset, ImageFolderDataset):
        picked = copy.copy(dataset)
        picked.samples = [dataset.samples[i] for i in indices.tolist()]
        return picked
    return torch.utils.data.Subset(dataset, indices.tolist())


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under torch.compile and DDP wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod  # type: ignore[assignment]
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager[Any]:
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def param_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not config.no_wd_bn_bias:
        return [{"params": params, "weight_decay": config.weight_decay}]
    # 1-D parameters are exactly the norm scales/shifts and the biases here.
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """``config.optimizer`` over ``model``'s trainable parameters at ``config.peak_lr``."""
    groups = param_groups(model, config)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.peak_lr, betas=(config.momentum, 0.95))
    return torch.optim.SGD(groups, lr=config.peak_lr, momentum=config.momentum)


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based): linear warm-up to 1
    over ``warmup_steps``, then cosine from 1 down to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule over the whole run: warm-up, then cosine decay to 0."""
    total_steps = config.epochs * steps_per_epoch
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps)
    )


def wrap_model(
    raw_model: nn.Module, world: int, device: torch.device, compile_model: bool, fsdp: bool = False
) -> nn.Module:
    """DDP over ``world`` > 1 processes (not for a model that ``fsdp`` sharded already), then
    ``torch.compile`` if asked."""
    model = raw_model
    if world > 1 and not fsdp:
        model = nn.parallel.DistributedDataParallel(
            raw_model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if compile_model:
        model = torch.compile(model)
    return model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed(seed % 2**32)


def check_capabilities(config: TrainConfig, device: torch.device) -> None:
    if config.amp == "fp16" and device.type != "cuda":
        raise ConfigError(
            "--amp fp16 needs CUDA (float16 training needs a GradScaler and fast fp16 "
            "kernels); on CPU use --amp bf16"
        )
    sparsity = config.sparsity()
    if config.amp == "fp16" and sparsity.decay and sparsity.decay_kind == "srste":
        raise ConfigError(
            f"--amp fp16 with recipe {config.recipe!r}: its SR-STE decay is added inside "
            "backward, where the GradScaler's loss scale does not reach it, so the decay "
            "would shrink by that scale; use --decay-kind masked_grad (the same term, added "
            "after unscaling), --amp bf16, or --decay 0"
        )
    if config.amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("--amp bf16: this GPU has no bfloat16 support; use --amp fp16")
    if config.compile:
        if not hasattr(torch, "compile"):
            raise ConfigError("--compile needs torch >= 2.0")
        if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
            raise ConfigError(
                "--compile on CPU needs a C++ compiler (g++ or clang++) for TorchInductor; "
                "install one or run without --compile"
            )
        if sys.platform == "win32":
            raise ConfigError("--compile is not supported on Windows by this torch; drop it")


def probe_step(
    model: nn.Module,
    raw_model: nn.Module,
    loss_of: Callable[[nn.Module], Any],
    amp_ctx: Callable[[], contextlib.AbstractContextManager[Any]],
    config: TrainConfig,
    device: torch.device,
) -> None:
    """One forward+backward (train mode) and one forward (eval mode) on a real batch, then
    every bit of state restored: flags like --compile/--amp/--channels-last fail here, with
    a clear message, instead of part-way through an epoch. ``loss_of(model)`` is the loss
    of the probe batch."""
    from fullsparse.nn import load_sparse_state_, sparse_state_dict

    saved_model = {k: v.detach().clone() for k, v in raw_model.state_dict().items()}
    saved_sparse = sparse_state_dict(raw_model)
    saved_rng = ckpt.capture_rng()
    flags = [
        f
        for f, on in (
            (f"--amp {config.amp}", config.amp != "none"),
            ("--channels-last", config.channels_last),
            ("--compile", config.compile),
            ("--deterministic", config.deterministic and device.type == "cuda"),
        )
        if on
    ]
    try:
        model.train()
        with amp_ctx():
            loss = loss_of(model)
        loss.backward()
        model.eval()
        with torch.no_grad(), amp_ctx():
            loss_of(model)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise UserError(
            f"{' '.join(flags)} does not work with model {config.model} and recipe "
            f"{config.recipe} here ({type(exc).__name__}: {first}); run without "
            f"{'these flags' if len(flags) > 1 else 'it'}"
        ) from None
    finally:
        model.train()
        raw_model.zero_grad(set_to_none=True)
        raw_model.load_state_dict(saved_model)
        load_sparse_state_(raw_model, saved_sparse)
        ckpt.restore_rng(saved_rng)


def image_data_options(config: TrainConfig) -> dict[str, Any]:
    """The keyword arguments of the image dataset builders (classification, detection)."""
    return {
        "image_size": config.image_size,
        "synthetic_train": config.synthetic_train,
        "synthetic_test": config.synthetic_test,
        "synthetic_classes": config.synthetic_classes,
        "seed": config.seed,
    }
