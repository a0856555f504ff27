"""backend="auto" checks each 2:4 kernel against the reference path on its first use.

The CUDA kernels cannot run here, so the tests make ``auto`` believe it is on a cuSPARSELt
GPU (the platform lookup) and hand it deliberately broken kernels through the same factory
it builds real ones with (``dispatch._kernel``); the data path then runs on CPU in bfloat16.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from fullsparse.config import recipe
from fullsparse.functional import sparse_conv2d, sparse_linear
from fullsparse.kernels import dispatch
from fullsparse.kernels.reference import REFERENCE_LINEAR
from fullsparse.kernels.selfcheck import (
    KernelSelfCheckWarning,
    clear_selfcheck_cache,
    selfcheck_verdict,
)
from fullsparse.kernels.semi_structured import EmulatedGemm, Gemm1x1ConvKernel, GemmLinearKernel
from fullsparse.nn import SparseLinear

FAKE_GPU = dispatch.Platform("cuda", "a pretend GPU", (8, 0), cusparselt=True)


class WrongGemm(EmulatedGemm):
    """Packs like the real thing, multiplies wrongly: 1.5 times the product."""

    calls = 0

    def linear(self, a2d: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        WrongGemm.calls += 1
        return 1.5 * F.linear(a2d, packed)


class RaisingGradInputKernel(GemmLinearKernel):
    """A correct output GEMM and a grad_input GEMM that raises."""

    def grad_input(self, grad_output: torch.Tensor, weight_gi: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom: no algorithm for this shape\nsecond line")


@pytest.fixture
def fake_gpu(monkeypatch):
    """``auto`` sees a cuSPARSELt GPU; ``use(factory)`` sets the kernel it gets."""
    clear_selfcheck_cache()
    monkeypatch.setattr(dispatch, "platform_for", lambda device: FAKE_GPU)

    def use(factory):
        monkeypatch.setattr(dispatch, "_kernel", factory)

    yield use
    clear_selfcheck_cache()


def _linear_operands(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 8, 64, generator=g).bfloat16()
    w = torch.randn(32, 64, generator=g).bfloat16()
    b = torch.randn(32, generator=g).bfloat16()
    dy = torch.randn(2, 8, 32, generator=g).bfloat16()
    return x, w, b, dy


def _run_linear(backend, x, w, b, dy):
    xr, wr, br = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    y = sparse_linear(xr, wr, br, config="fst", backend=backend)
    y.backward(dy)
    return y.detach(), xr.grad, wr.grad, br.grad


def _self_check_warnings(caught):
    return [w for w in caught if issubclass(w.category, KernelSelfCheckWarning)]


def test_wrong_kernel_falls_back_to_the_reference_with_one_warning(fake_gpu):
    fake_gpu(lambda kind, path, gemm, out, gi: GemmLinearKernel(WrongGemm(), out, gi))
    x, w, b, dy = _linear_operands()
    kernel = dispatch.select_linear_kernel("auto", recipe("fst"), x, w, x.dtype)
    assert kernel.output_sparse and kernel.grad_input_sparse and "SelfChecked" in repr(kernel)
    want = _run_linear("reference", x, w, b, dy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = _run_linear("auto", x, w, b, dy)
        calls_after_first = WrongGemm.calls
        second = _run_linear("auto", x, w, b, dy)
    for got in (first, second):
        for g, r in zip(got, want, strict=True):
            torch.testing.assert_close(g, r, rtol=0, atol=0)  # the reference, exactly
    (warning,) = _self_check_warnings(caught)
    message = str(warning.message)
    assert "linear layer with weight 32x64 (recipe 'fst', input (2, 8, 64))" in message
    assert "output relative error" in message and "reference path from now on" in message
    # the verdict is cached: the second call goes straight to the reference kernel
    assert WrongGemm.calls == calls_after_first
    again = dispatch.select_linear_kernel("auto", recipe("fst"), x, w, x.dtype)
    assert again is REFERENCE_LINEAR


def test_kernel_that_raises_falls_back_at_that_role(fake_gpu):
    fake_gpu(lambda kind, path, gemm, out, gi: RaisingGradInputKernel(EmulatedGemm(), out, gi))
    x, w, b, dy = _linear_operands(1)
    want = _run_linear("reference", x, w, b, dy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _run_linear("auto", x, w, b, dy)
        _run_linear("auto", x, w, b, dy)
    # the output GEMM passed its check (same product, another summation order) ...
    torch.testing.assert_close(got[0], want[0], rtol=2e-2, atol=2e-2)
    # ... grad_input raised, so it is the reference's, exactly; grad_weight never used a kernel
    for g, r in zip(got[1:], want[1:], strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=0)
    (warning,) = _self_check_warnings(caught)
    assert "grad_input raised RuntimeError: boom: no algorithm for this shape)" in str(
        warning.message
    )
    assert "second line" not in str(warning.message)


def test_correct_kernel_passes_and_is_then_used_unwrapped(fake_gpu):
    made = []

    def factory(kind, path, gemm, out, gi):
        made.append(GemmLinearKernel(EmulatedGemm(), out, gi))
        return made[-1]

    fake_gpu(factory)
    x, w, b, dy = _linear_operands(2)
    want = _run_linear("reference", x, w, b, dy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _run_linear("auto", x, w, b, dy)
    assert not _self_check_warnings(caught)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=2e-2, atol=2e-2)
    kernel = dispatch.select_linear_kernel("auto", recipe("fst"), x, w, x.dtype)
    assert kernel is made[-1]  # both roles passed: no wrapper left on the path
    key_verdicts = [selfcheck_verdict(k) for k in list(_verdict_keys())]
    assert key_verdicts == ["passed"]


def _verdict_keys():
    from fullsparse.kernels import selfcheck

    return selfcheck._VERDICTS.keys()


def test_wrong_conv_kernel_falls_back_once_per_shape(fake_gpu):
    fake_gpu(lambda kind, path, gemm, out, gi: Gemm1x1ConvKernel(WrongGemm(), out, gi))
    g = torch.Generator().manual_seed(3)
    cl = torch.channels_last
    x = torch.randn(2, 64, 4, 4, generator=g).bfloat16().contiguous(memory_format=cl)
    w = torch.randn(32, 64, 1, 1, generator=g).bfloat16()
    want = sparse_conv2d(x, w, config="fst", backend="reference")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [sparse_conv2d(x, w, config="fst", backend="auto") for _ in range(2)]
        other = torch.randn(3, 64, 4, 4, generator=g).bfloat16().contiguous(memory_format=cl)
        sparse_conv2d(other, w, config="fst", backend="auto")  # a new key: checked again
    for y in got:
        torch.testing.assert_close(y, want, rtol=0, atol=0)
    messages = [str(w.message) for w in _self_check_warnings(caught)]
    assert len(messages) == 2
    assert "conv layer with weight 32x64x1x1 (recipe 'fst', input (2, 64, 4, 4))" in messages[0]
    assert "input (3, 64, 4, 4)" in messages[1]


def test_compiling_a_sparse_layer_emits_no_lru_cache_warning():
    from torch._dynamo import utils as dynamo_utils

    # dynamo warns once per message per process; forget earlier ones so this can fail
    for msg in [m for m in dynamo_utils.warn_once_cache if "lru_cache" in m]:
        dynamo_utils.warn_once_cache.discard(msg)
    torch._dynamo.reset()
    layer = SparseLinear(16, 8, config="fst")
    compiled = torch.compile(layer, backend="eager")
    x = torch.randn(2, 4, 16, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(x).sum().backward()
    torch.testing.assert_close(x.grad, _eager_grad(layer, x), rtol=0, atol=0)
    assert not [w for w in caught if "lru_cache" in str(w.message)]


def _eager_grad(layer, x):
    xe = x.detach().clone().requires_grad_(True)
    layer(xe).sum().backward()
    return xe.grad


def test_gpu_suite_correctness_check_fails_a_kernel_the_self_check_replaced(fake_gpu):
    import time

    from fullsparse.bench.cases import LinearCase
    from fullsparse.bench.gpu_common import GpuContext
    from fullsparse.bench.gpu_roles import check_case

    fake_gpu(lambda kind, path, gemm, out, gi: GemmLinearKernel(WrongGemm(), out, gi))
    ctx = GpuContext(
        device=torch.device("cpu"),
        dtype=torch.bfloat16,
        backend="auto",
        warmup=1,
        repeats=1,
        steps=1,
        deadline=time.monotonic() + 60,
        dry_run=True,
        l2_bytes=1 << 20,
        progress=lambda msg: None,
        skipped=[],
    )
    row = check_case(LinearCase("t 64->32", "t", 64, 32, 2, 8), "fst", "auto", ctx)
    # the layer's numbers are the reference's (the fallback), but the kernel failed
    assert max(row["rel_err"].values()) <= row["tolerance"]
    assert len(row["self_check_failures"]) == 1 and not row["passed"]
