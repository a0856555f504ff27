"""The report that :func:`fullsparse.sparsify_` / :func:`fullsparse.densify_` return.

One row per Conv/Linear-like layer: what it got, why, and which backend its GEMMs will use.
``str(report)`` is a plain-text table that fits a terminal of :data:`REPORT_WIDTH` columns
(reasons too long for their cell become numbered footnotes, shared by the rows that give the
same reason); in a notebook the report shows as an HTML table with every reason in full.
"""

from __future__ import annotations

import html
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LayerReport", "SparsifyReport", "REPORT_WIDTH"]

#: Columns ``str(report)`` fits in.
REPORT_WIDTH = 100
_SEP = "  "
# Below this many columns a "why" cell shows only its footnote mark: a reason cut to a
# few characters says nothing.
_MIN_WHY = 12


@dataclass
class LayerReport:
    """One row of a :class:`SparsifyReport`."""

    name: str
    kind: str
    shape: tuple[int, ...]
    sparse: bool
    reason: str
    #: For sparse layers: the backend its GEMMs will use ("reference", "semi_structured",
    #: "emulation", or "auto" for a k×k conv decided by one measurement) and why.
    backend: str = ""
    backend_reason: str = ""
    #: For sparse layers: its weight-gradient estimator (``grad_weight_mode`` of its layer
    #: kind, with α for ``ir``: "ir α=1", "mvue", ...); "" for dense layers.
    grad_weight: str = ""

    @property
    def action(self) -> str:
        return "sparse" if self.sparse else "dense"


class _Footnotes:
    """Numbered notes, one number per distinct text, in order of first use."""

    def __init__(self) -> None:
        self.texts: dict[str, int] = {}

    def mark(self, text: str) -> str:
        return f"[{self.texts.setdefault(text, len(self.texts) + 1)}]"

    def lines(self, width: int) -> list[str]:
        out = []
        for text, number in self.texts.items():
            head = f"[{number}] "
            out += textwrap.wrap(
                text,
                width,
                initial_indent=head,
                subsequent_indent=" " * len(head),
                break_on_hyphens=False,
            )
        return out


def _split_name(name: str, width: int, indent: int = 2) -> list[str]:
    """``name`` in lines of at most ``width`` characters, cut after dots where possible;
    the lines after the first are indented by ``indent``."""
    pieces: list[str] = []
    rest, room = name, width
    while len(rest) > room:
        cut = rest.rfind(".", 0, room) + 1 or room  # the dot stays at the end of a line
        pieces.append(rest[:cut])
        rest, room = rest[cut:], width - indent
    return [*pieces[:1], *(" " * indent + p for p in [*pieces[1:], rest])] if pieces else [rest]


#: The table's columns; ``dW`` is the layer's weight-gradient estimator.
_HEAD = ("layer", "type", "weight shape", "gets", "dW", "backend", "why")


@dataclass
class SparsifyReport:
    """What :func:`sparsify_` / :func:`densify_` did to every Conv/Linear-like layer."""

    recipe: str
    rows: list[LayerReport] = field(default_factory=list)
    backend: str = "auto"

    @property
    def sparse_names(self) -> list[str]:
        return [r.name for r in self.rows if r.sparse]

    @property
    def dense_names(self) -> list[str]:
        return [r.name for r in self.rows if not r.sparse]

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[LayerReport]:
        return iter(self.rows)

    def __getitem__(self, name: str) -> LayerReport:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "backend": self.backend,
            "layers": [
                {
                    "name": r.name,
                    "kind": r.kind,
                    "shape": list(r.shape),
                    "action": r.action,
                    "reason": r.reason,
                    "backend": r.backend,
                    "backend_reason": r.backend_reason,
                    "grad_weight": r.grad_weight,
                }
                for r in self.rows
            ],
        }

    def summary(self) -> str:
        return f"{len(self.sparse_names)} of {len(self.rows)} layers use {self.recipe!r}"

    def _cells(self, r: LayerReport, backend_note: Callable[[str], str]) -> list[str]:
        """(layer, type, weight shape, gets, dW, backend, why) of a row; ``backend_note``
        writes the backend's reason (a footnote mark, or the text)."""
        shape = "x".join(map(str, r.shape)) or "-"
        gets = self.recipe if r.sparse else "dense"
        backend = r.backend or "-"
        if r.backend_reason:
            backend += backend_note(r.backend_reason)
        name = r.name or "<model>"
        return [name, r.kind, shape, gets, r.grad_weight or "-", backend, r.reason or "-"]

    def format(self, width: int = REPORT_WIDTH) -> str:
        """The table in at most ``width`` columns (at least 80).

        A backend's reason is always a footnote; a "why" that does not fit its column
        becomes one. Layer names too long for their column continue on the next line.
        """
        width = max(width, 80)
        notes = _Footnotes()
        head = _HEAD
        body = []
        for r in self.rows:
            body.append(self._cells(r, lambda why: " " + notes.mark(why)))
        widths = [max(len(row[i]) for row in (head, *body)) for i in range(len(head))]
        # The layer column gives way first: names wrap, other cells never do.
        fixed = sum(widths[1:6]) + len(_SEP) * 6
        widths[0] = max(min(widths[0], width - fixed - _MIN_WHY), len(head[0]), 12)
        why_width = width - fixed - widths[0]
        for row in body:  # numbered after the backend notes, in row order
            if len(row[6]) > max(why_width, 5):  # "[12]" is no shorter than "2:4"
                row[6] = notes.mark(row[6])
        widths[6] = max(len(row[6]) for row in (head, *body))

        def line(cells: list[str] | tuple[str, ...]) -> str:
            padded = (c.ljust(w) for c, w in zip(cells, widths, strict=True))
            return _SEP.join(padded).rstrip()

        lines = [line(head), _SEP.join("-" * w for w in widths)]
        for row in body:
            name, *more = _split_name(row[0], widths[0])
            lines.append(line([name, *row[1:]]))
            lines += [line([piece, "", "", "", "", "", ""]) for piece in more]
        lines.append(self.summary())
        return "\n".join(lines + notes.lines(width))

    def __str__(self) -> str:
        return self.format()

    def _repr_html_(self) -> str:
        """The table for notebooks (Jupyter, VS Code): every cell in full, no footnotes."""
        head = _HEAD
        rows = []
        for r in self.rows:
            cells = self._cells(r, lambda why: ": " + why)
            rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
        th = "".join(f"<th>{h}</th>" for h in head)
        return (
            f"<table><caption>{html.escape(self.summary())}</caption>"
            f"<thead><tr>{th}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        )
