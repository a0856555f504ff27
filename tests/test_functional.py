"""Every recipe's output, grad_input and grad_weight against the float64 im2col reference."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import reference
from fullsparse import RECIPES, recipe
from fullsparse.functional import (
    ConvGeometry,
    conv_grad_weight,
    grad_input_weight,
    ir_grad_output,
    linear_grad_weight,
    output_weight_mask,
    sparse_conv2d,
    sparse_linear,
)
from fullsparse.masks import is_2to4
from reference import DRAW_SEED, Geo, im2col, ir_matrices, out_size, same_draws

# fst_mvue draws: the layer and the reference start from one seed (reference.same_draws)
ref_conv, ref_linear = same_draws(reference.ref_conv), same_draws(reference.ref_linear)

# (N, Ci, H, W, Co, kernel, stride, padding, dilation, groups, bias)
CONV_CASES = {
    "3x3_s1_p1": (2, 8, 6, 6, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, False),
    "3x3_s2_odd_wo": (2, 8, 9, 11, 8, (3, 3), (2, 2), (1, 1), (1, 1), 1, True),
    "dilation2": (1, 8, 9, 9, 8, (3, 3), (1, 1), (2, 2), (2, 2), 1, False),
    "first_conv_1ch_K9": (2, 1, 7, 7, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, True),
    "first_conv_3ch_K27_s2": (2, 3, 8, 9, 12, (3, 3), (2, 2), (1, 1), (1, 1), 1, False),
    "groups2": (2, 8, 5, 7, 8, (3, 3), (1, 1), (1, 1), (1, 1), 2, True),
    "groups4_co_per_group_3": (1, 16, 5, 5, 12, (3, 3), (1, 1), (1, 1), (1, 1), 4, False),
    "1x1_bias": (3, 8, 4, 5, 16, (1, 1), (1, 1), (0, 0), (1, 1), 1, True),
    "1x3_stride_2x1": (2, 4, 6, 7, 8, (1, 3), (2, 1), (0, 1), (1, 1), 1, False),
    "co6_not_multiple_of_4": (2, 8, 5, 6, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1, False),
    "width1": (2, 4, 5, 1, 8, (3, 1), (1, 1), (1, 0), (1, 1), 1, False),
}

TOL64 = dict(rtol=1e-9, atol=1e-9)


def _make_conv(case, dtype=torch.float64, seed=0):
    n, ci, h, w, co, k, s, p, d, g, has_bias = CONV_CASES[case]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, ci, h, w, generator=gen, dtype=dtype)
    weight = torch.randn(co, ci // g, *k, generator=gen, dtype=dtype)
    bias = torch.randn(co, generator=gen, dtype=dtype) if has_bias else None
    geo = Geo(s, p, d, g)
    ho, wo = out_size(h, w, k[0], k[1], geo)
    gy = torch.randn(n, co, ho, wo, generator=gen, dtype=dtype)
    return x, weight, bias, gy, geo


def _run_conv(x, weight, bias, gy, geo, config, channels_last=False):
    x = x.clone()
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    if bias is not None:
        bias = bias.clone().requires_grad_(True)
    y = sparse_conv2d(
        x, weight, bias, geo.stride, geo.padding, geo.dilation, geo.groups, config=config
    )
    y.backward(gy)
    return y, x.grad, weight.grad, (bias.grad if bias is not None else None)


def _assert_all_close(got, want, **tol):
    for name, a, b in zip(
        ("output", "grad_input", "grad_weight", "grad_bias"), got, want, strict=True
    ):
        if b is None:
            assert a is None, name
            continue
        torch.testing.assert_close(a.double(), b, msg=lambda m, n=name: f"{n}: {m}", **tol)


@pytest.mark.parametrize("case", list(CONV_CASES))
@pytest.mark.parametrize("name", RECIPES)
def test_conv_matches_im2col_reference_float64(name, case):
    x, weight, bias, gy, geo = _make_conv(case)
    got = same_draws(_run_conv)(x, weight, bias, gy, geo, recipe(name))
    want = ref_conv(x, weight, bias, gy, geo, name)
    _assert_all_close(got, want, **TOL64)


@pytest.mark.parametrize("name", RECIPES)
def test_conv_channels_last_input_matches_reference(name):
    x, weight, bias, gy, geo = _make_conv("3x3_s2_odd_wo", seed=1)
    got = same_draws(_run_conv)(x, weight, bias, gy, geo, recipe(name), channels_last=True)
    _assert_all_close(got, ref_conv(x, weight, bias, gy, geo, name), **TOL64)


@pytest.mark.parametrize("source", ["dense", "pruned"])
@pytest.mark.parametrize("name", ["fst2", "fst", "wg"])
def test_grad_input_source_dense_and_pruned(name, source):
    x, weight, bias, gy, geo = _make_conv("groups2", seed=2)
    got = _run_conv(x, weight, bias, gy, geo, recipe(name, grad_input_source=source))
    _assert_all_close(got, ref_conv(x, weight, bias, gy, geo, name, source=source), **TOL64)


@pytest.mark.parametrize("alpha", [0.0, 0.03, 0.25, 1.0])
def test_ir_alpha_values(alpha):
    x, weight, bias, gy, geo = _make_conv("3x3_s2_odd_wo", seed=3)
    got = _run_conv(x, weight, bias, gy, geo, recipe("fst", ir_alpha=alpha))
    _assert_all_close(got, ref_conv(x, weight, bias, gy, geo, "fst", alpha=alpha), **TOL64)


@pytest.mark.parametrize(
    "case", ["3x3_s1_p1", "3x3_s2_odd_wo", "dilation2", "groups2", "1x3_stride_2x1", "width1"]
)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_strided_half_size_grad_weight_equals_masked_im2col_formula(case, alpha):
    """Eq. 7-10: (dY + α·dY·T)·F(Xᵀ) == the half-size strided weight-gradient conv."""
    x, weight, _, gy, geo = _make_conv(case, seed=4)
    n, _, h, w = x.shape
    co, cig, kh, kw = weight.shape
    ho, wo = out_size(h, w, kh, kw, geo)
    t, keep = ir_matrices(n, ho, wo)
    xmat = im2col(x, kh, kw, geo)  # [Ci·kh·kw, P]
    dy2 = gy.permute(1, 0, 2, 3).reshape(co, -1)  # [Co, P]
    k, cog = cig * kh * kw, co // geo.groups
    expected = torch.cat(
        [
            (dy2[i * cog : (i + 1) * cog] + alpha * dy2[i * cog : (i + 1) * cog] @ t)
            @ (keep[:, None] * xmat[i * k : (i + 1) * k].t())
            for i in range(geo.groups)
        ]
    ).reshape(weight.shape)
    got = conv_grad_weight(x, gy, weight, ConvGeometry.make(*geo.__dict__.values()), "ir", alpha)
    torch.testing.assert_close(got, expected, **TOL64)
    # F keeps one column of every pair: pattern 1010 along each output row. Flattened over
    # (n, ho, wo) that is 2:4 once every row is padded to an even width (odd Wo: the last
    # column is kept alone, so unpadded rows would shift the pattern).
    kept = (keep[None, :] * xmat).reshape(xmat.shape[0], n * ho, wo)
    kept = torch.nn.functional.pad(kept, (0, wo % 2)).reshape(xmat.shape[0], -1)
    assert is_2to4(kept, 1)


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_fst_grad_weight_does_half_the_flops_of_dense():
    x = torch.randn(4, 16, 16, 16)
    w = torch.randn(32, 16, 3, 3)
    gy = torch.randn(4, 32, 16, 16)
    geo = ConvGeometry.make(1, 1)
    dense = _flops(lambda: conv_grad_weight(x, gy, w, geo, "dense"))
    ir = _flops(lambda: conv_grad_weight(x, gy, w, geo, "ir", 1.0))
    assert dense > 0 and ir == dense // 2
    xl, gl = torch.randn(2, 64, 32), torch.randn(2, 64, 16)
    assert _flops(lambda: linear_grad_weight(xl, gl, "ir", 1.0)) * 2 == _flops(
        lambda: linear_grad_weight(xl, gl, "dense")
    )


def test_ir_grad_output_pairs_and_odd_tail():
    dy = torch.arange(5.0).reshape(1, 5)
    assert ir_grad_output(dy, 1.0, 1).tolist() == [[1.0, 5.0, 4.0]]
    assert ir_grad_output(dy, 0.5, 1).tolist() == [[0.5, 3.5, 4.0]]
    assert ir_grad_output(dy, 0.0, 1).tolist() == [[0.0, 2.0, 4.0]]
    assert ir_grad_output(torch.ones(1, 1), 1.0, 1).tolist() == [[1.0]]


@pytest.mark.parametrize("name", RECIPES)
def test_every_sparse_operand_is_2to4(name):
    """Each operand a recipe declares sparse passes is_2to4 along its GEMM's reduction axis."""
    cfg = recipe(name)
    torch.manual_seed(5)
    w = torch.randn(12, 8, 3, 3, dtype=torch.float64)
    w2 = w.reshape(12, -1)
    out_mask = output_weight_mask(w, cfg)
    w_out = w if out_mask is None else w * out_mask
    if cfg.output_weight != "dense":
        assert is_2to4(w_out.reshape(12, -1), 1)  # along K
    if cfg.output_weight == "transposable":
        assert is_2to4(w_out.reshape(12, -1), 0)  # and along Co
    w_gi = grad_input_weight(w, out_mask, cfg).reshape(12, -1)
    if cfg.grad_input_weight == "2:4_co":
        assert is_2to4(w_gi, 0)
    if cfg.grad_input_weight == "forward" and cfg.output_weight != "dense":
        assert is_2to4(w_gi, 1)
    assert not torch.equal(w_out.reshape(12, -1), w2) or cfg.output_weight == "dense"


