"""The training loop behind ``fullsparse train``: :func:`train` runs a :class:`TrainConfig`.

One code path for every setting: single process or ``torchrun`` (DDP), CPU or CUDA, fp32 or
autocast, eager or compiled. A run folder holds::

    config.json     the resolved TrainConfig (``--config`` reads it back)
    train.log       everything printed, plus the sparsify report
    metrics.jsonl   one JSON object per epoch
    last.pt         checkpoint after the latest epoch (atomic), best.pt: best test top-1
    summary.json    the run's outcome (also :func:`train`'s return value)
    curves.png      loss/accuracy/lr curves (when matplotlib is installed)

Optimisation follows the paper (§7.1): SGD with momentum 0.9, lr 0.1 × batch/256, cosine
decay to 0 per step after an optional linear warm-up, weight decay 7e-5, label smoothing 0.1.

``task="lm"`` runs are handed to :mod:`fullsparse.train.lm` and ``task="detection"`` runs to
:mod:`fullsparse.train.detection`; both reuse the pieces here (run folder, log, checkpoints,
optimiser, schedule) around their own data and metrics.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import platform
import random
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TextIO

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fullsparse.errors import CheckpointError, ConfigError, UserError
from fullsparse.train import checkpoint as ckpt
from fullsparse.train.config import TrainConfig
from fullsparse.train.distributed import (
    DistInfo,
    all_reduce_sum,
    any_rank,
    barrier,
    broadcast_buffers,
    init_distributed,
    shutdown_distributed,
)
from fullsparse.train.plot import MATPLOTLIB_HINT, plot_curves
from fullsparse.train.progress import ProgressBar

__all__ = [
    "train",
    "evaluate",
    "NonFiniteLossError",
    "RESULT_FILES",
    "resolve_device",
    "build_data",
    "build_sparse_model",
    "build_optimizer",
    "model_identity",
]

#: Files a run writes into its folder; ``force`` removes exactly these (never the folder).
RESULT_FILES = (
    "config.json",
    "train.log",
    "metrics.jsonl",
    "last.pt",
    "best.pt",
    "summary.json",
    "curves.png",
)
#: Config fields that may change between a run and its resume without changing the maths.
_RUN_CONTROL = (
    "resume", "force", "out", "stop_after", "checkpoint_every", "progress", "quiet", "plot",
    "workers",
)  # fmt: skip


class NonFiniteLossError(UserError):
    """The loss or a gradient became NaN/Inf; the message names the step and the first bad
    layer (the name predates the gradient check)."""


# ---------------------------------------------------------------------------------------
# Building blocks (also used by eval/export)


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


def build_data(config: TrainConfig) -> Any:
    """The DatasetBundle of ``config`` (missing data raises DataNotFoundError)."""
    from fullsparse.data import DATASETS, build_datasets

    if config.dataset not in DATASETS:
        raise ConfigError(
            f"unknown dataset {config.dataset!r}; choose one of {', '.join(DATASETS)}"
        )
    return build_datasets(
        config.dataset,
        config.data_dir,
        image_size=config.image_size,
        synthetic_train=config.synthetic_train,
        synthetic_test=config.synthetic_test,
        synthetic_classes=config.synthetic_classes,
        seed=config.seed,
    )


def _check_model_name(name: str) -> None:
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
    }


def build_sparse_model(identity: dict[str, Any]) -> tuple[nn.Module, Any]:
    """Build the model an identity describes and sparsify it; returns (model, report)."""
    from fullsparse.config import SparsityConfig
    from fullsparse.models import build_lm_model, build_model
    from fullsparse.nn import sparsify_

    if identity.get("task") == "detection":
        from fullsparse.train.detection import build_sparse_detector

        return build_sparse_detector(identity)
    if identity.get("task") == "lm":
        model = build_lm_model(
            identity["model"], identity["vocab_size"], **identity["model_kwargs"]
        )
    else:
        model = build_model(
            identity["model"],
            identity["num_classes"],
            in_channels=identity["in_channels"],
            image_size=identity["image_size"],
            **identity["model_kwargs"],
        )
    report = sparsify_(model, SparsityConfig(**identity["sparsity"]))
    return model, report


def _build_model(identity: dict[str, Any]) -> tuple[nn.Module, Any]:
    # One seam for tests (e.g. to inject a NaN into a layer); train() calls only this.
    return build_sparse_model(identity)


def _subset(dataset: Any, n: int | None, seed: int, *, random_pick: bool) -> Any:
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


def _to_device(x: Tensor, y: Tensor, device: torch.device, channels_last: bool) -> tuple:
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


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
            x, y = _to_device(x, y, device, channels_last)
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


# ---------------------------------------------------------------------------------------
# Logging: stdout (rank 0, unless quiet) and the run folder's train.log


class _RunLog:
    def __init__(self, enabled: bool, quiet: bool) -> None:
        self.enabled = enabled
        self.quiet = quiet
        self.file: TextIO | None = None
        self._pending: list[str] = []

    def open(self, path: Path, append: bool) -> None:
        if not self.enabled:
            return
        self.file = open(path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115
        for line in self._pending:
            self.file.write(line + "\n")
        self._pending.clear()
        self.file.flush()

    def info(self, message: str, *, console: bool = True) -> None:
        if not self.enabled:
            return
        if console and not self.quiet:
            print(message, flush=True)
        stamped = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        for line in stamped.splitlines() if "\n" in message else [stamped]:
            if self.file is not None:
                self.file.write(line + "\n")
            else:
                self._pending.append(line)
        if self.file is not None:
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


# ---------------------------------------------------------------------------------------
# Optimiser and schedule


def _param_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
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
    groups = _param_groups(model, config)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.peak_lr, betas=(config.momentum, 0.95))
    return torch.optim.SGD(groups, lr=config.peak_lr, momentum=config.momentum)


def clip_gradients(model: nn.Module, config: TrainConfig) -> float | None:
    """Clip the global gradient norm to ``config.grad_clip`` (0: off); returns the norm
    before clipping, or None when clipping is off."""
    if not config.grad_clip:
        return None
    return float(nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip))


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based): linear warm-up to 1
    over ``warmup_steps``, then cosine from 1 down to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------
# Non-finite loss diagnosis


def _diagnose_nonfinite(
    model: nn.Module, x: Tensor, y: Tensor, loss_fn: Callable, amp_ctx: Any, distributed: bool
) -> str:
    """Where non-finite values first appear: the weights, else the first layer (in call
    order) whose output is non-finite, else the first parameter with a non-finite gradient.

    Runs ``model`` (unwrapped: no DDP/compile) once more on the failing batch; the run is
    stopping, so the extra forward's side effects (BN statistics) do not matter.
    """
    bad_weights = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad_weights:
        more = f" (+{len(bad_weights) - 1} more)" if len(bad_weights) > 1 else ""
        return f"non-finite weights in {bad_weights[0]}{more}"
    found: list[str] = []

    def make_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if found or not isinstance(output, Tensor) or not output.is_floating_point():
                return
            if not torch.isfinite(output.detach()).all():
                found.append(f"{name} ({type(module).__name__})")

        return hook

    hooks = [
        module.register_forward_hook(make_hook(name))
        for name, module in model.named_modules()
        if name and not list(module.children())  # leaves; the hooks see them in call order
    ]
    loss = None
    try:
        model.zero_grad(set_to_none=True)
        with amp_ctx:
            loss = loss_fn(model(x), y)
    except Exception:  # diagnosis is best effort; the caller still reports the step
        pass
    finally:
        for h in hooks:
            h.remove()
    if found:
        return f"first non-finite activation: output of {found[0]}"
    if loss is None or distributed:  # a backward outside DDP's forward confuses its reducer
        return ""
    try:
        loss.backward()
    except Exception:
        return ""
    for name, p in model.named_parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            return f"first non-finite gradient: {name}"
    return ""


def _first_nonfinite_gradient(model: nn.Module) -> str:
    """``""`` when every gradient of ``model`` is finite; else where the first non-finite
    one is, in backward order (the reverse of registration order): the layer nearest the
    loss, where the NaN/Inf most likely arose before flowing into earlier layers.

    One fused norm per step and one host sync; the per-parameter scan runs only when that
    norm is not finite (a huge but finite gradient can overflow the norm: the scan then
    finds nothing and the step goes on).
    """
    named = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
    if not named:
        return ""
    grads = [g for _, g in named]
    try:
        norms = torch._foreach_norm(grads)  # what clip_grad_norm_ uses: few kernels
    except (AttributeError, RuntimeError):
        norms = [torch.linalg.vector_norm(g) for g in grads]
    if bool(torch.isfinite(torch.stack([n.float() for n in norms])).all()):
        return ""
    bad = [name for name, g in reversed(named) if not bool(torch.isfinite(g).all())]
    if not bad:
        return ""
    layer, _, param = bad[0].rpartition(".")
    kind = type(model.get_submodule(layer)).__name__
    return (
        f"first non-finite gradient (backward order): {layer or '<model>'} ({kind}) {param}; "
        f"{len(bad)} of {len(named)} gradients non-finite"
    )


# ---------------------------------------------------------------------------------------
# The run


@dataclass
class _State:
    epoch: int = 0  # completed epochs
    history: list[dict[str, Any]] = field(default_factory=list)
    best_top1: float = -1.0
    best_epoch: int = 0
    skipped_steps: int = 0
    #: Steps done in epoch ``epoch`` (a mid-epoch checkpoint, --checkpoint-every) and the
    #: epoch's running sums up to there (summed over ranks).
    step: int = 0
    partial: dict[str, float] = field(default_factory=dict)


class _StepGuard:
    """The non-finite handling every training loop shares (classification, LM, detection).

    One instance per epoch. Each step calls :meth:`snapshot` before its forward, then
    :meth:`backward`, which returns ``""``, ``"loss"`` or ``"gradient"``. On a problem the
    step either :meth:`skip` s (``--skip-nonfinite``: buffers restored, schedule advanced)
    or :meth:`fail` s with one line naming the step, the cause and the checkpoint kept;
    otherwise :meth:`step` clips, applies the optimizer and advances the schedule.

    Every rank agrees on a problem before acting (``any_rank``), so none waits in DDP's
    gradient all-reduce for a rank that skipped.
    """

    def __init__(
        self,
        raw_model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        scaler: Any,
        config: TrainConfig,
        dist_info: DistInfo,
        device: torch.device,
        run: _State,
        log: _RunLog,
        epoch: int,
        steps: int,
    ) -> None:
        self.raw_model, self.optimizer, self.scheduler = raw_model, optimizer, scheduler
        self.scaler, self.config, self.dist_info, self.device = scaler, config, dist_info, device
        self.run, self.log, self.epoch, self.steps = run, log, epoch, steps
        self.skipped = 0
        self.bad_grad = ""
        self.norm_sum, self.norms = 0.0, 0  # pre-clip gradient norms of the steps taken
        # Only --skip-nonfinite needs the buffers; the list is the same for every step.
        self._buffers = list(raw_model.buffers()) if config.skip_nonfinite else []
        self._saved: list[Tensor] = []

    def snapshot(self) -> None:
        """Keep the buffers (BatchNorm statistics, the TSM clock): a bad forward has
        already moved them, and skipping the step must undo that too."""
        if self._buffers:
            self._saved = [b.detach().clone() for b in self._buffers]

    def backward(self, loss: Tensor, value: float) -> str:
        """Check the loss (``value``, already on the host), run backward, check the
        gradients. fp16's GradScaler skips inf/NaN gradients itself, so with a scaler only
        the loss is checked."""
        self.bad_grad = ""
        if any_rank(not math.isfinite(value), self.dist_info, self.device):
            return "loss"
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            return ""
        loss.backward()
        self.bad_grad = _first_nonfinite_gradient(self.raw_model)
        return "gradient" if any_rank(bool(self.bad_grad), self.dist_info, self.device) else ""

    def where(self, step: int) -> str:
        global_step = self.epoch * self.steps + step + 1
        return f"epoch {self.epoch + 1} step {step + 1}/{self.steps} (global step {global_step})"

    def skip(self, problem: str, step: int) -> bool:
        """Skip the step when ``--skip-nonfinite`` is on (and say so); False otherwise."""
        if not self.config.skip_nonfinite:
            return False
        with torch.no_grad():
            for b, v in zip(self._buffers, self._saved, strict=True):
                b.copy_(v)
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # A skipped step still uses up its place in the schedule, on purpose; when it
            # is the run's first step PyTorch warns that the optimizer has not stepped yet.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step")
            self.scheduler.step()
        self.skipped += 1
        self.run.skipped_steps += 1
        where = self.where(step)
        self.log.info(f"non-finite {problem} at {where}: step skipped (--skip-nonfinite)")
        return True

    def resolve(
        self, problem: str, step: int, value: float, loss_detail: Callable[[], str]
    ) -> None:
        """Skip the bad step (``--skip-nonfinite``) or raise (see :meth:`fail`)."""
        if not self.skip(problem, step):
            self.fail(problem, step, value, loss_detail)

    def fail(
        self, problem: str, step: int, value: float, loss_detail: Callable[[], str]
    ) -> NoReturn:
        """Raise :class:`NonFiniteLossError`. ``loss_detail`` says where a non-finite loss
        came from (called only for one: it may run the model again)."""
        where = self.where(step)
        if problem == "loss":
            head, detail = f"non-finite loss ({value}) at {where}", loss_detail()
        else:
            head = f"non-finite gradient at {where} (the loss, {value:.4g}, is finite)"
            detail = self.bad_grad or "in another process"
        # last.pt holds (run.epoch, run.step): an epoch end, or a --checkpoint-every step
        step = getattr(self.run, "step", 0)
        epoch = self.run.epoch
        at = f"after epoch {epoch + 1} step {step}" if step else f"epoch {epoch}"
        kept = (
            f"the last good checkpoint {self.config.run_dir / 'last.pt'} ({at}) is untouched"
            if self.run.epoch > 0 or step
            else "no checkpoint was written"
        )
        amp = ", try without --amp," if self.config.amp != "none" else ""
        raise NonFiniteLossError(
            head
            + (f"; {detail}" if detail else "")
            + f"; {kept}; lower --lr{amp} or pass --skip-nonfinite"
        )

    def step(self) -> float | None:
        """Clip, step the optimizer and the schedule; the pre-clip norm (None: no clip)."""
        if self.scaler is not None:
            if self.config.grad_clip:
                self.scaler.unscale_(self.optimizer)  # clip the true gradients
            norm = clip_gradients(self.raw_model, self.config)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            norm = clip_gradients(self.raw_model, self.config)
            self.optimizer.step()
        self.scheduler.step()
        if norm is not None and math.isfinite(norm):
            self.norm_sum += norm
            self.norms += 1
        return norm

    @property
    def mean_norm(self) -> float | None:
        """Mean pre-clip gradient norm of the steps taken (None without --grad-clip)."""
        return self.norm_sum / self.norms if self.norms else None


def _diagnosis(
    raw_model: nn.Module, x: Tensor, y: Tensor, loss_fn: Callable, amp_ctx: Callable, dist: Any
) -> Callable[[], str]:
    """Where a non-finite loss came from, worked out only when called (it reruns the model)."""
    return functools.partial(
        _diagnose_nonfinite, raw_model, x, y, loss_fn, amp_ctx(), distributed=dist.enabled
    )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed(seed % 2**32)


def _check_run_dir(config: TrainConfig) -> Path | None:
    """Refuse to touch an existing run's results unless resuming or forced; returns the
    checkpoint to resume from (or None)."""
    run_dir = config.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} exists and is not a folder")
    existing = [f for f in RESULT_FILES if (run_dir / f).exists()]
    if config.resume:
        path = run_dir / "last.pt" if config.resume is True else Path(config.resume)
        if not path.is_file():
            raise CheckpointError(f"nothing to resume: checkpoint {path} does not exist")
        own = run_dir / "last.pt"
        if existing and not (own.exists() and own.resolve() == path.resolve()):
            raise UserError(
                f"run folder {run_dir} already holds another run ({', '.join(existing)}); "
                f"resume {path} into a new --out folder"
            )
        return path
    if existing and not config.force:
        raise UserError(
            f"run folder {run_dir} already holds a run ({', '.join(existing)}); "
            "pass --resume to continue it, --force to replace it, or --out for a new folder"
        )
    return None


def _probe_step(
    model: nn.Module,
    raw_model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: Callable,
    amp_ctx_fn: Callable,
    config: TrainConfig,
) -> None:
    """One forward+backward (train mode) and one forward (eval mode) on a real batch, then
    every bit of state restored: flags like --compile/--amp/--channels-last fail here, with
    a clear message, instead of part-way through an epoch."""
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
            ("--deterministic", config.deterministic and x.device.type == "cuda"),
        )
        if on
    ]
    try:
        model.train()
        with amp_ctx_fn():
            loss = loss_fn(model(x), y)
        loss.backward()
        model.eval()
        with torch.no_grad(), amp_ctx_fn():
            model(x)
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


def _probe_batch(dataset: Any, n: int) -> tuple[Tensor, Tensor]:
    n = max(1, min(n, len(dataset)))
    xs, ys = zip(*(dataset[i] for i in range(n)), strict=True)
    return torch.stack(xs), torch.as_tensor(ys, dtype=torch.int64)


def _check_capabilities(config: TrainConfig, device: torch.device) -> None:
    if config.amp == "fp16" and device.type != "cuda":
        raise ConfigError(
            "--amp fp16 needs CUDA (float16 training needs a GradScaler and fast fp16 "
            "kernels); on CPU use --amp bf16"
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


def _config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in keys
        if k not in _RUN_CONTROL and old.get(k) != new.get(k)
    ]


def _write_json(path: Path, obj: Any) -> None:
    ckpt.atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def _write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(h) + "\n" for h in history)
    ckpt.atomic_write_bytes(path, text.encode())


# ---------------------------------------------------------------------------------------
# Run plumbing shared by every task (classify here, lm and detection in their modules)


def _restore_run(
    state: dict[str, Any],
    resume_from: Path | None,
    raw_model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    run: Any,
    best_key: str,
    best_default: float,
) -> None:
    """Load a checkpoint's model, masks, optimiser and schedule, then the run's counters.

    The RNG state is restored last: nothing after this call may draw random numbers
    before the first step, or a resumed run would differ from an uninterrupted one.
    """
    from fullsparse.nn import load_sparse_state_

    try:
        raw_model.load_state_dict(state["model"])
        load_sparse_state_(raw_model, state["sparse_state"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise CheckpointError(
            f"checkpoint {resume_from} does not fit this run: {type(exc).__name__}: {first}"
        ) from None
    run.epoch = int(state["epoch"])
    run.history = list(state.get("history", []))
    setattr(run, best_key, float(state.get(best_key, best_default)))
    run.best_epoch = int(state.get("best_epoch", 0))
    run.skipped_steps = int(state.get("skipped_steps", 0))
    if state.get("step"):  # a mid-epoch checkpoint (classify's --checkpoint-every)
        run.step = int(state["step"])
        run.partial = {k: float(v) for k, v in state.get("partial", {}).items()}
    ckpt.restore_rng(state["rng"])


def _wrap_model(
    raw_model: nn.Module, world: int, device: torch.device, compile_model: bool
) -> nn.Module:
    """DDP over ``world`` > 1 processes, then ``torch.compile`` if asked."""
    model = raw_model
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            raw_model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if compile_model:
        model = torch.compile(model)
    return model


def _open_run_folder(
    config: TrainConfig, log: _RunLog, state: dict[str, Any] | None, run: Any, dist_info: DistInfo
) -> None:
    """Create (or reopen) the run folder on rank 0 once setup has succeeded; all ranks wait."""
    run_dir = config.run_dir
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if config.force:
            for name in RESULT_FILES:
                (run_dir / name).unlink(missing_ok=True)
        ckpt.remove_stale_temp_files(run_dir, RESULT_FILES)
        log.open(run_dir / "train.log", append=state is not None)
        _write_json(run_dir / "config.json", config.to_dict())
        if state is not None:
            _write_metrics(run_dir / "metrics.jsonl", run.history)
    barrier(dist_info)


def _log_resume(
    log: _RunLog,
    config: TrainConfig,
    state: dict[str, Any] | None,
    resume_from: Path | None,
    epoch: int,
) -> None:
    """Say where a resumed run continues from and what changed since its checkpoint."""
    if state is None:
        return
    diffs = _config_differences(state["config"], config.to_dict())
    step = int(state.get("step", 0))
    where = f"at epoch {epoch + 1} step {step + 1}" if step else f"after epoch {epoch}"
    log.info(f"resumed from {resume_from} {where}")
    if diffs:
        log.info(f"config changed since the checkpoint: {'; '.join(diffs)}")
    threads = state.get("threads")
    if config.deterministic and threads is not None and threads != torch.get_num_threads():
        log.info(
            f"note: the checkpoint was written with {threads} CPU threads, this process "
            f"uses {torch.get_num_threads()}; float sums depend on it, so the resumed run "
            "is not bit-identical to an uninterrupted one (set OMP_NUM_THREADS to match)"
        )


def _save_epoch(
    config: TrainConfig,
    identity: dict[str, Any],
    run: Any,
    metrics: dict[str, Any],
    raw_model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    best_key: str,
    is_best: bool,
    **extra: Any,
) -> None:
    """Append the epoch's metrics line, write ``last.pt`` atomically, copy it to ``best.pt``."""
    run_dir = config.run_dir
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(metrics) + "\n")
    _save_last(config, identity, run, raw_model, optimizer, scheduler, scaler, best_key, **extra)
    if is_best:
        ckpt.copy_checkpoint(run_dir / "last.pt", run_dir / "best.pt")


