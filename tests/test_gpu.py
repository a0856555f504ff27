"""The semi_structured backend on a real GPU (``pytest -m gpu``; excluded by default).

Each test compares the 2:4 sparse-tensor-core path with the reference path run on the same
masks: against float32 (the error budget is one half-precision rounding of inputs and
result) and against the reference in the same half dtype. Without CUDA, or on a GPU without
2:4 kernels, these tests are skipped with that reason; they are never run on CPU.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fullsparse import RECIPES, SparseLinear, recipe, sparsify_
from fullsparse.functional import ConvGeometry, sparse_conv2d, sparse_linear
from fullsparse.kernels import (
    REFERENCE_CONV,
    REFERENCE_LINEAR,
    Autotuner,
    BackendUnavailableError,
    plan_layer,
    platform_for,
    select_conv_kernel,
    select_linear_kernel,
)
from fullsparse.kernels.dispatch import LayerShape
from fullsparse.kernels.semi_structured import (
    Gemm1x1ConvKernel,
    GemmLinearKernel,
    Im2colConvKernel,
    SemiStructuredGemm,
)
from reference import DRAW_SEED


def _why_no_kernel() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    return platform_for("cuda").why_not()


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(_why_no_kernel() is not None, reason=f"2:4 kernels: {_why_no_kernel()}"),
]

TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}
DTYPES = [torch.bfloat16, torch.float16]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(autouse=True)
def exact_float32():
    """The float32 reference must be float32: no TF32 while a test runs (restored after)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def packs(monkeypatch):
    seen = []
    original = SemiStructuredGemm.pack

    def spy(self, operand):
        seen.append(tuple(operand.shape))
        return original(self, operand)

    monkeypatch.setattr(SemiStructuredGemm, "pack", spy)
    return seen


def _linear_run(x, w, b, dy, name, backend, dtype):
    torch.manual_seed(DRAW_SEED)  # the random weight gradients draw the same in every run
    xr = x.detach().clone().requires_grad_(True)
    wr = w.detach().clone().requires_grad_(True)
    br = b.detach().clone().requires_grad_(True)
    if dtype is None:
        y = sparse_linear(xr, wr, br, config=name, backend=backend)
    else:
        with torch.autocast("cuda", dtype=dtype):
            y = sparse_linear(xr.to(dtype), wr, br, config=name, backend=backend)
    y.backward(dy.to(y.dtype))
    return y, xr.grad, wr.grad, br.grad


def _expected_roles(name: str, shape: LayerShape, dtype) -> tuple[bool, bool]:
    plan = plan_layer(shape, recipe(name), "auto", platform_for("cuda"), dtype, True)
    return plan.output, plan.grad_input


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", RECIPES)
def test_semi_structured_linear_matches_reference(name, dtype, packs):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4, 64, 256, device="cuda", generator=gen)
    w = torch.randn(512, 256, device="cuda", generator=gen) / 16
    b = torch.randn(512, device="cuda", generator=gen)
    dy = torch.randn(4, 64, 512, device="cuda", generator=gen)
    want = _linear_run(x, w, b, dy, name, "reference", None)
    got = _linear_run(x, w, b, dy, name, "auto", dtype)
    base = _linear_run(x, w, b, dy, name, "reference", dtype)
    for role, g, r, s in zip(
        ("output", "grad_input", "grad_weight", "bias"), got, want, base, strict=True
    ):
        assert _rel(g, r) <= TOL[dtype], f"{role}: {_rel(g, r):.2e} vs float32"
        assert _rel(g, s) <= TOL[dtype], f"{role}: {_rel(g, s):.2e} vs reference in {dtype}"
    out, gi = _expected_roles(name, LayerShape("linear", (512, 256)), dtype)
    assert packs == [(512, 256)] * out + [(256, 512)] * gi


@pytest.mark.parametrize("name", RECIPES)
def test_semi_structured_1x1_conv_matches_reference(name, packs):
    dtype = torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(1)
    cl = torch.channels_last
    x = torch.randn(8, 128, 14, 14, device="cuda", generator=gen).contiguous(memory_format=cl)
    w = torch.randn(256, 128, 1, 1, device="cuda", generator=gen) / 11
    b = torch.randn(256, device="cuda", generator=gen)
    dy = torch.randn(8, 256, 14, 14, device="cuda", generator=gen).contiguous(memory_format=cl)

    def run(backend, half):
        torch.manual_seed(DRAW_SEED)  # the random weight gradients draw the same in every run
        xr = x.detach().clone().requires_grad_(True)
        wr = w.detach().clone().requires_grad_(True)
        if half:
            with torch.autocast("cuda", dtype=dtype):
                y = sparse_conv2d(xr.to(dtype), wr, b, config=name, backend=backend)
        else:
            y = sparse_conv2d(xr, wr, b, config=name, backend=backend)
        y.backward(dy.to(y.dtype))
        return y, xr.grad, wr.grad

    want = run("reference", False)
    got = run("auto", True)
    assert got[0].is_contiguous(memory_format=cl)
    for role, g, r in zip(("output", "grad_input", "grad_weight"), got, want, strict=True):
        assert _rel(g, r) <= TOL[dtype], f"{role}: {_rel(g, r):.2e}"
    out, gi = _expected_roles(name, LayerShape("conv", (256, 128, 1, 1)), dtype)
    assert packs == [(256, 128)] * out + [(128, 256)] * gi


