"""Native CPU kernels: small C loops (``native.c``) compiled once with the system's C
compiler and called through :mod:`ctypes`.

Eager PyTorch runs the per-step weight-side work of a sparse layer as about twenty small
operators, each one pass over the weight: on a CPU that is memory traffic and dispatch,
not arithmetic. :func:`fst_weight_side` does the FST recipes' S_K(W)·W, S_Co(W)·W and SR-STE
decay in one pass over W (:func:`masked_weight_side` the same from cached masks,
:func:`add_fst_decay` the decay added to the gradient in the backward), bit for bit the eager
path's; :func:`row_norm_products`, :func:`draw`, :func:`gather_rows` (the three in one pass
over small groups: :func:`draw_rows`), :func:`block_scores` and :func:`gather_blocks` are the
sampled weight gradients' scores, draw and operands, :func:`mvue` the MVUE of ``fst_mvue``
with its counter-based uniforms drawn in place (bit for bit), :func:`ir_half` FST's
information restoration and :func:`half_columns` ``rand_half``'s half of a convolution's
dY. The eager functions stay the reference (``tests/test_native.py``).

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
import math
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

__all__ = [
    "available",
    "enabled",
    "library",
    "usable",
    "fst_weight_side",
    "masked_weight_side",
    "add_fst_decay",
    "row_norm_products",
    "draw",
    "draw_rows",
    "gather_rows",
    "block_scores",
    "gather_blocks",
    "ir_half",
    "half_columns",
    "count",
    "mvue",
]

_lock = threading.Lock()
_state: dict[str, ctypes.CDLL | None] = {}


def _compiler() -> str | None:
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _flags() -> list[str]:
    # no contraction into fused multiply-adds: the kernels that match eager ops bit for bit
    # need each product rounded on its own, as torch's separate ops round it; no trapping
    # math: comparisons may run unconditionally (the same values), so the loops vectorize
    flags = ["-O3", "-fPIC", "-shared", "-std=c99", "-ffp-contract=off", "-fno-trapping-math"]
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
    """Whether torch's parallel backend is OpenMP from a ``libgomp`` already loaded in this
    process (the one our ``-fopenmp`` library then shares, by its soname); another runtime
    (Intel's, LLVM's) would be a second thread pool, so the kernels then run on one thread."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return False
    try:
        return "libgomp" in Path("/proc/self/maps").read_text()
    except OSError:  # not Linux: only torch's own copy tells
        return any((Path(torch.__file__).parent / "lib").glob("libgomp*"))


#: the C sources of the library: the per-step loops, and the 2:4 sparse products
_SOURCES = ("native.c", "spmm24.c")


