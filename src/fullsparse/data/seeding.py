"""Deriving independent random streams from one user seed."""

from __future__ import annotations

import torch

__all__ = ["derive_seed", "generator"]

_MASK64 = (1 << 64) - 1


def _mix(z: int) -> int:
    # SplitMix64: add the golden-ratio increment, then the finaliser (a bijection on 64 bits).
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def derive_seed(seed: int, *stream: int) -> int:
    """A 63-bit seed for sub-stream ``stream`` of ``seed`` (SplitMix64 finaliser).

    Independent streams (per epoch, per split) from one user seed, without the collisions
    of ``seed + epoch`` (seed 0 epoch 1 == seed 1 epoch 0).
    """
    z = _mix(seed)
    for s in stream:
        z = _mix(z + (s & _MASK64))
    return z >> 1


def generator(seed: int, *stream: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed` ``(seed, *stream)``."""
    return torch.Generator().manual_seed(derive_seed(seed, *stream))
