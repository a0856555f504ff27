"""A sparse module keeps the checks and the kernel choice of its last call
(``fullsparse.nn.linear_forward``, ``SparseConv2d.forward``): a call of the same kind skips
them, any change of kind makes them again, and the results are those of the functional
calls bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fullsparse.nn as fnn
from fullsparse import recipe
from fullsparse.functional import sparse_conv2d, sparse_linear
from fullsparse.nn import SparseConv2d, SparseLinear


@pytest.fixture
def plans(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How often the modules ran the full checks (``linear_plan`` / ``conv_plan``)."""
    counts = {"linear": 0, "conv": 0}

    def counting(kind: str, fn):  # type: ignore[no-untyped-def]
        def wrapped(*args, **kwargs):  # type: ignore[no-untyped-def]
            counts[kind] += 1
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(fnn, "linear_plan", counting("linear", fnn.linear_plan))
    monkeypatch.setattr(fnn, "conv_plan", counting("conv", fnn.conv_plan))
    return counts


def _linear(config: str = "fst2") -> SparseLinear:
    torch.manual_seed(0)
    return SparseLinear.from_dense(nn.Linear(16, 12).double(), recipe(config))


def test_a_linear_call_of_the_same_kind_skips_the_checks(plans: dict[str, int]) -> None:
    layer = _linear()
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    for _ in range(3):
        layer(x)
    assert plans["linear"] == 1
    layer(torch.randn(5, 4, 16, dtype=torch.float64))  # other leading dims: the same kind
    assert plans["linear"] == 1
    layer.float()(x.float())  # other dtype: checked again
    assert plans["linear"] == 2
    layer.config = recipe("fst")  # another config: checked again, and computed by it
    with torch.no_grad():
        got = layer(x.float())
    assert plans["linear"] == 3
    want = sparse_linear(x.float(), layer.weight, layer.bias, config=recipe("fst"))
    assert torch.equal(got, want)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast on: checked again
        layer(x.float())
    assert plans["linear"] == 4


def test_the_kept_linear_call_gives_the_functional_result_bit_for_bit() -> None:
    layer = _linear()
    layer.eval()  # no mask clock: both calls see the same masks
    x = torch.randn(3, 8, 16, dtype=torch.float64, requires_grad=True)
    for _ in range(2):  # the second call runs from the kept plan
        y = layer(x)
        y.square().sum().backward()
        got = (y.detach(), x.grad.clone(), layer.weight.grad.clone(), layer.bias.grad.clone())
        x.grad = layer.weight.grad = layer.bias.grad = None
    ref_x = x.detach().clone().requires_grad_()
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    y_ref = sparse_linear(ref_x, w, b, config=recipe("fst2"))
    y_ref.square().sum().backward()
    for a, r in zip(got, (y_ref.detach(), ref_x.grad, w.grad, b.grad), strict=True):
        assert torch.equal(a, r)


def test_bad_inputs_after_good_calls_still_get_their_messages() -> None:
    layer = _linear()
    layer(torch.randn(2, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="sparse_linear: input has 15 features"):
        layer(torch.randn(2, 15, dtype=torch.float64))
    with pytest.raises(ValueError, match="sparse_linear input must be a torch.Tensor"):
        layer([1.0] * 16)
    with pytest.raises(ValueError, match="must share one dtype"):
        layer(torch.randn(2, 16))
    with pytest.raises(ValueError, match="at least 1 dimension"):
        layer(torch.tensor(1.0, dtype=torch.float64))


def test_a_deep_copy_checks_its_own_first_call(plans: dict[str, int]) -> None:
    layer = _linear()
    x = torch.randn(2, 16, dtype=torch.float64)
    layer(x)
    twin = copy.deepcopy(layer)
    twin(x)
    twin(x)
    assert plans["linear"] == 2  # once each


def test_a_conv_call_of_the_same_kind_skips_the_checks(plans: dict[str, int]) -> None:
    torch.manual_seed(0)
    layer = SparseConv2d.from_dense(nn.Conv2d(8, 8, 3, padding=1).double(), recipe("fst2"))
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    layer(x)
    layer(x)
    assert plans["conv"] == 1
    layer(torch.randn(2, 8, 7, 6, dtype=torch.float64))  # another size: checked again
    assert plans["conv"] == 2
    layer(x.contiguous(memory_format=torch.channels_last))  # another layout: checked again
    assert plans["conv"] == 3
    with pytest.raises(ValueError, match="input has 4 channels"):
        layer(torch.randn(2, 4, 6, 6, dtype=torch.float64))


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_the_kept_conv_call_gives_the_functional_result_bit_for_bit(padding_mode: str) -> None:
    torch.manual_seed(0)
    # an even kernel with padding='same' pads the input asymmetrically, outside the product
    # (torch's own conv is not called here: its warning about that copy comes once per
    # process, and tests/test_functional.py waits for it)
    dense = nn.Conv2d(8, 8, 4, padding="same", padding_mode=padding_mode).double()
    layer = SparseConv2d.from_dense(dense, recipe("fst2")).eval()
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64, requires_grad=True)
    for _ in range(2):  # the second call runs from the kept plan
        y = layer(x)
        y.square().sum().backward()
        got = (y.detach(), x.grad.clone(), layer.weight.grad.clone())
        x.grad = layer.weight.grad = layer.bias.grad = None
    ref_x = x.detach().clone().requires_grad_()
    w = layer.weight.detach().clone().requires_grad_()
    inp = ref_x
    if padding_mode != "zeros":
        inp = nn.functional.pad(ref_x, dense._reversed_padding_repeated_twice, mode=padding_mode)
    y_ref = sparse_conv2d(
        inp, w, layer.bias.detach(), padding="same" if padding_mode == "zeros" else 0,
        config=recipe("fst2"),
    )  # fmt: skip
    y_ref.square().sum().backward()
    for a, r in zip(got, (y_ref.detach(), ref_x.grad, w.grad), strict=True):
        assert torch.equal(a, r)
