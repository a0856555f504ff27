"""The conv geometry and the one output-size formula."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fullsparse.geometry import ConvGeometry, conv_output_size

SRC = Path(__file__).resolve().parents[1] / "src" / "fullsparse"


def test_output_size_equals_torch_conv2d_on_every_small_geometry():
    x = torch.zeros(1, 1, 7, 6)
    for kh, kw, s, p, d in itertools.product((1, 2, 3), (1, 3), (1, 2, 3), (0, 1, 2), (1, 2)):
        geo = ConvGeometry.make((s, 1), (p, 1), (d, 1))
        ho, wo = geo.output_size((7, 6), (kh, kw))
        w = torch.zeros(1, 1, kh, kw)
        if ho < 1 or wo < 1:  # the dilated kernel does not fit: torch refuses too
            with pytest.raises(RuntimeError):
                F.conv2d(x, w, None, geo.stride, geo.padding, geo.dilation)
            continue
        y = F.conv2d(x, w, None, geo.stride, geo.padding, geo.dilation)
        assert (ho, wo) == tuple(y.shape[2:]), (kh, kw, s, p, d)
        assert ho == conv_output_size(7, kh, s, p, d)


def test_make_normalises_and_rejects():
    assert ConvGeometry.make(2, (1, 0), [3]) == ConvGeometry((2, 2), (1, 0), (3, 3), 1)
    with pytest.raises(ValueError, match="stride >= 1"):
        ConvGeometry.make(0)
    with pytest.raises(ValueError, match="pair of ints"):
        ConvGeometry.make((1, 2, 3))
    with pytest.raises(ValueError, match="groups"):
        ConvGeometry.make(groups=0)


def test_the_output_size_formula_is_written_once_in_src():
    # (size + 2 * padding - ...) // stride, in any spelling of the names
    formula = re.compile(r"\+ 2 \* [\w.\[\]]+ - [^\n]*\)\s*//")
    hits = [
        str(p.relative_to(SRC))
        for p in SRC.rglob("*.py")
        if formula.search(p.read_text(encoding="utf-8"))
    ]
    assert hits == ["geometry.py"]
