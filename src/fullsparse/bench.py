"""Layer benchmarks: each GEMM role of every recipe against dense, in the same run.

``fullsparse bench layers`` (also ``python -m fullsparse.bench layers``) times, per conv
shape of ResNet-18 (CIFAR-style 32×32 and ImageNet 224×224 inputs) and per recipe:

- ``forward``      the ``output`` GEMM including S(W) (the forward mask),
- ``grad_input``   the ``grad_input`` GEMM including S(Wᵀ) (the backward mask),
- ``grad_weight``  the ``grad_weight`` GEMM (the FST half-size product for ``fst``),
- ``total``        forward + backward of the layer through autograd,

plus the mask overhead S(W), S(Wᵀ) against the dense layer's total. Times are medians over
``repeats`` runs after ``warmup``; ratios are dense / recipe (above 1 = faster than dense).
Functions here return data; printing is the CLI's job (:func:`format_layers`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from fullsparse.config import RECIPES, recipe
from fullsparse.functional import (
    ConvGeometry,
    conv_grad_input_for,
    conv_grad_weight_for,
    mask_co,
    mask_k,
    output_weight_mask,
    sparse_conv2d,
)
from fullsparse.geometry import conv_output_size

__all__ = ["ConvShape", "RESNET18_SHAPES", "bench_layers", "format_layers", "machine_info"]


@dataclass(frozen=True)
class ConvShape:
    """One conv layer at one input size: ``[batch, cin, size, size]`` → ``cout``."""

    name: str
    cin: int
    cout: int
    kernel: int
    stride: int
    size: int  # input height = width
    batch: int

    @property
    def padding(self) -> int:
        return self.kernel // 2

    @property
    def out_size(self) -> int:
        return conv_output_size(self.size, self.kernel, self.stride, self.padding)

    def gemm_flops(self) -> int:
        """FLOPs of one dense GEMM role (2·Co·K·N·Ho·Wo)."""
        k = self.cin * self.kernel * self.kernel
        return 2 * self.cout * k * self.batch * self.out_size**2


def resnet18_shapes(cifar_batch: int = 128, imagenet_batch: int = 16) -> list[ConvShape]:
    """The distinct conv shapes of ResNet-18 on CIFAR (32×32, 3×3 stem, no max-pool) and on
    ImageNet (224×224, 7×7 stride-2 stem + max-pool), one per stage (3×3 and the stride-2
    entry conv) — the paper's model at both input sizes."""
    c, i = cifar_batch, imagenet_batch
    return [
        ConvShape("cifar.stem 3x3 3-64 @32", 3, 64, 3, 1, 32, c),
        ConvShape("cifar.layer1 3x3 64-64 @32", 64, 64, 3, 1, 32, c),
        ConvShape("cifar.layer2.0 3x3/2 64-128 @32", 64, 128, 3, 2, 32, c),
        ConvShape("cifar.layer2 3x3 128-128 @16", 128, 128, 3, 1, 16, c),
        ConvShape("cifar.layer3 3x3 256-256 @8", 256, 256, 3, 1, 8, c),
        ConvShape("cifar.layer4 3x3 512-512 @4", 512, 512, 3, 1, 4, c),
        ConvShape("imagenet.stem 7x7/2 3-64 @224", 3, 64, 7, 2, 224, i),
        ConvShape("imagenet.layer1 3x3 64-64 @56", 64, 64, 3, 1, 56, i),
        ConvShape("imagenet.layer2 3x3 128-128 @28", 128, 128, 3, 1, 28, i),
        ConvShape("imagenet.layer3 3x3 256-256 @14", 256, 256, 3, 1, 14, i),
        ConvShape("imagenet.layer4 3x3 512-512 @7", 512, 512, 3, 1, 7, i),
    ]


RESNET18_SHAPES = resnet18_shapes()


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


