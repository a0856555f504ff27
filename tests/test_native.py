"""The native CPU kernels (fullsparse.native) equal the eager reference bit for bit, fall
back to it wherever they do not apply, and a failed build degrades to the eager path."""

from __future__ import annotations

import shutil

import pytest
import torch

from fullsparse import native, recipe
from fullsparse.operands import weight_operands

HAS_COMPILER = any(shutil.which(c) for c in ("cc", "gcc", "clang"))
NAN, INF = float("nan"), float("inf")


def _eager(monkeypatch, *args, **kwargs):
    with monkeypatch.context() as m:
        m.setenv("FULLSPARSE_NATIVE", "off")
        return weight_operands(*args, **kwargs)


def _same(a, b) -> None:
    if a is None or b is None:
        assert a is None and b is None
        return
    assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    # the sign of zeros too (x * 0 keeps it, as the eager product does)
    assert torch.equal(torch.signbit(a), torch.signbit(b))


def _weight(shape, seed=0):
    """Random values with ties, zeros of both signs, NaN and ±inf in some groups."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randint(-3, 4, shape, generator=gen).float()  # many ties
    w += torch.randn(shape, generator=gen) * (torch.rand(shape, generator=gen) < 0.5)
    flat = w.view(-1)
    flat[:12] = torch.tensor([NAN, 1.0, INF, -INF, -0.0, 0.0, 0.0, -0.0, NAN, NAN, NAN, 2.0])
    return w


def test_available_where_a_compiler_is():
    assert native.available() == HAS_COMPILER


@pytest.mark.parametrize(
    ("name", "shape", "groups"),
    [
        ("fst", (8, 16), 1),
        ("fst", (16, 8, 3, 3), 1),
        ("fst", (16, 4, 3, 3), 2),  # Co/g = 8
        ("fst_is_batch", (12, 20), 1),
        ("fst_mvue", (24, 4, 1, 1), 1),
        ("srste", (8, 12), 1),  # grad_input takes the forward operand
        ("fst2", (8, 12), 1),
    ],
)
@pytest.mark.parametrize("needs", ["both", "no_grad_input", "no_decay"])
def test_weight_side_equals_the_eager_path_bit_for_bit(monkeypatch, name, shape, groups, needs):
    config = recipe(name)
    w = _weight(shape, seed=len(shape) + groups)
    kwargs = {"grad_input": needs != "no_grad_input", "decay": needs != "no_decay"}
    got = weight_operands(w, config, groups, torch.float32, **kwargs)
    want = _eager(monkeypatch, w, config, groups, torch.float32, **kwargs)
    _same(got.output, want.output)
    _same(got.grad_input, want.grad_input)
    _same(got.decay, want.decay)
    if HAS_COMPILER and config.operands.output_weight == "S_K(W)":
        assert got.out_mask is None  # the native kernel made it: no mask materialized


def test_the_kernel_is_what_ran(monkeypatch):
    """Where it applies, weight_operands takes the native kernel (not the eager ops)."""
    calls = []
    real = native.fst_weight_side

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(native, "fst_weight_side", spy)
    weight_operands(_weight((8, 16)), recipe("fst"), 1, torch.float32)
    assert calls == [torch.Size([8, 16])]


@pytest.mark.parametrize(
    ("shape", "groups", "dtype", "layout"),
    [
        ((8, 18), 1, torch.float32, "contiguous"),  # K not a multiple of 4: zero padding
        ((16, 3, 3, 3), 1, torch.float32, "contiguous"),  # K = 27
        ((12, 4, 3, 3), 2, torch.float32, "contiguous"),  # Co/g = 6
        ((8, 16), 1, torch.float64, "contiguous"),
        ((8, 16), 1, torch.bfloat16, "contiguous"),
        ((8, 8, 3, 3), 1, torch.float32, "channels_last"),
    ],
)
def test_where_the_kernel_does_not_apply_the_eager_path_runs(
    monkeypatch, shape, groups, dtype, layout
):
    w = _weight(shape).to(dtype)
    if layout == "channels_last":
        w = w.to(memory_format=torch.channels_last)
    got = weight_operands(w, recipe("fst"), groups, dtype)
    want = _eager(monkeypatch, w, recipe("fst"), groups, dtype)
    assert got.out_mask is not None  # the eager path ran
    _same(got.output, want.output)
    _same(got.grad_input, want.grad_input)
    _same(got.decay, want.decay)


def test_the_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv("FULLSPARSE_NATIVE", "off")
    assert not native.available()
    assert native.fst_weight_side(torch.ones(4, 4), 0.1, True, True) is None


def test_a_failed_build_warns_once_and_runs_eagerly(monkeypatch, tmp_path):
    monkeypatch.setenv("FULLSPARSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "_compiler", lambda: shutil.which("false") or "/bin/false")
    w = _weight((8, 16))
    with pytest.warns(RuntimeWarning, match="native CPU kernels could not be built"):
        got = weight_operands(w, recipe("fst"), 1, torch.float32)
    assert not native.available()  # no second warning, no second build
    want = _eager(monkeypatch, w, recipe("fst"), 1, torch.float32)
    _same(got.output, want.output)
    _same(got.decay, want.decay)
