"""Relative error of one step's conv weight-gradient estimators on a trained ResNet-20:
column blocks against whole samples as the sampled units (``conv_sample_unit``), per share
(docs/spec-notes.md, "Sampled weight gradients").

One Fashion-MNIST training batch of ``--batch`` images through the model of CHECKPOINT (any
`fullsparse train` run of a CNN on fashion-mnist), in train mode; for every convolution the
exact ``G`` (float64) and ``--draws`` draws of each estimator; prints, per estimator, the
mean over layers of the root-mean-square ‖Ĝ − G‖/‖G‖, and the same pooled over layers.

    python scripts/conv_estimator_error.py runs/quality/resnet20/dense-seed0/last.pt --draws 8
"""

from __future__ import annotations

import sys
from functools import partial

import torch
import torch.nn as nn
from estimator_error import parse_and_load, print_errors
from torch import Tensor

from fullsparse.data.fashion_mnist import load_fashion_mnist
from fullsparse.geometry import ConvGeometry
from fullsparse.roles import conv_grad_weight

#: Fashion-MNIST's pixel mean and standard deviation (of x / 255)
MEAN, STD = 0.2860, 0.3530


def conv_operands(model: nn.Module, x: Tensor, y: Tensor) -> list[tuple[Tensor, ...]]:
    """``(X, dY, weight, geometry)`` of every convolution for one batch, float64."""
    captured: list[dict[str, object]] = []

    def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
        record: dict[str, object] = {"x": args[0].detach(), "m": module}
        out.register_hook(lambda g: record.__setitem__("dy", g.detach()))
        captured.append(record)

    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    handles = [m.register_forward_hook(hook) for m in convs]
    nn.functional.cross_entropy(model(x), y).backward()
    for h in handles:
        h.remove()
    out = []
    for r in captured:
        m = r["m"]
        assert isinstance(m, nn.Conv2d)
        geo = ConvGeometry.make(m.stride, m.padding, m.dilation, m.groups)
        w = m.weight.detach().double()
        out.append((r["x"].double(), r["dy"].double(), w, geo))  # type: ignore[union-attr]
    return out


def main(argv: list[str] | None = None) -> int:
    args, model = parse_and_load(argv, __doc__, batch=128)
    (images, labels), _ = load_fashion_mnist()
    pick = torch.randint(0, images.shape[0], (args.batch,))
    x = (images[pick].float() / 255 - MEAN) / STD
    layers = conv_operands(model, x, labels[pick])
    estimators = {}
    for unit in ("block", "sample"):
        for group, share, label in ((4, 0.5, "groups of 4, 1/2"), (0, 0.59, "whole batch, 0.59")):
            estimators[f"{unit}s, {label}"] = partial(
                conv_grad_weight, mode="is_half", group=group, share=share, unit=unit
            )
    estimators["per-element MVUE (fst_mvue)"] = partial(conv_grad_weight, mode="mvue")
    print(f"{len(layers)} convolutions, batch {args.batch}, {args.draws} draws each")
    print_errors(layers, estimators, partial(conv_grad_weight, mode="dense"), args.draws)
    return 0


if __name__ == "__main__":
    sys.exit(main())
