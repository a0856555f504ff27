"""The 2:4 CPU kernels (fullsparse.kernels.cpu_sparse) and the ``cpu_sparse`` backend: every
product against a float64 dense product of the same operands, the fused MVUE against the
eager one bit for bit, every layer role against the float64 reference of its recipe."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fullsparse import native, recipe
from fullsparse.estimators import mvue_2to4
from fullsparse.functional import sparse_linear
from fullsparse.kernels import BackendUnavailableError, LayerShape, plan_layer, platform_for
from fullsparse.kernels.cpu_sparse import (
    mvue_packed,
    pack24,
    spmm24,
    tokens_product,
    unavailable_reason,
)
from fullsparse.nn import sparsify_
from reference import ref_linear, ref_mask_cols, ref_mask_rows, same_draws

#: float32 products against float64: a few roundings of each sum, relative to Σ|a|·|b|
TOL32 = dict(rtol=2e-5, atol=2e-5)


def _close(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor | None = None) -> None:
    """|got − want| ≤ 1e-5·(|a|·|b| summed) + 1e-6 entrywise (float32 against float64)."""
    err = (got.double() - want).abs()
    bound = 1e-5 * (scale if scale is not None else want.abs()) + 1e-6
    assert bool((err <= bound).all()), float((err - bound).max())


def _two_of_four(rows: int, cols: int, dim: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(rows, cols, generator=g)
    return m * (ref_mask_rows(m) if dim == 1 else ref_mask_cols(m)).to(m.dtype)


def test_the_kernels_build_here():
    # CI and this machine have a C compiler and an x86-64 CPU with AVX2 / FMA: the fast
    # form must be what runs (a portable build would pass the value tests below too)
    assert native.available()
    assert unavailable_reason() is None


@pytest.mark.parametrize(
    ("m", "k", "r"),
    [(1, 4, 1), (5, 8, 3), (64, 64, 8), (100, 132, 17), (130, 260, 9), (200, 12, 70)],
)
def test_product_equals_the_float64_product(m, k, r):
    a = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    b = _two_of_four(r, k, seed=k)
    want = a.double() @ b.double().t()
    scale = a.double().abs() @ b.double().abs().t()
    _close(spmm24(a, pack24(b)), want, scale)
    # any strides: a transposed view of A, a column-major output, B packed down columns
    out = torch.empty(r, m).t()
    _close(spmm24(a.t().contiguous().t(), pack24(b.t().contiguous().t()), out=out), want, scale)
    assert out.stride() == (1, m)
    for rows in (True, False):  # either layout of the packed entries, from either layout of B
        _close(spmm24(a, pack24(b.t().contiguous().t(), rows=rows)), want, scale)
        _close(spmm24(a, pack24(b, rows=rows)), want, scale)
    bias = torch.randn(r)
    _close(spmm24(a, pack24(b), bias=bias), want + bias.double(), scale + bias.double().abs())


def test_pack_refuses_what_is_not_two_of_four():
    with pytest.raises(ValueError, match="not 2:4 along its rows"):
        pack24(torch.ones(3, 8))
    with pytest.raises(ValueError, match="K a multiple of 4"):
        pack24(torch.zeros(3, 6))
    with pytest.raises(ValueError, match="float32 CPU"):
        pack24(torch.zeros(3, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="does not fit"):
        spmm24(torch.zeros(2, 12), pack24(torch.zeros(3, 8)))


def test_pack_keeps_two_values_and_their_columns_per_group():
    b = torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 0.0, 0.0]])
    p = pack24(b)
    assert p.values.tolist() == [[1.0, 2.0, 3.0, 0.0]]
    assert p.index[0, :3].tolist() == [1, 3, 4]  # a missing entry: value 0 in its group


def _unpacked(p) -> torch.Tensor:
    """The dense ``[rows, cols]`` matrix a packed operand holds."""
    out = torch.zeros(p.rows, p.cols)
    rows = torch.arange(p.rows)
    for j in range(p.cols // 2):
        at = rows * p.row_stride + j * p.entry_stride
        out[rows, p.index.flatten()[at].long()] += p.values.flatten()[at]
    return out


@pytest.mark.parametrize(("tokens", "channels"), [(4, 1), (64, 9), (128, 300), (36, 257)])
def test_the_fused_mvue_is_the_eager_one_bit_for_bit(tokens, channels):
    dy = torch.randn(tokens, channels, generator=torch.Generator().manual_seed(channels))
    key = (123456789, 987654321)
    eager = mvue_2to4(dy, 0, key=key)
    packed = mvue_packed(dy, key)
    assert packed is not None and packed.shape == (channels, tokens)
    assert torch.equal(_unpacked(packed).t(), eager + 0.0)  # −0 counts as 0
    assert torch.equal(_unpacked(pack24(eager.t())), _unpacked(packed))
    assert int((_unpacked(packed) != 0).sum()) <= channels * tokens // 2


def test_the_fused_mvue_leaves_what_it_cannot_do_to_the_eager_path():
    key = (1, 2)
    assert mvue_packed(torch.randn(6, 3), key) is None  # tokens not a multiple of 4
    assert mvue_packed(torch.tensor([[float("nan")]] * 4), key) is None
    assert mvue_packed(torch.randn(8, 3, dtype=torch.float64), key) is None


def test_tokens_product_equals_the_float64_product():
    dy = _two_of_four(96, 40, dim=0, seed=3)  # 2:4 along the tokens (the 96 rows)
    x = torch.randn(96, 33)
    scale = dy.double().abs().t() @ x.abs().double()
    _close(tokens_product(dy, x), dy.double().t() @ x.double(), scale)
    assert tokens_product(torch.ones(96, 4), x) is None  # not 2:4 along the tokens
    assert tokens_product(dy[:90], x[:90]) is None


#: the 2:4 products each recipe's Linear layer runs on the backend: output (S_K), input
#: gradient (S_Co), weight gradient (a dY 2:4 along the tokens)
PRODUCTS = {"fst_mvue": 3, "fst": 2, "fst2": 2, "srste": 1, "wg": 3, "dense": 0}


@pytest.mark.parametrize("name", list(PRODUCTS))
def test_every_role_of_a_linear_layer_equals_the_float64_reference(monkeypatch, name):
    from fullsparse.kernels import cpu_sparse

    calls = []
    kernel = cpu_sparse.spmm24
    monkeypatch.setattr(cpu_sparse, "spmm24", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 36, 24, generator=gen, requires_grad=True)
    w = torch.randn(20, 24, generator=gen, requires_grad=True)
    b = torch.randn(20, generator=gen, requires_grad=True)
    gy = torch.randn(2, 36, 20, generator=gen)
    y = sparse_linear(x, w, b, config=name, backend="cpu_sparse")
    same_draws(y.backward)(gy)
    want = same_draws(ref_linear)(x.detach(), w.detach(), b.detach(), gy, name)
    for got, ref in zip((y, x.grad, w.grad, b.grad), want, strict=True):
        torch.testing.assert_close(got.double(), ref, **TOL32)
    assert len(calls) == PRODUCTS[name]


def test_the_backend_runs_the_products_it_names():
    config = recipe("fst_mvue")
    cpu = platform_for("cpu")
    plan = plan_layer(LayerShape("linear", (20, 24)), config, "cpu_sparse", cpu, torch.float32)
    assert (plan.backend, plan.output, plan.grad_input) == ("cpu_sparse", True, True)
    odd = plan_layer(LayerShape("linear", (18, 24)), config, "cpu_sparse", cpu, torch.float32)
    assert (odd.output, odd.grad_input) == (True, False) and "d_out=18" in odd.reason
    conv = LayerShape("conv", (8, 4, 3, 3))
    assert plan_layer(conv, config, "cpu_sparse", cpu, torch.float32).backend == "reference"
    with pytest.raises(BackendUnavailableError, match="backend='cpu_sparse'.*float32"):
        plan_layer(LayerShape("linear", (20, 24)), config, "cpu_sparse", cpu, torch.float64)


def test_a_model_trains_on_the_backend_as_on_the_reference():
    def step(backend: str) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16), nn.Linear(16, 4))
        sparsify_(model, "fst_mvue", backend=backend)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.randn(8, 12, 16)
        for _ in range(2):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    for got, want in zip(step("cpu_sparse"), step("reference"), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_bench_steps_refuses_the_backend_where_it_cannot_run(monkeypatch, capsys):
    from fullsparse.cli import main

    monkeypatch.setenv("FULLSPARSE_NATIVE", "off")
    assert main(["bench", "steps", "--backend", "cpu_sparse", "--cases", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "--backend cpu_sparse: the native CPU kernels are switched off" in err


@pytest.mark.slow
def test_inside_a_compile_trace_the_reference_products_run():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
    sparsify_(model, "fst2", backend="cpu_sparse")
    x = torch.randn(4, 8, 16)
    eager = model(x)  # the kept plan holds the 2:4 kernel now
    compiled = torch.compile(model)(x)
    torch.testing.assert_close(compiled, eager, **TOL32)
