"""Native CPU kernels: small C loops (``native.c``) compiled once with the system's C
compiler and called through :mod:`ctypes`.

Eager PyTorch runs the per-step weight-side work of a sparse layer as about twenty small
operators, each one pass over the weight: on a CPU that is memory traffic and dispatch,
not arithmetic. :func:`fst_weight_side` does the FST recipes' S_K(W)·W, S_Co(W)·W and SR-STE
decay in one pass over W. Its results equal the eager path's bit for bit (the eager
functions stay the reference, ``tests/test_native.py``).

When the native form runs (:func:`available`): float32 CPU tensors, a C compiler on the
``PATH`` (``cc``, ``gcc`` or ``clang``) and ``FULLSPARSE_NATIVE`` not ``0``/``off``. The
library is compiled on first use (under a second) into the cache directory
(``$FULLSPARSE_CACHE_DIR``, else ``~/.cache/fullsparse``), under a name that hashes the
source and the flags; a failed build warns once and the eager path runs from then on.
Threads: OpenMP, sharing torch's runtime where torch uses GNU OpenMP
(``torch.set_num_threads`` applies), single-threaded otherwise.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["available", "enabled", "fst_weight_side"]

_lock = threading.Lock()
_state: dict[str, ctypes.CDLL | None] = {}


def _compiler() -> str | None:
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _flags() -> list[str]:
    flags = ["-O3", "-fPIC", "-shared", "-std=c99"]
    try:
        cpu = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpu = ""
    if " avx2 " in cpu and " fma " in cpu:
        flags += ["-mavx2", "-mfma"]
    if _torch_uses_gnu_openmp():
        flags.append("-fopenmp")
    return flags


def _torch_uses_gnu_openmp() -> bool:
    """Whether torch's parallel backend is OpenMP from a ``libgomp`` (the one our ``-fopenmp``
    library then shares, by its soname); another runtime would be a second thread pool."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return False
    lib = Path(torch.__file__).parent / "lib"
    return any(lib.glob("libgomp*")) or Path("/usr/lib/x86_64-linux-gnu/libgomp.so.1").exists()


def _build(compiler: str) -> Path:
    source = resources.files("fullsparse").joinpath("native.c").read_bytes()
    flags = _flags()
    key = hashlib.sha256(source + " ".join([compiler, *flags]).encode()).hexdigest()[:16]
    from fullsparse.kernels.autotune import cache_dir

    folder = cache_dir() / "native"
    target = folder / f"fullsparse-native-{key}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        src = Path(tmp) / "native.c"
        src.write_bytes(source)
        built = Path(tmp) / target.name
        subprocess.run(
            [compiler, *flags, str(src), "-o", str(built), "-lm"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        os.replace(built, target)  # atomic: a concurrent build leaves one good file
    return target


def _load() -> ctypes.CDLL | None:
    with _lock:
        if "lib" in _state:
            return _state["lib"]
        lib = None
        compiler = _compiler()
        if compiler is not None:
            try:
                lib = ctypes.CDLL(str(_build(compiler)))
                fn = lib.fs_fst_weight_side
                fn.restype = None
                fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_float]
            except (OSError, subprocess.SubprocessError, AttributeError) as e:
                detail = getattr(e, "stderr", b"") or b""
                warnings.warn(
                    f"fullsparse: the native CPU kernels could not be built ({type(e).__name__}"
                    f"{': ' + detail.decode(errors='replace').strip()[:200] if detail else ''})"
                    "; running the eager path from now on",
                    RuntimeWarning,
                    stacklevel=3,
                )
                lib = None
        _state["lib"] = lib
        return lib


def enabled() -> bool:
    """Whether ``FULLSPARSE_NATIVE`` allows the native kernels (default ``auto``: yes)."""
    return os.environ.get("FULLSPARSE_NATIVE", "auto").lower() not in ("0", "off", "false", "no")


def available() -> bool:
    """Whether the native kernels run here (the switch, a compiler, a good build)."""
    return enabled() and _load() is not None


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def fst_weight_side(
    w2: Tensor, lam: float, grad_input: bool, decay: bool
) -> tuple[Tensor, Tensor | None, Tensor | None] | None:
    """``(W·S_K(W), W·S_Co(W) or None, λ·(W − W·S_K(W)) or None)`` of ``w2 [co, k]`` (S_K
    along rows in groups of 4, S_Co down columns in groups of 4 rows), or None where the
    native kernel does not apply: not a contiguous float32 CPU matrix with co and k
    multiples of 4, or no native library (:func:`available`)."""
    if (
        w2.dtype != torch.float32
        or w2.device.type != "cpu"
        or w2.ndim != 2
        or w2.shape[0] % 4
        or w2.shape[1] % 4
        or not w2.is_contiguous()
        or w2.numel() == 0
        or torch.compiler.is_compiling()
        or not available()
    ):
        return None
    lib = _state["lib"]
    assert lib is not None
    out = torch.empty_like(w2)
    gi = torch.empty_like(w2) if grad_input else None
    term = torch.empty_like(w2) if decay else None
    lib.fs_fst_weight_side(
        w2.data_ptr(), out.data_ptr(), _ptr(gi), _ptr(term), w2.shape[0], w2.shape[1], lam
    )
    return out, gi, term
