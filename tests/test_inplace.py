"""A sparse layer's output takes every in-place op the torch layer's output takes.

Each case runs a layer, modifies its output in place, backpropagates, and checks the output
and all gradients against the float64 reference (``tests/reference.py``) fed with the
gradient the in-place op passes back. Under ``torch.compile`` the same code must trace and
give the eager gradients.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

import reference
from fullsparse import RECIPES, SparseConv2d, SparseLinear, sparsify_
from fullsparse.sampling import AdaptiveState
from reference import DRAW_SEED, Geo, module_reference_name, same_draws

ref_conv, ref_linear = same_draws(reference.ref_conv), same_draws(reference.ref_linear)

TOL64 = dict(rtol=1e-9, atol=1e-9)

#: input shapes of the Linear(8 -> 12) cases: 1-D, 2-D (no token axis), 3-D and 4-D (odd
#: token count, so information restoration's unpaired last token is covered)
LINEAR_INPUTS = {"1d": (8,), "2d": (6, 8), "3d": (2, 6, 8), "4d": (2, 3, 5, 8)}


def _op_mul(y: torch.Tensor) -> None:
    y.mul_(2.0)


def _op_add(y: torch.Tensor) -> None:
    y.add_(1.5)


def _op_relu(y: torch.Tensor) -> None:
    torch.relu_(y)


def _op_index(y: torch.Tensor) -> None:
    y[..., 1] = 0.0


#: each in-place op, and the gradient it passes back to the layer output y from the
#: upstream gradient g (y_pre: y before the op)
INPLACE = {
    "mul_": (_op_mul, lambda g, y_pre: 2.0 * g),
    "add_": (_op_add, lambda g, y_pre: g),
    "relu_": (_op_relu, lambda g, y_pre: g * (y_pre > 0)),
    "index_assign": (_op_index, lambda g, y_pre: g.index_fill(-1, torch.tensor([1]), 0.0)),
}


def _linear(name: str) -> SparseLinear:
    torch.manual_seed(0)
    return SparseLinear(8, 12, config=name).double()


def _conv(name: str) -> SparseConv2d:
    torch.manual_seed(0)
    return SparseConv2d(4, 8, 3, stride=(1, 2), padding=1, config=name).double()


def _check(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(got, want, msg=lambda m: f"{what}: {m}", **TOL64)


def _run_and_check(layer: nn.Module, x: torch.Tensor, op: str, reference) -> None:
    apply, passes_back = INPLACE[op]
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y_pre = y.detach().clone()
    apply(y)
    g = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(DRAW_SEED)  # the draws of the reference (fst_mvue)
    (y * g).sum().backward()
    y_ref, dx, dw, db = reference(x.detach(), passes_back(g, y_pre))
    want_y = y_ref.clone()
    apply(want_y)
    _check(y.detach(), want_y, "output")
    _check(x.grad, dx, "grad_input")
    _check(layer.weight.grad, dw, "grad_weight")
    _check(layer.bias.grad, db, "grad_bias")


@pytest.mark.parametrize("op", list(INPLACE))
@pytest.mark.parametrize("rank", list(LINEAR_INPUTS))
@pytest.mark.parametrize("name", RECIPES)
def test_inplace_op_on_linear_output_gives_reference_gradients(name, rank, op):
    layer = _linear(name)
    x = torch.randn(LINEAR_INPUTS[rank], dtype=torch.float64)
    w, b = layer.weight.detach(), layer.bias.detach()

    def reference(x, gy):
        if x.ndim == 1:  # the layer treats [d_in] as a batch of one
            y, dx, dw, db = ref_linear(x[None], w, b, gy[None], module_reference_name(name))
            return y[0], dx[0], dw, db
        return ref_linear(x, w, b, gy, module_reference_name(name))

    _run_and_check(layer, x, op, reference)


@pytest.mark.parametrize("op", list(INPLACE))
@pytest.mark.parametrize("name", RECIPES)
def test_inplace_op_on_conv_output_gives_reference_gradients(name, op):
    layer = _conv(name)
    x = torch.randn(2, 4, 5, 7, dtype=torch.float64)
    w, b = layer.weight.detach(), layer.bias.detach()
    geo = Geo(layer.stride, layer.padding, layer.dilation, layer.groups)
    ref_name = module_reference_name(name)
    _run_and_check(layer, x, op, lambda x, gy: ref_conv(x, w, b, gy, geo, ref_name))


def test_token_linear_then_inplace_ops_trains_after_sparsify():
    """The failing model of the bug report: in-place ops between two token Linears."""

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 4)

        def forward(self, x):
            y = self.a(x)
            y.mul_(2)
            return self.b(torch.relu_(y))

    torch.manual_seed(0)
    model = M().double()
    dense = M().double()
    dense.load_state_dict(model.state_dict())
    sparsify_(model, "fst", filter_fn=lambda name, m: True)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    model(x).sum().backward()
    assert isinstance(model.a, SparseLinear)
    assert model.a.weight.grad is not None and torch.isfinite(model.a.weight.grad).all()
    # the dense recipe is the torch layer exactly, in-place ops included
    sparsify_(dense, "dense", filter_fn=lambda name, m: True)
    twin = M().double()
    twin.load_state_dict(dense.state_dict())
    dense(x).sum().backward()
    twin(x).sum().backward()
    for p, q in zip(dense.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


def _all_inplace(y: torch.Tensor) -> torch.Tensor:
    y.mul_(2.0)
    y[..., 1] = 0.0
    y.add_(-0.5)
    return torch.relu_(y)  # last: relu_ saves its output for its backward


class _ThreeLayers(nn.Module):
    """A Linear on a 3-D and a 4-D input, and a Conv2d, each output modified in place."""

    def __init__(self, name: str, with_conv: bool = True) -> None:
        super().__init__()
        self.lin = _linear(name).float()
        self.conv = _conv(name).float() if with_conv else None

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        outs = [_all_inplace(self.lin(x)) for x in xs if x.shape[-1] == 8]
        if self.conv is not None:
            outs.append(_all_inplace(self.conv(xs[-1])))
        return torch.cat([o.flatten() for o in outs])


def _compiled_matches_eager(name: str, backend: str, with_conv: bool = True) -> None:
    torch.compiler.reset()  # one fresh compile per case: the recompile limit never binds
    model = _ThreeLayers(name, with_conv)
    gen = torch.Generator().manual_seed(2)
    shapes = [(2, 6, 8), (2, 3, 5, 8)] + ([(2, 4, 5, 7)] if with_conv else [])
    xs = [torch.randn(s, generator=gen) for s in shapes]
    g = torch.randn(model(*xs).shape, generator=gen)
    results = []
    for fn in (model, torch.compile(model, backend=backend, fullgraph=True)):
        model.zero_grad()
        for module in model.modules():  # both start from a fresh sampled-gradient state
            if getattr(module, "gw_state", None) is not None:
                module.gw_state.copy_(AdaptiveState.new())
        inputs = [x.clone().requires_grad_(True) for x in xs]
        y = fn(*inputs)
        torch.manual_seed(DRAW_SEED)  # eager and compiled draw the same (fst_mvue)
        (y * g).sum().backward()
        grads = [x.grad for x in inputs] + [p.grad.clone() for p in model.parameters()]
        results.append([y.detach(), *grads])
    for i, (a, b) in enumerate(zip(*results, strict=True)):
        torch.testing.assert_close(a, b, msg=lambda m, i=i: f"result {i}: {m}")


#: the recipes the default run compiles, one per distinct path under compile (dense; the IR
#: weight gradient; the MVUE's draw; the sampled custom operator with its mutated state; the
#: one-call sampled product; the cached TSM mask); the others are ``slow`` (a compile each)
COMPILED_BY_DEFAULT = ("dense", "fst", "fst_mvue", "fst_adaptive", "fst_is_batch", "tsm")


@pytest.mark.parametrize(
    "name",
    [n if n in COMPILED_BY_DEFAULT else pytest.param(n, marks=pytest.mark.slow) for n in RECIPES],
)
def test_inplace_ops_on_outputs_under_torch_compile(name):
    _compiled_matches_eager(name, "aot_eager")


@pytest.mark.slow
def test_inplace_ops_on_outputs_under_inductor_where_a_compiler_exists():
    """With a C++ compiler, the default backend (inductor); without one, aot_eager (the
    same autograd graph, no code generation), so the test always runs. The token Linear
    only: inductor's code generation is slow on a small machine."""
    backend = "inductor" if (shutil.which("g++") or shutil.which("cc")) else "aot_eager"
    _compiled_matches_eager("fst", backend, with_conv=False)
