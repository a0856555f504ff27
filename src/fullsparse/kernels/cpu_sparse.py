"""2:4 sparse products on a CPU: the ``cpu_sparse`` backend's GEMM.

A 2:4 operand keeps at most two of every four entries along the product's reduction axis;
:func:`pack24` stores those two values and their column indices (half the entries), and
:func:`spmm24` multiplies with half a dense product's multiply-adds (``spmm24.c``: AVX2 and
FMA, compiled with the other native kernels, :mod:`fullsparse.native`). On the recipes'
three products:

- ``output``: ``Y = X · S_K(W)ᵀ`` — ``S_K(W)`` is 2:4 along its rows;
- ``grad_input``: ``dX = dY · S_Co(W)`` — ``S_Co(W)ᵀ`` is 2:4 along its rows;
- ``grad_weight`` from a dY that is 2:4 along the tokens (``fst_mvue``'s MVUE, or S_T):
  ``dW = dYᵀ · X`` (:func:`tokens_product`).

The sums run in another order than a dense BLAS's, so results equal the dense product of the
same operands to float32 rounding, not bit for bit (tested against a float64 reference).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fullsparse import native
from fullsparse.clock import sampling_part

__all__ = [
    "Packed24",
    "CpuSparseGemm",
    "unavailable_reason",
    "pack24",
    "spmm24",
    "mvue_packed",
    "tokens_product",
]

#: the compressed layout's row stride is padded by this many entries when it runs down the
#: columns, so that the rows the kernel reads together do not share cache sets
_PAD = 16


@dataclass(frozen=True)
class Packed24:
    """A 2:4 matrix ``[rows, cols]`` (2:4 along ``cols``) as two values and two column indices
    per group of four: entry ``j`` of row ``r`` at ``r·row_stride + j·entry_stride`` of
    ``values`` (float32) and ``index`` (int32)."""

    values: Tensor
    index: Tensor
    rows: int
    cols: int
    row_stride: int
    entry_stride: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)


def unavailable_reason() -> str | None:
    """Why the 2:4 CPU kernels cannot run in this process (None where they can)."""
    if not native.enabled():
        return "the native CPU kernels are switched off (FULLSPARSE_NATIVE)"
    if not native.available():
        return "the native CPU kernels could not be built (a C compiler on the PATH is needed)"
    lib = native.library()
    if lib is None or not lib.fs_spmm24_vectorized():
        return "this CPU or compiler has no AVX2 and FMA (the kernels' fast form)"
    return None


def _lib(*tensors: Tensor):  # noqa: ANN202 - a ctypes library
    lib = native.usable(*tensors)
    if lib is None:
        raise ValueError(
            "the 2:4 CPU kernels take plain float32 CPU tensors outside torch.compile "
            f"(got {', '.join(f'{t.dtype} on {t.device}' for t in tensors)}; "
            f"{unavailable_reason() or 'a tensor subclass'})"
        )
    return lib


def pack24(b: Tensor, rows: bool | None = None) -> Packed24:
    """Compress ``b [R, K]`` (any strides; K a multiple of 4), 2:4 along K. Raises
    ``ValueError`` if a group of four holds more than two nonzeros. ``rows``: lay each row's
    entries side by side (the product reads them faster; packing a ``b`` whose columns are
    contiguous so is slower), or down the columns (None: whichever follows ``b``'s layout)."""
    if b.ndim != 2 or b.shape[1] % 4:
        raise ValueError(
            f"pack24: need a 2-D [R, K] operand with K a multiple of 4, got {tuple(b.shape)}"
        )
    lib = _lib(b)
    height, cols = b.shape
    half = cols // 2
    if rows is None:
        rows = not (b.stride(0) == 1 and b.shape[0] > 1)
    if not rows:  # columns side by side: compress down the columns
        stride = height + _PAD
        values = torch.empty(half, stride, dtype=torch.float32)
        index = torch.empty(half, stride, dtype=torch.int32)
        row_stride, entry_stride = 1, stride
    else:
        values = torch.empty(height, half, dtype=torch.float32)
        index = torch.empty(height, half, dtype=torch.int32)
        row_stride, entry_stride = half, 1
    bad = lib.fs_compress24(
        b.data_ptr(), height, cols, b.stride(0), b.stride(1), values.data_ptr(),
        index.data_ptr(), row_stride, entry_stride,
    )  # fmt: skip
    if bad:
        raise ValueError(
            f"pack24: operand {tuple(b.shape)} is not 2:4 along its rows (a group of four "
            "holds more than two nonzeros)"
        )
    return Packed24(values, index, height, cols, row_stride, entry_stride)


def spmm24(
    a: Tensor, packed: Packed24, out: Tensor | None = None, bias: Tensor | None = None
) -> Tensor:
    """``a [M, K] · Bᵀ (+ bias)`` → ``[M, R]`` for ``packed`` = :func:`pack24` of ``B [R, K]``.
    ``a`` may have any strides; ``out`` (any strides, ``[M, R]``) receives the result if
    given; ``bias [R]`` is added to every row."""
    if a.ndim != 2 or a.shape[1] != packed.cols:
        raise ValueError(f"spmm24: a {tuple(a.shape)} does not fit B {packed.shape}")
    m, r = a.shape[0], packed.rows
    if out is None:
        out = torch.empty(m, r, dtype=torch.float32)
    elif tuple(out.shape) != (m, r):
        raise ValueError(f"spmm24: out {tuple(out.shape)} is not [{m}, {r}]")
    if bias is not None:
        if tuple(bias.shape) != (r,):
            raise ValueError(f"spmm24: bias {tuple(bias.shape)} is not [{r}]")
        bias = bias.contiguous()
    lib = _lib(a, out) if bias is None else _lib(a, out, bias)
    if m == 0 or r == 0:
        return out
    if packed.cols == 0:
        return out.zero_() if bias is None else out.copy_(bias.expand(m, r))
    failed = lib.fs_spmm24(
        a.data_ptr(), m, packed.cols, a.stride(0), a.stride(1), packed.values.data_ptr(),
        packed.index.data_ptr(), packed.row_stride, packed.entry_stride, r,
        None if bias is None else bias.data_ptr(), out.data_ptr(), out.stride(0), out.stride(1),
    )  # fmt: skip
    if failed:
        raise MemoryError("spmm24: could not allocate the kernel's work buffers")
    return out


def tokens_product(dy: Tensor, x: Tensor) -> Tensor | None:
    """``dyᵀ · x`` → ``[d_out, d_in]`` for ``dy [T, d_out]`` 2:4 along T (each channel's
    column), ``x [T, d_in]``; None where the kernel does not apply (T not a multiple of 4,
    a tensor it cannot read, dy not 2:4 along T)."""
    tokens = dy.shape[0]
    if tokens % 4 or tokens == 0 or native.usable(dy, x) is None:
        return None
    try:
        packed = pack24(dy.t())
    except ValueError:
        return None
    return _packed_product(packed, x)


@sampling_part
def mvue_packed(dy: Tensor, key: tuple[int, int]) -> Packed24 | None:
    """The MVUE of ``dy [T, d_out]`` along T (:func:`fullsparse.estimators.mvue_2to4` with
    ``key``: the same draws and values) packed as ``MVUE(dy)ᵀ [d_out, T]`` in one pass; None
    where the kernel does not apply (T not a multiple of 4, a tensor it cannot read, or a
    NaN / infinity in ``dy``: the eager MVUE defines those)."""
    tokens, channels = dy.shape
    lib = native.usable(dy)
    if tokens % 4 or tokens == 0 or channels == 0 or lib is None:
        return None
    dy = dy.contiguous()
    stride = channels + _PAD
    values = torch.empty(tokens // 2, stride, dtype=torch.float32)
    index = torch.empty(tokens // 2, stride, dtype=torch.int32)
    failed = lib.fs_mvue_packed(
        dy.data_ptr(), key[0], key[1], values.data_ptr(), index.data_ptr(), tokens, channels,
        stride,
    )  # fmt: skip
    if failed:
        return None
    return Packed24(values, index, channels, tokens, 1, stride)


def _packed_product(packed: Packed24, x: Tensor) -> Tensor:
    """``B · x`` → ``[R, d_in]`` for ``packed`` = ``B [R, T]`` and ``x [T, d_in]``."""
    out = torch.empty(packed.rows, x.shape[1], dtype=torch.float32)
    spmm24(x.t(), packed, out=out.t())  # [d_in, R] = xᵀ · Bᵀ, written as its transpose
    return out


class CpuSparseGemm:
    """``A · Bᵀ`` with ``B`` 2:4 along its rows, on the CPU's vector units (float32)."""

    name = "cpu_sparse"
    #: pack() reads a transposed view as it is (no contiguous copy first)
    takes_views = True
    #: linear() adds a bias in the product's last pass
    fuses_bias = True

    def pack(self, operand: Tensor) -> Packed24:
        # a weight operand is small: laid out by rows (the product reads those faster) even
        # where it is a transposed view (grad_input's S_Co(W)ᵀ)
        return pack24(operand, rows=True)

    def linear(self, a2d: Tensor, packed: Packed24, bias: Tensor | None = None) -> Tensor:
        return spmm24(a2d, packed, bias=bias)

    def weight_product(self, dy2: Tensor, x2: Tensor) -> Tensor | None:
        """``dy2ᵀ · x2`` where ``dy2`` is 2:4 along its rows' axis (tokens), else None."""
        return tokens_product(dy2, x2)

    def mvue_weight_product(self, dy2: Tensor, x2: Tensor, key: tuple[int, int]) -> Tensor | None:
        """``MVUE(dy2)ᵀ · x2`` with the MVUE of ``key`` along the tokens (the draws of
        :func:`fullsparse.estimators.mvue_2to4`), made packed in one pass; None where the
        fused form does not apply (the caller then runs the eager MVUE with the same key)."""
        if native.usable(x2) is None:
            return None
        packed = mvue_packed(dy2, key)
        return None if packed is None else _packed_product(packed, x2)

    def __repr__(self) -> str:
        return "CpuSparseGemm()"
