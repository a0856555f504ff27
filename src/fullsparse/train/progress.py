"""A small progress bar (no tqdm: the core install needs only torch).

On a terminal it redraws one line in place (at most every ``min_interval`` seconds); on a
pipe or a log file it writes a plain line every ``every_percent`` % of the epoch, so CI logs
stay short and readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["ProgressBar"]


class ProgressBar:
    """Per-epoch progress: ``update(images, loss, correct)`` after each step.

    Shows the running mean loss, running accuracy and images/s since the start (``unit``
    names what is counted: ``tok`` for a language model's tokens).
    """

    def __init__(
        self,
        total_steps: int,
        desc: str = "",
        *,
        stream: TextIO | None = None,
        enabled: bool = True,
        every_percent: int = 10,
        min_interval: float = 0.1,
        width: int = 24,
        unit: str = "img",
        accuracy: bool = True,
    ) -> None:
        self.total = max(int(total_steps), 1)
        self.desc = desc
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.width = width
        self.unit = unit
        self.accuracy = accuracy  # False: a task without one (detection) shows the loss only
        self.min_interval = min_interval
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self.every = max(1, round(self.total * every_percent / 100))
        self.steps = 0
        self.images = 0
        self.loss_sum = 0.0
        self.correct = 0
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self._closed = False

    @property
    def images_per_second(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.images / elapsed if elapsed > 0 else 0.0

    def update(self, images: int, loss: float, correct: int) -> None:
        self.steps += 1
        self.images += images
        self.loss_sum += loss * images
        self.correct += correct
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty:
            if now - self._last_draw >= self.min_interval or self.steps == self.total:
                self._last_draw = now
                self.stream.write("\r" + self._line())
                self.stream.flush()
        elif self.steps % self.every == 0 or self.steps == self.total:
            self.stream.write(self._line() + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.enabled and self.tty:
            self.stream.write("\r" + self._line() + "\n")
            self.stream.flush()

    def _line(self) -> str:
        frac = min(self.steps / self.total, 1.0)
        filled = int(frac * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        loss = self.loss_sum / self.images if self.images else float("nan")
        acc = 100.0 * self.correct / self.images if self.images else 0.0
        shown = f"acc {acc:5.2f}% " if self.accuracy else ""
        return (
            f"{self.desc} [{bar}] {self.steps}/{self.total} "
            f"loss {loss:.4f} {shown}{self.images_per_second:7.1f} {self.unit}/s"
        )

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