def test_dense_recipe_is_bitwise_torch():
    torch.manual_seed(6)
    x = torch.randn(2, 8, 9, 9, requires_grad=True)
    conv = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
    y = sparse_conv2d(x, conv.weight, conv.bias, 2, 1, config="dense")
    y_ref = conv(x)
    assert torch.equal(y, y_ref)
    gy = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, conv.weight), gy)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, conv.weight), gy)
    assert torch.equal(gx, gx_ref) and torch.equal(gw, gw_ref)


def test_padding_same_and_valid():
    torch.manual_seed(7)
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    w = torch.randn(8, 4, 2, 2, dtype=torch.float64)  # even kernel: asymmetric 'same'
    y = sparse_conv2d(x, w, padding="same", config="dense")
    with pytest.warns(UserWarning, match="zero-padded copy"):
        torch.testing.assert_close(y, torch.nn.functional.conv2d(x, w, padding="same"))
    w3 = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(
        sparse_conv2d(x, w3, padding="valid", config="dense"), torch.nn.functional.conv2d(x, w3)
    )


# --------------------------------------------------------------------------- linear
# (input shape, d_out, bias)
LINEAR_CASES = {
    "tokens_odd_T7": ((2, 7, 12), 8, True),
    "tokens_even_T6_dout10": ((3, 6, 16), 10, False),
    "2d_input": ((5, 12), 8, True),
    "4d_input": ((2, 2, 5, 8), 4, False),
    "d_in6_not_multiple_of_4": ((2, 5, 6), 8, True),
    "single_token": ((3, 1, 8), 8, False),
}


