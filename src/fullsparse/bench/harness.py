"""The one timing harness every suite uses: warm-up, median over repeats, interleaving,
peak memory, and what a table must say about the machine it ran on.

- :func:`median_ms` times one callable; :func:`interleaved_ms` times several in turn, the
  order rotated every round, so load from other processes on a shared machine falls on all
  of them alike (a ratio between two of them is then fair even when the absolute times are
  not). :func:`interleaved_times` keeps every round's time, for :func:`paired_speedup`: the
  ratio of two callables round by round (the calls of one round run close in time, so a
  machine whose speed drifts over minutes moves both alike), its median, and a
  distribution-free confidence interval of that median (:func:`median_interval`).
- The first call of anything pays one-time costs (allocator growth, oneDNN / cuDNN kernel
  choice, lazy imports), so at least one warm-up call always runs, whatever ``warmup`` says.
- On CUDA the times come from CUDA events around each call (device time, no host sync
  inside the timed region); on a CPU from ``time.perf_counter``.
- :func:`peak_memory_bytes` runs a callable once more, untimed, and reports the most memory
  its tensors held at once above what was live before it started (see its docstring).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "median_ms",
    "interleaved_ms",
    "interleaved_times",
    "median_interval",
    "paired_speedup",
    "peak_memory_bytes",
    "machine_info",
    "ratio",
]

#: Timed callables take the call's index (suites use it to rotate through a pool of inputs).
Fn = Callable[[int], Any]


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_ms(
    fns: Mapping[str, Fn],
    warmup: int = 1,
    repeats: int = 5,
    device: torch.device | None = None,
) -> dict[str, float]:
    """Median milliseconds per call of each of ``fns`` (same keys), over the rounds of
    :func:`interleaved_times`."""
    times = interleaved_times(fns, warmup, repeats, device)
    return {n: statistics.median(t) for n, t in times.items()}


def interleaved_times(
    fns: Mapping[str, Fn],
    warmup: int = 1,
    repeats: int = 5,
    device: torch.device | None = None,
) -> dict[str, list[float]]:
    """Milliseconds of each of ``fns`` (same keys) in every timed round, in round order.

    Every round calls each function once; round ``r`` starts at the ``r``-th function (a
    rotation), so none always runs first or right after the same neighbour. ``warmup``
    untimed rounds come first (at least one).
    """
    names = list(fns)
    for i in range(max(1, warmup)):
        for name in names:
            fns[name](i)
    _sync(device)
    start_index = max(1, warmup)
    cuda = device is not None and device.type == "cuda"
    times: dict[str, list[Any]] = {name: [] for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            if cuda:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fns[name](start_index + r)
                end.record()
                times[name].append((start, end))
            else:
                t0 = time.perf_counter()
                fns[name](start_index + r)
                times[name].append(1e3 * (time.perf_counter() - t0))
    _sync(device)
    if cuda:
        return {n: [s.elapsed_time(e) for s, e in t] for n, t in times.items()}
    return times


def median_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """``(low, high, coverage)``: a distribution-free confidence interval for the median of
    the distribution ``values`` were drawn from (independently).

    The order statistics ``x_(j)`` and ``x_(n+1-j)`` of the n sorted values hold the median
    between them with probability ``1 − 2·P(B ≤ j − 1)``, B ~ Binomial(n, ½), whatever the
    distribution; j is the largest with that coverage at least ``level``. Too few values for
    ``level`` give the smallest and the largest and their own, lower, coverage (5 values:
    0.9375; 8: 0.992 at j = 1, the first j above 0.95 needing 9 values for j = 2)."""
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        raise ValueError("median_interval: no values")

    def coverage(j: int) -> float:
        return 1.0 - 2.0 * sum(math.comb(n, i) for i in range(j)) / 2.0**n

    j = 1
    while j + 1 <= (n + 1) // 2 and coverage(j + 1) >= level:
        j += 1
    return xs[j - 1], xs[n - j], coverage(j)


def paired_speedup(
    reference_ms: Sequence[float], ms: Sequence[float], level: float = 0.95
) -> dict[str, float]:
    """Round-by-round ``reference / ms`` (above 1: faster than the reference) of two
    :func:`interleaved_times` series: its ``median``, and the ``low`` / ``high`` ends of
    :func:`median_interval` with their ``coverage``."""
    if len(reference_ms) != len(ms) or not ms:
        raise ValueError("paired_speedup: two series of the same, non-zero length")
    ratios = [ratio(a, b) for a, b in zip(reference_ms, ms, strict=True)]
    low, high, coverage = median_interval(ratios, level)
    return {"median": statistics.median(ratios), "low": low, "high": high, "coverage": coverage}


def median_ms(
    fn: Fn, warmup: int = 1, repeats: int = 5, device: torch.device | None = None
) -> float:
    """Median milliseconds of ``fn(i)`` over ``repeats`` calls after ``max(1, warmup)``."""
    return interleaved_ms({"fn": fn}, warmup, repeats, device)["fn"]


def ratio(reference_ms: float, ms: float) -> float:
    """``reference / ms`` (above 1: faster than the reference), safe for a zero time."""
    return reference_ms / max(ms, 1e-9)


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """The most bytes ``fn``'s tensors held at once, above what was allocated before it.

    What the number means: memory the step itself needs on top of what already exists
    (parameters, optimizer state, the inputs): activations saved for the backward, masks,
    gradients (when they are set to None between steps), temporaries.

    - CUDA: ``torch.cuda.max_memory_allocated`` after a reset, minus the memory allocated at
      the start (the caching allocator's tensor bytes, not what it reserved).
    - CPU: one run under ``torch.profiler`` with ``profile_memory=True``; the profiler
      records every allocation and free of the CPU allocator, and the peak of their running
      sum is the answer: the most memory allocated *during* ``fn`` that was live at once.
      Frees of blocks allocated before ``fn`` (say, last step's gradients) are not seen,
      and allocations outside PyTorch's allocator (oneDNN scratch buffers, Python objects)
      are not counted.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with (
        _native_stderr_silenced(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        fn()
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    records.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in records:
        if e.device_type() == torch.autograd.DeviceType.CPU:
            live += e.nbytes()
            peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """The profiler's C++ side prints start/stop lines and a note about blocks allocated
    before it started straight to file descriptor 2; a benchmark's output has no use for
    them."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def machine_info() -> dict[str, Any]:
    """What a benchmark table must say about where it ran."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    commit = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                cwd=os.path.dirname(os.path.abspath(__file__)),
            ).stdout.strip()
            or "unknown"
        )
    load = None
    with contextlib.suppress(OSError, AttributeError):
        load = round(os.getloadavg()[0], 2)
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "load_average_1min": load,
        "allocator_env": allocator_env(),
    }


def allocator_env() -> dict[str, str]:
    """The environment that changes how the C allocator serves tensors (glibc's
    ``MALLOC_*`` tunables, a preloaded jemalloc or tcmalloc): on a CPU a step's large
    temporaries cost page faults or not depending on it (docs/benchmarks/cpu-steps.md)."""
    keys = ("LD_PRELOAD", "GLIBC_TUNABLES")
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_") or k in keys}