def _build(compiler: str) -> Path:
    sources = [resources.files("fullsparse").joinpath(n).read_bytes() for n in _SOURCES]
    flags = _flags()
    key = hashlib.sha256(b"".join(sources) + " ".join([compiler, *flags]).encode()).hexdigest()[:16]
    from fullsparse.kernels.autotune import cache_dir

    folder = cache_dir() / "native"
    target = folder / f"fullsparse-native-{key}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        paths = [Path(tmp) / name for name in _SOURCES]
        for path, source in zip(paths, sources, strict=True):
            path.write_bytes(source)
        built = Path(tmp) / target.name
        subprocess.run(
            [compiler, *flags, *map(str, paths), "-o", str(built), "-lm"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        os.replace(built, target)  # atomic: a concurrent build leaves one good file
    return target


def _declare(lib: ctypes.CDLL) -> None:
    ptr, i64, f32, u32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_uint32
    signatures = {
        "fs_fst_weight_side": (None, [ptr] * 4 + [i64] * 2 + [f32]),
        "fs_masked_weight_side": (None, [ptr] * 6 + [i64, f32]),
        "fs_add_fst_decay": (None, [ptr, ptr, i64, f32]),
        "fs_row_norm_products": (None, [ptr, ptr] + [i64] * 5 + [ptr]),
        "fs_draw": (ctypes.c_int, [ptr] + [i64] * 3 + [ptr] * 3),
        "fs_gather_rows": (None, [ptr, i64, i64, ptr, ptr, i64, ptr]),
        "fs_draw_rows": (ctypes.c_int, [ptr, ptr] + [i64] * 7 + [ptr] * 5),
        "fs_block_scores": (None, [ptr, ptr] + [i64] * 9 + [ptr]),
        "fs_gather_blocks": (i64, [ptr, i64, i64, ptr, i64, i64, ptr, ptr] + [i64] * 3 + [ptr] * 4),
        "fs_count_odd": (i64, [ptr, i64]),
        "fs_ir_half": (None, [ptr, i64, i64, i64, f32, ptr]),
        "fs_half_columns": (ctypes.c_int, [ptr, i64, i64, i64, ptr]),
        "fs_count": (None, [ptr, ctypes.c_double, ctypes.c_double]),
        "fs_mvue": (ctypes.c_int, [ptr, ctypes.c_uint32, ctypes.c_uint32, ptr] + [i64] * 4),
        "fs_spmm24_vectorized": (ctypes.c_int, []),
        "fs_compress24": (ctypes.c_int, [ptr] + [i64] * 4 + [ptr, ptr, i64, i64]),
        "fs_spmm24": (ctypes.c_int, [ptr, *[i64] * 4, ptr, ptr, *[i64] * 3, ptr, ptr, i64, i64]),
        "fs_mvue_packed": (ctypes.c_int, [ptr, u32, u32, ptr, ptr] + [i64] * 3),
    }
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes


def _load() -> ctypes.CDLL | None:
    with _lock:
        if "lib" in _state:
            return _state["lib"]
        lib = None
        compiler = _compiler()
        if compiler is not None:
            try:
                lib = ctypes.CDLL(str(_build(compiler)))
                _declare(lib)
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
    if not enabled():
        return False
    lib = _state.get("lib", False)  # a loaded library (or None: no build) without the lock
    return (lib if lib is not False else _load()) is not None


def library() -> ctypes.CDLL | None:
    """The loaded library, or None where the native kernels do not run (:func:`available`)."""
    return _state.get("lib") if available() else None


def usable(*tensors: Tensor) -> ctypes.CDLL | None:
    """The library, if every tensor is a plain float32 CPU tensor outside a compile trace and
    the native kernels run here; else None."""
    return _usable(*tensors)


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


#: the tensor types whose ``data_ptr()`` is the memory the kernels read: a subclass (a
#: sharded ``DTensor`` under FSDP2, a fake or functional tensor) wraps its data elsewhere
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _plain(t: Tensor) -> bool:
    return type(t) in _PLAIN


def _usable(*tensors: Tensor) -> ctypes.CDLL | None:
    """The library, if every tensor is a plain float32 CPU tensor outside a compile trace."""
    for t in tensors:
        if not _plain(t) or t.dtype != torch.float32 or t.device.type != "cpu":
            return None
    if torch.compiler.is_compiling() or not available():
        return None
    return _state["lib"]


def _rows(t: Tensor) -> bool:
    """A matrix whose rows are contiguous (any row stride)."""
    return t.ndim == 2 and (t.stride(1) == 1 or t.shape[1] <= 1) and t.shape[0] > 0


def _co_k(w: Tensor) -> tuple[int, int] | None:
    """``(co, k)`` of a contiguous weight read as ``[co, k]`` (a convolution's
    ``[Co, Ci/g, kh, kw]`` as ``[Co, Ci/g·kh·kw]``, with no reshape), k a multiple of 4."""
    if w.ndim < 2 or not w.is_contiguous() or w.numel() == 0:
        return None
    co = w.shape[0]
    k = w.numel() // co
    return None if k % 4 else (co, k)


def fst_weight_side(
    w2: Tensor, lam: float, grad_input: bool, decay: bool
) -> tuple[Tensor, Tensor | None, Tensor | None] | None:
    """``(W·S_K(W), W·S_Co(W) or None, λ·(W − W·S_K(W)) or None)`` of ``w2 [co, k]`` (S_K
    along rows in groups of 4, S_Co down columns in groups of 4 rows), or None where the
    native kernel does not apply: not a contiguous float32 CPU matrix with co and k
    multiples of 4, or no native library (:func:`available`). A contiguous weight of more
    dimensions is read as ``[co, k]`` (k the rest), and the results have its shape."""
    shape = _co_k(w2)
    if shape is None or shape[0] % 4:
        return None
    lib = _usable(w2)
    if lib is None:
        return None
    out = torch.empty_like(w2)
    gi = torch.empty_like(w2) if grad_input else None
    term = torch.empty_like(w2) if decay else None
    lib.fs_fst_weight_side(w2.data_ptr(), out.data_ptr(), _ptr(gi), _ptr(term), *shape, lam)
    return out, gi, term


def masked_weight_side(
    w: Tensor, out_mask: Tensor, co_mask: Tensor | None, lam: float, decay: bool
) -> tuple[Tensor, Tensor | None, Tensor | None] | None:
    """``(W·out_mask, W·co_mask or None, λ·(W − W·out_mask) or None)`` from cached bool masks
    of ``w``'s shape (``mask_interval > 1``), in one pass; None where the kernel does not
    apply (not contiguous float32 / bool CPU tensors of one shape)."""
    masks = [out_mask] if co_mask is None else [out_mask, co_mask]
    for m in masks:
        if not _plain(m) or m.dtype != torch.bool or m.shape != w.shape or not m.is_contiguous():
            return None
        if m.device.type != "cpu":
            return None
    if not w.is_contiguous():
        return None
    lib = _usable(w) if w.numel() else None
    if lib is None:
        return None
    out = torch.empty_like(w)
    gi = torch.empty_like(w) if co_mask is not None else None
    term = torch.empty_like(w) if decay else None
    lib.fs_masked_weight_side(
        w.data_ptr(), out_mask.data_ptr(), _ptr(co_mask), out.data_ptr(), _ptr(gi), _ptr(term),
        w.numel(), lam,
    )  # fmt: skip
    return out, gi, term


def add_fst_decay(grad: Tensor, w2: Tensor, lam: float) -> bool:
    """``grad += λ·(W − W·S_K(W))`` in place for ``w2 [co, k]`` (S_K along rows in groups of
    4, k a multiple of 4; a contiguous weight of more dimensions is read as ``[co, k]``) and
    a ``grad`` of W's shape and layout: the decay term :func:`fst_weight_side` makes, added
    in one pass over W and grad (the same bits as ``grad.add_(decay)``). False where the
    kernel does not apply (nothing done)."""
    if _co_k(w2) is None or not grad.is_contiguous() or grad.numel() != w2.numel():
        return False
    lib = _usable(w2, grad)
    if lib is None:
        return False
    lib.fs_add_fst_decay(w2.data_ptr(), grad.data_ptr(), w2.numel(), lam)
    return True


def row_norm_products(x2: Tensor, dy2: Tensor) -> Tensor | None:
    """``‖dY_r‖·‖X_r‖`` per row ``[m]`` (:func:`fullsparse.sampled_grad.token_scores`, the
    sums of squares in double), or None where the kernel does not apply."""
    if not (_rows(x2) and _rows(dy2)) or x2.shape[0] != dy2.shape[0]:
        return None
    lib = _usable(x2, dy2)
    if lib is None:
        return None
    out = torch.empty(x2.shape[0], dtype=torch.float32)
    lib.fs_row_norm_products(
        x2.data_ptr(), dy2.data_ptr(), x2.shape[0], x2.shape[1], x2.stride(0),
        dy2.shape[1], dy2.stride(0), out.data_ptr(),
    )  # fmt: skip
    return out


def draw(scores: Tensor, k: int, u: Tensor) -> tuple[Tensor, Tensor] | None:
    """The kept units of ``scores [G, g]`` (k of every group) and their weights 1/p:
    :func:`fullsparse.sampling.keep_probabilities` and :func:`~fullsparse.sampling.select_units`
    in one call, the level in double (so p equals the eager float32 level's up to
    rounding). None where the kernel does not apply or a group has a non-finite score
    (the eager path, which keeps those for sure, then runs on the same ``u``)."""
    if scores.ndim != 2 or not scores.is_contiguous() or u.numel() != scores.shape[0]:
        return None
    lib = _usable(scores, u)
    if lib is None or not u.is_contiguous():
        return None
    groups, size = scores.shape
    index = torch.empty(groups * k, dtype=torch.int64)
    weight = torch.empty(groups * k, dtype=torch.float32)
    failed = lib.fs_draw(
        scores.data_ptr(), groups, size, k, u.data_ptr(), index.data_ptr(), weight.data_ptr()
    )
    return None if failed else (index, weight)


def draw_rows(
    x2: Tensor, dy2: Tensor, group: int, k: int, u: Tensor, *, indices: bool = True
) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor] | None:
    """:func:`row_norm_products`, :func:`draw` and :func:`gather_rows` in one pass, group by
    group while its rows are in cache: ``(index, weight, dy_kept, x_kept)`` — k of every
    ``group`` consecutive rows of ``x2 [m, dx]`` and ``dy2 [m, ddy]`` drawn with ``u`` (one
    per whole group), the rows after the last whole group kept with weight 1; ``dy_kept`` is
    divided by p. The same bits as the three calls. None where the kernel does not apply or
    a group has a non-finite score (the separate calls then run on the same ``u``).

    A contiguous ``x2`` or ``dy2`` of more dimensions gives its rows along the first (a
    convolution's samples), and the kept rows keep its shape after the first dimension.
    ``indices=False``: ``index`` and ``weight`` are not returned (None; nothing allocated
    for them here)."""
    if x2.ndim < 2 or dy2.ndim < 2 or x2.shape[0] != dy2.shape[0] or not 0 < k < group:
        return None
    m = x2.shape[0]
    if u.numel() != m // group or not u.is_contiguous() or u.device.type != "cpu":
        return None
    x_rows, dy_rows = _row_layout(x2), _row_layout(dy2)
    if x_rows is None or dy_rows is None:
        return None
    lib = _usable(x2, dy2, u)
    if lib is None:
        return None
    rows = m // group * k + m % group
    index = weight = None
    if indices:
        index = torch.empty(rows, dtype=torch.int64)
        weight = torch.empty(rows, dtype=torch.float32)
    x_kept = torch.empty(rows, *x2.shape[1:], dtype=torch.float32)
    dy_kept = torch.empty(rows, *dy2.shape[1:], dtype=torch.float32)
    failed = lib.fs_draw_rows(
        x2.data_ptr(), dy2.data_ptr(), m, group, k, *x_rows, *dy_rows, u.data_ptr(),
        _ptr(index), _ptr(weight), x_kept.data_ptr(), dy_kept.data_ptr(),
    )  # fmt: skip
    return None if failed else (index, weight, dy_kept, x_kept)


def _row_layout(t: Tensor) -> tuple[int, int] | None:
    """``(row length, row stride)`` of a matrix with contiguous rows, or of a contiguous
    tensor of more dimensions read as rows along its first; None otherwise."""
    if t.ndim == 2:
        return (t.shape[1], t.stride(0)) if _rows(t) else None
    if not t.is_contiguous() or t.shape[0] == 0:
        return None
    length = t.numel() // t.shape[0]
    return length, length


def gather_rows(
    src: Tensor, index: Tensor, scale: Tensor | None = None, *, index_checked: bool = False
) -> Tensor | None:
    """``src.index_select(0, index)``, times ``scale[:, None]`` when given, in one pass;
    None where the kernel does not apply. The indices are checked against ``src``'s rows
    (an IndexError) unless ``index_checked`` says a call on as many rows just did."""
    if not _rows(src) or index.dtype != torch.int64 or not index.is_contiguous():
        return None
    if not _plain(index):
        return None
    if scale is not None and (scale.dtype != torch.float32 or not scale.is_contiguous()):
        return None
    lib = _usable(src)
    if lib is None or index.device.type != "cpu":
        return None
    if index.numel() and not index_checked:
        low, high = index.aminmax()
        if int(low) < 0 or int(high) >= src.shape[0]:  # the C loop would read out of bounds
            raise IndexError(f"row index out of range for {src.shape[0]} rows")
    out = torch.empty(index.numel(), src.shape[1], dtype=torch.float32)
    lib.fs_gather_rows(
        src.data_ptr(), src.shape[1], src.stride(0), index.data_ptr(), _ptr(scale),
        index.numel(), out.data_ptr(),
    )  # fmt: skip
    return out


def block_scores(
    x: Tensor, dy: Tensor, kw: int, stride: int, dilation: int, padding: int
) -> Tensor | None:
    """:func:`fullsparse.sampled_grad.block_scores` of ``x [N, Ci, H, W]`` and ``dy [N, Co,
    Ho, Wo]`` (the width's stride, dilation and padding) in one pass over each: ``[2N]``
    float32, the sums in float32 lanes (equal to the eager scores up to rounding). None
    where the kernel does not apply (not contiguous NCHW float32 CPU tensors)."""
    if x.ndim != 4 or dy.ndim != 4 or x.shape[0] != dy.shape[0] or x.shape[0] == 0:
        return None
    if not (x.is_contiguous() and dy.is_contiguous()):
        return None
    lib = _usable(x, dy)
    if lib is None:
        return None
    n, w, wo = x.shape[0], x.shape[3], dy.shape[3]
    out = torch.empty(2 * n, dtype=torch.float32)
    lib.fs_block_scores(
        x.data_ptr(), dy.data_ptr(), n, x.shape[1] * x.shape[2], w, dy.shape[1] * dy.shape[2],
        wo, kw, stride, dilation, padding, out.data_ptr(),
    )  # fmt: skip
    return out


def gather_blocks(
    x: Tensor,
    dy: Tensor,
    units: Tensor,
    scale: Tensor,
    left: int,
    width: int,
    *,
    index_checked: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """The operands of the column-block products of the kept ``units`` (``2n + q``) of
    ``x [N, Ci, H, W]`` and ``dy [N, Co, Ho, Wo]``, in one call: ``(x0, dy0, x1, dy1)``.
    Parity q's units, in order, give ``dyq``: dY's columns ``q, q + 2, …`` times their
    ``scale`` (1/p); ``x0``: the input as it is; ``x1``: the input shifted by ``left`` columns
    (zero-padded, or cropped where ``left`` < 0) to ``width`` — ``index_select`` of strided
    and padded views, bit for bit. None where the kernel does not apply; a unit out of range
    raises ``IndexError`` (``index_checked``: the caller knows they are in range)."""
    if x.ndim != 4 or dy.ndim != 4 or x.shape[0] != dy.shape[0] or width < 0:
        return None
    if not (x.is_contiguous() and dy.is_contiguous() and scale.is_contiguous()):
        return None
    if units.dtype != torch.int64 or not units.is_contiguous() or units.device.type != "cpu":
        return None
    if not _plain(units):
        return None
    if scale.numel() != units.numel():
        return None
    lib = _usable(x, dy, scale)
    if lib is None:
        return None
    (n, ci, h, w), (co, ho, wo), m = x.shape, dy.shape[1:], units.numel()
    if m and not index_checked:
        low, high = units.aminmax()
        if int(low) < 0 or int(high) >= 2 * n:  # the C loop would read out of bounds
            raise IndexError(f"unit index out of range for {2 * n} units")
    odd = int(lib.fs_count_odd(units.data_ptr(), m))
    x0, x1 = x.new_empty(m - odd, ci, h, w), x.new_empty(odd, ci, h, width)
    dy0, dy1 = dy.new_empty(m - odd, co, ho, (wo + 1) // 2), dy.new_empty(odd, co, ho, wo // 2)
    failed = m and lib.fs_gather_blocks(
        x.data_ptr(), ci * h, w, dy.data_ptr(), co * ho, wo, units.data_ptr(), scale.data_ptr(),
        m, left, width, x0.data_ptr(), dy0.data_ptr(), x1.data_ptr(), dy1.data_ptr(),
    )  # fmt: skip
    return None if failed else (x0, dy0, x1, dy1)


def count(state: Tensor, kept: int, total: int) -> bool:
    """:meth:`fullsparse.sampling.AdaptiveState.count` on a float64 CPU state in one call (no
    tensor made, no operator dispatched: this runs in every sampled layer's backward); the
    same bits. False where it does not apply (nothing done)."""
    if not _plain(state) or state.dtype != torch.float64 or state.device.type != "cpu":
        return False
    if state.numel() < 6:
        return False
    if not state.is_contiguous() or max(abs(kept), abs(total)) >= 2**53:
        return False
    if torch.compiler.is_compiling() or not available():
        return False
    _state["lib"].fs_count(state.data_ptr(), float(kept), float(total))  # type: ignore[union-attr]
    return True


def half_columns(t: Tensor, phase: int) -> tuple[Tensor, bool] | None:
    """``(t[..., phase::2]`` contiguous, whether ``t[..., 1 - phase::2]`` holds a NaN or an
    infinity``)`` in one pass over ``t``: ``rand_half``'s dY operand of a convolution and the
    check of the columns it drops. None where the kernel does not apply (not a contiguous
    float32 CPU tensor of at least one dimension)."""
    if t.ndim == 0 or not t.is_contiguous() or t.numel() == 0 or phase not in (0, 1):
        return None
    lib = _usable(t)
    if lib is None:
        return None
    w = t.shape[-1]
    out = t.new_empty(*t.shape[:-1], (w - phase + 1) // 2)
    bad = lib.fs_half_columns(t.data_ptr(), t.numel() // w, w, phase, out.data_ptr())
    return out, bool(bad)


def ir_half(t: Tensor, alpha: float, dim: int) -> Tensor | None:
    """:func:`fullsparse.operands.ir_grad_output` of ``t`` along ``dim`` in one pass: ``t``'s
    even positions plus ``alpha`` times their odd partners (one fused multiply-add each, as
    torch's ``add_(…, alpha=…)`` on a CPU with FMA), contiguous; None where the kernel does
    not apply (not a contiguous float32 CPU tensor)."""
    if t.ndim == 0 or not t.is_contiguous() or t.numel() == 0:
        return None
    lib = _usable(t)
    if lib is None:
        return None
    dim = dim % t.ndim
    size = t.shape[dim]
    outer, inner = math.prod(t.shape[:dim]), math.prod(t.shape[dim + 1 :])
    out = t.new_empty(*t.shape[:dim], (size + 1) // 2, *t.shape[dim + 1 :])
    lib.fs_ir_half(t.data_ptr(), outer, size, inner, alpha, out.data_ptr())
    return out


def mvue(t4: Tensor, key: tuple[int, int]) -> Tensor | None:
    """:func:`fullsparse.estimators.mvue_planes` applied to ``t4 [outer, pre, size, post]`` in
    its own layout (groups of 4 along ``size``, a last partial group zero-padded), with the
    uniforms of :func:`fullsparse.estimators.mvue_uniforms` for ``key`` drawn in the order
    (pre, outer, post, group): ``t4``'s shape, bit for bit the eager result, in one pass.
    None where the kernel does not apply, or where ``t4`` holds a NaN or an infinity (the
    eager path then runs on the same uniforms)."""
    if t4.ndim != 4 or not t4.is_contiguous() or t4.numel() == 0:
        return None
    lib = _usable(t4)
    if lib is None:
        return None
    out = torch.empty_like(t4)
    failed = lib.fs_mvue(t4.data_ptr(), key[0], key[1], out.data_ptr(), *t4.shape)
    return None if failed else out