def _make_linear(case, dtype=torch.float64, seed=0):
    shape, d_out, has_bias = LINEAR_CASES[case]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=dtype)
    w = torch.randn(d_out, shape[-1], generator=gen, dtype=dtype)
    b = torch.randn(d_out, generator=gen, dtype=dtype) if has_bias else None
    gy = torch.randn(*shape[:-1], d_out, generator=gen, dtype=dtype)
    return x, w, b, gy


def _run_linear(x, w, b, gy, config):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    if b is not None:
        b = b.clone().requires_grad_(True)
    y = sparse_linear(x, w, b, config=config)
    y.backward(gy)
    return y, x.grad, w.grad, (b.grad if b is not None else None)


@pytest.mark.parametrize("case", list(LINEAR_CASES))
@pytest.mark.parametrize("name", RECIPES)
def test_linear_matches_reference_float64(name, case):
    x, w, b, gy = _make_linear(case)
    _assert_all_close(
        same_draws(_run_linear)(x, w, b, gy, recipe(name)), ref_linear(x, w, b, gy, name), **TOL64
    )


def test_linear_1d_input():
    x = torch.randn(12, dtype=torch.float64)
    w = torch.randn(8, 12, dtype=torch.float64)
    y = sparse_linear(x, w, config="fst")
    torch.testing.assert_close(y, ref_linear(x[None], w, None, torch.zeros(1, 8), "fst")[0][0])


