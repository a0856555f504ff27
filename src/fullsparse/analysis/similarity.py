"""Spatial entropy of conv inputs (paper §6.1, Fig. 4): how much a neighbour tells.

The fixed mask F of the ``fst`` recipe keeps the even columns of a feature map and drops
the odd ones; information restoration then stands in the kept column ``2j`` for its dropped
neighbour ``2j+1`` (width axis, no wrap across rows or images). Whether that is a good
stand-in is an information question: how much uncertainty about a dropped value is left
once its kept neighbour is known.

Definitions used here (the paper leaves them loose; this module decides):

- **Quantisation.** Each conv layer's input ``X`` is quantised *per image* to ``bins``
  (256 = 8 bits) uniform intervals spanning that image's ``min..max`` over the whole
  ``[C, H, W]`` tensor; a constant tensor falls into one bin. Per-image ranges make images
  comparable regardless of their activation scale.
- **Pairs.** ``X`` = the values at the dropped positions ``x[..., 2j+1]``, ``X'`` = their
  kept neighbours ``x[..., 2j]``, for every channel and row; with an odd width the last
  column has no partner and is left out (no wrap).
- **Entropies** in bits, plug-in (histogram) estimates: ``H(X)`` from the marginal of the
  dropped values, ``H(X|X') = H(X, X') − H(X')`` (Eq. 11) from the 256×256 joint histogram.
  Both are taken over the same samples, so ``H(X|X') ≤ H(X)`` holds exactly and their
  difference — the paper's "similarity" — is the plug-in mutual information ``I(X; X')``.
- **Averaging.** Entropies are computed per image and averaged over the images (the
  paper's protocol). A plug-in joint entropy is biased low when a layer has few pairs
  per image compared with the 65,536 joint cells, which inflates the difference for small
  deep maps; ``pooled_*`` therefore also reports the entropies of the histograms summed over
  all images (the same per-image codes), which are far less biased.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "BINS",
    "quantize",
    "adjacent_pairs",
    "entropy_bits",
    "spatial_entropy",
    "LayerEntropy",
    "SimilarityResult",
    "conv_inputs",
    "layer_similarity",
    "format_similarity",
]

#: 8-bit quantisation, as in the paper (§6.1).
BINS = 256


def quantize(x: Tensor, bins: int = BINS) -> Tensor:
    """Per-sample uniform quantisation of ``x`` ``[B, ...]`` into codes ``0..bins-1``.

    Sample ``b``'s interval is ``x[b].min() .. x[b].max()`` split into ``bins`` equal bins
    (the maximum goes into the top bin); a constant sample is all code 0. int64, ``x``'s
    shape.
    """
    if x.ndim < 2:
        raise ValueError(f"quantize needs [B, ...] with a batch axis, got shape {tuple(x.shape)}")
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    flat = x.detach().reshape(x.shape[0], -1).double()
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    span = (hi - lo).clamp_min(torch.finfo(torch.float64).tiny)
    codes = ((flat - lo) / span * bins).floor().clamp_(0, bins - 1).long()
    return codes.reshape(x.shape)


def adjacent_pairs(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(dropped, kept)`` = ``(x[..., 2j+1], x[..., 2j])`` along the last (width) axis.

    The pairing the ``fst`` recipe's fixed mask and information restoration use; with an
    odd width the last column has no partner and is not returned (no wrap).
    """
    w = x.shape[-1]
    return x[..., 1 : w - w % 2 : 2], x[..., 0 : w - w % 2 : 2]


def entropy_bits(counts: Tensor) -> Tensor:
    """Plug-in entropy (bits) of histograms ``counts [..., K]`` along the last axis.

    An all-zero histogram (no samples) gives NaN.
    """
    counts = counts.double()
    total = counts.sum(-1, keepdim=True)
    p = counts / total
    logp = torch.where(p > 0, p.log2(), torch.zeros_like(p))
    return -(p * logp).sum(-1)


def _sample_entropies(cells: Tensor, n_cells: int) -> Tensor:
    """Per-sample plug-in entropy (bits) of the cell ids ``cells [B, n]`` (``0..n_cells-1``).

    ``H = log2 n − Σ c·log2 c / n`` over each sample's histogram counts ``c``; ``c·log2 c``
    is looked up in a table (a gather is much cheaper than a log over 65,536 joint cells).
    """
    b, n = cells.shape
    offset = torch.arange(b, device=cells.device).unsqueeze(1) * n_cells
    counts = torch.bincount((cells + offset).reshape(-1), minlength=b * n_cells)
    k = torch.arange(int(counts.max()) + 1, dtype=torch.float64, device=cells.device)
    c_log_c = k * torch.where(k > 0, k.log2(), k)
    total = c_log_c[counts].reshape(b, n_cells).sum(1)
    return (math.log2(n) - total / n).clamp_min(0.0)  # rounding can leave -1e-16


