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

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fullsparse.errors import UserError
from fullsparse.train.common import autocast
from fullsparse.train.config import TrainConfig
from fullsparse.train.config_checks import layer_policy_identity
from fullsparse.train.distributed import DistInfo, all_reduce_sum
from fullsparse.train.plot import plot_lm_curves
from fullsparse.train.protocol import TrainerView
from fullsparse.train.task import StepOutput, Task

__all__ = [
    "VOCAB_SIZE",
    "LMTask",
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
        **layer_policy_identity(config),
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


class LMTask(Task):
    best_key = "best_val_loss"
    score_metric = "val_loss"
    higher_is_better = False
    count_key = "tokens"
    sum_keys = ("correct",)
    bar_unit = "tok"
    plot = staticmethod(plot_lm_curves)

    epoch_format = (
        "train loss {train_loss:.4f} | val loss {val_loss:.4f} perplexity "
        "{val_perplexity:.3f} {val_bits_per_byte:.3f} bits/byte acc "
        "{val_accuracy:.2f}% | lr {lr:.4g} | {epoch_seconds:.1f} s "
        "({tokens_per_second:.0f} tok/s)"
    )
    result_format = (
        "best val loss {best_val_loss:.4f} (perplexity {best_perplexity:.3f}, "
        "epoch {best_epoch}), final {final_val_loss:.4f} "
        "({final_bits_per_byte:.3f} bits/byte), {seconds_per_epoch:.1f} s/epoch"
    )

    def check(self, world: int, device: torch.device) -> None:
        if self.config.sync_bn or self.config.channels_last:
            flag = "--sync-bn" if self.config.sync_bn else "--channels-last"
            raise UserError(f"{flag} is for convolutional image models; drop it for --task lm")

    def load_data(self) -> dict[str, Any]:
        self.corpus = build_corpus(self.config)
        return lm_identity(self.config)

    def attach(self, model: nn.Module, trainer: TrainerView) -> None:
        self.device, self.dist, self.local_batch = trainer.device, trainer.dist, trainer.local_batch
        self.context = context = int(model.context)
        train = self.corpus.train
        if train.numel() < context + 1:
            raise UserError(
                f"the training text ({train.numel()} bytes) is shorter than one window "
                f"of context+1={context + 1} bytes: lower the model's context or add files"
            )
        self.val = validation_windows(self.corpus.val, context, self.config.test_subset)
        self.parameters = sum(p.numel() for p in model.parameters())

    def steps_per_epoch(self) -> int:
        assert self.config.steps_per_epoch is not None  # filled by TrainConfig for lm
        return self.config.steps_per_epoch

    def probe_batch(self, n: int) -> Any:
        probe = self.val[: max(1, n)]
        return probe[:, :-1], probe[:, 1:]

    def batches(self, epoch: int, first: int) -> Iterable[Any]:
        batches = _epoch_batches(self.corpus.train, self.config, epoch, self.context, self.dist)
        return batches[first:]

    def to_device(self, batch: Any) -> Any:
        return batch[0].to(self.device), batch[1].to(self.device)  # (b, T) each

    def forward(self, model: nn.Module, batch: Any) -> StepOutput:
        x, y = batch
        logits = model(x)  # (b, T, vocab): mean next-byte cross-entropy over all b·T tokens
        loss = F.cross_entropy(
            logits.float().flatten(0, 1), y.flatten(), label_smoothing=self.config.label_smoothing
        )
        return StepOutput(loss, y.numel(), {"correct": (logits.argmax(-1) == y).sum()})

    def train_metrics(self, sums: dict[str, float]) -> dict[str, Any]:
        tokens = sums["tokens"]
        return {"train_accuracy": 100.0 * sums["correct"] / tokens if tokens else 0.0}

    def evaluate(self, model: nn.Module, trainer: TrainerView) -> dict[str, Any]:
        result = evaluate_lm(
            model, self.val, self.local_batch, self.device, amp=self.config.amp,
            dist_info=self.dist,
        )  # fmt: skip
        return {
            "val_loss": result["loss"],
            "val_perplexity": result["perplexity"],
            "val_bits_per_byte": result["bits_per_byte"],
            "val_accuracy": result["accuracy"],
        }

    def describe(self, trainer: TrainerView) -> list[str]:
        c, corpus, val = self.config, self.corpus, self.val
        n_sparse, n_layers = self.sparse_layer_counts(trainer.report)
        return [
            f"fullsparse train --task lm: {c.model} ({self.parameters / 1e6:.2f}M parameters, "
            f"context {self.context}) on {c.dataset} ({corpus.train.numel() / 1e6:.2f} MB "
            f"train from {corpus.files_train} files, {val.shape[0] * self.context} validation "
            f"bytes in {val.shape[0]} windows), recipe {c.recipe!r} on {n_sparse} of "
            f"{n_layers} layers",
            self.settings_line(trainer, f"global batch {c.batch_size} x {self.context} bytes"),
        ]

    def scores(self, history: list[dict[str, Any]], best_epoch: int) -> dict[str, Any]:
        metrics = {"val_loss": "val_loss", "perplexity": "val_perplexity",
                   "bits_per_byte": "val_bits_per_byte"}  # fmt: skip
        best = {f"best_{k}": v for k, v in metrics.items()}
        final = {f"final_{k}": v for k, v in metrics.items()}
        final |= {"final_val_accuracy": "val_accuracy", "final_train_loss": "train_loss"}
        scores = self.best_and_final(history, best, final)
        return {**{k: scores.pop(k) for k in best}, "best_epoch": best_epoch, **scores}

    def summary_extra(self, trainer: TrainerView) -> dict[str, Any]:
        return {
            "sparse_layers": self.sparse_layer_counts(trainer.report)[0],
            "world_size": trainer.world,
        }

    def summary_details(self, trainer: TrainerView) -> dict[str, Any]:
        return {
            "parameters": self.parameters,
            "context": self.context,
            "vocab_size": VOCAB_SIZE,
            "validation_tokens": self.val.shape[0] * self.context,
            "corpus": self.corpus.summary(),
        }
