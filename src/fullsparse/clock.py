"""A clock of the weight-gradient sampling inside training steps (``bench steps``).

Functions marked :func:`sampling_part` — the sampled weight gradients' scores, draw and
operand copies, ``fst_rand``'s check of its dropped half, the MVUE of ``fst_mvue`` — add their
wall time to the running :class:`SamplingClock`, if one runs; a marked call inside another
counts once. Without a running clock a marked function costs one global read and a call.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

__all__ = ["SamplingClock", "sampling_part", "running"]

F = TypeVar("F", bound=Callable[..., Any])


class SamplingClock:
    """Seconds spent in marked functions since the last :meth:`reset`."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._depth = 0

    def reset(self) -> None:
        self.seconds = 0.0


_clock: SamplingClock | None = None


def sampling_part(fn: F) -> F:
    """Mark ``fn`` as weight-gradient sampling work for a running clock."""

    @functools.wraps(fn)
    def timed(*args: Any, **kwargs: Any) -> Any:
        clock = _clock
        if clock is None or clock._depth:
            return fn(*args, **kwargs)
        clock._depth += 1
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            clock.seconds += time.perf_counter() - start
            clock._depth -= 1

    return timed  # type: ignore[return-value]


@contextmanager
def running(clock: SamplingClock) -> Iterator[SamplingClock]:
    """Run ``clock`` for the block (one clock at a time; the previous one resumes after)."""
    global _clock
    previous, _clock = _clock, clock
    try:
        yield clock
    finally:
        _clock = previous
