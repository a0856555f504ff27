"""The GPU suite's per-layer sections: correctness of each sparse recipe's layer against
the float32 reference, and the timing of each GEMM role against torch's own layer."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fullsparse.bench.cases import ConvCase, LinearCase
from fullsparse.bench.gpu_common import LAYER_RECIPES, TOLERANCE, GpuContext
from fullsparse.bench.ops import (
    ConvGeometry,
    conv_grad_input,
    conv_grad_input_for,
    conv_grad_weight,
    conv_grad_weight_for,
    linear_grad_input_for,
    linear_grad_weight_for,
    output_weight_mask,
    recipe,
    sparse_conv2d,
    sparse_linear,
)
from fullsparse.kernels import select_conv_kernel, select_linear_kernel
from fullsparse.kernels.selfcheck import KernelSelfCheckWarning, clear_selfcheck_cache

__all__ = ["check_case", "layer_variants", "time_linear", "time_conv", "exact_float32"]


# --------------------------------------------------------------------------- correctness
def _sparse_roles(kernel: Any) -> list[str]:
    flags = (("output", kernel.output_sparse), ("grad_input", kernel.grad_input_sparse))
    return [role for role, on in flags if on]


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """The float32 reference must be float32: no TF32 in cuBLAS or cuDNN meanwhile."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _run_layer(
    kind: str,
    x: Tensor,
    w: Tensor,
    b: Tensor,
    dy: Tensor,
    cfg: Any,
    backend: str,
    ctx: GpuContext,
    geo: ConvGeometry | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(output, grad_input, grad_weight) of one layer call; ``x``'s dtype is the compute
    dtype (float32 x: plain float32; half x: under autocast, float32 master weight)."""
    xr = x.detach().clone().requires_grad_(True)
    wr = w.detach().clone().requires_grad_(True)
    br = b.detach().clone().requires_grad_(True)
    amp = ctx.amp() if x.dtype in (torch.float16, torch.bfloat16) else contextlib.nullcontext()
    with amp:
        if kind == "linear":
            y = sparse_linear(xr, wr, br, config=cfg, backend=backend)
        else:
            assert geo is not None
            y = sparse_conv2d(xr, wr, br, geo.stride, geo.padding, config=cfg, backend=backend)
    y.backward(dy.to(y.dtype))
    return y, xr.grad, wr.grad  # type: ignore[return-value]


def check_case(
    case: LinearCase | ConvCase, name: str, backend: str, ctx: GpuContext
) -> dict[str, Any]:
    gen = torch.Generator(device=ctx.device).manual_seed(0)
    dev, dt = ctx.device, ctx.dtype
    cfg = recipe(name)
    if isinstance(case, LinearCase):
        kind, geo = "linear", None
        tokens = min(case.tokens, 256)
        batch = min(case.batch, 8)
        x = torch.randn(batch, tokens, case.d_in, device=dev, generator=gen)
        w = torch.randn(case.d_out, case.d_in, device=dev, generator=gen) * case.d_in**-0.5
        b = torch.randn(case.d_out, device=dev, generator=gen)
        dy = torch.randn(batch, tokens, case.d_out, device=dev, generator=gen)
        kernel = select_linear_kernel(backend, cfg, x.to(dt), w, dt)
    else:
        kind = "conv"
        geo = ConvGeometry.make(case.stride, case.padding)
        batch = min(case.batch, 4)
        x = torch.randn(batch, case.cin, case.size, case.size, device=dev, generator=gen)
        x = x.contiguous(memory_format=torch.channels_last)
        fan_in = case.cin * case.kernel**2
        w = torch.randn(case.cout, case.cin, case.kernel, case.kernel, device=dev, generator=gen)
        w = w * fan_in**-0.5
        b = torch.randn(case.cout, device=dev, generator=gen)
        dy = torch.randn(batch, case.cout, case.out_size, case.out_size, device=dev, generator=gen)
        dy = dy.contiguous(memory_format=torch.channels_last)
        kernel = select_conv_kernel(backend, cfg, x.to(dt), w, geo, dt)
    want = _run_layer(kind, x, w, b, dy, cfg, "reference", ctx, geo)  # float32, same masks
    with warnings.catch_warnings(record=True) as caught:
        # auto's first-use self-check would swap a wrong kernel for the reference path;
        # here the kernel itself is on trial, so its verdict is part of the result
        warnings.simplefilter("always", KernelSelfCheckWarning)
        clear_selfcheck_cache()  # a verdict from an earlier case must not stand in for this one
        got = _run_layer(kind, x.to(dt), w, b, dy.to(dt), cfg, backend, ctx, geo)
    self_check = [str(c.message) for c in caught if issubclass(c.category, KernelSelfCheckWarning)]
    base = _run_layer(kind, x.to(dt), w, b, dy.to(dt), cfg, "reference", ctx, geo)
    tol = TOLERANCE.get(dt, 2e-2)
    roles = ("output", "grad_input", "grad_weight")
    errors = {role: _rel_err(g, r) for role, g, r in zip(roles, got, want, strict=True)}
    ref_errors = {role: _rel_err(g, r) for role, g, r in zip(roles, base, want, strict=True)}
    return {
        "shape": case.name,
        "recipe": name,
        "backend": backend,
        "kernel": repr(kernel),
        "sparse_roles": _sparse_roles(kernel),
        "rel_err": errors,
        "reference_same_dtype_rel_err": ref_errors,
        "tolerance": tol,
        "self_check_failures": self_check,
        "passed": all(e <= tol for e in errors.values()) and not self_check,
    }


# --------------------------------------------------------------------------- layer timing
def _pick(seq: list[Tensor], i: int) -> Tensor:
    """Call ``i``'s tensor of a pool (cycling, so repeats do not hit a warm cache)."""
    return seq[i % len(seq)]


