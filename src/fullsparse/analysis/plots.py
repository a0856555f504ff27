"""Figures for the analyses, when matplotlib (the ``plot`` extra) is installed.

Every function returns False and writes nothing when matplotlib is missing (the callers
then say the plot was skipped); they draw on an Agg canvas directly, never pyplot, so a
caller's interactive backend is left alone.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "MATPLOTLIB_HINT",
    "have_matplotlib",
    "plot_similarity",
    "plot_neighbors",
    "plot_fidelity",
    "plot_study_curves",
]

MATPLOTLIB_HINT = "pip install 'fullsparse[plot]'"


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | Path) -> None:
    from fullsparse.train.checkpoint import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())


def _short(name: str) -> str:
    return name.replace("layer", "L").replace("shortcut", "sc")


def plot_similarity(results: Sequence[Any], path: str | Path, title: str = "") -> bool:
    """Fig. 4: per layer, bars of H(X) and H(X|X'), one panel per set of inputs
    (:class:`~fullsparse.analysis.similarity.SimilarityResult`)."""
    if not have_matplotlib():
        return False
    fig = _figure(11, 3.2 * len(results))
    axes = fig.subplots(len(results), 1, squeeze=False)[:, 0]
    for ax, result in zip(axes, results, strict=True):
        rows = [r for r in result.layers if not math.isnan(r.h)]
        xs = list(range(len(rows)))
        ax.bar([x - 0.2 for x in xs], [r.h for r in rows], 0.4, label="H(X)")
        ax.bar([x + 0.2 for x in xs], [r.h_cond for r in rows], 0.4, label="H(X|X')")
        ax.plot(xs, [r.similarity for r in rows], "k.-", lw=1, label="H(X) − H(X|X')")
        ax.plot(
            xs,
            [r.pooled_similarity for r in rows],
            "r.--",
            lw=1,
            label="same, pooled over images",
        )
        ax.set_xticks(xs, [_short(r.name) for r in rows], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("bits")
        ax.set_ylim(0, max(9.0, *(r.h + 1 for r in rows)) if rows else 9.0)
        ax.set_title(f"{result.inputs} inputs", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper right", ncol=4)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return True


def plot_neighbors(
    panels: Sequence[tuple[str, Sequence[Any]]], path: str | Path, title: str = ""
) -> bool:
    """Fig. 5: rows = layers; per ``(label, maps)`` panel three columns X, |X^ad|, X^r.

    X and X^r are scaled by X's range to [0, 1]; |X^ad| by the *same* range, so a dark
    difference map means neighbours are close relative to the feature's own contrast.
    """
    if not have_matplotlib():
        return False
    n_rows = max(len(maps) for _, maps in panels)
    n_cols = 3 * len(panels)
    fig = _figure(1.45 * n_cols + 0.6, 1.45 * n_rows + 0.6)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for p, (label, maps) in enumerate(panels):
        for r, m in enumerate(maps):
            lo, hi = float(m.x.min()), float(m.x.max())
            span = hi - lo if hi > lo else 1.0
            images = (
                ((m.x - lo) / span, "X"),
                (m.x_ad.abs() / span, "|X^ad|"),
                ((m.x_r - lo) / span, "X^r"),
            )
            for c, (img, name) in enumerate(images):
                ax = axes[r, 3 * p + c]
                ax.imshow(img.numpy(), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(f"{label}: {name}", fontsize=8)
                if c == 0:
                    ax.set_ylabel(f"{_short(m.layer)}\nch {m.channel}", fontsize=7)
                if c == 2:
                    ax.set_xlabel(f"err {m.rel_error:.2f}", fontsize=7)
        for r in range(len(maps), n_rows):
            for c in range(3):
                axes[r, 3 * p + c].axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    return True


def plot_fidelity(result: Any, path: str | Path, title: str = "") -> bool:
    """Cosine to the reference vs layer depth: rows grad_input / grad_weight, columns
    local / accumulated, a line per recipe
    (:class:`~fullsparse.analysis.fidelity.FidelityResult`)."""
    if not have_matplotlib():
        return False
    from matplotlib.ticker import MaxNLocator

    modes = [m for m in ("local", "accumulated") if any(r.mode == m for r in result.rows)]
    fig = _figure(6 * len(modes), 7.2)
    axes = fig.subplots(2, len(modes), squeeze=False)
    for c, mode in enumerate(modes):
        for r, role in enumerate(("grad_input", "grad_weight")):
            ax = axes[r, c]
            for i, name in enumerate(result.recipes):
                rows = result.select(name, mode)
                if not rows:
                    continue
                ax.plot(
                    [row.depth for row in rows],
                    [getattr(row, f"{role}_cos") for row in rows],
                    "-" if i < 10 else "--",  # the colour cycle has 10 colours
                    marker=".",
                    lw=1.2,
                    label=name,
                )
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(f"{role}, {mode}", fontsize=10)
            ax.set_xlabel("layer (forward order; the backward ends at 0)", fontsize=8)
            ax.set_ylabel(f"cosine to {result.reference} gradient", fontsize=8)
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7, ncol=2)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return True


def plot_study_curves(results: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> bool:
    """Test top-1 per epoch, one line per variant (mean over its seeds), a band from the
    lowest to the highest seed. ``results`` from
    :func:`~fullsparse.analysis.study.collect_results`."""
    if not have_matplotlib():
        return False
    from matplotlib.ticker import MaxNLocator

    variants: dict[str, list[list[dict[str, Any]]]] = {}
    for r in results:
        if r["history"]:
            variants.setdefault(r["variant"], []).append(r["history"])
    fig = _figure(8, 4.5)
    ax = fig.subplots()
    for variant, histories in variants.items():
        epochs = sorted({h["epoch"] for hist in histories for h in hist})
        per_epoch = [
            [h["test_top1"] for hist in histories for h in hist if h["epoch"] == e] for e in epochs
        ]
        mean = [sum(v) / len(v) for v in per_epoch]
        (line,) = ax.plot(epochs, mean, marker="o", ms=3, label=f"{variant} (n={len(histories)})")
        if len(histories) > 1:
            ax.fill_between(
                epochs,
                [min(v) for v in per_epoch],
                [max(v) for v in per_epoch],
                color=line.get_color(),
                alpha=0.15,
            )
    ax.set(xlabel="epoch", ylabel="test top-1 (%)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if variants:
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return True
