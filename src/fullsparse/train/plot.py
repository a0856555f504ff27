"""Training curves as a PNG, when matplotlib (the ``plot`` extra) is installed."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

__all__ = ["plot_curves", "plot_lm_curves", "MATPLOTLIB_HINT"]

MATPLOTLIB_HINT = "pip install 'fullsparse[plot]'"

#: A panel: (title, y label, lines); a line: (metric key, legend label or "", marker).
Panel = tuple[str, str, tuple[tuple[str, str, str], ...]]
_LR: Panel = ("learning rate", "lr (end of epoch)", (("lr", "", "o"),))
_CLASSIFY: tuple[Panel, ...] = (
    ("loss", "loss", (("train_loss", "train", "o"), ("test_loss", "test", "o"))),
    ("accuracy", "%", (
        ("train_acc", "train acc", "o"), ("test_top1", "test top-1", "o"),
        ("test_top5", "test top-5", "."),
    )),
    _LR,
)  # fmt: skip
_LM: tuple[Panel, ...] = (
    ("loss", "cross-entropy (nats/byte)",
     (("train_loss", "train", "o"), ("val_loss", "validation", "o"))),
    ("validation bits per byte", "bits/byte", (("val_bits_per_byte", "", "o"),)),
    _LR,
)  # fmt: skip


def plot_curves(history: list[dict[str, Any]], path: str | Path, title: str = "") -> bool:
    """Draw loss, accuracy and learning rate per epoch into ``path``.

    Returns False (and writes nothing) when matplotlib is missing. Uses the Agg canvas
    directly, never pyplot, so a caller's interactive backend is left alone.
    """
    return _draw(history, path, title, _CLASSIFY)


def plot_lm_curves(history: list[dict[str, Any]], path: str | Path, title: str = "") -> bool:
    """A language-model run's curves: train/validation loss, validation bits per byte and
    the learning rate per epoch. Returns False (and writes nothing) without matplotlib."""
    return _draw(history, path, title, _LM)


def _draw(
    history: list[dict[str, Any]], path: str | Path, title: str, panels: tuple[Panel, ...]
) -> bool:
    """One row of ``panels`` over the epochs of ``history``, written atomically to ``path``."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return False
    from fullsparse.train.checkpoint import atomic_write_bytes

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(12, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    for ax, (name, ylabel, lines) in zip(fig.subplots(1, len(panels)), panels, strict=True):
        for key, label, marker in lines:
            ax.plot(epochs, [h[key] for h in history], marker=marker, label=label or None)
        ax.set(xlabel="epoch", ylabel=ylabel, title=name)
        if len(lines) > 1:
            ax.legend()
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return True
