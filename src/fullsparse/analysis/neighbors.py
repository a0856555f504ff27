"""Neighbouring-difference maps (paper §6.2, Fig. 5): what information restoration assumes.

For a feature map ``X`` (one channel, ``[H, W]``):

- ``X^ad`` — the adjacent-difference map, ``X^ad[:, i] = X[:, i] − X[:, i+1]``
  (``W − 1`` columns);
- ``X^r`` — the reconstruction information restoration implies: every odd column replaced
  by its kept even neighbour, ``X^r[:, 2j+1] = X^r[:, 2j] = X[:, 2j]`` (with an odd width
  the last column is kept as is, no wrap).

:func:`neighbor_maps` gathers them for chosen conv layers of a model on one image, plus the
relative reconstruction error ``‖X − X^r‖ / ‖X‖`` of the whole ``[C, H, W]`` input averaged
over a batch (:func:`reconstruction_errors`) — the number behind the picture.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fullsparse.analysis.similarity import conv_inputs

__all__ = [
    "adjacent_difference",
    "pair_reconstruction",
    "relative_reconstruction_error",
    "default_layers",
    "NeighborMaps",
    "neighbor_maps",
    "reconstruction_errors",
    "summarize_maps",
]


def adjacent_difference(x: Tensor) -> Tensor:
    """``X^ad[..., i] = X[..., i] − X[..., i+1]`` along the last (width) axis: width − 1."""
    return x[..., :-1] - x[..., 1:]


def pair_reconstruction(x: Tensor) -> Tensor:
    """``X^r``: each odd column ``2j+1`` replaced by its even neighbour ``2j`` (last axis).

    With an odd width the last column has no pair and is kept. Exact (``X^r == X``)
    whenever every column pair ``(2j, 2j+1)`` is identical.
    """
    out = x.clone()
    w = x.shape[-1]
    out[..., 1 : w - w % 2 : 2] = x[..., 0 : w - w % 2 : 2]
    return out


def relative_reconstruction_error(x: Tensor) -> Tensor:
    """Per sample ``‖X − X^r‖ / ‖X‖`` of ``x [B, ...]`` (0 for an all-zero sample)."""
    b = x.shape[0]
    diff = (x - pair_reconstruction(x)).reshape(b, -1).double().norm(dim=1)
    norm = x.reshape(b, -1).double().norm(dim=1)
    return torch.where(norm > 0, diff / norm.clamp_min(1e-300), torch.zeros_like(norm))


def default_layers(model: nn.Module, count: int = 5) -> list[str]:
    """``count`` conv layers spread evenly over depth (first and last included), skipping
    1×1 shortcut convs when there are enough 3×3 ones (the paper shows five layers)."""
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    spatial = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1  # type: ignore[arg-type]
    ]
    pool = spatial if len(spatial) >= count else convs
    if len(pool) <= count:
        return pool
    picks = sorted({round(i * (len(pool) - 1) / (count - 1)) for i in range(count)})
    return [pool[i] for i in picks]


@dataclass
class NeighborMaps:
    """One layer on one image: the channel shown and its three maps ``[H, W]``."""

    layer: str
    #: The whole layer input's shape ``[C, H, W]``.
    input_shape: tuple[int, ...]
    channel: int
    x: Tensor
    x_ad: Tensor
    x_r: Tensor
    #: ``‖X − X^r‖ / ‖X‖`` of this image's whole ``[C, H, W]`` layer input.
    rel_error: float


def neighbor_maps(
    model: nn.Module,
    image: Tensor,
    layers: Sequence[str] | None = None,
    channel: int | None = None,
) -> list[NeighborMaps]:
    """X, X^ad and X^r of one image's input to each of ``layers``.

    Args:
        model: run as is (eval mode for analysis).
        image: ``[C, H, W]`` or ``[1, C, H, W]``, normalised as the model expects.
        layers: conv layer names (default :func:`default_layers`).
        channel: channel to show; default, per layer, the channel with the largest
            variance (the one with the most structure to look at).
    """
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"neighbor_maps needs one image [C, H, W], got {tuple(image.shape)}")
    layers = list(layers) if layers is not None else default_layers(model)
    (captured,) = list(conv_inputs(model, image, 1, layers))
    out = []
    for name in layers:
        x = captured[name][0].float().cpu()  # [C, H, W]
        c = int(x.flatten(1).var(dim=1).argmax()) if channel is None else channel
        if not 0 <= c < x.shape[0]:
            raise ValueError(f"channel {c} out of range for layer {name} with {x.shape[0]}")
        xc = x[c]
        out.append(
            NeighborMaps(
                layer=name,
                input_shape=tuple(x.shape),
                channel=c,
                x=xc,
                x_ad=adjacent_difference(xc),
                x_r=pair_reconstruction(xc),
                rel_error=float(relative_reconstruction_error(x.unsqueeze(0))[0]),
            )
        )
    return out


def reconstruction_errors(
    model: nn.Module, images: Tensor, layers: Sequence[str] | None = None, batch_size: int = 64
) -> dict[str, dict[str, float]]:
    """Per layer, mean and std over ``images`` of ``‖X − X^r‖ / ‖X‖`` of its input."""
    errors: dict[str, list[Tensor]] = {}
    for batch in conv_inputs(model, images, batch_size, layers):
        for name, x in batch.items():
            errors.setdefault(name, []).append(relative_reconstruction_error(x).cpu())
    result: dict[str, dict[str, float]] = {}
    for name, chunks in errors.items():
        e = torch.cat(chunks)
        result[name] = {
            "mean": float(e.mean()),
            "std": float(e.std()) if e.numel() > 1 else 0.0,
            "images": int(e.numel()),
        }
    return result


def summarize_maps(maps: Sequence[NeighborMaps]) -> list[dict[str, Any]]:
    """JSON-ready summary of :func:`neighbor_maps` (no pixel data)."""
    return [
        {
            "layer": m.layer,
            "channel": m.channel,
            "input_shape": list(m.input_shape),
            "rel_error": m.rel_error,
            "mean_abs_x": float(m.x.abs().mean()),
            "mean_abs_x_ad": float(m.x_ad.abs().mean()) if m.x_ad.numel() else 0.0,
        }
        for m in maps
    ]
