"""Fused CPU kernels: elementwise operator functions compiled once with ``torch.compile``.

Eager PyTorch runs an elementwise formula as one pass over memory per operator; the MVUE of
``fst_mvue`` is about forty of them, so on a CPU it costs more than the GEMM it sparsifies.
Compiled by inductor, the same function is one loop (about 12× faster on a 2-core CPU for a
``[4096, 512]`` gradient, ``docs/benchmarks/cpu-steps.md``) and gives the same bits: the
eager function stays the reference the fused one is tested against
(``tests/test_fused_kernels.py``).

When the fused form runs (:func:`fused_or_eager`): on CPU tensors of at least
:data:`MIN_ELEMENTS` elements, outside a ``torch.compile`` region, when a C++ compiler is on
the ``PATH`` and ``FULLSPARSE_FUSED`` is not ``0``/``off``. The first call per dtype
compiles (tens of seconds on a small machine; inductor caches it on disk for later runs).
If compiling fails, the eager function is used from then on, with one warning.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["MIN_ELEMENTS", "fused_enabled", "fused_or_eager"]

#: Below this many elements the compiled call's fixed cost is not worth it.
MIN_ELEMENTS = 1 << 16

_compiled: dict[Callable[..., Any], Callable[..., Any]] = {}
_failed: set[Callable[..., Any]] = set()


def fused_enabled() -> bool:
    """Whether fused kernels may run here (``FULLSPARSE_FUSED`` and a C++ compiler)."""
    if os.environ.get("FULLSPARSE_FUSED", "auto").lower() in ("0", "off", "false", "no"):
        return False
    return bool(shutil.which("g++") or shutil.which("c++") or shutil.which("cc"))


def _forced() -> bool:
    return os.environ.get("FULLSPARSE_FUSED", "auto").lower() in ("1", "on", "true", "yes")


def fused_or_eager(fn: Callable[..., Any], first: torch.Tensor) -> Callable[..., Any]:
    """``fn`` compiled (dynamic shapes, one compile per dtype) where the fused form applies to
    a call whose first tensor is ``first``; ``fn`` itself otherwise."""
    if fn in _failed or first.device.type != "cpu" or torch.compiler.is_compiling():
        return fn
    if first.numel() < MIN_ELEMENTS and not _forced():
        return fn
    if not fused_enabled():
        return fn
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True)
    compiled = _compiled[fn]

    def call(*args: Any) -> Any:
        try:
            return compiled(*args)
        except Exception as e:  # noqa: BLE001 - any compiler failure means: run eagerly
            _failed.add(fn)
            warnings.warn(
                f"fullsparse: the fused {fn.__name__} could not be compiled "
                f"({type(e).__name__}); running it eagerly from now on",
                RuntimeWarning,
                stacklevel=2,
            )
            return fn(*args)

    return call
