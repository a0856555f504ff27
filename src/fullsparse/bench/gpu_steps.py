"""The GPU suite's whole-model sections: one training step per recipe, and the per-step
overhead of ``fst`` (the paper's Table 6: S(W), S(Wᵀ), packing, the IR shift)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fullsparse.bench.gpu_common import GpuContext
from fullsparse.bench.ops import ir_grad_output, mask_co, output_weight_mask, recipe
from fullsparse.errors import UserError
from fullsparse.kernels.semi_structured import EmulatedGemm, SemiStructuredGemm

__all__ = ["ModelSpec", "model_specs", "time_step", "overhead"]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable[[], torch.nn.Module]
    image_size: int
    num_classes: int
    channels_last: bool
    note: str = ""


def model_specs(dry_run: bool) -> list[ModelSpec]:
    def build(name: str, classes: int, size: int, **kw: Any) -> Callable[[], torch.nn.Module]:
        def make() -> torch.nn.Module:
            try:
                from fullsparse.models import build_model
            except ImportError as exc:  # pragma: no cover - the zoo is part of the package
                raise UserError(f"fullsparse.models is not available: {exc}") from exc
            return build_model(name, classes, image_size=size, **kw)

        return make

    if dry_run:
        return [
            ModelSpec(
                "ViT-B/16",
                build("vit_tiny", 10, 32, depth=2, embed_dim=64, num_heads=2, patch_size=16),
                32,
                10,
                False,
                "dry-run stand-in: 2 blocks, width 64, 32 px",
            ),
            ModelSpec(
                "ResNet-50",
                build("resnet20", 10, 16),
                16,
                10,
                True,
                "dry-run stand-in: CIFAR ResNet-20, 16 px",
            ),
        ]
    return [
        ModelSpec(
            "ViT-B/16",
            build("vit_tiny", 1000, 224, depth=12, embed_dim=768, num_heads=12),
            224,
            1000,
            False,
        ),
        ModelSpec("ResNet-50", build("resnet50", 1000, 224), 224, 1000, True),
    ]


def _build_for(spec: ModelSpec, name: str, ctx: GpuContext) -> tuple[torch.nn.Module, Any]:
    from fullsparse.nn import sparsify_

    torch.manual_seed(0)
    model = spec.builder().to(ctx.device)
    if spec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    report = None
    if name != "dense":  # the dense baseline is the untouched torch model
        # on the device already, so the report's backends are this GPU's
        report = sparsify_(model, name, backend=ctx.backend, compute_dtype=ctx.dtype)
    return model, report


def _batches(
    spec: ModelSpec, batch: int, ctx: GpuContext, n: int = 2
) -> list[tuple[Tensor, Tensor]]:
    out = []
    for _ in range(n):
        x = torch.randn(batch, 3, spec.image_size, spec.image_size, device=ctx.device)
        if spec.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, spec.num_classes, (batch,), device=ctx.device)
        out.append((x, y))
    return out


def _step_fn(model: torch.nn.Module, batches: list, ctx: GpuContext) -> Callable[[int], None]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step(i: int) -> None:
        x, y = batches[i % len(batches)]
        with ctx.amp():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def time_step(spec: ModelSpec, name: str, batch: int, ctx: GpuContext) -> dict[str, Any]:
    model, report = _build_for(spec, name, ctx)
    batches = _batches(spec, batch, ctx)
    step = _step_fn(model, batches, ctx)
    t0 = time.monotonic()
    step(0)  # first step: autotune measurements, cuSPARSELt plans, cuDNN heuristics
    ctx.sync()
    first_s = time.monotonic() - t0
    ms = ctx.time(step, warmup=max(1, ctx.warmup // 2), repeats=ctx.steps)
    backends: dict[str, int] = {}
    if report is not None:
        for row in report.rows:
            if row.sparse:
                backends[row.backend] = backends.get(row.backend, 0) + 1
    result = {
        "model": spec.name,
        "recipe": name,
        "batch": batch,
        "step_ms": ms,
        "first_step_s": first_s,
        "images_per_s": 1e3 * batch / ms,
        "layer_backends": backends,
        "note": spec.note,
    }
    del model, batches, step
    ctx.free()
    return result


@contextlib.contextmanager
def _record_packs() -> Iterator[list[tuple[Any, Tensor]]]:
    """Record every operand packed for a 2:4 GEMM while the block runs."""
    seen: list[tuple[Any, Tensor]] = []
    originals = {cls: cls.pack for cls in (SemiStructuredGemm, EmulatedGemm)}

    def wrap(original: Callable) -> Callable:
        def pack(self: Any, operand: Tensor) -> Any:
            seen.append((self, operand.detach().clone()))
            return original(self, operand)

        return pack

    try:
        for cls, original in originals.items():
            cls.pack = wrap(original)  # type: ignore[method-assign]
        yield seen
    finally:
        for cls, original in originals.items():
            cls.pack = original  # type: ignore[method-assign]


def overhead(spec: ModelSpec, batch: int, step_ms: float, ctx: GpuContext) -> dict[str, Any]:
    """Table 6 for ``fst``: per-step cost of S(W), S(Wᵀ), packing and the IR shift."""
    from fullsparse.nn import sparse_modules

    cfg = recipe("fst")
    model, _ = _build_for(spec, "fst", ctx)
    layers = [m for _, m in sparse_modules(model)]
    shapes: list[tuple[tuple[int, ...], int]] = []  # grad_output shape, IR axis

    def hook(module: torch.nn.Module, _inputs: Any, output: Tensor) -> None:
        axis = 3 if output.ndim == 4 else (output.ndim - 2 if output.ndim >= 3 else -1)
        shapes.append((tuple(output.shape), axis))

    handles = [m.register_forward_hook(hook) for m in layers]
    batches = _batches(spec, batch, ctx, n=1)
    step = _step_fn(model, batches, ctx)
    with _record_packs() as packs:
        step(0)
    for h in handles:
        h.remove()
    ctx.sync()
    weights = [(m.weight.detach(), int(getattr(m, "groups", 1))) for m in layers]
    grads = [
        (torch.zeros(s, device=ctx.device, dtype=ctx.dtype), axis)
        for s, axis in shapes
        if axis >= 0
    ]
    s_w = ctx.time(lambda i: [output_weight_mask(w, cfg, g) for w, g in weights])
    s_wt = ctx.time(lambda i: [mask_co(w, g) for w, g in weights])
    pack = ctx.time(lambda i: [gemm.pack(op) for gemm, op in packs]) if packs else 0.0
    shift = ctx.time(lambda i: [ir_grad_output(dy, cfg.ir_alpha, axis) for dy, axis in grads])
    total = s_w + s_wt + pack + shift
    result = {
        "model": spec.name,
        "recipe": "fst",
        "batch": batch,
        "layers": len(layers),
        "packed_operands": len(packs),
        "s_w_ms": s_w,
        "s_wt_ms": s_wt,
        "pack_ms": pack,
        "ir_shift_ms": shift,
        "total_ms": total,
        "step_ms": step_ms,
        "percent": 100.0 * total / step_ms if step_ms else None,
    }
    del model, batches, step
    packs.clear()
    grads.clear()
    ctx.free()
    return result