def _pair_entropies(dropped: Tensor, kept: Tensor, bins: int) -> tuple[Tensor, Tensor]:
    """Per-sample ``(H(X), H(X|X'))`` of code pairs ``dropped, kept [B, ...]``."""
    b = dropped.shape[0]
    a = dropped.reshape(b, -1)
    k = kept.reshape(b, -1)
    h_x = _sample_entropies(a, bins)
    h_xprime = _sample_entropies(k, bins)
    h_joint = _sample_entropies(a * bins + k, bins * bins)
    # H(X|X') = H(X, X') - H(X') (Eq. 11); not clamped: H(X|X') <= H(X) is a property of
    # the plug-in estimates (the tests check it), not something to enforce.
    return h_x, h_joint - h_xprime


def _joint_histogram(dropped: Tensor, kept: Tensor, bins: int) -> Tensor:
    """Joint histogram ``[bins (X), bins (X')]`` of all code pairs (summed over samples)."""
    index = (dropped.reshape(-1) * bins + kept.reshape(-1)).cpu()
    return torch.bincount(index, minlength=bins * bins).reshape(bins, bins)


def _histogram_entropies(joint: Tensor) -> tuple[float, float]:
    """``(H(X), H(X|X'))`` of one joint histogram ``[bins (X), bins (X')]``."""
    h_x = entropy_bits(joint.sum(1))
    h_xprime = entropy_bits(joint.sum(0))
    h_joint = entropy_bits(joint.flatten())
    return float(h_x), float(h_joint - h_xprime)


def spatial_entropy(x: Tensor, bins: int = BINS) -> tuple[Tensor, Tensor]:
    """Per-sample ``(H(X), H(X|X'))`` in bits for feature maps ``x [B, ..., W]``.

    Quantised per sample (:func:`quantize`), paired along the last axis
    (:func:`adjacent_pairs`). Returns two float64 tensors of shape ``[B]``; NaN for samples
    with no pair (width < 2).
    """
    codes = quantize(x, bins)
    dropped, kept = adjacent_pairs(codes)
    if dropped.numel() == 0:
        nan = torch.full((x.shape[0],), math.nan, dtype=torch.float64)
        return nan, nan.clone()
    return _pair_entropies(dropped, kept, bins)


@dataclass
class LayerEntropy:
    """One conv layer's input: entropies in bits, averaged over ``images``."""

    name: str
    #: Input shape per image ``[C, H, W]``.
    shape: tuple[int, ...]
    #: (dropped, kept) pairs per image.
    pairs: int
    images: int
    h: float
    h_cond: float
    #: Standard deviation over images of ``h - h_cond``.
    similarity_std: float
    #: Entropies of the histograms pooled over all images (far smaller estimator bias).
    pooled_h: float
    pooled_h_cond: float

    @property
    def similarity(self) -> float:
        """``H(X) − H(X|X')``: the paper's 'similarity' (plug-in mutual information)."""
        return self.h - self.h_cond

    @property
    def pooled_similarity(self) -> float:
        return self.pooled_h - self.pooled_h_cond

    def to_dict(self) -> dict[str, Any]:
        return dict(
            asdict(self),
            shape=list(self.shape),
            similarity=self.similarity,
            pooled_similarity=self.pooled_similarity,
        )


@dataclass
class SimilarityResult:
    """:func:`layer_similarity` over one set of inputs (``natural`` or ``noise``)."""

    inputs: str
    bins: int
    layers: list[LayerEntropy] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs,
            "bins": self.bins,
            "layers": [row.to_dict() for row in self.layers],
        }