def _save_last(
    config: TrainConfig,
    identity: dict[str, Any],
    run: Any,
    raw_model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    best_key: str,
    **extra: Any,
) -> None:
    """Write ``last.pt`` atomically: everything a resume needs, at an epoch end or (with
    ``run.step`` > 0) inside epoch ``run.epoch``."""
    from fullsparse.nn import sparse_state_dict

    ckpt.save_checkpoint(
        config.run_dir / "last.pt",
        {
            "identity": identity,
            "config": config.to_dict(),
            "epoch": run.epoch,
            "loader_epoch": run.epoch,
            "step": getattr(run, "step", 0),
            "partial": dict(getattr(run, "partial", {})),
            "model": raw_model.state_dict(),
            "sparse_state": sparse_state_dict(raw_model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": ckpt.capture_rng(),
            "history": run.history,
            best_key: getattr(run, best_key),
            "best_epoch": run.best_epoch,
            "skipped_steps": run.skipped_steps,
            **extra,
            "torch_version": str(torch.__version__),
            "threads": torch.get_num_threads(),
        },
    )


def train(config: TrainConfig) -> dict[str, Any]:
    """Train ``config.model`` on ``config.dataset`` with ``config.recipe``; return the summary.

    Writes the run folder (see the module docstring) on rank 0. Under ``torchrun`` every
    rank calls this; each gets the same summary.

    Raises:
        UserError (and its subclasses ConfigError, DataNotFoundError, CheckpointError,
        NonFiniteLossError): a problem the user can fix; nothing was overwritten.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"train() needs a TrainConfig, got {type(config).__name__}")
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    device = resolve_device(config.device, int(os.environ.get("LOCAL_RANK", "0") or 0))
    _check_capabilities(config, device)
    if config.deterministic and device.type == "cuda":
        # cuBLAS needs this before its first call to be deterministic.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    dist_info = init_distributed(device.type)
    log = _RunLog(enabled=dist_info.is_main, quiet=config.quiet)
    finished = False
    try:
        if config.task == "lm":
            from fullsparse.train.lm import train_lm

            summary = train_lm(config, device, dist_info, log)
        elif config.task == "detection":
            from fullsparse.train.detection import train_detection

            summary = train_detection(config, device, dist_info, log)
        else:
            summary = _train(config, device, dist_info, log)
        finished = True
        return summary
    finally:
        log.close()
        torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)
        shutdown_distributed(dist_info, synchronize=finished)


def _train(config: TrainConfig, device: torch.device, dist_info: DistInfo, log: _RunLog) -> dict:
    from fullsparse.data import make_loader

    world = dist_info.world_size
    if config.batch_size % world:
        raise ConfigError(
            f"batch_size={config.batch_size} is the global batch and must divide evenly over "
            f"{world} processes"
        )
    local_batch = config.batch_size // world
    if config.sync_bn and world > 1 and device.type != "cuda":
        raise ConfigError(
            "--sync-bn needs CUDA: torch's SyncBatchNorm runs on GPUs only; on CPU train "
            "without it (per-rank batch statistics) or use a model without BatchNorm"
        )
    run_dir = config.run_dir

    # -- setup: everything that can fail on bad input happens before a file is written ----
    error: BaseException | None = None
    resume_from = state = identity = None
    model = report = bundle = None
    try:
        resume_from = _check_run_dir(config) if dist_info.is_main else None
        _seed_everything(config.seed)
        if config.deterministic:
            torch.use_deterministic_algorithms(True)
        _check_model_name(config.model)  # before loading data: a typo fails in no time
        bundle = build_data(config)
        identity = model_identity(config, bundle)
        model, report = _build_model(identity)
        if config.resume:
            path = run_dir / "last.pt" if config.resume is True else Path(config.resume)
            state = ckpt.load_checkpoint(path)
            ckpt.check_identity(path, state["identity"], identity)
            resume_from = path
    except Exception as exc:  # synchronised below so no rank waits for a failed one
        error = exc
    if any_rank(error is not None, dist_info, device):
        if error is not None:
            raise error
        raise UserError("another process of this distributed run failed during setup")
    assert model is not None and bundle is not None and identity is not None

    train_set = _subset(bundle.train, config.train_subset, config.seed, random_pick=True)
    test_set = _subset(bundle.test, config.test_subset, config.seed, random_pick=False)
    train_loader = make_loader(
        train_set,
        local_batch,
        train=True,
        seed=config.seed,
        rank=dist_info.rank,
        world_size=world,
        workers=config.workers,
    )
    test_loader = make_loader(
        test_set,
        local_batch,
        train=False,
        seed=config.seed,
        rank=dist_info.rank,
        world_size=world,
        workers=config.workers,
    )
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ConfigError(
            f"batch_size={config.batch_size} is larger than the {len(train_set)} training "
            "images: no full batch per epoch"
        )

    # -- model, optimiser, schedule ---------------------------------------------------------
    raw_model = model
    if config.sync_bn and world > 1:
        raw_model = nn.SyncBatchNorm.convert_sync_batchnorm(raw_model)
    raw_model.to(device)
    if config.channels_last:
        raw_model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(raw_model, config)
    total_steps = config.epochs * steps_per_epoch
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps)
    )
    scaler = torch.amp.GradScaler("cuda") if config.amp == "fp16" else None
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

    def loss_fn(logits: Tensor, y: Tensor) -> Tensor:
        return criterion(logits.float(), y)

    run = _State()
    if state is not None:
        _restore_run(
            state, resume_from, raw_model, optimizer, scheduler, scaler, run, "best_top1", -1.0
        )

    model = _wrap_model(raw_model, world, device, config.compile)

    def amp_ctx() -> contextlib.AbstractContextManager[Any]:
        return autocast(device, config.amp)

    # Evaluation needs no gradient sync, and under DDP the ranks' last test batches may
    # differ in number: DDP's per-forward buffer broadcast would then wait forever.
    eval_model = model if world == 1 else raw_model
    if config.compile:
        log.info("torch.compile: the first steps compile the model (minutes on a CPU)")
    # CUDA has ops without deterministic kernels: find out now, not mid-epoch.
    deterministic_cuda = config.deterministic and device.type == "cuda"
    if config.compile or config.amp != "none" or config.channels_last or deterministic_cuda:
        px, py = _probe_batch(train_set, local_batch)
        px, py = _to_device(px, py, device, config.channels_last)
        error = None
        try:
            _probe_step(model, raw_model, px, py, loss_fn, amp_ctx, config)
        except UserError as exc:
            error = exc
        if any_rank(error is not None, dist_info, device):
            raise error or UserError("another process failed its first training step")

    # -- the run folder: written only now that everything is known to work --------------------
    _open_run_folder(config, log, state, run, dist_info)

    n_sparse = len([r for r in report.rows if r.sparse]) if report is not None else 0
    n_layers = len(report.rows) if report is not None else 0
    log.info(
        f"fullsparse train: {config.model} on {config.dataset}, recipe {config.recipe!r} on "
        f"{n_sparse} of {n_layers} layers, {len(train_set)} train / {len(test_set)} test images"
    )
    log.info(str(report), console=False)
    log.info(
        f"device {device} x{world}, global batch {config.batch_size}, lr {config.peak_lr:g}, "
        f"{config.epochs} epochs of {steps_per_epoch} steps, amp {config.amp}"
        + (", channels-last" if config.channels_last else "")
        + (", compiled" if config.compile else "")
        + (", deterministic" if config.deterministic else "")
    )
    log.info(f"run folder: {run_dir}")
    _log_resume(log, config, state, resume_from, run.epoch)

    # -- epochs -------------------------------------------------------------------------
    def save_step() -> None:  # --checkpoint-every: last.pt inside an epoch
        _save_last(
            config, identity, run, raw_model, optimizer, scheduler, scaler, "best_top1",
            mean=list(bundle.mean), std=list(bundle.std),
        )  # fmt: skip

    last_epoch = config.stop_after if config.stop_after is not None else config.epochs
    status = "completed"
    for epoch in range(run.epoch, config.epochs):
        if epoch >= last_epoch:
            status = f"stopped after epoch {run.epoch} of {config.epochs} (stop_after)"
            break
        metrics = _train_epoch(
            model,
            raw_model,
            train_loader,
            optimizer,
            scheduler,
            scaler,
            loss_fn,
            amp_ctx,
            device,
            dist_info,
            config,
            epoch,
            run,
            log,
            save_step,
        )
        run.step, run.partial = 0, {}
        broadcast_buffers(raw_model, dist_info)
        test = evaluate(
            eval_model,
            test_loader,
            device,
            amp=config.amp,
            channels_last=config.channels_last,
            dist_info=dist_info,
        )
        metrics.update(test_loss=test["loss"], test_top1=test["top1"], test_top5=test["top5"])
        metrics["eval_seconds"] = time.perf_counter() - metrics.pop("_eval_start")
        run.epoch = epoch + 1
        run.history.append(metrics)
        is_best = test["top1"] > run.best_top1
        if is_best:
            run.best_top1, run.best_epoch = test["top1"], epoch + 1
        log.info(
            f"epoch {epoch + 1}/{config.epochs}: train loss {metrics['train_loss']:.4f} "
            f"acc {metrics['train_acc']:.2f}% | test top-1 {test['top1']:.2f}% "
            f"top-5 {test['top5']:.2f}% | lr {metrics['lr']:.4g} | "
            f"{metrics['epoch_seconds']:.1f} s ({metrics['images_per_second']:.0f} img/s)"
        )
        if dist_info.is_main:
            _save_epoch(
                config, identity, run, metrics, raw_model, optimizer, scheduler, scaler,
                "best_top1", is_best, mean=list(bundle.mean), std=list(bundle.std),
            )  # fmt: skip
        barrier(dist_info)

    summary = _summary(config, identity, run, status, device, world, n_sparse)
    if dist_info.is_main:
        _write_json(run_dir / "summary.json", summary)
        if config.plot and run.history:
            title = f"{config.model} / {config.dataset} / {config.recipe}"
            try:
                drawn = plot_curves(run.history, run_dir / "curves.png", title=title)
            except Exception as exc:  # a plotting problem must not fail a finished run
                log.info(f"curves.png failed ({type(exc).__name__}: {exc}); results are intact")
            else:
                if drawn:
                    log.info(f"curves: {run_dir / 'curves.png'}", console=False)
                else:
                    log.info(f"curves.png skipped: matplotlib is not installed; {MATPLOTLIB_HINT}")
        log.info(
            f"{status}: best test top-1 {summary['best_top1']:.2f}% (epoch "
            f"{summary['best_epoch']}), final {summary['final_top1']:.2f}%, "
            f"{summary['seconds_per_epoch']:.1f} s/epoch"
        )
        log.info(f"results in {run_dir}/: summary.json, metrics.jsonl, last.pt, best.pt, train.log")
    return summary


def _train_epoch(
    model: nn.Module,
    raw_model: nn.Module,
    loader: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    loss_fn: Callable,
    amp_ctx: Callable,
    device: torch.device,
    dist_info: DistInfo,
    config: TrainConfig,
    epoch: int,
    run: _State,
    log: _RunLog,
    save_step: Callable[[], None] | None = None,
) -> dict[str, Any]:
    # A resumed mid-epoch checkpoint continues at step run.step with the epoch's sums so far
    # (summed over ranks: rank 0 carries them, so the final all-reduce counts them once).
    first = run.step
    prior = run.partial if first else {}
    loader.set_epoch(epoch, first)
    model.train()
    steps = len(loader)
    bar = ProgressBar(
        steps - first,
        f"epoch {epoch + 1}/{config.epochs}",
        enabled=config.progress and not config.quiet and dist_info.is_main,
    )
    guard = _StepGuard(
        raw_model, optimizer, scheduler, scaler, config, dist_info, device, run, log, epoch, steps
    )
    guard.skipped = int(prior.get("skipped", 0))
    guard.norm_sum, guard.norms = prior.get("norm_sum", 0.0), int(prior.get("norms", 0))
    summed = prior if dist_info.is_main else {}
    loss_sum, correct, images = (summed.get(k, 0.0) for k in ("loss_sum", "correct", "images"))
    before = prior.get("seconds", 0.0)
    start = time.perf_counter()
    with bar:
        for step, (xb, yb) in enumerate(loader, start=first):
            x, y = _to_device(xb, yb, device, config.channels_last)
            guard.snapshot()
            with amp_ctx():
                logits = model(x)
                loss = loss_fn(logits, y)
            stats = torch.stack(
                [loss.detach().float(), (logits.argmax(1) == y).sum().float()]
            ).tolist()
            problem = guard.backward(loss, stats[0])
            if problem:
                diagnosis = _diagnosis(raw_model, x, y, loss_fn, amp_ctx, dist_info)
                guard.resolve(problem, step, stats[0], diagnosis)
                continue
            guard.step()
            n = y.numel()
            loss_sum += stats[0] * n
            correct += stats[1]
            images += n
            bar.update(n, stats[0], int(stats[1]))
            due = config.checkpoint_every and (step + 1) % config.checkpoint_every == 0
            if save_step is not None and due and step + 1 < steps:
                total = all_reduce_sum([loss_sum, correct, images], dist_info, device)
                run.step = step + 1
                run.partial = {
                    "loss_sum": total[0],
                    "correct": total[1],
                    "images": total[2],
                    "norm_sum": guard.norm_sum,
                    "norms": guard.norms,
                    "skipped": guard.skipped,
                    "seconds": before + time.perf_counter() - start,
                }
                if dist_info.is_main:
                    save_step()
                    log.info(f"checkpoint: {guard.where(step)}", console=False)
    seconds = before + time.perf_counter() - start
    loss_sum, correct, images = all_reduce_sum([loss_sum, correct, images], dist_info, device)
    return {
        "epoch": epoch + 1,
        "train_loss": loss_sum / images if images else float("nan"),
        "train_acc": 100.0 * correct / images if images else 0.0,
        "lr": optimizer.param_groups[0]["lr"],
        # mean global gradient norm before clipping (None without --grad-clip)
        "grad_norm": guard.mean_norm,
        "epoch_seconds": seconds,
        "images_per_second": images / seconds if seconds > 0 else 0.0,
        "train_images": int(images),
        "skipped_steps": guard.skipped,
        "_eval_start": time.perf_counter(),
    }


def _summary_fields(
    config: TrainConfig,
    identity: dict[str, Any],
    run: _State,
    status: str,
    device: torch.device,
    scores: dict[str, Any],
    *,
    rate: tuple[str, str],
    extra: dict[str, Any],
) -> dict[str, Any]:
    """The ``summary.json`` of any task: what ran and how it ended, then ``scores`` (the
    task's own), timing (``rate`` = (summary key, per-epoch count key), e.g. images per
    second from ``train_images``), then ``extra`` and the environment."""
    history = run.history
    seconds = [h["epoch_seconds"] for h in history]
    nan = float("nan")
    rate_key, count_key = rate
    return {
        "status": status,
        "task": config.task,
        "recipe": config.recipe,
        "model": config.model,
        "dataset": config.dataset,
        "seed": config.seed,
        "epochs": config.epochs,
        "epochs_done": run.epoch,
        **scores,
        "seconds_per_epoch": sum(seconds) / len(seconds) if seconds else nan,
        "epoch_seconds": seconds,
        rate_key: sum(h[count_key] for h in history) / sum(seconds) if seconds else nan,
        "skipped_steps": run.skipped_steps,
        **extra,
        "sparsity": identity["sparsity"],
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": str(torch.__version__),
        "python": platform.python_version(),
        "run_dir": str(config.run_dir),
        "config": config.to_dict(),
    }


def _summary(
    config: TrainConfig,
    identity: dict[str, Any],
    run: _State,
    status: str,
    device: torch.device,
    world: int,
    n_sparse: int,
) -> dict[str, Any]:
    history = run.history
    nan = float("nan")
    final = history[-1] if history else None
    scores = {
        "best_top1": max((h["test_top1"] for h in history), default=nan),
        "best_epoch": run.best_epoch,
        "final_top1": final["test_top1"] if final else nan,
        "final_top5": final["test_top5"] if final else nan,
        "final_train_loss": final["train_loss"] if final else nan,
    }
    extra = {
        "sparse_layers": n_sparse,
        "num_classes": identity["num_classes"],
        "world_size": world,
    }
    return _summary_fields(
        config, identity, run, status, device, scores,
        rate=("images_per_second", "train_images"), extra=extra,
    )  # fmt: skip