def _time_roles(
    ctx: GpuContext,
    xs: list[Tensor],
    dys: list[Tensor],
    w: Tensor,
    b: Tensor,
    layer: Callable[[Tensor, Tensor, Tensor], Tensor],
    grad_input: Callable[[int], Any],
    grad_weight: Callable[[int], Any],
    kernel_name: str,
    pool: int,
) -> dict[str, float | str]:
    """Times of one layer's roles: the forward ``layer(x, w, b)`` without autograd, the two
    backward GEMMs alone, and a whole forward + backward through autograd."""
    wr = w.detach().clone().requires_grad_(True)
    br = b.detach().clone().requires_grad_(True)

    def forward(i: int) -> Any:
        with torch.no_grad(), ctx.amp():
            return layer(_pick(xs, i), w, b)

    def total(i: int) -> None:
        x = _pick(xs, i).detach().requires_grad_(True)
        with ctx.amp():
            y = layer(x, wr, br)
        y.backward(_pick(dys, i))
        wr.grad = br.grad = None

    return {
        "forward_ms": ctx.time(forward),
        "grad_input_ms": ctx.time(grad_input),
        "grad_weight_ms": ctx.time(grad_weight),
        "total_ms": ctx.time(total),
        "kernel": kernel_name,
        "pool": pool,
    }


def layer_variants(case: LinearCase | ConvCase, ctx: GpuContext) -> list[tuple[str, str, str]]:
    """(label, recipe, backend) rows for one shape; ``torch`` = plain torch ops."""
    rows = [("dense", "dense", "torch")] + [(r, r, ctx.backend) for r in LAYER_RECIPES[1:]]
    if isinstance(case, ConvCase) and case.kernel > 1 and not ctx.dry_run:
        rows += [
            ("fst [im2col]", "fst", "semi_structured"),
            ("fst [reference]", "fst", "reference"),
        ]
    elif not ctx.dry_run:
        rows.append(("fst [reference]", "fst", "reference"))
    return rows


