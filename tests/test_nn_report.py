"""The sparsify_ report: a text table in 100 columns, footnotes for long reasons, and the
HTML table notebooks show."""

from __future__ import annotations

from html.parser import HTMLParser

import torch
from torch import nn

from fullsparse import sparsify_
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
    assert lines[0].split() == ["layer", "type", "weight", "shape", "gets", "backend", "why"]
    conv1 = next(line for line in lines if line.startswith("conv1 "))
    assert conv1.split() == ["conv1", "Conv2d", "16x1x3x3", "fst", "reference", "[1]", "K=9",
                             "zero-padded", "to", "12"]  # fmt: skip
    fc = next(line for line in lines if line.startswith("fc "))
    assert fc.split()[3:] == ["dense", "-", "classifier", "head", "(last", "Linear)"]
    assert lines[2 + 22] == "21 of 22 layers use 'fst'"  # after the header, rule and 22 rows
    # each distinct backend reason is a footnote, once, in full (wrapped lines re-joined)
    reasons = {r.backend_reason for r in report if r.sparse}
    notes = lines[25:]
    assert sum(line.startswith("[") for line in notes) == len(reasons) >= 2
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
    assert lines[2].split() == ["<model>", "Linear", "-", "dense", "-", "lazy"]
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
    assert table.rows[0] == ["layer", "type", "weight shape", "gets", "backend", "why"]
    assert [row[0] for row in table.rows[1:]] == ["0", "2", "3"]
    assert table.rows[1][:4] == ["0", "Conv2d", "8x3x3x3", "fst"]
    assert table.rows[1][4].startswith("reference: CPU now")  # the backend reason in full
    assert table.rows[2][3:] == ["dense", "-", "<fused> & kept"]  # escaped, and read back
    assert "&lt;fused&gt; &amp; kept" in report._repr_html_()
    assert table.caption == "2 of 3 layers use 'fst'"
    model(torch.randn(1, 3, 3, 3))
