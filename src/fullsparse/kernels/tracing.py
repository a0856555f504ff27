"""What the kernel selection needs to know about ``torch.compile``.

The selection runs inside a compiled region (``sparse_linear`` calls it before its autograd
function). Dynamo does not use a ``functools.lru_cache``: it traces the wrapped function and
warns, in several lines per call site, that it did so. :func:`cache_outside_compile` keeps
the cache for eager calls and calls the function itself while tracing: the functions it
wraps are pure, so the answer is the same, and there is no warning.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

__all__ = ["is_compiling", "cache_outside_compile"]

_F = TypeVar("_F", bound=Callable[..., Any])


def is_compiling() -> bool:
    """True while Dynamo traces (``torch.compiler.is_compiling``, or its torch 2.1 name)."""
    check = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling
    return bool(check())


def cache_outside_compile(maxsize: int) -> Callable[[_F], _F]:
    """``functools.lru_cache(maxsize)`` for eager calls; inside a trace, the function itself.
    The result keeps ``cache_clear()``."""

    def wrap(fn: _F) -> _F:
        cached = functools.lru_cache(maxsize=maxsize)(fn)

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            if is_compiling():
                return fn(*args, **kwargs)
            return cached(*args, **kwargs)

        call.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
        return call  # type: ignore[return-value]

    return wrap
