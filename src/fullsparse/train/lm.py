"""The language-model task: ``train(TrainConfig(task="lm"))`` trains a byte-level GPT.

The run folder and its guarantees are the classification loop's (``config.json``,
``train.log``, ``metrics.jsonl``, ``last.pt``/``best.pt``, ``summary.json``, bit-exact
resume with ``deterministic``); what differs is the data and what is measured:

* data: a byte corpus (:mod:`fullsparse.data.text`) with a fixed train/validation split
  by file. Epoch ``e`` draws ``steps_per_epoch`` global batches of random training windows
  of ``context + 1`` bytes from a generator seeded with ``derive_seed(seed, e)``, so a
  resumed run sees the same windows without saving a sampler state. Under DDP rank ``r``
  takes rows ``r, r + world, ...`` of each global batch (the image loader's striding).
* validation: the first ``test_subset`` (default: all) non-overlapping windows of the
  validation stream — the same windows after every epoch and in ``fullsparse eval``.
* metrics: mean next-byte cross-entropy in nats (``val_loss``), perplexity
  ``exp(val_loss)``, bits per byte ``val_loss / ln 2`` (a token is a byte), next-byte
  accuracy, training tokens per second.

``best.pt`` is the epoch with the lowest validation loss.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fullsparse.errors import UserError
from fullsparse.train import checkpoint as ckpt
from fullsparse.train import loop as train_loop
from fullsparse.train.config import TrainConfig
from fullsparse.train.distributed import (
    DistInfo,
    all_reduce_sum,
    any_rank,
    barrier,
)
from fullsparse.train.loop import (
    _check_run_dir,
    _log_resume,
    _open_run_folder,
    _probe_step,
    _restore_run,
    _RunLog,
    _save_epoch,
    _seed_everything,
    _wrap_model,
    _write_json,
    autocast,
    build_optimizer,
    lr_factor,
)
from fullsparse.train.plot import MATPLOTLIB_HINT, plot_lm_curves
from fullsparse.train.progress import ProgressBar

__all__ = [
    "VOCAB_SIZE",
    "train_lm",
    "build_corpus",
    "lm_identity",
    "validation_windows",
    "evaluate_lm",
    "loss_metrics",
]

#: Bytes: every corpus is read as raw bytes, so the vocabulary is fixed.
VOCAB_SIZE = 256


def build_corpus(config: TrainConfig) -> Any:
    """The TextCorpus of ``config`` (``pystdlib`` or the ``text`` folder), capped."""
    from fullsparse.data.text import build_text_corpus

    return build_text_corpus(
        config.data_dir if config.dataset == "text" else None,
        max_train_bytes=config.text_train_bytes,
        max_val_bytes=config.text_val_bytes,
    )


def lm_identity(config: TrainConfig) -> dict[str, Any]:
    """What a checkpoint must agree on to be loaded into this run's model."""
    return {
        "task": "lm",
        "model": config.model,
        "model_kwargs": dict(config.model_kwargs),
        "dataset": config.dataset,
        "vocab_size": VOCAB_SIZE,
        "recipe": config.recipe,
        "sparsity": config.sparsity().to_dict(),
    }


def validation_windows(stream: Tensor, context: int, limit: int | None = None) -> Tensor:
    """The fixed validation set: consecutive non-overlapping windows from the start of
    ``stream``, ``[N, context + 1]`` int64 (inputs ``[:, :-1]``, targets ``[:, 1:]``).

    ``N`` is ``limit`` or as many as fit. Raises UserError when not even one fits.
    """
    fit = (stream.numel() - 1) // context
    if fit < 1:
        raise UserError(
            f"the validation text ({stream.numel()} bytes) is shorter than one window of "
            f"context+1={context + 1} bytes: lower the model's context (--model-kwargs "
            "'{\"context\": 64}'), raise --text-val-bytes, or add validation files"
        )
    n = fit if limit is None else min(limit, fit)
    starts = torch.arange(n) * context
    return stream[starts[:, None] + torch.arange(context + 1)].long()


def loss_metrics(loss: float) -> dict[str, float]:
    """Perplexity ``exp(loss)`` and bits per byte ``loss / ln 2`` of a loss in nats/byte."""
    try:
        perplexity = math.exp(loss)
    except OverflowError:
        perplexity = float("inf")
    return {"perplexity": perplexity, "bits_per_byte": loss / math.log(2)}


