"""Relative error of one step's weight-gradient estimators on a trained GPT, per sampling
group size and share (docs/spec-notes.md, "Sampled weight gradients").

One batch of ``--batch`` × ``--context`` bytes of the training corpus through the model of
CHECKPOINT (any `fullsparse train --task lm` run); for every Linear layer the exact
``G = dYᵀ·X`` and ``--draws`` draws of each estimator; prints, per estimator, the mean over
layers of the root-mean-square ‖Ĝ − G‖/‖G‖, and the same pooled over layers.

    fullsparse train --task lm --batch-size 32 --steps-per-epoch 150 --epochs 1 \\
        --test-subset 64 --recipe dense --out runs/gpt-dense150
    python scripts/estimator_error.py runs/gpt-dense150/last.pt --draws 8
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from fullsparse.data.text import build_text_corpus
from fullsparse.operands import mvue_tokens
from fullsparse.sampling import sample_units
from fullsparse.train.inference import load_trained_model


def sampled(x2: Tensor, dy2: Tensor, group: int, share: float) -> Tensor:
    """One draw of the importance-sampled estimator (:func:`fullsparse.sampling.sample_units`:
    ``share`` of every ``group`` rows, p ∝ ‖dY_t‖·‖X_t‖ water-filled, ×1/p)."""
    scores = torch.linalg.vector_norm(dy2, dim=1) * torch.linalg.vector_norm(x2, dim=1)
    index, weight = sample_units(scores, share, group)
    return (dy2[index] * weight[:, None]).t().mm(x2[index])


def layer_operands(model: nn.Module, x: Tensor, y: Tensor) -> list[tuple[Tensor, Tensor]]:
    """``(X [M, d_in], dY [M, d_out])`` of every Linear layer for one batch, float64."""
    captured: list[dict[str, Tensor]] = []

    def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
        record = {"x": args[0].detach()}
        out.register_hook(lambda g: record.__setitem__("dy", g.detach()))
        captured.append(record)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    logits = model(x)
    nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()
    for h in handles:
        h.remove()
    return [
        (
            r["x"].reshape(-1, r["x"].shape[-1]).double(),
            r["dy"].reshape(-1, r["dy"].shape[-1]).double(),
        )
        for r in captured
    ]


def parse_and_load(
    argv: list[str] | None, doc: str, batch: int, context: int | None = None
) -> tuple[argparse.Namespace, nn.Module]:
    """The scripts' arguments (CHECKPOINT, --draws, --batch, --seed, and --context when
    given a default) and the checkpoint's model in train mode, torch seeded."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--draws", type=int, default=8)
    p.add_argument("--batch", type=int, default=batch)
    if context is not None:
        p.add_argument("--context", type=int, default=context)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    model, _ = load_trained_model(args.checkpoint)
    return args, model.train()


def main(argv: list[str] | None = None) -> int:
    args, model = parse_and_load(argv, __doc__, batch=32, context=128)
    data = build_text_corpus(max_train_bytes=2_000_000, max_val_bytes=1000).train
    starts = torch.randint(0, len(data) - args.context - 1, (args.batch,))
    x = torch.stack([data[s : s + args.context] for s in starts]).long()
    y = torch.stack([data[s + 1 : s + args.context + 1] for s in starts]).long()
    layers = layer_operands(model, x, y)
    estimators = {
        "groups of 4, share 1/2 (fst_is)": lambda a, b: sampled(a, b, 4, 0.5),
        "groups of 16, share 1/2": lambda a, b: sampled(a, b, 16, 0.5),
        "whole batch, share 1/2": lambda a, b: sampled(a, b, 1 << 30, 0.5),
        "whole batch, share 9/16": lambda a, b: sampled(a, b, 1 << 30, 0.5625),
        "groups of 4, share 3/4": lambda a, b: sampled(a, b, 4, 0.75),
        "per-element MVUE (fst_mvue)": lambda a, b: mvue_tokens(b.contiguous()).t().mm(a),
    }
    print(f"{len(layers)} Linear layers, {args.draws} draws each")
    print_errors(layers, estimators, lambda x2, dy2: dy2.t().mm(x2), args.draws)
    return 0


def print_errors(
    layers: Sequence[tuple[Any, ...]],
    estimators: dict[str, Callable[..., Tensor]],
    exact: Callable[..., Tensor],
    draws: int,
) -> None:
    """Per estimator (called with a layer's operands, like ``exact``): the mean over layers
    of the root-mean-square ‖Ĝ − G‖/‖G‖ over ``draws`` draws, and the same pooled."""
    for name, estimate in estimators.items():
        rel, err2, norm2 = [], 0.0, 0.0
        for operands in layers:
            grad = exact(*operands)
            e2 = sum(float((estimate(*operands) - grad).norm()) ** 2 for _ in range(draws))
            e2 /= draws
            g2 = float(grad.norm()) ** 2
            rel.append((e2 / g2) ** 0.5)
            err2, norm2 = err2 + e2, norm2 + g2
        mean = sum(rel) / len(rel)
        print(f"{name:30s} mean over layers {mean:.3f}  pooled {(err2 / norm2) ** 0.5:.3f}")


if __name__ == "__main__":
    sys.exit(main())
