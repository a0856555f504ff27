"""The sparsify_ report: a text table in 100 columns, footnotes for long reasons, and the
HTML table notebooks show."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest
import torch
from torch import nn

from fullsparse import SparseConv2d, SparseLinear, recipe, sparsify_
from fullsparse.models import build_model
from fullsparse.nn_report import REPORT_WIDTH, LayerReport, SparsifyReport

LONG = (
    "kept dense because the deployment target runs this projection through a fused "
    "attention kernel that reads the weight directly, so a 2:4 mask would never be applied"
)


def _widths(text: str) -> list[int]:
    return [len(line) for line in text.splitlines()]


def test_readme_resnet20_report_fits_100_columns_with_backend_reasons_as_footnotes() -> None:
    report = sparsify_(build_model("resnet20", num_classes=10, in_channels=1), "fst")
    text = str(report)
    assert REPORT_WIDTH == 100 and max(_widths(text)) <= 100
    lines = text.splitlines()
    assert lines[0].split() == ["layer", "type", "weight", "shape", "gets", "dW", "backend", "why"]
    conv1 = next(line for line in lines if line.startswith("conv1 "))
    assert conv1.split() == ["conv1", "Conv2d", "16x1x3x3", "fst", "ir", "α=1", "reference", "[1]",
                             "K=9", "zero-padded", "to", "12"]  # fmt: skip
    fc = next(line for line in lines if line.startswith("fc "))
    assert fc.split()[3:] == ["dense", "-", "-", "[3]"]  # the reason did not fit: a footnote
    assert "[3] classifier head (last Linear)" in lines
    assert lines[2 + 22] == "21 of 22 layers use 'fst'"  # after the header, rule and 22 rows
    # each distinct backend reason is a footnote, once, in full (wrapped lines re-joined)
    reasons = {r.backend_reason for r in report if r.sparse}
    notes = lines[25:]
    # (and the head's reason, too long for its cell beside the dW column)
    assert sum(line.startswith("[") for line in notes) == len(reasons) + 1 >= 3
    joined = " ".join(line.strip() for line in notes)
    assert all(joined.count(reason) == 1 for reason in reasons)


def test_long_reasons_and_long_names_stay_within_the_width() -> None:
    inner = nn.Sequential()
    inner.add_module("a_rather_long_module_name_for_the_attention_block", nn.Linear(8, 8))
    inner.add_module("another_quite_long_name_for_the_output_projection", nn.Linear(8, 8))
    model = nn.Sequential()
    model.add_module("transformer_with_a_long_prefix", inner)
    model.add_module("head", nn.Linear(8, 2))
    report = sparsify_(model, "fst", lambda name, m: LONG if "output" in name else name != "head")
    for width in (100, 80):
        text = report.format(width)
        assert max(_widths(text)) <= width, text
        flat = " ".join(line.strip() for line in text.splitlines())
        assert LONG in flat  # the long reason, whole, as a footnote
        assert text.count(LONG.split()[0]) == 1  # once, not once per row
    text = str(report)
    first = next(i for i, line in enumerate(text.splitlines()) if "Linear" in line)
    name_lines = text.splitlines()[first : first + 3]
    # a long name continues on indented lines, cut after a dot
    assert name_lines[0].startswith("transformer_with_a_long_prefix.")
    assert name_lines[1].startswith("  a_rather_long_module_name")


def test_short_reasons_stay_inline_and_a_row_without_shape_shows_a_dash() -> None:
    report = SparsifyReport("fst", [LayerReport("", "Linear", (), False, "lazy")])
    lines = str(report).splitlines()
    assert lines[2].split() == ["<model>", "Linear", "-", "dense", "-", "-", "lazy"]
    assert lines[-1] == "0 of 1 layers use 'fst'"


class _Table(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.caption = ""
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: object) -> None:
        if tag == "tr":
            self.rows.append([])
        if tag in ("td", "th", "caption"):
            self._in = tag
            if tag != "caption":
                self.rows[-1].append("")

    def handle_endtag(self, tag: str) -> None:
        self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "caption":
            self.caption += data
        elif self._in:
            self.rows[-1][-1] += data


def test_notebook_repr_is_an_html_table_with_every_reason_in_full() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 8), nn.Linear(8, 2))
    report = sparsify_(model, "fst", lambda name, m: "<fused> & kept" if name == "2" else True)
    table = _Table()
    table.feed(report._repr_html_())
    assert table.rows[0] == ["layer", "type", "weight shape", "gets", "dW", "backend", "why"]
    assert [row[0] for row in table.rows[1:]] == ["0", "2", "3"]
    assert table.rows[1][:5] == ["0", "Conv2d", "8x3x3x3", "fst", "ir α=1"]
    assert table.rows[1][5].startswith("reference: CPU now")  # the backend reason in full
    assert table.rows[2][3:] == ["dense", "-", "-", "<fused> & kept"]  # escaped, and read back
    assert "&lt;fused&gt; &amp; kept" in report._repr_html_()
    assert table.caption == "2 of 3 layers use 'fst'"
    model(torch.randn(1, 3, 3, 3))


# --------------------------------------------------------------------------- layer policy
def _vit_like() -> nn.Module:
    model = nn.Sequential()
    model.add_module("patch", nn.Conv2d(1, 8, 4, stride=4))
    model.add_module("flat", nn.Flatten(2))
    model.add_module("mix", nn.Conv2d(8, 8, 1))
    model.add_module("qkv", nn.Linear(4, 8))
    model.add_module("proj", nn.Linear(8, 8))
    model.add_module("head", nn.Linear(8, 2))
    return model


@pytest.mark.parametrize(
    ("keep", "dense"),
    [
        ((), {"head"}),
        (("stem",), {"patch", "head"}),
        (("first_linear",), {"qkv", "head"}),
        (("stem", "first_linear"), {"patch", "qkv", "head"}),
        ("stem", {"patch", "head"}),
    ],
)
def test_keep_dense_policy_keeps_the_stem_and_first_linear_dense(keep, dense) -> None:
    model = _vit_like()
    report = sparsify_(model, "fst", keep_dense=keep)
    assert set(report.dense_names) == dense
    assert isinstance(model.patch, SparseConv2d) == ("patch" not in dense)
    assert isinstance(model.qkv, SparseLinear) == ("qkv" not in dense)
    reasons = {r.name: r.reason for r in report if not r.sparse}
    if "patch" in dense:
        assert reasons["patch"] == "stem (layer policy)"
        assert "stem (layer policy)" in str(report)
    if "qkv" in dense:
        assert reasons["qkv"] == "first Linear (layer policy)"


def test_keep_dense_overrides_the_filter_and_refuses_unknown_roles() -> None:
    report = sparsify_(_vit_like(), "fst", lambda n, m: True, keep_dense=["stem"])
    assert report.dense_names == ["patch"]  # the filter made the head sparse
    with pytest.raises(ValueError, match="keep_dense=.*'neck'"):
        sparsify_(_vit_like(), "fst", keep_dense=("neck",))


def test_report_shows_each_layer_kind_weight_gradient_estimator() -> None:
    config = recipe("fst", grad_weight_mode_linear="mvue")
    report = sparsify_(_vit_like(), config)
    assert {r.name: r.grad_weight for r in report} == {
        "patch": "ir α=1", "mix": "ir α=1", "qkv": "mvue", "proj": "mvue", "head": ""
    }  # fmt: skip
    assert [r["grad_weight"] for r in report.to_dict()["layers"]][2:4] == ["mvue", "mvue"]
    noir = sparsify_(_vit_like(), recipe("fst", ir_alpha_linear=0.0))
    assert noir["qkv"].grad_weight == "ir α=0" and noir["patch"].grad_weight == "ir α=1"
    qkv = next(line for line in str(report).splitlines() if line.startswith("qkv "))
    assert qkv.split()[3:5] == ["fst", "mvue"]