@torch.no_grad()
def evaluate_lm(
    model: nn.Module,
    windows: Tensor,
    batch_size: int,
    device: torch.device,
    *,
    amp: str = "none",
    dist_info: DistInfo | None = None,
) -> dict[str, float]:
    """Mean next-byte cross-entropy (nats), perplexity, bits/byte and accuracy (%) of
    ``model`` on ``windows [N, T+1]`` (rank ``r`` of a DDP run takes rows ``r::world``)."""
    dist_info = dist_info or DistInfo()
    was_training = model.training
    model.eval()
    loss_sum = correct = tokens = 0.0
    mine = windows[dist_info.rank :: dist_info.world_size]
    try:
        for chunk in mine.split(batch_size):
            chunk = chunk.to(device)
            x, y = chunk[:, :-1], chunk[:, 1:]  # (B, T) each
            with autocast(device, amp):
                logits = model(x)
            logits = logits.float().flatten(0, 1)  # (B·T, vocab)
            stats = torch.stack(
                [
                    F.cross_entropy(logits, y.flatten(), reduction="sum"),
                    (logits.argmax(-1) == y.flatten()).sum().float(),
                ]
            ).tolist()
            loss_sum += stats[0]
            correct += stats[1]
            tokens += y.numel()
    finally:
        model.train(was_training)
    loss_sum, correct, tokens = all_reduce_sum([loss_sum, correct, tokens], dist_info, device)
    if tokens == 0:
        return {"loss": float("nan"), "perplexity": float("nan"), "bits_per_byte": float("nan"),
                "accuracy": 0.0, "tokens": 0}  # fmt: skip
    loss = loss_sum / tokens
    return {"loss": loss, **loss_metrics(loss), "accuracy": 100.0 * correct / tokens,
            "tokens": int(tokens)}  # fmt: skip


@dataclass
class _State:
    epoch: int = 0  # completed epochs
    history: list[dict[str, Any]] = field(default_factory=list)
    best_val_loss: float = float("inf")
    best_epoch: int = 0
    skipped_steps: int = 0


def _epoch_batches(
    stream: Tensor, config: TrainConfig, epoch: int, context: int, dist_info: DistInfo
) -> list[tuple[Tensor, Tensor]]:
    """This rank's ``(x [b, T], y [b, T])`` for every step of ``epoch`` (b = batch/world)."""
    from fullsparse.data.seeding import generator
    from fullsparse.data.text import lm_batches

    batches = lm_batches(
        stream,
        config.batch_size,
        context,
        generator=generator(config.seed, epoch),
        num_batches=config.steps_per_epoch,
    )
    r, w = dist_info.rank, dist_info.world_size
    return [(x[r::w], y[r::w]) for x, y in batches]


