"""One-time measurements that ``backend="auto"`` uses where no rule can decide, cached on disk.

A k×k convolution can run its 2:4 GEMMs through im2col, which costs a column matrix
``kh·kw`` times the input; whether the sparse GEMM wins that back depends on the shape, the
GPU and the library versions. So ``auto`` times both candidates once per key and remembers
the winner in ``autotune.json`` under :func:`cache_dir` (``$FULLSPARSE_CACHE_DIR``, else
``$XDG_CACHE_HOME/fullsparse``, else ``~/.cache/fullsparse``). Keys name the device, the
torch version, the dtype and every size that changes the kernels' cost; see
:func:`fullsparse.kernels.dispatch.conv_autotune_key`.

Delete the file to measure again (e.g. after a driver upgrade).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["Autotuner", "AUTOTUNER", "cache_dir", "median_ms"]

CACHE_FILE = "autotune.json"


def cache_dir() -> Path:
    """Where fullsparse keeps measurements: ``$FULLSPARSE_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/fullsparse``, else ``~/.cache/fullsparse``."""
    env = os.environ.get("FULLSPARSE_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "fullsparse"


def median_ms(fn: Callable[[], Any], warmup: int = 2, repeats: int = 5) -> float:
    """Median wall time of ``fn`` in ms: CUDA events when CUDA is initialised, else a clock."""
    for _ in range(warmup):
        fn()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pairs = []
        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in pairs)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


class Autotuner:
    """Pick the fastest of a few candidates once per key; remember it on disk.

    Args:
        path: the JSON file; default ``cache_dir() / "autotune.json"``, resolved at each use
            (so the environment variables are honoured even after import).
        measure: ``measure(fn) -> ms``; default :func:`median_ms`. Tests pass a fake.
    """

    def __init__(
        self,
        path: Path | str | None = None,
        measure: Callable[[Callable[[], Any]], float] | None = None,
    ) -> None:
        self._path = Path(path) if path is not None else None
        self._measure = measure or median_ms
        self._table: dict[str, dict[str, Any]] = {}
        self._loaded_from: Path | None = None
        self._lock = threading.Lock()
        self.measurements = 0  # how many keys this object has measured (not read from disk)

    @property
    def path(self) -> Path:
        return self._path if self._path is not None else cache_dir() / CACHE_FILE

    def _load(self) -> None:
        path = self.path
        if self._loaded_from == path:
            return
        self._table = self._read(path)
        self._loaded_from = path

    @staticmethod
    def _read(path: Path) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            warnings.warn(
                f"fullsparse: ignoring unreadable autotune cache {path} ({exc}); it will be "
                "measured again and rewritten",
                RuntimeWarning,
                stacklevel=3,
            )
            return {}
        entries = data.get("entries") if isinstance(data, dict) else None
        return dict(entries) if isinstance(entries, dict) else {}

    def lookup(self, key: str) -> dict[str, Any] | None:
        """The cached record of ``key`` (``choice``, ``ms`` per candidate, ``date``) or None."""
        with self._lock:
            self._load()
            return self._table.get(key)

    def choose(self, key: str, candidates: Mapping[str, Callable[[], Any]]) -> str:
        """Name of the fastest candidate for ``key``: from the cache, else measured now."""
        if not candidates:
            raise ValueError("Autotuner.choose needs at least one candidate")
        record = self.lookup(key)
        if record is not None and record.get("choice") in candidates:
            return str(record["choice"])
        times = {name: float(self._measure(fn)) for name, fn in candidates.items()}
        choice = min(times, key=times.__getitem__)
        with self._lock:
            self.measurements += 1
            self._table[key] = {
                "choice": choice,
                "ms": times,
                "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            }
            self._save()
        return choice

    def _save(self) -> None:
        path = self.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            merged = self._read(path)  # keep what other processes wrote meanwhile
            merged.update(self._table)
            self._table = merged
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".autotune-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump({"version": 1, "entries": merged}, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except OSError as exc:  # a read-only home still trains; it just measures again
            warnings.warn(
                f"fullsparse: could not write the autotune cache {path} ({exc}); the choice is "
                "kept for this process only",
                RuntimeWarning,
                stacklevel=3,
            )


#: The process-wide tuner ``backend="auto"`` uses.
AUTOTUNER = Autotuner()
