"""2:4 GEMMs on sparse tensor cores (``torch.sparse`` semi-structured), and their emulation.

Two layers of objects:

- a *GEMM backend* computes one 2-D product ``A · Bᵀ`` where ``B [R, K]`` is 2:4 along its
  rows (the reduction axis K): :meth:`pack` turns ``B`` into what the hardware reads,
  :meth:`linear` multiplies. :class:`SemiStructuredGemm` uses PyTorch's
  ``SparseSemiStructuredTensor`` (cuSPARSELt, or CUTLASS on Ampere when cuSPARSELt is
  missing); :class:`EmulatedGemm` checks the operand is 2:4 along its rows and multiplies
  densely — same layout, same call sequence, any device and dtype (CI without a GPU, and
  numerics debugging; cf. torchao float8's ``emulate``).
- a *layer kernel* maps a layer's ``output`` (Eq. 1) and ``grad_input`` (Eq. 2) onto such
  GEMMs: :class:`GemmLinearKernel` (tokens × features), :class:`Gemm1x1ConvKernel` (a 1×1
  stride-1 conv is a GEMM over ``[N·H·W, Ci]``, copy-free on channels-last input) and
  :class:`Im2colConvKernel` (any k×k conv: ``unfold`` → GEMM → ``fold``). A role the plan
  leaves dense runs the reference op.

Operands, for ``W2 = W.reshape(Co, K)``:

- ``output``: ``B = S_K(W2)`` ``[Co, K]`` — 2:4 along K, its rows. ``y = A · Bᵀ`` with
  ``A = X`` ``[tokens, K]``.
- ``grad_input``: ``B = W_gi2ᵀ`` ``[K, Co]`` — W_gi is 2:4 along Co (S_Co), so its transpose
  is 2:4 along its rows. ``dX = dY · Bᵀ`` with ``A = dY`` ``[tokens, Co]``.

Packing happens where the operand is made: the forward packs ``S_K(W)``, the backward packs
``S_Co(W_src)ᵀ`` — each once per training step. (The packed forms cannot be reused across
the two roles: the masks differ, and a packed 2:4 matrix cannot be transposed.)
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fullsparse.geometry import ConvGeometry
from fullsparse.kernels.reference import conv_grad_input, conv_output
from fullsparse.masks import is_2to4

__all__ = [
    "SemiStructuredGemm",
    "EmulatedGemm",
    "GemmLinearKernel",
    "Gemm1x1ConvKernel",
    "Im2colConvKernel",
]


# --------------------------------------------------------------------------- GEMM backends
class SemiStructuredGemm:
    """``A · Bᵀ`` with ``B`` packed for 2:4 sparse tensor cores (CUDA, fp16/bf16).

    ``library`` is ``"cusparselt"`` (any sm_80+ GPU, required on Hopper) or ``"cutlass"``
    (sm_8x only). The subclass is chosen here rather than through the process-global
    ``SparseSemiStructuredTensor._FORCE_CUTLASS`` flag, so other code's setting of that
    flag does not change what fullsparse runs.
    """

    def __init__(self, library: str) -> None:
        if library not in ("cusparselt", "cutlass"):
            raise ValueError(f"library must be 'cusparselt' or 'cutlass', got {library!r}")
        self.library = library
        self.name = library

    def _subclass(self) -> type:
        from torch.sparse import (
            SparseSemiStructuredTensorCUSPARSELT,
            SparseSemiStructuredTensorCUTLASS,
        )

        if self.library == "cusparselt":
            return SparseSemiStructuredTensorCUSPARSELT
        return SparseSemiStructuredTensorCUTLASS

    def pack(self, operand: Tensor) -> Tensor:
        """Compress ``operand [R, K]`` (2:4 along K, already masked) into values + metadata."""
        with warnings.catch_warnings():
            # torch warns once per process that the subclass is a prototype API
            warnings.filterwarnings("ignore", message=".*SparseSemiStructuredTensor.*prototype")
            return self._subclass().from_dense(operand.contiguous())

    def linear(self, a2d: Tensor, packed: Tensor) -> Tensor:
        """``a2d [M, K] · packedᵀ`` → ``[M, R]`` on sparse tensor cores."""
        # torch pads the dense operand to the kernel's minimum itself
        return F.linear(a2d.contiguous(), packed)

    def __repr__(self) -> str:
        return f"SemiStructuredGemm({self.library!r})"


class EmulatedGemm:
    """The same GEMM with a dense product: checks the operand, then multiplies densely.

    Ignores the hardware's dtype and shape rules (so it runs on CPU in float64), but keeps
    the one rule that makes the layout right: the packed operand must be 2:4 along its rows.
    """

    name = "emulation"

    def pack(self, operand: Tensor) -> Tensor:
        if operand.ndim != 2:
            raise ValueError(
                f"emulated 2:4 GEMM: the sparse operand must be 2-D [R, K], got shape "
                f"{tuple(operand.shape)}"
            )
        if not is_2to4(operand, 1):
            raise ValueError(
                f"emulated 2:4 GEMM: operand {tuple(operand.shape)} is not 2:4 along its rows "
                "(the reduction axis); a sparse tensor core would compute something else"
            )
        return operand

    def linear(self, a2d: Tensor, packed: Tensor) -> Tensor:
        return F.linear(a2d, packed)

    def __repr__(self) -> str:
        return "EmulatedGemm()"


# --------------------------------------------------------------------------- layout helpers
def _is_channels_last(t: Tensor) -> bool:
    return t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last)


def _rows_to_nchw(rows: Tensor, n: int, h: int, w: int, like: Tensor) -> Tensor:
    """``[N·H·W, C]`` → ``[N, C, H, W]``: a channels-last view, copied to NCHW only when
    ``like`` (the layer's input) is not channels-last, so the layer keeps its input's
    memory format."""
    out = rows.reshape(n, h, w, rows.shape[1]).permute(0, 3, 1, 2)  # a view when contiguous
    return out if _is_channels_last(like) else out.contiguous()


def _nchw_to_rows(t: Tensor) -> Tensor:
    """``[N, C, H, W]`` → ``[N·H·W, C]`` (a view on channels-last input, a copy otherwise)."""
    n, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).reshape(n * h * w, c)


# --------------------------------------------------------------------------- layer kernels
class _GemmKernel:
    def __init__(self, gemm: Any, output_sparse: bool, grad_input_sparse: bool) -> None:
        self.gemm = gemm
        self.output_sparse = bool(output_sparse)
        self.grad_input_sparse = bool(grad_input_sparse)
        self.name = {"emulation": "emulation", "cpu_sparse": "cpu_sparse"}.get(
            getattr(gemm, "name", ""), "semi_structured"
        )

    def __repr__(self) -> str:
        flags = (("output", self.output_sparse), ("grad_input", self.grad_input_sparse))
        roles = [role for role, on in flags if on]
        return f"{type(self).__name__}({self.gemm!r}, sparse={roles})"

    def _output_rows(self, rows: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``rows [M, K]`` · ``S(W)ᵀ`` (+ bias) → ``[M, Co]``, ``weight`` flattened to the 2:4
        operand ``[Co, K]``."""
        packed = self.gemm.pack(weight.reshape(weight.shape[0], -1))
        if bias is not None and getattr(self.gemm, "fuses_bias", False):
            return self.gemm.linear(rows, packed, bias)
        y = self.gemm.linear(rows, packed)
        return y if bias is None else y + bias

    def _grad_input_rows(self, grad_rows: Tensor, weight: Tensor) -> Tensor:
        """``dY [M, Co]`` · ``W`` → ``[M, K]``; the 2:4 operand is ``Wᵀ [K, Co]`` (2:4 along
        Co, its rows)."""
        operand = weight.reshape(weight.shape[0], -1).t()
        if not getattr(self.gemm, "takes_views", False):
            operand = operand.contiguous()
        return self.gemm.linear(grad_rows, self.gemm.pack(operand))


class GemmLinearKernel(_GemmKernel):
    """Linear layer: ``output`` and ``grad_input`` as 2:4 GEMMs over the flattened tokens."""

    def output(self, input: Tensor, weight_out: Tensor, bias: Tensor | None) -> Tensor:
        """Eq. 1: ``input [..., d_in]`` · ``S_K(W)ᵀ`` (+ bias) → ``[..., d_out]``."""
        if not self.output_sparse:
            return F.linear(input, weight_out, bias)
        d_out, d_in = weight_out.shape
        y = self._output_rows(input.reshape(-1, d_in), weight_out, bias)
        return y.reshape(*input.shape[:-1], d_out)

    def grad_input(self, grad_output: Tensor, weight_gi: Tensor) -> Tensor:
        """Eq. 2: ``dY [..., d_out]`` · ``W_gi`` → ``[..., d_in]``; the 2:4 operand is
        ``W_giᵀ [d_in, d_out]`` (2:4 along d_out, its rows)."""
        if not self.grad_input_sparse:
            return grad_output.matmul(weight_gi)
        d_out, d_in = weight_gi.shape
        dx = self._grad_input_rows(grad_output.reshape(-1, d_out), weight_gi)
        return dx.reshape(*grad_output.shape[:-1], d_in)


class _ConvGemmKernel(_GemmKernel):
    """A conv kernel: each role dense (plain torch) unless the recipe makes it 2:4; the
    subclass says how a 2:4 role is laid out as a GEMM."""

    def output(
        self, input: Tensor, weight_out: Tensor, bias: Tensor | None, geo: ConvGeometry
    ) -> Tensor:
        if not self.output_sparse:
            return conv_output(input, weight_out, bias, geo)
        return self._sparse_output(input, weight_out, bias, geo)

    def grad_input(
        self, grad_output: Tensor, input: Tensor, weight_gi: Tensor, geo: ConvGeometry
    ) -> Tensor:
        if not self.grad_input_sparse:
            return conv_grad_input(grad_output, input, weight_gi, geo)
        return self._sparse_grad_input(grad_output, input, weight_gi, geo)

    def _sparse_output(
        self, input: Tensor, weight_out: Tensor, bias: Tensor | None, geo: ConvGeometry
    ) -> Tensor:
        raise NotImplementedError

    def _sparse_grad_input(
        self, grad_output: Tensor, input: Tensor, weight_gi: Tensor, geo: ConvGeometry
    ) -> Tensor:
        raise NotImplementedError


class Gemm1x1ConvKernel(_ConvGemmKernel):
    """1×1, stride-1, unpadded, ungrouped conv as a GEMM over ``[N·H·W, Ci]``."""

    def _sparse_output(
        self, input: Tensor, weight_out: Tensor, bias: Tensor | None, geo: ConvGeometry
    ) -> Tensor:
        n, _, h, w = input.shape
        y = self._output_rows(_nchw_to_rows(input), weight_out, bias)
        return _rows_to_nchw(y, n, h, w, like=input)

    def _sparse_grad_input(
        self, grad_output: Tensor, input: Tensor, weight_gi: Tensor, geo: ConvGeometry
    ) -> Tensor:
        n, _, h, w = input.shape
        dx = self._grad_input_rows(_nchw_to_rows(grad_output), weight_gi)  # [N·H·W, Ci]
        return _rows_to_nchw(dx, n, h, w, like=input)


class Im2colConvKernel(_ConvGemmKernel):
    """Any ungrouped conv as ``unfold`` (im2col) → 2:4 GEMM → ``fold`` (col2im).

    The column matrix costs ``kh·kw`` times the input's memory and traffic; whether the 2:4
    GEMM wins that back is shape dependent, which is why ``backend="auto"`` measures it.
    """

    def _sparse_output(
        self, input: Tensor, weight_out: Tensor, bias: Tensor | None, geo: ConvGeometry
    ) -> Tensor:
        n = input.shape[0]
        _, cig, kh, kw = weight_out.shape
        k = cig * kh * kw
        cols = F.unfold(input, (kh, kw), geo.dilation, geo.padding, geo.stride)  # [N, K, L]
        ho, wo = geo.output_size(tuple(input.shape[-2:]), (kh, kw))
        a2d = cols.transpose(1, 2).reshape(n * ho * wo, k)  # [N·L, K], rows in (n, ho, wo)
        y = self._output_rows(a2d, weight_out, bias)  # [N·L, Co]
        return _rows_to_nchw(y, n, ho, wo, like=input)

    def _sparse_grad_input(
        self, grad_output: Tensor, input: Tensor, weight_gi: Tensor, geo: ConvGeometry
    ) -> Tensor:
        n, _, h, w = input.shape
        _, cig, kh, kw = weight_gi.shape
        k = cig * kh * kw
        dcols = self._grad_input_rows(_nchw_to_rows(grad_output), weight_gi)  # [N·L, K]
        dcols = dcols.reshape(n, -1, k).transpose(1, 2)  # [N, K, L]
        dx = F.fold(dcols, (h, w), (kh, kw), geo.dilation, geo.padding, geo.stride)
        if _is_channels_last(input):
            dx = dx.contiguous(memory_format=torch.channels_last)
        return dx
