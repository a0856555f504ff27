"""Kernels and dispatch, on CPU: the rules, the errors, the emulated 2:4 data path against
the float64 reference, the operands' layout and packing, the autotune cache, the report,
and the GPU suite's dry run. (What needs CUDA is in test_gpu.py, marked ``gpu``.)"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.sparse._semi_structured_conversions import (
    sparse_semi_structured_from_dense_cutlass,
    sparse_semi_structured_to_dense_cutlass,
)

import fullsparse.kernels.dispatch as dispatch
import reference
from fullsparse import RECIPES, SparseConv2d, SparseLinear, recipe, sparsify_
from fullsparse.cli import main
from fullsparse.errors import UserError
from fullsparse.functional import (
    ConvGeometry,
    grad_input_weight,
    mask_co,
    mask_k,
    sparse_conv2d,
    sparse_linear,
)
from fullsparse.kernels import (
    REFERENCE_CONV,
    REFERENCE_LINEAR,
    Autotuner,
    BackendUnavailableError,
    LayerShape,
    Platform,
    conv_autotune_key,
    plan_layer,
    platform_for,
    select_conv_kernel,
    select_linear_kernel,
    sparse_limits,
)
from fullsparse.kernels.semi_structured import (
    EmulatedGemm,
    Gemm1x1ConvKernel,
    GemmLinearKernel,
    Im2colConvKernel,
    SemiStructuredGemm,
)
from fullsparse.masks import is_2to4
from reference import DRAW_SEED, Geo, same_draws

ref_conv, ref_linear = same_draws(reference.ref_conv), same_draws(reference.ref_linear)

H100 = Platform("cuda", "NVIDIA H100 80GB HBM3", (9, 0), cusparselt=True)
H100_NO_CSLT = Platform("cuda", "NVIDIA H100 80GB HBM3", (9, 0), cusparselt=False)
A100_CUTLASS = Platform("cuda", "NVIDIA A100-SXM4-80GB", (8, 0), cusparselt=False)
T4 = Platform("cuda", "Tesla T4", (7, 5), cusparselt=True)
CPU = Platform("cpu")
BF16 = torch.bfloat16
TOL64 = dict(rtol=1e-9, atol=1e-9)


def linear(d_out: int, d_in: int) -> LayerShape:
    return LayerShape("linear", (d_out, d_in))


def conv(co, ci, k, stride=1, padding=0, groups=1) -> LayerShape:
    return LayerShape(
        "conv", (co, ci // groups, k, k), (stride,) * 2, (padding,) * 2, (1, 1), groups
    )


# --------------------------------------------------------------------------- platform
@pytest.fixture
def fake_cuda(monkeypatch):
    """Make torch report one CUDA device with the given capability / cuSPARSELt."""

    def install(capability, cusparselt, name="Fake GPU"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: name)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: capability)
        monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: cusparselt)
        dispatch.clear_platform_cache()

    yield install
    monkeypatch.undo()
    dispatch.clear_platform_cache()


@pytest.mark.parametrize(
    "capability, cusparselt, gemm, why",
    [
        ((8, 0), True, "cusparselt", None),
        ((8, 6), False, "cutlass", None),
        ((9, 0), True, "cusparselt", None),
        ((9, 0), False, None, "no cuSPARSELt in this PyTorch, and its CUTLASS 2:4 kernels"),
        ((7, 5), True, None, "has no 2:4 sparse tensor cores (needs sm_80+)"),
    ],
)
def test_platform_reads_capability_and_cusparselt(fake_cuda, capability, cusparselt, gemm, why):
    fake_cuda(capability, cusparselt)
    p = platform_for("cuda")
    assert (p.name, p.capability, p.cusparselt, p.gemm) == (
        "Fake GPU",
        capability,
        cusparselt,
        gemm,
    )
    assert (p.why_not() is None) == (why is None)
    if why:
        assert why in p.why_not()


def test_platform_of_cpu_and_of_cuda_without_a_device(monkeypatch):
    assert platform_for("cpu") == CPU and CPU.why_not() == "CPU" and CPU.gemm is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert platform_for("cuda").why_not() == "CUDA not available"


def test_sparse_limits_are_torchs_tables():
    assert sparse_limits("cusparselt", torch.bfloat16) == (16, 16)
    assert sparse_limits("cusparselt", torch.float16) == (16, 16)
    assert sparse_limits("cutlass", torch.float16) == (32, 64)
    assert sparse_limits("cutlass", torch.bfloat16) == (32, 64)
    assert sparse_limits("emulation", torch.float64) == (1, 1)


# --------------------------------------------------------------------------- the rules
def test_auto_on_cpu_is_reference_for_every_recipe_and_layer():
    x = torch.randn(2, 16, 64)
    xc = torch.randn(2, 64, 8, 8).to(memory_format=torch.channels_last)
    for name in RECIPES:
        cfg = recipe(name)
        assert (
            select_linear_kernel("auto", cfg, x, torch.randn(64, 64), x.dtype) is REFERENCE_LINEAR
        )
        for k in (1, 3):
            w = torch.randn(64, 64, k, k)
            geo = ConvGeometry.make(1, k // 2)
            assert select_conv_kernel("auto", cfg, xc, w, geo, xc.dtype) is REFERENCE_CONV
        dense_weights = name in ("dense", "meprop")  # meProp sparsifies dY only, unstructured
        want = f"reference: recipe '{name}' has no 2:4" if dense_weights else "reference: CPU"
        assert plan_layer(linear(64, 64), cfg, "auto", CPU, BF16).summary.startswith(want)


def test_auto_on_hopper_with_cusparselt_runs_both_fst_gemms_on_sparse_tensor_cores():
    plan = plan_layer(linear(3072, 768), recipe("fst"), "auto", H100, BF16)
    assert (plan.backend, plan.path, plan.output, plan.grad_input) == (
        "semi_structured",
        "linear",
        True,
        True,
    )
    assert plan.gemm == "cusparselt" and plan.reason == ""
    assert (
        plan_layer(linear(3072, 768), recipe("fst"), "auto", A100_CUTLASS, BF16).gemm == "cutlass"
    )


@pytest.mark.parametrize(
    "name, output, grad_input, why",
    [
        ("dense", False, False, "recipe 'dense' has no 2:4 weight operand"),
        ("srste", True, False, "S_K(W)ᵀ is 2:4 along K, not along Co"),
        ("tsm", True, True, ""),
        ("fst2", True, True, ""),
        ("fst_noir", True, True, ""),
        ("fst", True, True, ""),
        ("wg", True, True, ""),
        ("wx", True, True, ""),
        ("gg", True, False, "grad_input prunes dY"),
        ("gx", True, False, "grad_input prunes dY"),
    ],
)
def test_which_gemms_each_recipe_puts_on_the_2to4_kernel(name, output, grad_input, why):
    plan = plan_layer(linear(1024, 1024), recipe(name), "auto", H100, BF16)
    assert (plan.output, plan.grad_input) == (output, grad_input)
    assert plan.backend == ("semi_structured" if output or grad_input else "reference")
    assert why in plan.reason


def test_grad_input_source_pruned_still_has_a_co_operand():
    cfg = recipe("fst", grad_input_source="pruned")
    plan = plan_layer(linear(256, 256), cfg, "auto", H100, BF16)
    assert plan.output and plan.grad_input


@pytest.mark.parametrize(
    "platform, dtype, layer, summary",
    [
        (H100, torch.float32, linear(256, 256), "reference: compute dtype float32"),
        (H100, torch.float16, linear(256, 24), "reference: d_in=24 not a multiple of 16"),
        (H100, BF16, linear(40, 256), "reference: d_out=40 not a multiple of 16"),
        (A100_CUTLASS, BF16, conv(64, 3, 3, padding=1), "reference: K=27 not a multiple of 64"),
        (H100, BF16, conv(64, 3, 3, padding=1), "reference: K=27 not a multiple of 16"),
        (H100, BF16, conv(64, 64, 3, padding=1, groups=4), "reference: grouped conv, groups=4"),
        (H100_NO_CSLT, BF16, linear(256, 256), "reference: no cuSPARSELt in this PyTorch"),
        (T4, BF16, linear(256, 256), "reference: Tesla T4 (sm_75) has no 2:4 sparse tensor cores"),
        (CPU, BF16, linear(256, 256), "reference: CPU"),
    ],
)
def test_auto_falls_back_to_reference_and_says_why(platform, dtype, layer, summary):
    plan = plan_layer(layer, recipe("fst"), "auto", platform, dtype)
    assert plan.backend == "reference" and not (plan.output or plan.grad_input)
    assert plan.summary.startswith(summary), plan.summary


def test_one_role_falls_back_when_only_its_operand_breaks_the_tile_rule():
    # CUTLASS 32x64: output operand [d_out=96, d_in=64] fits, grad_input [64, 96] does not
    plan = plan_layer(linear(96, 64), recipe("fst"), "auto", A100_CUTLASS, BF16)
    assert (plan.backend, plan.output, plan.grad_input) == ("semi_structured", True, False)
    assert plan.reason == "grad_input on reference: d_out=96 not a multiple of 64"


def test_conv_paths_1x1_gemm_im2col_and_measured():
    fst = recipe("fst")
    p = plan_layer(conv(256, 64, 1), fst, "auto", H100, BF16, channels_last=True)
    assert (p.backend, p.path, p.output, p.grad_input) == ("semi_structured", "conv1x1", True, True)
    p = plan_layer(conv(256, 64, 1), fst, "auto", H100, BF16, channels_last=False)
    assert p.summary.startswith("reference: input is not channels_last")
    p = plan_layer(conv(256, 64, 1), fst, "semi_structured", H100, BF16, channels_last=False)
    assert p.path == "conv1x1"  # explicit: runs anyway, with a copy of the activation
    p = plan_layer(conv(64, 64, 3, padding=1), fst, "auto", H100, BF16, channels_last=True)
    assert (p.backend, p.path, p.measure) == ("auto", "im2col", True)
    p = plan_layer(conv(64, 64, 3, padding=1), fst, "semi_structured", H100, BF16)
    assert (p.backend, p.path, p.measure) == ("semi_structured", "im2col", False)
    p = plan_layer(conv(512, 256, 1, stride=2), fst, "auto", H100, BF16)
    assert p.path == "im2col"  # a strided 1x1 conv is not a plain GEMM over the input


def test_reference_and_emulation_ignore_the_hardware():
    assert plan_layer(linear(8, 8), recipe("fst"), "reference", H100, BF16).summary == (
        "reference: requested"
    )
    plan = plan_layer(conv(6, 3, 3, padding=1), recipe("srste"), "emulation", CPU, torch.float64)
    assert (plan.backend, plan.path, plan.output, plan.grad_input, plan.gemm) == (
        "emulation",
        "im2col",
        True,
        False,
        "emulation",
    )


# --------------------------------------------------------------------------- the errors
def _explicit(layer, platform, dtype=BF16, name="fst"):
    with pytest.raises(BackendUnavailableError) as info:
        plan_layer(layer, recipe(name), "semi_structured", platform, dtype)
    message = str(info.value)
    assert "\n" not in message and message.startswith("backend='semi_structured' cannot run")
    return message


def test_explicit_semi_structured_on_cpu_says_why_and_how():
    with pytest.raises(BackendUnavailableError) as info:
        sparse_linear(
            torch.randn(2, 64), torch.randn(64, 64), config="fst", backend="semi_structured"
        )
    message = str(info.value)
    assert ": CPU;" in message and "CUDA GPU with sparse tensor cores" in message
    assert "backend='auto'" in message and "backend='emulation'" in message
    assert isinstance(info.value, ValueError) and isinstance(info.value, UserError)
    with pytest.raises(BackendUnavailableError, match="CPU"):
        sparse_conv2d(
            torch.randn(1, 16, 4, 4),
            torch.randn(16, 16, 1, 1),
            config="fst",
            backend="semi_structured",
        )


def test_explicit_semi_structured_errors_name_the_broken_rule():
    assert "install a PyTorch CUDA build that ships cuSPARSELt" in _explicit(
        linear(256, 256), H100_NO_CSLT
    )
    assert "sm_80" in _explicit(linear(256, 256), T4)
    msg = _explicit(linear(256, 256), H100, torch.float32)
    assert "compute dtype float32" in msg and "torch.autocast" in msg
    msg = _explicit(conv(64, 3, 3, padding=1), H100)
    assert "output operand [Co=64, K=27] breaks cusparselt's 16x16 tile rule: K=27" in msg
    assert "grad_input operand [K=27, Co=64]" in msg
    assert "grouped conv (groups=2)" in _explicit(conv(64, 64, 3, groups=2), H100)
    assert "no 2:4 weight operand" in _explicit(linear(256, 256), H100, name="dense")


def test_unknown_backend_is_rejected_everywhere():
    for make in (
        lambda: sparse_linear(torch.randn(2, 8), torch.randn(8, 8), config="fst", backend="cuda"),
        lambda: SparseLinear(8, 8, backend="fast"),
        lambda: sparsify_(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)), "fst", backend="x"),
    ):
        with pytest.raises(ValueError, match="unknown backend .* choose one of auto, reference"):
            make()


# --------------------------------------------------------------------------- emulation
@pytest.fixture
def packs(monkeypatch):
    """Every operand handed to the emulated 2:4 GEMM, in order."""
    seen = []
    original = EmulatedGemm.pack

    def spy(self, operand):
        seen.append(operand.detach().clone())
        return original(self, operand)

    monkeypatch.setattr(EmulatedGemm, "pack", spy)
    return seen


def _expected_packs(name: str) -> int:
    plan = plan_layer(linear(8, 8), recipe(name), "emulation", CPU, torch.float64)
    return int(plan.output) + int(plan.grad_input) if plan.backend == "emulation" else 0


LINEAR_CASES = {"tokens_3d": (2, 6, 16, 12), "batch_2d": (5, 16, 8)}


@pytest.mark.parametrize("case", list(LINEAR_CASES))
@pytest.mark.parametrize("name", RECIPES)
def test_emulated_linear_matches_float64_reference(name, case, packs):
    *lead, d_in, d_out = LINEAR_CASES[case]
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(*lead, d_in, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(d_out, d_in, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(d_out, dtype=torch.float64, generator=gen, requires_grad=True)
    y = sparse_linear(x, w, b, config=name, backend="emulation")
    gy = torch.randn(y.shape, dtype=torch.float64, generator=gen)
    torch.manual_seed(DRAW_SEED)  # the draws of the reference (fst_mvue)
    y.backward(gy)
    want = ref_linear(x.detach(), w.detach(), b.detach(), gy, name)
    for got, ref in zip((y, x.grad, w.grad, b.grad), want, strict=True):
        torch.testing.assert_close(got, ref, **TOL64)
    assert len(packs) == _expected_packs(name)


# (N, Ci, H, W, Co, k, stride, padding, dilation, channels_last)
CONV_CASES = {
    "1x1_channels_last": (2, 8, 5, 6, 16, 1, 1, 0, 1, True),
    "1x1_nchw": (2, 8, 5, 6, 12, 1, 1, 0, 1, False),
    "3x3_s2_odd_wo": (2, 8, 9, 11, 8, 3, 2, 1, 1, True),
    "3x3_dilation2": (1, 8, 9, 9, 8, 3, 1, 2, 2, False),
    "first_conv_K27": (2, 3, 8, 9, 12, 3, 2, 1, 1, False),
    "1x1_stride2": (2, 8, 7, 7, 8, 1, 2, 0, 1, True),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
@pytest.mark.parametrize("name", RECIPES)
def test_emulated_conv_matches_float64_reference(name, case, packs):
    n, ci, h, wd, co, k, s, p, d, channels_last = CONV_CASES[case]
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(n, ci, h, wd, dtype=torch.float64, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    w = torch.randn(co, ci, k, k, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(co, dtype=torch.float64, generator=gen, requires_grad=True)
    y = sparse_conv2d(x, w, b, s, p, d, config=name, backend="emulation")
    gy = torch.randn(y.shape, dtype=torch.float64, generator=gen)
    torch.manual_seed(DRAW_SEED)  # the draws of the reference (fst_mvue)
    y.backward(gy)
    want = ref_conv(x.detach(), w.detach(), b.detach(), gy, Geo((s, s), (p, p), (d, d), 1), name)
    for got, ref in zip((y, x.grad, w.grad, b.grad), want, strict=True):
        torch.testing.assert_close(got, ref, **TOL64)
    assert len(packs) == _expected_packs(name)
    # the layer keeps its input's memory format
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last or co == 1
    assert x.grad.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_emulated_gemm_paths_are_the_kernels_the_dispatch_names():
    fst = recipe("fst")
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    k1 = select_conv_kernel(
        "emulation", fst, x, torch.randn(16, 8, 1, 1), ConvGeometry.make(), x.dtype
    )
    k3 = select_conv_kernel(
        "emulation", fst, x, torch.randn(16, 8, 3, 3), ConvGeometry.make(1, 1), x.dtype
    )
    kl = select_linear_kernel("emulation", fst, x, torch.randn(16, 8), x.dtype)
    assert isinstance(k1, Gemm1x1ConvKernel) and isinstance(k3, Im2colConvKernel)
    assert isinstance(kl, GemmLinearKernel) and isinstance(kl.gemm, EmulatedGemm)
    assert kl.output_sparse and kl.grad_input_sparse and kl.name == "emulation"


def test_operands_are_SK_W_and_SCo_W_transposed_with_2to4_along_rows(packs):
    """The forward packs S_K(W) [d_out, d_in]; the backward packs S_Co(W)ᵀ [d_in, d_out]."""
    gen = torch.Generator().manual_seed(12)
    w = torch.randn(24, 32, dtype=torch.float64, generator=gen, requires_grad=True)
    x = torch.randn(3, 4, 32, dtype=torch.float64, generator=gen, requires_grad=True)
    sparse_linear(x, w, None, config="fst", backend="emulation").sum().backward()
    out_op, gi_op = packs
    wd = w.detach()
    assert torch.equal(out_op, wd * mask_k(wd)) and out_op.shape == (24, 32)
    assert torch.equal(gi_op, (wd * mask_co(wd)).t()) and gi_op.shape == (32, 24)
    assert is_2to4(out_op, 1) and is_2to4(gi_op, 1) and not is_2to4(out_op.t(), 1)
    # conv: [Co, K] and [K, Co] in im2col order (channel-major, then kh, then kw)
    packs.clear()
    wc = torch.randn(16, 8, 3, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    xc = torch.randn(2, 8, 5, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    sparse_conv2d(xc, wc, None, 1, 1, config="fst2", backend="emulation").sum().backward()
    w2 = wc.detach().reshape(16, 72)
    cfg = recipe("fst2")
    assert torch.equal(packs[0], w2 * mask_k(wc.detach()).reshape(16, 72))
    assert torch.equal(packs[1], grad_input_weight(wc.detach(), None, cfg).reshape(16, 72).t())


def test_emulated_gemm_rejects_an_operand_that_is_not_2to4_along_rows():
    with pytest.raises(ValueError, match=r"operand \(4, 8\) is not 2:4 along its rows"):
        EmulatedGemm().pack(torch.ones(4, 8))
    with pytest.raises(ValueError, match="must be 2-D"):
        EmulatedGemm().pack(torch.ones(2, 4, 8))
    with pytest.raises(ValueError, match="cusparselt"):
        SemiStructuredGemm("cusolver")


def test_auto_on_cpu_is_bitwise_the_reference_path():
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(2, 5, 16, generator=gen)
    w = torch.randn(8, 16, generator=gen)
    for name in ("fst", "srste", "tsm"):
        outs = []
        for backend in ("auto", "reference"):
            xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
            y = sparse_linear(xr, wr, config=name, backend=backend)
            y.backward(torch.ones_like(y))
            outs.append((y, xr.grad, wr.grad))
        for a, b in zip(*outs, strict=True):
            assert torch.equal(a, b)


# --------------------------------------------------------------------------- packing layout
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cutlass_packing_of_our_operands_round_trips_exactly(dtype):
    """torch's pure-Python CUTLASS conversion (it runs on CPU): values are exactly the kept
    entries in row order, and values + metadata give back the masked operand bit for bit."""
    gen = torch.Generator().manual_seed(14)
    w = torch.randn(64, 128, generator=gen)
    operands = {
        "output S_K(W) [64, 128]": (w * mask_k(w)).to(dtype),
        "grad_input S_Co(W)ᵀ [128, 64]": (w * mask_co(w)).t().contiguous().to(dtype),
    }
    for what, op in operands.items():
        rows, k = op.shape
        values, meta = sparse_semi_structured_from_dense_cutlass(op)
        assert values.shape == (rows, k // 2) and meta.shape == (rows, k // 16), what
        assert meta.dtype == torch.int16
        assert torch.equal(values, op[op != 0].view(rows, k // 2)), what
        assert torch.equal(sparse_semi_structured_to_dense_cutlass(values, meta), op), what


@pytest.mark.parametrize(
    "pattern, nibble",
    [
        ((1, 1, 0, 0), 0b0100),
        ((1, 0, 1, 0), 0b1000),  # the fixed mask F of Eq. 7: constant metadata
        ((0, 1, 1, 0), 0b1001),
        ((1, 0, 0, 1), 0b1100),
        ((0, 1, 0, 1), 0b1101),
        ((0, 0, 1, 1), 0b1110),
    ],
)
def test_cutlass_metadata_of_a_constant_pattern_is_one_nibble_repeated(pattern, nibble):
    """Each 2:4 group is one 4-bit code (index of the first kept entry, then the second);
    four codes per int16. A constant pattern gives one constant word whatever the reordering."""
    op = (torch.tensor(pattern, dtype=torch.float16).repeat(32, 16)) * torch.arange(
        1, 32 * 64 + 1, dtype=torch.float16
    ).view(32, 64).remainder(7).add(1)
    values, meta = sparse_semi_structured_from_dense_cutlass(op)
    word = nibble | nibble << 4 | nibble << 8 | nibble << 12
    word = word - (1 << 16) if word >= 1 << 15 else word  # as int16
    assert meta.unique().tolist() == [word]
    assert torch.equal(sparse_semi_structured_to_dense_cutlass(values, meta), op)


def test_float32_is_1to2_in_the_cutlass_layout_so_our_2to4_needs_half_precision():
    op = torch.tensor([1.0, 2.0, 0.0, 0.0]).repeat(32, 16)  # 2:4, but not 1:2
    values, meta = sparse_semi_structured_from_dense_cutlass(op)
    assert not torch.equal(sparse_semi_structured_to_dense_cutlass(values, meta), op)


# --------------------------------------------------------------------------- autotune
def _fake_measure(times):
    it = iter(times)
    return lambda fn: next(it)


def test_autotuner_measures_once_and_caches_on_disk(tmp_path):
    path = tmp_path / "cache" / "autotune.json"
    tuner = Autotuner(path, measure=_fake_measure([3.0, 1.0]))
    ran = []
    cands = {"reference": lambda: ran.append("r"), "im2col": lambda: ran.append("i")}
    assert tuner.choose("k1", cands) == "im2col"
    assert tuner.choose("k1", cands) == "im2col"  # no second measurement (iterator is empty)
    assert tuner.measurements == 1
    data = json.loads(path.read_text())
    assert data["entries"]["k1"]["choice"] == "im2col"
    assert data["entries"]["k1"]["ms"] == {"reference": 3.0, "im2col": 1.0}
    fresh = Autotuner(path, measure=_fake_measure([]))  # reads the file, measures nothing
    assert fresh.choose("k1", cands) == "im2col" and fresh.measurements == 0
    other = Autotuner(path, measure=_fake_measure([1.0, 2.0]))
    assert other.choose("k2", cands) == "reference"
    assert set(json.loads(path.read_text())["entries"]) == {"k1", "k2"}  # merged, not lost


def test_autotuner_survives_a_corrupt_cache_and_honours_the_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FULLSPARSE_CACHE_DIR", str(tmp_path))
    (tmp_path / "autotune.json").write_text("{not json")
    tuner = Autotuner(measure=_fake_measure([2.0, 1.0]))
    assert tuner.path == tmp_path / "autotune.json"
    with pytest.warns(RuntimeWarning, match="ignoring unreadable autotune cache"):
        assert tuner.choose("k", {"a": lambda: None, "b": lambda: None}) == "b"
    assert json.loads((tmp_path / "autotune.json").read_text())["entries"]["k"]["choice"] == "b"


def test_autotune_key_names_device_versions_dtype_and_sizes():
    layer = conv(64, 64, 3, padding=1)
    plan = plan_layer(layer, recipe("fst"), "auto", H100, BF16, channels_last=True)
    key = conv_autotune_key(H100, BF16, (64, 64, 56, 56), layer, plan, True)
    for part in ("NVIDIA H100", "sm_90", "cusparselt", f"torch {torch.__version__}", "bfloat16"):
        assert part in key
    assert "x 64x64x56x56" in key and "w 64x64x3x3" in key and "channels_last" in key
    assert key != conv_autotune_key(H100, torch.float16, (64, 64, 56, 56), layer, plan, True)
    assert key != conv_autotune_key(H100, BF16, (32, 64, 56, 56), layer, plan, True)


@pytest.mark.parametrize("times, kind", [([2.0, 1.0], Im2colConvKernel), ([1.0, 2.0], None)])
def test_auto_kxk_conv_uses_the_measured_winner(monkeypatch, tmp_path, times, kind):
    monkeypatch.setattr(dispatch, "platform_for", lambda device: H100)
    tuner = Autotuner(tmp_path / "a.json", measure=_fake_measure(times))
    x = torch.randn(2, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    w = torch.randn(32, 16, 3, 3)
    geo = ConvGeometry.make(1, 1)
    # auto hands out a 2:4 kernel wrapped until its first-use self-check (test_selfcheck.py)
    unwrap = lambda k: getattr(k, "kernel", k)  # noqa: E731
    kernel = unwrap(select_conv_kernel("auto", recipe("fst"), x, w, geo, BF16, autotuner=tuner))
    if kind is None:
        assert kernel is REFERENCE_CONV
    else:
        assert isinstance(kernel, kind) and kernel.gemm.library == "cusparselt"
    again = select_conv_kernel("auto", recipe("fst"), x, w, geo, BF16, autotuner=tuner)
    assert unwrap(again) is kernel and tuner.measurements == 1


# --------------------------------------------------------------------------- modules, report
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 3, padding=1)  # K=27
        self.pw = nn.Conv2d(64, 128, 1)  # 1x1: a GEMM
        self.body = nn.Conv2d(128, 64, 3, padding=1)  # 3x3: measured
        self.grouped = nn.Conv2d(64, 64, 3, padding=1, groups=4)
        self.fc = nn.Linear(64, 256)
        self.head = nn.Linear(256, 10)

    def forward(self, x):
        x = self.grouped(self.body(self.pw(self.stem(x)).relu()).relu())
        return self.head(self.fc(x.mean((2, 3))).relu())


def test_report_on_cpu_says_reference_now_and_what_a_gpu_would_run():
    report = sparsify_(Net(), "fst")
    rows = {r.name: r for r in report}
    assert all(rows[n].backend == "reference" for n in ("stem", "pw", "body", "grouped", "fc"))
    assert rows["stem"].backend_reason == (
        "CPU now; on a cuSPARSELt GPU in fp16/bf16: reference (K=27 not a multiple of 16)"
    )
    assert rows["pw"].backend_reason.endswith("in fp16/bf16: semi_structured")
    assert "auto (k x k conv: im2col + 2:4 GEMM or reference conv" in rows["body"].backend_reason
    assert "grouped conv, groups=4" in rows["grouped"].backend_reason
    assert rows["head"].backend == "" and report.to_dict()["layers"][0]["backend"] == "reference"
    assert "backend" in str(report).splitlines()[0]


def test_report_on_a_gpu_names_each_layers_backend(monkeypatch):
    monkeypatch.setattr(dispatch, "platform_for", lambda device: H100)
    rows = {r.name: r for r in sparsify_(Net(), "fst")}
    assert (rows["fc"].backend, rows["pw"].backend) == ("semi_structured", "semi_structured")
    assert rows["pw"].backend_reason == (
        "on channels_last input; under fp16/bf16 autocast (float32 runs reference)"
    )
    assert (rows["stem"].backend, rows["stem"].backend_reason) == (
        "reference",
        "K=27 not a multiple of 16",
    )
    assert rows["body"].backend == "auto" and rows["grouped"].backend == "reference"
    rows = {r.name: r for r in sparsify_(Net(), "srste", compute_dtype=torch.float16)}
    assert rows["fc"].backend_reason == (
        "grad_input on reference: grad_input weight S_K(W)ᵀ is 2:4 along K, not along Co"
    )


def test_explicit_semi_structured_in_sparsify_fails_before_changing_the_model():
    model = Net()
    with pytest.raises(BackendUnavailableError) as info:
        sparsify_(model, "fst", backend="semi_structured")
    message = str(info.value)
    assert message.startswith("sparsify_(backend='semi_structured'): 2 layer(s) cannot run it")
    assert "stem: " in message and "grouped: " in message and "\n" not in message
    assert all(type(m) in (nn.Conv2d, nn.Linear) for m in model.modules() if m is not model)
    ok = sparsify_(
        model, "fst", filter_fn=lambda n, m: n in ("pw", "fc"), backend="semi_structured"
    )
    assert ok.backend == "semi_structured" and model.fc.backend == "semi_structured"
    assert ok.to_dict()["backend"] == "semi_structured"


def test_modules_carry_their_backend():
    torch.manual_seed(15)
    lin = nn.Linear(16, 8).double()
    s_lin = SparseLinear.from_dense(lin, "fst", backend="emulation")
    assert s_lin.backend == "emulation" and "backend=emulation" in repr(s_lin)
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    torch.testing.assert_close(
        s_lin(x), sparse_linear(x, lin.weight, lin.bias, config="fst"), rtol=0, atol=1e-12
    )
    conv2 = SparseConv2d(8, 16, 3, padding=1, config="fst2", backend="reference")
    assert conv2.backend == "reference" and "recipe=fst2, backend=reference" in repr(conv2)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    sparsify_(model, "fst", backend="emulation")
    assert model[0].backend == "emulation"
    sparsify_(model, "fst2")  # re-configured in place: the backend follows
    assert model[0].backend == "auto"


# --------------------------------------------------------------------------- bench gpu
def test_bench_gpu_refuses_without_cuda_in_one_line(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "gpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: `fullsparse bench gpu` times 2:4 sparse tensor cores")
    assert "--dry-run" in err and err.count("\n") == 1


def test_bench_gpu_dry_run_runs_every_section(tmp_path, capsys):
    out, md = tmp_path / "g.json", tmp_path / "g.md"
    code = main(["bench", "gpu", "--dry-run", "--quiet", "--json", str(out), "--markdown", str(md)])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["settings"]["dry_run"] and data["settings"]["backend"] == "emulation"
    checks = data["correctness"]
    assert len(checks) == 4 * 3 and all(c["passed"] for c in checks)
    assert {tuple(c["sparse_roles"]) for c in checks if c["recipe"] == "fst"} == {
        ("output", "grad_input")
    }
    labels = [(r["shape"], r["label"]) for r in data["layers"]]
    shapes = list(dict.fromkeys(s for s, _ in labels))
    assert labels == [(s, lbl) for s in shapes for lbl in ("dense", "srste", "fst2", "fst")]
    for r in data["layers"]:
        assert all(
            r[f"{role}_ms"] > 0 for role in ("forward", "grad_input", "grad_weight", "total")
        )
        assert r["label"] != "dense" or all(v == 1.0 for v in r["speedup"].values())
        assert (r["kernel"] == "torch") == (r["label"] == "dense")
    assert [(s["model"], s["recipe"]) for s in data["steps"]] == [
        ("ViT-B/16", "dense"),
        ("ViT-B/16", "fst"),
        ("ResNet-50", "dense"),
        ("ResNet-50", "fst"),
    ]
    assert all(s["step_ms"] > 0 for s in data["steps"])
    assert data["steps"][1]["layer_backends"] == {"emulation": 9}  # 2 blocks x 4 + patch
    for o in data["overhead"]:
        assert o["packed_operands"] > 0 and o["percent"] > 0
        assert all(o[k] > 0 for k in ("s_w_ms", "s_wt_ms", "pack_ms", "ir_shift_ms"))
    assert set(data["targets"]) == {
        "fst_large_linear_total_speedup",
        "fst_vit_b_step_speedup",
        "fst_overhead_percent",
    }
    assert data["targets"]["fst_large_linear_total_speedup"]["met"] is None  # no such shape
    table = md.read_text()
    assert "Dry run" in table and "| overhead (fst) |" in table and "| ViT-B/16 | fst |" in table
    assert "saved" in capsys.readouterr().out
