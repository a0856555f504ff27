"""A convolution's weight gradient as one GEMM (``kernels.reference.conv_weight_gemm``):
against the float64 im2col reference, the rule that picks it, and the layers that use it."""

from __future__ import annotations

import pytest
import torch

import fullsparse.kernels.reference as kref
import reference
from fullsparse.functional import sparse_conv2d
from fullsparse.geometry import ConvGeometry
from reference import Geo, im2col, out_size, same_draws

# (N, Ci, H, W, Co, kernel, stride, padding, dilation)
GEOMETRIES = {
    "3x3_s1_p1": (2, 8, 6, 6, 8, (3, 3), (1, 1), (1, 1), (1, 1)),
    "3x3_s2_odd_width": (2, 8, 9, 11, 8, (3, 3), (2, 2), (1, 1), (1, 1)),
    "dilation2": (1, 8, 9, 9, 8, (3, 3), (1, 1), (2, 2), (2, 2)),
    "1x3_stride_2x1": (2, 4, 6, 7, 8, (1, 3), (2, 1), (0, 1), (1, 1)),
    "1x1_s2": (3, 8, 5, 5, 16, (1, 1), (2, 2), (0, 0), (1, 1)),
    "width1": (2, 4, 5, 1, 8, (3, 1), (1, 1), (1, 0), (1, 1)),
}


def _operands(case: str, dtype: torch.dtype, seed: int = 0):
    n, ci, h, w, co, k, s, p, d = GEOMETRIES[case]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, ci, h, w, generator=gen, dtype=dtype)
    weight = torch.randn(co, ci, *k, generator=gen, dtype=dtype)
    ho, wo = out_size(h, w, k[0], k[1], Geo(s, p, d))
    dy = torch.randn(n, co, ho, wo, generator=gen, dtype=dtype)
    return x, weight, dy, Geo(s, p, d), ConvGeometry.make(s, p, d, 1)


def _reference_grad_weight(x, weight, dy, geo):
    co, _, kh, kw = weight.shape
    dy2 = dy.double().permute(1, 0, 2, 3).reshape(co, -1)  # [Co, N·Ho·Wo], (n, ho, wo)
    return (dy2 @ im2col(x.double(), kh, kw, geo).t()).reshape(weight.shape)


@pytest.mark.parametrize("case", list(GEOMETRIES))
def test_gemm_weight_gradient_matches_float64_reference(case):
    x, weight, dy, ref_geo, geo = _operands(case, torch.float64)
    want = _reference_grad_weight(x, weight, dy, ref_geo)
    torch.testing.assert_close(kref.conv_weight_gemm(dy, x, weight, geo), want,
                               rtol=1e-12, atol=1e-12)  # fmt: skip
    x32, w32, dy32 = x.float(), weight.float(), dy.float()
    got = kref.conv_weight_gemm(dy32, x32, w32, geo)
    assert got.dtype == torch.float32 and got.shape == weight.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    cl = x32.contiguous(memory_format=torch.channels_last)  # any input layout
    torch.testing.assert_close(kref.conv_weight_gemm(dy32, cl, w32, geo), got)


def test_the_rule_picks_the_gemm_for_a_large_weight_and_a_short_reduction():
    rule, geo = kref.weight_grad_by_gemm, ConvGeometry.make(1, 1)
    w512 = torch.empty(512, 512, 3, 3)  # ResNet-18's last stage: 2.4 M entries
    x, dy = torch.empty(8, 512, 5, 5), torch.empty(8, 512, 5, 5)  # N·Ho·Wo = 200
    assert rule(dy, x, w512, geo)
    assert rule(dy[:5], x[:5], w512, geo)  # a sampled product's kept samples
    assert not rule(torch.empty(32, 512, 5, 5), torch.empty(32, 512, 5, 5), w512, geo)  # 800
    edge = kref.GEMM_MAX_REDUCTION // 4
    assert rule(torch.empty(edge, 512, 2, 2), torch.empty(edge, 512, 2, 2), w512, geo)
    assert not rule(torch.empty(edge + 1, 512, 2, 2), torch.empty(edge + 1, 512, 2, 2), w512, geo)
    w256 = torch.empty(256, 256, 3, 3)  # ResNet-18's third stage: oneDNN as fast
    assert not rule(torch.empty(8, 256, 5, 5), torch.empty(8, 256, 5, 5), w256, geo)
    assert not rule(dy.double(), x.double(), w512.double(), geo)  # float32 only
    assert not rule(dy.bfloat16(), x.bfloat16(), w512.bfloat16(), geo)
    grouped = ConvGeometry.make(1, 1, 1, 2)
    assert not rule(dy, x, torch.empty(512, 256, 3, 3), grouped)


@pytest.fixture
def gemm_everywhere(monkeypatch):
    """Every float32 weight gradient through the GEMM; returns the calls it made."""
    calls = []
    real = kref.conv_weight_gemm

    def counted(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(kref, "GEMM_MIN_WEIGHT", 1)
    monkeypatch.setattr(kref, "GEMM_MAX_REDUCTION", 1 << 30)
    monkeypatch.setattr(kref, "conv_weight_gemm", counted)
    return calls


@pytest.mark.parametrize("name", ["dense", "fst2", "fst", "fst_is_batch", "fst_is", "fst_mvue"])
def test_layers_through_the_gemm_match_float64_reference(name, gemm_everywhere):
    x, weight, dy, ref_geo, geo = _operands("3x3_s2_odd_width", torch.float32, seed=3)

    def run():
        xg, wg = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        y = sparse_conv2d(xg, wg, None, geo.stride, geo.padding, geo.dilation, config=name)
        y.backward(dy)
        return y, xg.grad, wg.grad

    y, gx, gw = same_draws(run)()
    assert gemm_everywhere, "the weight gradient did not go through the GEMM"
    want = same_draws(reference.ref_conv)(x, weight, None, dy, ref_geo, name)
    for got, ref in zip((y, gx, gw), want[:3], strict=True):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


def test_a_both_gradients_call_splits_and_keeps_grad_input(gemm_everywhere):
    x, weight, dy, _, geo = _operands("3x3_s1_p1", torch.float32, seed=5)
    dx, dw = kref.conv_backward(dy, x, weight, geo, "both")
    assert len(gemm_everywhere) == 1
    dx_ref, dw_ref, _ = torch.ops.aten.convolution_backward(
        dy, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, False]
    )
    assert torch.equal(dx, dx_ref)  # grad_input: the same kernel as before
    torch.testing.assert_close(dw, dw_ref, rtol=1e-5, atol=1e-5)
    assert kref.conv_backward(dy, x, weight, geo, "input").shape == x.shape
    assert len(gemm_everywhere) == 1  # no weight gradient asked: no GEMM