def train_lm(
    config: TrainConfig, device: torch.device, dist_info: DistInfo, log: _RunLog
) -> dict[str, Any]:
    """The lm counterpart of the classification ``_train`` (called by ``train``)."""

    world = dist_info.world_size
    if config.batch_size % world:
        raise UserError(
            f"batch_size={config.batch_size} is the global batch and must divide evenly over "
            f"{world} processes"
        )
    local_batch = config.batch_size // world
    if config.sync_bn or config.channels_last:
        flag = "--sync-bn" if config.sync_bn else "--channels-last"
        raise UserError(f"{flag} is for convolutional image models; drop it for --task lm")
    run_dir = config.run_dir
    assert config.steps_per_epoch is not None  # filled by TrainConfig for lm

    # -- setup: everything that can fail on bad input happens before a file is written ----
    error: BaseException | None = None
    resume_from = state = corpus = model = report = val = None
    identity = lm_identity(config)
    try:
        resume_from = _check_run_dir(config) if dist_info.is_main else None
        _seed_everything(config.seed)
        if config.deterministic:
            torch.use_deterministic_algorithms(True)
        model, report = train_loop._build_model(identity)  # the loop's seam, for tests
        corpus = build_corpus(config)
        context = int(model.context)
        if corpus.train.numel() < context + 1:
            raise UserError(
                f"the training text ({corpus.train.numel()} bytes) is shorter than one window "
                f"of context+1={context + 1} bytes: lower the model's context or add files"
            )
        val = validation_windows(corpus.val, context, config.test_subset)
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
    assert model is not None and corpus is not None and val is not None

    # -- model, optimiser, schedule ---------------------------------------------------------
    raw_model = model.to(device)
    optimizer = build_optimizer(raw_model, config)
    steps_per_epoch = config.steps_per_epoch
    total_steps = config.epochs * steps_per_epoch
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps)
    )
    scaler = torch.amp.GradScaler("cuda") if config.amp == "fp16" else None

    def loss_fn(logits: Tensor, y: Tensor) -> Tensor:
        # logits (B, T, vocab), y (B, T): mean next-byte cross-entropy over all B·T tokens
        return F.cross_entropy(
            logits.float().flatten(0, 1), y.flatten(), label_smoothing=config.label_smoothing
        )

    run = _State()
    if state is not None:
        _restore_run(
            state, resume_from, raw_model, optimizer, scheduler, scaler, run,
            "best_val_loss", float("inf"),
        )  # fmt: skip

    model = _wrap_model(raw_model, world, device, config.compile)

    def amp_ctx() -> contextlib.AbstractContextManager[Any]:
        return autocast(device, config.amp)

    eval_model = model if world == 1 else raw_model
    if config.compile:
        log.info("torch.compile: the first steps compile the model (minutes on a CPU)")
    deterministic_cuda = config.deterministic and device.type == "cuda"
    if config.compile or config.amp != "none" or deterministic_cuda:
        probe = val[: max(1, local_batch)].to(device)
        error = None
        try:
            _probe_step(model, raw_model, probe[:, :-1], probe[:, 1:], loss_fn, amp_ctx, config)
        except UserError as exc:
            error = exc
        if any_rank(error is not None, dist_info, device):
            raise error or UserError("another process failed its first training step")

    # -- the run folder: written only now that everything is known to work --------------------
    _open_run_folder(config, log, state, run, dist_info)

    n_sparse = len([r for r in report.rows if r.sparse]) if report is not None else 0
    n_layers = len(report.rows) if report is not None else 0
    n_params = sum(p.numel() for p in raw_model.parameters())
    val_tokens = val.shape[0] * context
    log.info(
        f"fullsparse train --task lm: {config.model} ({n_params / 1e6:.2f}M parameters, "
        f"context {context}) on {config.dataset} ({corpus.train.numel() / 1e6:.2f} MB train "
        f"from {corpus.files_train} files, {val_tokens} validation bytes in {val.shape[0]} "
        f"windows), recipe {config.recipe!r} on {n_sparse} of {n_layers} layers"
    )
    log.info(str(report), console=False)
    log.info(
        f"device {device} x{world}, global batch {config.batch_size} x {context} bytes, "
        f"{config.optimizer} lr {config.peak_lr:g} (warm-up {warmup_steps} steps, cosine), "
        f"wd {config.weight_decay:g}, grad clip {config.grad_clip:g}, {config.epochs} epochs "
        f"of {steps_per_epoch} steps, amp {config.amp}"
        + (", compiled" if config.compile else "")
        + (", deterministic" if config.deterministic else "")
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
        batches = _epoch_batches(corpus.train, config, epoch, context, dist_info)
        metrics = _train_epoch(
            model, raw_model, batches, optimizer, scheduler, scaler, loss_fn, amp_ctx,
            device, dist_info, config, epoch, run, log,
        )  # fmt: skip
        eval_start = time.perf_counter()
        result = evaluate_lm(
            eval_model, val, local_batch, device, amp=config.amp, dist_info=dist_info
        )
        metrics.update(
            val_loss=result["loss"],
            val_perplexity=result["perplexity"],
            val_bits_per_byte=result["bits_per_byte"],
            val_accuracy=result["accuracy"],
            eval_seconds=time.perf_counter() - eval_start,
        )
        run.epoch = epoch + 1
        run.history.append(metrics)
        is_best = result["loss"] < run.best_val_loss
        if is_best:
            run.best_val_loss, run.best_epoch = result["loss"], epoch + 1
        log.info(
            f"epoch {epoch + 1}/{config.epochs}: train loss {metrics['train_loss']:.4f} | "
            f"val loss {result['loss']:.4f} perplexity {result['perplexity']:.3f} "
            f"{result['bits_per_byte']:.3f} bits/byte acc {result['accuracy']:.2f}% | "
            f"lr {metrics['lr']:.4g} | {metrics['epoch_seconds']:.1f} s "
            f"({metrics['tokens_per_second']:.0f} tok/s)"
        )
        if dist_info.is_main:
            _save_epoch(
                config, identity, run, metrics, raw_model, optimizer, scheduler, scaler,
                "best_val_loss", is_best,
            )  # fmt: skip
        barrier(dist_info)

    summary = _summary(config, identity, run, status, device, world, n_sparse)
    summary.update(
        parameters=n_params,
        context=context,
        vocab_size=VOCAB_SIZE,
        validation_tokens=val_tokens,
        corpus=corpus.summary(),
    )
    if dist_info.is_main:
        _write_json(run_dir / "summary.json", summary)
        if config.plot and run.history:
            title = f"{config.model} / {config.dataset} / {config.recipe}"
            try:
                drawn = plot_lm_curves(run.history, run_dir / "curves.png", title=title)
            except Exception as exc:  # a plotting problem must not fail a finished run
                log.info(f"curves.png failed ({type(exc).__name__}: {exc}); results are intact")
            else:
                if not drawn:
                    log.info(f"curves.png skipped: matplotlib is not installed; {MATPLOTLIB_HINT}")
        log.info(
            f"{status}: best val loss {summary['best_val_loss']:.4f} (perplexity "
            f"{summary['best_perplexity']:.3f}, epoch {summary['best_epoch']}), final "
            f"{summary['final_val_loss']:.4f} ({summary['final_bits_per_byte']:.3f} bits/byte), "
            f"{summary['seconds_per_epoch']:.1f} s/epoch"
        )
        log.info(f"results in {run_dir}/: summary.json, metrics.jsonl, last.pt, best.pt, train.log")
    return summary


def _train_epoch(
    model: nn.Module,
    raw_model: nn.Module,
    batches: list[tuple[Tensor, Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    loss_fn: Any,
    amp_ctx: Any,
    device: torch.device,
    dist_info: DistInfo,
    config: TrainConfig,
    epoch: int,
    run: _State,
    log: _RunLog,
) -> dict[str, Any]:
    model.train()
    steps = len(batches)
    bar = ProgressBar(
        steps,
        f"epoch {epoch + 1}/{config.epochs}",
        enabled=config.progress and dist_info.is_main,
        unit="tok",
    )
    guard = train_loop._StepGuard(
        raw_model, optimizer, scheduler, scaler, config, dist_info, device, run, log, epoch, steps
    )
    loss_sum = correct = tokens = 0.0
    start = time.perf_counter()
    with bar:
        for step, (xb, yb) in enumerate(batches):
            x, y = xb.to(device), yb.to(device)  # (b, T) each
            guard.snapshot()  # a bad forward may have moved a TSM step counter
            with amp_ctx():
                logits = model(x)
                loss = loss_fn(logits, y)
            stats = torch.stack([loss.detach().float(), (logits.argmax(-1) == y).sum().float()])
            stats = stats.tolist()
            problem = guard.backward(loss, stats[0])
            if problem:
                diagnosis = train_loop._diagnosis(raw_model, x, y, loss_fn, amp_ctx, dist_info)
                guard.resolve(problem, step, stats[0], diagnosis)
                continue
            guard.step()
            n = y.numel()
            loss_sum += stats[0] * n
            correct += stats[1]
            tokens += n
            bar.update(n, stats[0], int(stats[1]))
    seconds = time.perf_counter() - start
    loss_sum, correct, tokens = all_reduce_sum([loss_sum, correct, tokens], dist_info, device)
    return {
        "epoch": epoch + 1,
        "train_loss": loss_sum / tokens if tokens else float("nan"),
        "train_accuracy": 100.0 * correct / tokens if tokens else 0.0,
        "lr": optimizer.param_groups[0]["lr"],
        # mean global gradient norm before clipping (this rank's; DDP grads are all-reduced)
        "grad_norm": guard.mean_norm,
        "epoch_seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
        "train_tokens": int(tokens),
        "skipped_steps": guard.skipped,
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
    best = min(history, key=lambda h: h["val_loss"]) if history else None
    final = history[-1] if history else None
    scores = {
        "best_val_loss": best["val_loss"] if best else nan,
        "best_perplexity": best["val_perplexity"] if best else nan,
        "best_bits_per_byte": best["val_bits_per_byte"] if best else nan,
        "best_epoch": run.best_epoch,
        "final_val_loss": final["val_loss"] if final else nan,
        "final_perplexity": final["val_perplexity"] if final else nan,
        "final_bits_per_byte": final["val_bits_per_byte"] if final else nan,
        "final_val_accuracy": final["val_accuracy"] if final else nan,
        "final_train_loss": final["train_loss"] if final else nan,
    }
    return train_loop._summary_fields(
        config, identity, run, status, device, scores,
        rate=("tokens_per_second", "train_tokens"),
        extra={"sparse_layers": n_sparse, "world_size": world},
    )  # fmt: skip