def time_linear(
    case: LinearCase, name: str, backend: str, ctx: GpuContext
) -> dict[str, float | str]:
    dev, dt = ctx.device, ctx.dtype
    gen = torch.Generator(device=dev).manual_seed(1)
    w = torch.randn(case.d_out, case.d_in, device=dev, generator=gen) * case.d_in**-0.5
    b = torch.zeros(case.d_out, device=dev)
    item = case.batch * case.tokens * (case.d_in + case.d_out) * torch.finfo(dt).bits // 8
    pool = ctx.pool_size(item)
    xs = [
        torch.randn(case.batch, case.tokens, case.d_in, device=dev, dtype=dt) for _ in range(pool)
    ]
    dys = [
        torch.randn(case.batch, case.tokens, case.d_out, device=dev, dtype=dt) for _ in range(pool)
    ]

    if backend == "torch":  # the baseline every ratio divides: torch's own layer
        w_c = w.to(dt)

        def grad_input(i: int) -> Any:
            return _pick(dys, i).matmul(w_c)

        def grad_weight(i: int) -> Any:
            dy, x = _pick(dys, i), _pick(xs, i)
            return dy.reshape(-1, case.d_out).t().mm(x.reshape(-1, case.d_in))

        def layer(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
            return F.linear(x, weight, bias)

        kernel_name = "torch"
    else:
        cfg = recipe(name)
        kernel = select_linear_kernel(backend, cfg, xs[0], w, dt)
        kernel_name = repr(kernel)
        out_mask = output_weight_mask(w, cfg)  # the forward saves it for the backward

        def grad_input(i: int) -> Any:
            return linear_grad_input_for(cfg, _pick(dys, i), w, out_mask, kernel=kernel)

        def grad_weight(i: int) -> Any:
            return linear_grad_weight_for(cfg, _pick(xs, i), _pick(dys, i), w, out_mask)

        def layer(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
            return sparse_linear(x, weight, bias, config=cfg, backend=backend)

    return _time_roles(ctx, xs, dys, w, b, layer, grad_input, grad_weight, kernel_name, pool)


def time_conv(case: ConvCase, name: str, backend: str, ctx: GpuContext) -> dict[str, float | str]:
    dev, dt = ctx.device, ctx.dtype
    cl = torch.channels_last
    gen = torch.Generator(device=dev).manual_seed(2)
    fan_in = case.cin * case.kernel**2
    w = torch.randn(case.cout, case.cin, case.kernel, case.kernel, device=dev, generator=gen)
    w = w * fan_in**-0.5
    b = torch.zeros(case.cout, device=dev)
    geo = ConvGeometry.make(case.stride, case.padding)
    o = case.out_size
    bits = torch.finfo(dt).bits
    item = case.batch * (case.cin * case.size**2 + case.cout * o * o) * bits // 8
    pool = ctx.pool_size(item)
    xs = [
        torch.randn(case.batch, case.cin, case.size, case.size, device=dev, dtype=dt).contiguous(
            memory_format=cl
        )
        for _ in range(pool)
    ]
    dys = [
        torch.randn(case.batch, case.cout, o, o, device=dev, dtype=dt).contiguous(memory_format=cl)
        for _ in range(pool)
    ]
    s, p = case.stride, case.padding

    if backend == "torch":
        w_c = w.to(dt)

        def grad_input(i: int) -> Any:
            return conv_grad_input(_pick(dys, i), _pick(xs, i), w_c, geo)

        def grad_weight(i: int) -> Any:
            return conv_grad_weight(_pick(xs, i), _pick(dys, i), w_c, geo, "dense")

        def layer(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
            return F.conv2d(x, weight, bias, s, p)

        kernel_name = "torch"
    else:
        cfg = recipe(name)
        kernel = select_conv_kernel(backend, cfg, xs[0], w, geo, dt)
        kernel_name = repr(kernel)
        out_mask = output_weight_mask(w, cfg)

        def grad_input(i: int) -> Any:
            return conv_grad_input_for(
                cfg, _pick(dys, i), _pick(xs, i), w, out_mask, geo, kernel=kernel
            )

        def grad_weight(i: int) -> Any:
            return conv_grad_weight_for(cfg, _pick(xs, i), _pick(dys, i), w, out_mask, geo)

        def layer(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
            return sparse_conv2d(x, weight, bias, s, p, config=cfg, backend=backend)

    return _time_roles(ctx, xs, dys, w, b, layer, grad_input, grad_weight, kernel_name, pool)
