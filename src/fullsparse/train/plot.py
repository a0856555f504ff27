"""Training curves as a PNG, when matplotlib (the ``plot`` extra) is installed."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

__all__ = ["plot_curves", "plot_lm_curves", "MATPLOTLIB_HINT"]

MATPLOTLIB_HINT = "pip install 'fullsparse[plot]'"


def plot_curves(history: list[dict[str, Any]], path: str | Path, title: str = "") -> bool:
    """Draw loss, accuracy and learning rate per epoch into ``path``.

    Returns False (and writes nothing) when matplotlib is missing. Uses the Agg canvas
    directly, never pyplot, so a caller's interactive backend is left alone.
    """
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
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
    ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train")
    ax_loss.plot(epochs, [h["test_loss"] for h in history], marker="o", label="test")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.plot(epochs, [h["train_acc"] for h in history], marker="o", label="train acc")
    ax_acc.plot(epochs, [h["test_top1"] for h in history], marker="o", label="test top-1")
    ax_acc.plot(epochs, [h["test_top5"] for h in history], marker=".", label="test top-5")
    ax_acc.set(xlabel="epoch", ylabel="%", title="accuracy")
    ax_lr.plot(epochs, [h["lr"] for h in history], marker="o")
    ax_lr.set(xlabel="epoch", ylabel="lr (end of epoch)", title="learning rate")
    for ax in (ax_loss, ax_acc):
        ax.legend()
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return True


def plot_lm_curves(history: list[dict[str, Any]], path: str | Path, title: str = "") -> bool:
    """A language-model run's curves: train/validation loss, validation bits per byte and
    the learning rate per epoch. Returns False (and writes nothing) without matplotlib."""
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
    ax_loss, ax_bpb, ax_lr = fig.subplots(1, 3)
    ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], marker="o", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy (nats/byte)", title="loss")
    ax_loss.legend()
    ax_bpb.plot(epochs, [h["val_bits_per_byte"] for h in history], marker="o")
    ax_bpb.set(xlabel="epoch", ylabel="bits/byte", title="validation bits per byte")
    ax_lr.plot(epochs, [h["lr"] for h in history], marker="o")
    ax_lr.set(xlabel="epoch", ylabel="lr (end of epoch)", title="learning rate")
    for ax in (ax_loss, ax_bpb, ax_lr):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return True
