"""``bench layers``: each GEMM role of every recipe against dense, per ResNet-18 conv shape.

Per conv shape (:func:`~fullsparse.bench.cases.resnet18_shapes`) and per recipe:

- ``forward``      the ``output`` GEMM including S(W) (the forward mask),
- ``grad_input``   the ``grad_input`` GEMM including S(Wᵀ) (the backward mask),
- ``grad_weight``  the ``grad_weight`` GEMM (the FST half-size product for ``fst``),
- ``total``        forward + backward of the layer through autograd,

plus the mask overhead S(W), S(Wᵀ) against the dense layer's total. Each role is timed for
all recipes interleaved (:func:`~fullsparse.bench.harness.interleaved_ms`); times are
medians over ``repeats`` rounds after ``max(1, warmup)`` warm-up rounds; ratios are
dense / recipe (above 1 = faster than dense).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from fullsparse.bench.cases import RESNET18_SHAPES, ConvShape
from fullsparse.bench.harness import interleaved_ms, machine_info, median_ms, ratio
from fullsparse.bench.ops import (
    RECIPES,
    ConvGeometry,
    conv_grad_input_for,
    conv_grad_weight_for,
    mask_co,
    mask_k,
    output_weight_mask,
    recipe,
    sparse_conv2d,
)

__all__ = ["ROLES", "LayerTiming", "MaskOverhead", "bench_layers", "role_fns"]

ROLES = ("forward", "grad_input", "grad_weight", "total")


@dataclass
class LayerTiming:
    shape: str
    recipe: str
    forward_ms: float
    grad_input_ms: float
    grad_weight_ms: float
    total_ms: float
    ratios: dict[str, float] = field(default_factory=dict)  # dense / this, per role


@dataclass
class MaskOverhead:
    shape: str
    s_w_ms: float  # S(W): 2:4 along K (forward mask)
    s_wt_ms: float  # S(Wᵀ): 2:4 along Co (separate backward mask)
    dense_total_ms: float

    @property
    def percent(self) -> float:
        return 100.0 * (self.s_w_ms + self.s_wt_ms) / self.dense_total_ms


def role_fns(
    shape: ConvShape, name: str, x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor
) -> dict[str, Callable[[int], Any]]:
    """The four timed callables of one recipe at one shape."""
    cfg = recipe(name)
    geo = ConvGeometry.make(shape.stride, shape.padding)
    # TSM reuses its mask for tsm_interval steps: time it as a module would run it.
    cached = output_weight_mask(w, cfg) if cfg.uses_transposable_mask else None
    # The forward saves its mask for the backward; the backward roles don't recompute it.
    out_mask = output_weight_mask(w, cfg, 1, cached)
    xr = x.detach().requires_grad_(True)
    wr = w.detach().requires_grad_(True)

    def forward(_: int) -> None:
        with torch.no_grad():
            sparse_conv2d(x, w, None, shape.stride, shape.padding, config=cfg, forward_mask=cached)

    def grad_input(_: int) -> None:
        conv_grad_input_for(cfg, dy, x, w, out_mask, geo)

    def grad_weight(_: int) -> None:
        conv_grad_weight_for(cfg, x, dy, w, out_mask, geo)

    def total(_: int) -> None:
        y = sparse_conv2d(
            xr, wr, None, shape.stride, shape.padding, config=cfg, forward_mask=cached
        )
        y.backward(dy)
        xr.grad = wr.grad = None

    return {
        "forward": forward,
        "grad_input": grad_input,
        "grad_weight": grad_weight,
        "total": total,
    }


def bench_layers(
    shapes: Sequence[ConvShape] | None = None,
    recipes: Sequence[str] = RECIPES,
    *,
    warmup: int = 1,
    repeats: int = 5,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Time every role of every recipe at every shape; ``dense`` is always included.

    ``warmup`` below 1 counts as 1: the first call of a role pays one-time costs (oneDNN
    kernel choice, allocator growth) that would otherwise land in the first timed call.
    ``progress`` is called once per shape and role.

    Returns a JSON-ready dict: ``machine``, ``settings``, ``layers`` (one entry per shape ×
    recipe, with ``ratios`` = dense time / recipe time per role) and ``mask_overhead``.
    """
    shapes = list(shapes or RESNET18_SHAPES)
    for name in recipes:
        recipe(name)  # unknown names fail before any timing
    names = ["dense", *[r for r in recipes if r != "dense"]]
    warmup = max(1, warmup)
    if threads:
        torch.set_num_threads(threads)
    layers: list[LayerTiming] = []
    overheads: list[MaskOverhead] = []
    gen = torch.Generator().manual_seed(0)
    for shape in shapes:
        x = torch.randn(shape.batch, shape.cin, shape.size, shape.size, generator=gen)
        w = torch.randn(shape.cout, shape.cin, shape.kernel, shape.kernel, generator=gen)
        dy = torch.randn(shape.batch, shape.cout, shape.out_size, shape.out_size, generator=gen)
        fns = {name: role_fns(shape, name, x, w, dy) for name in names}
        ms: dict[str, dict[str, float]] = {name: {} for name in names}
        for role in ROLES:
            if progress:
                progress(f"{shape.name}: {role}")
            timed = interleaved_ms({n: fns[n][role] for n in names}, warmup, repeats)
            for name, value in timed.items():
                ms[name][role] = value
        for name in names:
            timing = LayerTiming(shape.name, name, *(ms[name][role] for role in ROLES))
            timing.ratios = {role: ratio(ms["dense"][role], ms[name][role]) for role in ROLES}
            layers.append(timing)
        overheads.append(
            MaskOverhead(
                shape.name,
                median_ms(lambda _, w=w: mask_k(w), warmup, repeats),
                median_ms(lambda _, w=w: mask_co(w), warmup, repeats),
                ms["dense"]["total"],
            )
        )
    return {
        "machine": machine_info(),
        "settings": {
            "warmup": warmup,
            "repeats": repeats,
            "recipes": names,
            "shapes": [asdict(s) for s in shapes],
        },
        "layers": [asdict(t) for t in layers],
        "mask_overhead": [dict(asdict(o), percent=o.percent) for o in overheads],
    }