def conv_inputs(
    model: nn.Module, images: Tensor, batch_size: int = 64, layers: Sequence[str] | None = None
) -> Iterator[dict[str, Tensor]]:
    """Per batch of ``images``, ``{layer name: its input [B, C, H, W]}`` for every Conv2d.

    Forward pre-hooks on the ``nn.Conv2d`` modules (sparse ones included), ``torch.no_grad``,
    the model in whatever mode it is (eval for analysis). Names in forward-call order.
    """
    wanted = set(layers) if layers is not None else None
    convs = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and (wanted is None or name in wanted)
    ]
    if wanted is not None:
        missing = wanted - {name for name, _ in convs}
        if missing:
            raise ValueError(
                f"no Conv2d named {', '.join(sorted(missing))}; conv layers: "
                + ", ".join(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
            )
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    captured: dict[str, Tensor] = {}

    def hook_for(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            captured[name] = args[0].detach()

        return hook

    handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in convs]
    try:
        with torch.no_grad():
            for start in range(0, images.shape[0], batch_size):
                captured.clear()
                model(images[start : start + batch_size].to(device))
                yield dict(captured)
    finally:
        for h in handles:
            h.remove()


def layer_similarity(
    model: nn.Module,
    images: Tensor,
    *,
    inputs: str = "natural",
    bins: int = BINS,
    batch_size: int = 64,
    layers: Sequence[str] | None = None,
) -> SimilarityResult:
    """``H(X)``, ``H(X|X')`` and their difference for the input of every conv layer.

    Args:
        model: any model whose convolutions are ``nn.Conv2d`` (sparse ones included); it is
            run as is (put it in eval mode first).
        images: ``[N, C, H, W]`` inputs, normalised as the model expects.
        inputs: a label for the result (``natural`` / ``noise``).
        bins: quantisation levels (256 = 8 bits).
        batch_size: images per forward.
        layers: conv layer names to analyse (default: all).

    Returns:
        A :class:`SimilarityResult`, one row per conv layer in forward-call order.
    """
    per_image: dict[str, list[Tensor]] = {}
    pooled: dict[str, Tensor] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for batch in conv_inputs(model, images, batch_size, layers):
        for name, x in batch.items():
            codes = quantize(x, bins)
            dropped, kept = adjacent_pairs(codes)
            shapes[name] = tuple(x.shape[1:])
            if dropped.numel() == 0:
                per_image.setdefault(name, [])
                continue
            h, h_cond = _pair_entropies(dropped, kept, bins)
            per_image.setdefault(name, []).append(torch.stack([h, h_cond], 1).cpu())
            joint = _joint_histogram(dropped, kept, bins)
            pooled[name] = pooled[name] + joint if name in pooled else joint
    result = SimilarityResult(inputs=inputs, bins=bins)
    for name, chunks in per_image.items():
        shape = shapes[name]
        pairs = math.prod(shape[:-1]) * (shape[-1] // 2)
        if not chunks:
            nan = math.nan
            result.layers.append(LayerEntropy(name, shape, 0, 0, nan, nan, nan, nan, nan))
            continue
        hs = torch.cat(chunks)  # [N, 2]
        diff = hs[:, 0] - hs[:, 1]
        ph, ph_cond = _histogram_entropies(pooled[name])
        result.layers.append(
            LayerEntropy(
                name=name,
                shape=shape,
                pairs=pairs,
                images=hs.shape[0],
                h=float(hs[:, 0].mean()),
                h_cond=float(hs[:, 1].mean()),
                similarity_std=float(diff.std()) if hs.shape[0] > 1 else 0.0,
                pooled_h=ph,
                pooled_h_cond=ph_cond,
            )
        )
    return result


def format_similarity(results: Sequence[SimilarityResult]) -> str:
    """Markdown: one row per layer, H / H(X|X') / difference for each set of inputs."""
    head = ["layer", "input C×H×W", "pairs/img"]
    for r in results:
        head += [f"{r.inputs} H(X)", f"{r.inputs} H(X|X')", f"{r.inputs} H−H(X|X')"]
        head += [f"{r.inputs} pooled H−H(X|X')"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---:|" + "---:|" * (len(head) - 3)]
    names = [row.name for row in results[0].layers] if results else []
    by_name = [{row.name: row for row in r.layers} for r in results]
    for name in names:
        first = by_name[0][name]
        cells = [name, "×".join(map(str, first.shape)), str(first.pairs)]
        for rows in by_name:
            row = rows.get(name)
            if row is None:
                cells += ["-"] * 4
                continue
            cells += [
                f"{row.h:.3f}",
                f"{row.h_cond:.3f}",
                f"{row.similarity:.3f} ± {row.similarity_std:.3f}",
                f"{row.pooled_similarity:.3f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