# --------------------------------------------------------------------------- dtypes
def _rel(a, b):
    return float((a.detach().double() - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("name", RECIPES)
def test_float32_close_to_float64_reference(name):
    x, weight, bias, gy, geo = _make_conv("first_conv_3ch_K27_s2", dtype=torch.float32, seed=8)
    got = same_draws(_run_conv)(x, weight, bias, gy, geo, recipe(name))
    want = ref_conv(x, weight, bias, gy, geo, name)
    _assert_all_close(got, want, rtol=1e-4, atol=1e-4)
    xl, wl, bl, gl = _make_linear("tokens_odd_T7", dtype=torch.float32, seed=8)
    _assert_all_close(
        same_draws(_run_linear)(xl, wl, bl, gl, recipe(name)),
        ref_linear(xl, wl, bl, gl, name),
        rtol=1e-4,
        atol=1e-4,
    )


@pytest.mark.parametrize("name", RECIPES)
def test_bfloat16_autocast_on_cpu(name):
    """Under CPU autocast the GEMMs run in bf16; grads come back in the params' float32.

    Inputs are rounded to bf16 first so that masks on activations/gradients see the same
    values as the reference; the remaining error is bf16 accumulation (~1e-2 relative).
    """
    x, weight, bias, gy, geo = _make_conv("3x3_s1_p1", dtype=torch.float32, seed=9)
    x, weight = x.bfloat16().float(), weight.bfloat16().float()
    gy = gy.bfloat16().float()
    xr = x.clone().requires_grad_(True)
    wr = weight.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sparse_conv2d(xr, wr, None, geo.stride, geo.padding, config=recipe(name))
    assert y.dtype == torch.bfloat16
    torch.manual_seed(DRAW_SEED)  # the draws of the reference (fst_mvue)
    y.backward(gy.bfloat16())
    assert xr.grad.dtype == torch.float32 and wr.grad.dtype == torch.float32
    want = ref_conv(x, weight.bfloat16().float(), None, gy, geo, name)
    assert _rel(y, want[0]) < 2e-2
    assert _rel(xr.grad, want[1]) < 2e-2
    # the decay term uses the float32 master weight; compare the GEMM part at bf16 accuracy
    assert _rel(wr.grad, want[2]) < 3e-2

    xl, wl, bl, gl = _make_linear("tokens_odd_T7", dtype=torch.float32, seed=9)
    xl, wl, gl = xl.bfloat16().float(), wl.bfloat16().float(), gl.bfloat16().float()
    xr, wr = xl.clone().requires_grad_(True), wl.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sparse_linear(xr, wr, bl, config=recipe(name))
    torch.manual_seed(DRAW_SEED)
    y.backward(gl.bfloat16())
    want = ref_linear(xl, wl.bfloat16().float(), bl, gl, name)
    assert _rel(y, want[0]) < 2e-2 and _rel(xr.grad, want[1]) < 2e-2
    assert _rel(wr.grad, want[2]) < 3e-2


def test_autocast_off_turns_autocast_off_only_where_it_is_on():
    """The layers' autocast-off block: a real one under autocast (the products inside run in
    the compute dtype the layer chose), a shared empty one elsewhere."""
    from fullsparse.entry_checks import autocast_off

    assert autocast_off("cpu") is autocast_off("cpu")  # off: the one shared empty context
    with autocast_off("cpu"):
        assert not torch.is_autocast_enabled("cpu")
    a = torch.randn(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16
        with autocast_off("cpu"):
            assert not torch.is_autocast_enabled("cpu")
            assert (a @ a).dtype == torch.float32
        assert torch.is_autocast_enabled("cpu")


# PyTorch's CPU oneDNN convolution in bfloat16 is wrong (or crashes) on some shapes with an
# output height or width of 1 or a kernel tap that meets only padding; onednn_guard routes
# those around it (docs/reliability.md).
# (n, ci, co, h, w, kernel, stride, padding, dilation)
ONE_WIDE = {
    "hypothesis-found": (1, 2, 1, 6, 4, (3, 3), (1, 2), (1, 0), (1, 1)),
    "off-by-1e15": (1, 4, 1, 6, 4, (3, 3), (1, 2), (1, 0), (1, 1)),
    "1x3-kernel": (2, 4, 3, 6, 3, (1, 3), (1, 2), (0, 0), (1, 1)),
    "one-high": (1, 4, 2, 4, 6, (3, 3), (2, 1), (0, 1), (1, 1)),
    "crashed-the-process": (1, 8, 1, 1, 8, (2, 1), (1, 2), (1, 1), (2, 2)),
    "grad-input-crashed": (2, 3, 8, 1, 5, (2, 4), (1, 1), (1, 1), (2, 2)),
    # output 3x2, but fst's weight gradient convolves a 3x1 dY_ir at stride (1, 2)
    "ir-weight-grad": (1, 2, 1, 3, 1, (1, 4), (1, 1), (0, 2), (1, 1)),
    # output 6x2, no side of 1: the middle kernel column only ever meets padding, and
    # oneDNN's weight gradient left garbage (1e31) there instead of 0
    "dead-tap-weight-grad": (1, 1, 1, 6, 2, (1, 3), (1, 3), (0, 2), (1, 1)),
}


@pytest.mark.parametrize("case", list(ONE_WIDE))
@pytest.mark.parametrize("name", ["dense", "fst", "wx"])
def test_bfloat16_conv_on_onednn_unsafe_shapes_matches_reference(name, case):
    n, ci, co, h, w, k, stride, padding, dilation = ONE_WIDE[case]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, ci, h, w, generator=gen).bfloat16()
    weight = torch.randn(co, ci, *k, generator=gen).bfloat16()
    geo = Geo(stride, padding, dilation, 1)
    ho, wo = out_size(h, w, *k, geo)
    gy = torch.randn(n, co, ho, wo, generator=gen).bfloat16()
    want = ref_conv(x, weight, None, gy, geo, name)
    scale = max(want[0].norm().item(), 1.0)  # the crash case's output is all padding: 0
    # The dead-tap bug leaves uninitialised memory in the result: free NaN-filled blocks
    # first so the allocator is likely to hand one back, and try a few times.
    for _ in range(16):
        dirty = torch.full((1 << 14,), float("nan"), dtype=torch.bfloat16)
        del dirty
        xr, wr = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        y = sparse_conv2d(xr, wr, None, stride, padding, dilation, config=recipe(name))
        y.backward(gy)
        assert (y.double() - want[0]).norm().item() / scale < 2e-2
        assert _rel(xr.grad, want[1]) < 2e-2 and _rel(wr.grad, want[2]) < 2e-2
    assert torch.backends.mkldnn.enabled  # the detour is put back


def test_dead_tap_rule_matches_brute_force_and_the_guard_uses_it():
    # The dead-tap garbage above is uninitialised memory, so the end-to-end test catches a
    # missing guard only some of the time; these checks are deterministic.
    from fullsparse.functional import ConvGeometry
    from fullsparse.kernels.reference import _has_dead_tap, onednn_guard

    checked = 0
    for size in range(1, 9):
        for k in range(1, 6):
            for s in range(1, 4):
                for p in range(4):
                    for d in (1, 2):
                        if size + 2 * p < d * (k - 1) + 1:
                            continue
                        out = (size + 2 * p - d * (k - 1) - 1) // s + 1
                        dead = any(
                            all(not 0 <= o * s + t * d - p < size for o in range(out))
                            for t in range(k)
                        )
                        geo = ConvGeometry.make((1, s), (0, p), (1, d))
                        assert _has_dead_tap((1, size), (1, k), geo, (1, out)) == dead
                        checked += dead
    assert checked > 100  # the rule was exercised, not only its negative
    x = torch.zeros(1, 1, 6, 2, dtype=torch.bfloat16)
    weight = torch.zeros(1, 1, 1, 3, dtype=torch.bfloat16)
    geo = ConvGeometry.make((1, 3), (0, 2))
    for dtype in (torch.bfloat16, torch.float32):
        with onednn_guard(x.to(dtype), x, weight, geo, (6, 2)):
            assert not torch.backends.mkldnn.enabled
    with onednn_guard(x, x, weight, ConvGeometry.make(1, 1), (8, 2)):  # 3 taps, all live
        assert torch.backends.mkldnn.enabled
    assert torch.backends.mkldnn.enabled


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "call,needle",
    [
        (
            lambda: sparse_conv2d(torch.randn(4, 6, 6), torch.randn(4, 4, 3, 3), config="fst"),
            r"4-D \[N, C, H, W\].*unsqueeze",
        ),
        (
            lambda: sparse_conv2d(torch.randn(1, 4, 6, 6), torch.randn(4, 4, 3), config="fst"),
            r"weight must be 4-D",
        ),
        (
            lambda: sparse_conv2d(torch.randn(1, 5, 6, 6), torch.randn(4, 4, 3, 3), config="fst"),
            r"input has 5 channels.*expects 4",
        ),
        (
            lambda: sparse_conv2d(
                torch.randn(1, 4, 6, 6), torch.randn(6, 1, 3, 3), groups=4, config="fst"
            ),
            r"divisible by groups=4",
        ),
        (
            lambda: sparse_conv2d(
                torch.randn(1, 4, 6, 6).int(), torch.randn(4, 4, 3, 3), config="fst"
            ),
            r"floating point.*torch.int32",
        ),
        (
            lambda: sparse_conv2d(torch.randn(1, 4, 6, 6), torch.randn(4, 4, 3, 3), config="fsst"),
            r"unknown recipe 'fsst'",
        ),
        (
            lambda: sparse_conv2d(
                torch.randn(1, 4, 6, 6), torch.randn(4, 4, 3, 3).double(), config="fst"
            ),
            r"share one dtype",
        ),
        (
            lambda: sparse_conv2d(torch.randn(1, 4, 2, 2), torch.randn(4, 4, 3, 3), config="fst"),
            r"smaller than the dilated kernel",
        ),
        (
            lambda: sparse_conv2d(
                torch.randn(1, 4, 6, 6), torch.randn(4, 4, 3, 3), torch.randn(3), config="fst"
            ),
            r"bias must have shape \(4,\)",
        ),
        (
            lambda: sparse_conv2d(
                torch.randn(1, 4, 6, 6), torch.randn(4, 4, 3, 3), stride=0, config="fst"
            ),
            r"stride >= 1",
        ),
        (
            lambda: sparse_linear(torch.randn(2, 7), torch.randn(4, 8), config="fst"),
            r"input has 7 features.*expects 8",
        ),
        (
            lambda: sparse_linear(torch.randn(2, 8), torch.randn(4, 8, 1), config="fst"),
            r"weight must be 2-D",
        ),
        (
            lambda: sparse_linear(torch.randn(2, 8).long(), torch.randn(4, 8), config="fst"),
            r"floating point.*torch.int64",
        ),
    ],
)
def test_bad_input_gets_a_clear_error(call, needle):
    with pytest.raises(ValueError, match=needle):
        call()


def test_activation_and_gradient_operands_are_2to4():
    """S_T(dY), S_T(Xᵀ) (WG/WX) and S_Co(dY) (GG/GX) are 2:4 along their reduction axes."""
    from fullsparse.functional import _mask_channels, _mask_spatial_conv

    torch.manual_seed(10)
    dy = torch.randn(2, 12, 5, 7)
    st = _mask_spatial_conv(dy)  # along N·Ho·Wo per channel, (n, h, w) order
    assert is_2to4(st.transpose(0, 1).reshape(12, -1), 1)
    sco = _mask_channels(dy, 1, groups=3)  # along Co within each of 3 groups of 4
    assert is_2to4(sco.reshape(2, 3, 4, 5, 7), 2)
    tokens = torch.randn(3, 5, 8)
    assert is_2to4(_mask_channels(tokens, -1, 1), -1)


def test_meprop_keeps_half_of_each_output_positions_gradient():
    """TopK(dY): at every (n, h, w) of a conv and every token of a linear layer, exactly
    round(C/2) channels survive, and they are the largest |dY|."""
    from fullsparse.operands import topk_channels

    torch.manual_seed(11)
    dy = torch.randn(2, 6, 3, 5, dtype=torch.float64)
    top = topk_channels(dy, 1)
    kept = top != 0
    assert (kept.sum(1) == 3).all()
    smallest_kept = torch.where(kept, dy.abs(), torch.inf).amin(1)
    largest_dropped = torch.where(kept, -torch.inf, dy.abs()).amax(1)
    assert (smallest_kept > largest_dropped).all()
    tokens = torch.randn(4, 7, 10, dtype=torch.float64)
    assert ((topk_channels(tokens, -1) != 0).sum(-1) == 5).all()