@pytest.mark.parametrize("name", ["srste", "tsm", "fst2", "fst"])
def test_im2col_3x3_conv_matches_reference(name, packs):
    dtype = torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(2)
    cl = torch.channels_last
    x = torch.randn(4, 64, 15, 15, device="cuda", generator=gen).contiguous(memory_format=cl)
    w = torch.randn(128, 64, 3, 3, device="cuda", generator=gen) / 24
    dy = torch.randn(4, 128, 8, 8, device="cuda", generator=gen).contiguous(memory_format=cl)

    def run(backend, half):
        torch.manual_seed(DRAW_SEED)  # the random weight gradients draw the same in every run
        xr = x.detach().clone().requires_grad_(True)
        wr = w.detach().clone().requires_grad_(True)
        if half:
            with torch.autocast("cuda", dtype=dtype):
                y = sparse_conv2d(xr.to(dtype), wr, None, 2, 1, config=name, backend=backend)
        else:
            y = sparse_conv2d(xr, wr, None, 2, 1, config=name, backend=backend)
        y.backward(dy.to(y.dtype))
        return y, xr.grad, wr.grad

    want = run("reference", False)
    got = run("semi_structured", True)
    for role, g, r in zip(("output", "grad_input", "grad_weight"), got, want, strict=True):
        assert _rel(g, r) <= TOL[dtype], f"{role}: {_rel(g, r):.2e}"
    assert packs[0] == (128, 576) and (len(packs) == 2) == (name != "srste")


def test_auto_picks_semi_structured_where_it_should():
    fst = recipe("fst")
    x16 = torch.randn(2, 197, 768, device="cuda", dtype=torch.bfloat16)
    kernel = select_linear_kernel(
        "auto", fst, x16, torch.randn(3072, 768, device="cuda"), x16.dtype
    )
    assert (
        isinstance(kernel, GemmLinearKernel) and kernel.output_sparse and kernel.grad_input_sparse
    )
    assert kernel.gemm.library == platform_for("cuda").gemm
    x32 = x16.float()
    w = torch.randn(3072, 768, device="cuda")
    assert select_linear_kernel("auto", fst, x32, w, torch.float32) is REFERENCE_LINEAR
    odd = torch.randn(3072, 24, device="cuda")
    assert select_linear_kernel("auto", fst, x16[..., :24], odd, x16.dtype) is REFERENCE_LINEAR
    xc = torch.randn(2, 64, 8, 8, device="cuda", dtype=torch.bfloat16)
    w1 = torch.randn(256, 64, 1, 1, device="cuda")
    geo = ConvGeometry.make()
    cl = xc.contiguous(memory_format=torch.channels_last)
    assert isinstance(select_conv_kernel("auto", fst, cl, w1, geo, xc.dtype), Gemm1x1ConvKernel)
    assert select_conv_kernel("auto", fst, xc, w1, geo, xc.dtype) is REFERENCE_CONV  # NCHW
    with pytest.raises(BackendUnavailableError, match="compute dtype float32"):
        sparse_linear(x32, w, config="fst", backend="semi_structured")


def test_auto_measures_a_3x3_conv_once(tmp_path):
    tuner = Autotuner(tmp_path / "autotune.json")
    x = torch.randn(8, 64, 28, 28, device="cuda", dtype=torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, 64, 3, 3, device="cuda")
    geo = ConvGeometry.make(1, 1)
    k = select_conv_kernel("auto", recipe("fst"), x, w, geo, x.dtype, autotuner=tuner)
    assert k is REFERENCE_CONV or isinstance(k, Im2colConvKernel)
    assert tuner.measurements == 1 and (tmp_path / "autotune.json").exists()
    select_conv_kernel("auto", recipe("fst"), x, w, geo, x.dtype, autotuner=tuner)
    assert tuner.measurements == 1


def test_sparsify_report_and_a_training_step_on_the_gpu():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256), nn.Linear(256, 10))
    model = model.cuda()
    report = sparsify_(model, "fst")
    assert [r.backend for r in report if r.sparse] == ["semi_structured", "semi_structured"]
    assert isinstance(model[0], SparseLinear)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 32, 256, device="cuda")
    target = torch.randint(0, 10, (8, 32), device="cuda")
    losses = []
    for _ in range(5):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x).flatten(0, 1), target.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_bench_gpu_quick_suite_runs_within_its_budget():
    from fullsparse.bench.gpu import run_gpu_suite
    from fullsparse.bench.report import format_gpu

    result = run_gpu_suite(quick=True, budget_s=90)
    assert result["correctness"] and all(c["passed"] for c in result["correctness"])
    assert result["elapsed_s"] < 90 + 60  # one item may start just before the deadline
    assert "| target |" in format_gpu(result)
