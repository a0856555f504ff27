"""A seeded, learnable stand-in dataset for smoke tests and CPU runs (no files needed).

Each class has a smooth random prototype image (a 4×4 grid of random colours, bilinearly
upsampled); an example is its class prototype plus Gaussian pixel noise, quantised to
uint8 like a real image. A small CNN separates the classes in a few hundred steps, which
is what a smoke test needs; it says nothing about real-data accuracy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fullsparse.data.seeding import generator

__all__ = ["make_synthetic"]

#: Stream tag: keeps these draws apart from the loader's (seed, epoch) streams.
_STREAM = 0x53594E  # "SYN"
_NOISE_STD = 0.2  # in [0, 1] pixel units: visible noise, yet the classes stay separable


def _examples(prototypes: Tensor, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    K = prototypes.shape[0]
    labels = (torch.arange(n) % K)[torch.randperm(n, generator=g)]  # balanced classes
    noise = torch.randn((n, *prototypes.shape[1:]), generator=g) * _NOISE_STD
    x = (prototypes[labels] + noise).clamp_(0.0, 1.0)
    return (x * 255.0).round_().to(torch.uint8), labels


def make_synthetic(
    num_train: int,
    num_test: int,
    num_classes: int,
    image_size: int = 32,
    channels: int = 3,
    seed: int = 0,
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """``((train_images, train_labels), (test_images, test_labels))``, deterministic in ``seed``.

    Images uint8 ``[N, channels, image_size, image_size]``, labels int64 ``[N]`` with every
    class equally often (±1). Train and test share the prototypes and use independent
    noise streams, so each split depends only on ``seed`` and its own size.
    """
    if num_train < 1 or num_test < 1 or num_classes < 2 or image_size < 1 or channels < 1:
        raise ValueError(
            f"synthetic data needs num_train, num_test >= 1, num_classes >= 2, image_size and "
            f"channels >= 1; got {num_train}, {num_test}, {num_classes}, {image_size}, {channels}"
        )
    grid = torch.rand((num_classes, channels, 4, 4), generator=generator(seed, _STREAM, 0))
    prototypes = F.interpolate(grid, size=(image_size, image_size), mode="bilinear")
    prototypes = 0.15 + 0.7 * prototypes  # keep headroom so noise is not clipped away
    train = _examples(prototypes, num_train, generator(seed, _STREAM, 1))
    test = _examples(prototypes, num_test, generator(seed, _STREAM, 2))
    return train, test