def _median_ms(fn: Callable[[], Any], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _time_recipe(
    shape: ConvShape,
    name: str,
    x: torch.Tensor,
    w: torch.Tensor,
    dy: torch.Tensor,
    warmup: int,
    repeats: int,
) -> LayerTiming:
    cfg = recipe(name)
    geo = ConvGeometry.make(shape.stride, shape.padding)
    # TSM reuses its mask for tsm_interval steps: time it as a module would run it.
    cached = output_weight_mask(w, cfg) if cfg.uses_transposable_mask else None
    # The forward saves its mask for the backward; the backward roles don't recompute it.
    out_mask = output_weight_mask(w, cfg, 1, cached)

    def forward() -> None:
        with torch.no_grad():
            sparse_conv2d(x, w, None, shape.stride, shape.padding, config=cfg, forward_mask=cached)

    def grad_input() -> None:
        conv_grad_input_for(cfg, dy, x, w, out_mask, geo)

    def grad_weight() -> None:
        conv_grad_weight_for(cfg, x, dy, w, out_mask, geo)

    xr = x.detach().requires_grad_(True)
    wr = w.detach().requires_grad_(True)

    def total() -> None:
        y = sparse_conv2d(
            xr, wr, None, shape.stride, shape.padding, config=cfg, forward_mask=cached
        )
        y.backward(dy)
        xr.grad = wr.grad = None

    return LayerTiming(
        shape.name,
        name,
        _median_ms(forward, warmup, repeats),
        _median_ms(grad_input, warmup, repeats),
        _median_ms(grad_weight, warmup, repeats),
        _median_ms(total, warmup, repeats),
    )


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

    Returns a JSON-ready dict: ``machine``, ``settings``, ``layers`` (one entry per shape ×
    recipe, with ``ratios`` = dense time / recipe time per role) and ``mask_overhead``.
    """
    shapes = list(shapes or RESNET18_SHAPES)
    for name in recipes:
        recipe(name)  # unknown names fail before any timing
    names = ["dense", *[r for r in recipes if r != "dense"]]
    if threads:
        torch.set_num_threads(threads)
    layers: list[LayerTiming] = []
    overheads: list[MaskOverhead] = []
    gen = torch.Generator().manual_seed(0)
    for shape in shapes:
        x = torch.randn(shape.batch, shape.cin, shape.size, shape.size, generator=gen)
        w = torch.randn(shape.cout, shape.cin, shape.kernel, shape.kernel, generator=gen)
        dy = torch.randn(shape.batch, shape.cout, shape.out_size, shape.out_size, generator=gen)
        dense: LayerTiming | None = None
        for name in names:
            if progress:
                progress(f"{shape.name}: {name}")
            timing = _time_recipe(shape, name, x, w, dy, warmup, repeats)
            if dense is None:
                dense = timing
            timing.ratios = {
                role: getattr(dense, f"{role}_ms") / max(getattr(timing, f"{role}_ms"), 1e-9)
                for role in ("forward", "grad_input", "grad_weight", "total")
            }
            layers.append(timing)
        assert dense is not None
        overheads.append(
            MaskOverhead(
                shape.name,
                _median_ms(lambda w=w: mask_k(w), warmup, repeats),
                _median_ms(lambda w=w: mask_co(w), warmup, repeats),
                dense.total_ms,
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


def machine_info() -> dict[str, Any]:
    """What a benchmark table must say about where it ran."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    commit = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                cwd=os.path.dirname(os.path.abspath(__file__)),
            ).stdout.strip()
            or "unknown"
        )
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
    }


def format_layers(result: dict[str, Any]) -> str:
    """Markdown tables: per-role times and ratios vs dense, then the mask overhead."""
    lines = [
        "| layer | recipe | forward ms | grad_input ms | grad_weight ms | total ms "
        "| grad_weight × | total × |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for t in result["layers"]:
        r = t["ratios"]
        lines.append(
            f"| {t['shape']} | {t['recipe']} | {t['forward_ms']:.2f} | {t['grad_input_ms']:.2f} "
            f"| {t['grad_weight_ms']:.2f} | {t['total_ms']:.2f} | {r['grad_weight']:.2f} "
            f"| {r['total']:.2f} |"
        )
    lines += [
        "",
        "| layer | S(W) ms | S(Wᵀ) ms | dense layer total ms | overhead % |",
        "|---|---:|---:|---:|---:|",
    ]
    for o in result["mask_overhead"]:
        lines.append(
            f"| {o['shape']} | {o['s_w_ms']:.3f} | {o['s_wt_ms']:.3f} | "
            f"{o['dense_total_ms']:.2f} | {o['percent']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":  # python -m fullsparse.bench layers ...
    import sys

    from fullsparse.cli import main

    sys.exit(main(["bench", *sys.argv[1:]]))
