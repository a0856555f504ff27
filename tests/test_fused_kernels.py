"""The fused (compiled) CPU kernels give the eager reference's bits (fullsparse.fused)."""

from __future__ import annotations

import pytest
import torch

from fullsparse import fused
from fullsparse.estimators import mvue_2to4, mvue_planes

pytestmark = pytest.mark.usefixtures("one_thread")


def _draw(t: torch.Tensor, dim: int) -> torch.Tensor:
    torch.manual_seed(4)
    return mvue_2to4(t, dim)


def test_fused_mvue_equals_the_eager_reference_bit_for_bit(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(48, 1030, generator=gen)  # a partial last group; zeros and ties below
    t[:, :8] = 0.0
    t[3, 8:16] = 1.5
    monkeypatch.setenv("FULLSPARSE_FUSED", "off")
    eager = [_draw(t, 1), _draw(t, 0)]
    monkeypatch.setenv("FULLSPARSE_FUSED", "on")
    assert fused.fused_or_eager(mvue_planes, t) is not mvue_planes  # the fused path is taken
    fused_out = [_draw(t, 1), _draw(t, 0)]
    for a, b in zip(eager, fused_out, strict=True):
        assert torch.equal(a, b)


def test_small_tensors_and_a_missing_compiler_stay_eager(monkeypatch):
    monkeypatch.setenv("FULLSPARSE_FUSED", "auto")
    small = torch.zeros(4, 4)
    assert fused.fused_or_eager(mvue_planes, small) is mvue_planes
    monkeypatch.setattr(fused.shutil, "which", lambda name: None)
    big = torch.zeros(fused.MIN_ELEMENTS)
    assert not fused.fused_enabled()
    assert fused.fused_or_eager(mvue_planes, big) is mvue_planes
    monkeypatch.setenv("FULLSPARSE_FUSED", "off")
    monkeypatch.undo()
    monkeypatch.setenv("FULLSPARSE_FUSED", "off")
    assert fused.fused_or_eager(mvue_planes, big) is mvue_planes


def test_a_compiler_failure_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken(*args):
        raise RuntimeError("no compiler today")

    def planes_copy(planes, u):  # a function of its own, so the real cache is untouched
        return mvue_planes(planes, u)

    monkeypatch.setenv("FULLSPARSE_FUSED", "on")
    monkeypatch.setattr(fused, "_compiled", {planes_copy: broken})
    monkeypatch.setattr(fused, "_failed", set())
    planes, u = torch.rand(4, 3, 5), torch.rand(3, 5)
    with pytest.warns(RuntimeWarning, match="could not be compiled"):
        out = fused.fused_or_eager(planes_copy, planes)(planes, u)
    assert torch.equal(out, mvue_planes(planes, u))
    assert fused.fused_or_eager(planes_copy, planes) is planes_copy  # eager from now on
