"""The reference kernels: each GEMM role as a plain dense PyTorch op on masked operands.

This is the path every other backend is tested against, and what ``backend="auto"`` uses
wherever a 2:4 kernel cannot run (CPU, float32, shapes the kernel rejects). 2:4 operands
arrive here already masked (zeros in place), so the product is the spec's formula exactly;
no sparse hardware is involved.

Kernels receive the operands the autograd functions prepared (``fullsparse.functional``):

- ``output(input, weight_out, bias[, geo])``  — Eq. 1, ``y = W_out · X``
- ``grad_input(grad_output, weight_gi[, input, geo])`` — Eq. 2, ``dX = W_giᵀ · dY``

``geo`` is the conv's :class:`fullsparse.geometry.ConvGeometry`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fullsparse.geometry import ConvGeometry

__all__ = [
    "conv_output",
    "conv_grad_input",
    "conv_backward",
    "conv_weight_gemm",
    "weight_grad_by_gemm",
    "GEMM_MIN_WEIGHT",
    "GEMM_MAX_REDUCTION",
    "onednn_guard",
    "NO_CONTEXT",
    "ReferenceLinearKernel",
    "ReferenceConvKernel",
    "REFERENCE_LINEAR",
    "REFERENCE_CONV",
]


def conv_output(input: Tensor, weight: Tensor, bias: Tensor | None, geo: ConvGeometry) -> Tensor:
    """``output`` (Eq. 1): ``y = W_out · X`` as a convolution."""
    sizes = geo.output_size(tuple(input.shape[-2:]), tuple(weight.shape[-2:]))
    with onednn_guard(input, input, weight, geo, sizes):
        return F.conv2d(input, weight, bias, geo.stride, geo.padding, geo.dilation, geo.groups)


def conv_grad_input(
    grad_output: Tensor, input: Tensor, weight: Tensor, geo: ConvGeometry
) -> Tensor:
    """``grad_input`` (Eq. 2): ``dX = W_giᵀ · dY`` (col2im of it) — ``input`` gives the shape."""
    return conv_backward(grad_output, input, weight, geo, "input")


def conv_backward(
    grad_output: Tensor, input: Tensor, weight: Tensor, geo: ConvGeometry, which: str
) -> Any:
    """Gradients of a convolution from ``dY``, in one ``convolution_backward`` call (the
    weight gradient as one GEMM where :func:`weight_grad_by_gemm` says so): ``which`` =
    "input" (shaped like ``input``), "weight" (shaped like ``weight``; its values are not
    read) or "both" (the pair ``(grad_input, grad_weight)``)."""
    if which not in ("input", "weight", "both"):
        raise ValueError(f"conv_backward: which must be 'input', 'weight' or 'both', got {which!r}")
    by_gemm = which != "input" and weight_grad_by_gemm(grad_output, input, weight, geo)
    mask = [which != "weight", which != "input" and not by_gemm, False]
    grads: Sequence[Tensor | None] = (None, None)
    if mask[0] or mask[1]:
        with onednn_guard(grad_output, input, weight, geo, grad_output.shape[-2:]):
            grads = torch.ops.aten.convolution_backward(
                grad_output,
                input,
                weight,
                None,
                list(geo.stride),
                list(geo.padding),
                list(geo.dilation),
                False,
                [0, 0],
                geo.groups,
                mask,
            )
    grad_weight = conv_weight_gemm(grad_output, input, weight, geo) if by_gemm else grads[1]
    if which == "both":
        return grads[0], grad_weight
    return grads[0] if which == "input" else grad_weight


#: Where a convolution's weight gradient runs as one GEMM on the unfolded input instead of
#: oneDNN's kernel (:func:`weight_grad_by_gemm`): a weight of at least this many entries ...
GEMM_MIN_WEIGHT = 1 << 20
#: ... and a reduction (N·Ho·Wo) of at most this many output positions.
GEMM_MAX_REDUCTION = 512


def weight_grad_by_gemm(
    grad_output: Tensor, input: Tensor, weight: Tensor, geo: ConvGeometry
) -> bool:
    """Whether :func:`conv_backward` computes the weight gradient as one GEMM
    (:func:`conv_weight_gemm`): float32 on a CPU, no groups, a large weight and a short
    reduction — ResNet-18's last stage at a small batch (512×512×3×3 at 5×5). There
    oneDNN's weight-gradient kernel took 1.1–2.2× the GEMM's time, and no less on 5 of 8
    samples than on all 8, so a reduced-size product saved nothing through it
    (``docs/training-speed.md``); elsewhere oneDNN was as fast or faster."""
    if grad_output.device.type != "cpu" or geo.groups != 1:
        return False
    if grad_output.dtype != torch.float32 or input.dtype != torch.float32:
        return False
    n, _, ho, wo = grad_output.shape
    return weight.numel() >= GEMM_MIN_WEIGHT and n * ho * wo <= GEMM_MAX_REDUCTION


def conv_weight_gemm(
    grad_output: Tensor, input: Tensor, weight: Tensor, geo: ConvGeometry
) -> Tensor:
    """A convolution's weight gradient (``weight``'s shape; its values are not read, and
    ``geo.groups`` must be 1) as one GEMM: ``dY [Co, N·L] · cols [K, N·L]ᵀ``, where ``cols``
    is the unfolded input (im2col: K = Ci·kh·kw rows, one column per output position)."""
    co = weight.shape[0]
    cols = F.unfold(input, tuple(weight.shape[2:]), geo.dilation, geo.padding, geo.stride)
    cols = cols.transpose(0, 1).reshape(cols.shape[1], -1)  # [K, N·L], (n, l) order
    dy = grad_output.transpose(0, 1).reshape(co, -1)  # [Co, N·L], the same order
    return torch.mm(dy, cols.t()).view(weight.shape)


#: an empty context shared by every call that needs one (it holds no state)
NO_CONTEXT = contextlib.nullcontext()


def onednn_guard(
    t: Tensor, input: Tensor, weight: Tensor, geo: ConvGeometry, output_hw: Sequence[int]
) -> contextlib.AbstractContextManager[Any]:
    """A context for one convolution of ``input`` by ``weight`` (or one of its gradients)
    computed in ``t``'s dtype, with an output of ``output_hw``: PyTorch's own kernel where
    its CPU oneDNN kernel is unsafe, else nothing.

    Unsafe: ``t`` is on the CPU, and an output side is 1 or a kernel tap only ever meets
    padding. Found first in bfloat16; the thorough property run then hit the same shapes in
    float32 with a channels-last input (a wrong output, and a segmentation fault), so the
    rule covers every dtype. There, torch 2.13's oneDNN convolution gave NaN or values off
    by up to 1e31 on some shapes (the forward when an output side is 1; the weight gradient
    in both cases, the dead tap's entry being garbage instead of 0) and crashed the process
    on two, while PyTorch's own kernel was right on every shape tried. Found by
    tests/test_properties.py; the scans, and the upstream reports pytorch/pytorch#163347 and
    #169688, are in docs/reliability.md. Such shapes are tiny, so the detour costs nothing.
    """
    if t.device.type != "cpu":
        return NO_CONTEXT
    if min(output_hw) == 1 or _has_dead_tap(input.shape[-2:], weight.shape[-2:], geo, output_hw):
        return _without_onednn()
    return NO_CONTEXT


def _has_dead_tap(
    input_hw: Sequence[int], kernel_hw: Sequence[int], geo: ConvGeometry, output_hw: Sequence[int]
) -> bool:
    """True when some kernel position reads only padding at every output position."""
    rule = _dead_tap.__wrapped__ if torch.compiler.is_compiling() else _dead_tap  # SymInts
    return rule(tuple(input_hw), tuple(kernel_hw), geo, tuple(output_hw))


@functools.lru_cache(maxsize=4096)
def _dead_tap(
    input_hw: tuple[int, ...], kernel_hw: tuple[int, ...], geo: ConvGeometry,
    output_hw: tuple[int, ...],
) -> bool:  # fmt: skip
    for d in range(2):
        size, stride, out = input_hw[d], geo.stride[d], output_hw[d]
        for tap in range(kernel_hw[d]):
            offset = tap * geo.dilation[d] - geo.padding[d]  # input index at output 0
            first = max(0, -(offset // stride)) if offset < 0 else 0  # first o with index >= 0
            if first > out - 1 or first * stride + offset >= size:
                return True
    return False


@contextlib.contextmanager
def _without_onednn() -> Iterator[None]:
    # Plain attribute assignment: torch.backends.mkldnn.flags() also resets the TF32 flag
    # and warns about it on every call.
    saved = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = saved


class ReferenceLinearKernel:
    """Dense ``F.linear`` / ``matmul`` on masked operands (any device, any float dtype)."""

    name = "reference"
    output_sparse = False
    grad_input_sparse = False

    def output(self, input: Tensor, weight_out: Tensor, bias: Tensor | None) -> Tensor:
        """Eq. 1: ``input [..., d_in]`` · ``weight_outᵀ`` (+ bias) → ``[..., d_out]``."""
        return F.linear(input, weight_out, bias)

    def grad_input(self, grad_output: Tensor, weight_gi: Tensor) -> Tensor:
        """Eq. 2: ``grad_output [..., d_out]`` · ``weight_gi [d_out, d_in]`` → ``[..., d_in]``."""
        return grad_output.matmul(weight_gi)

    def __repr__(self) -> str:
        return "ReferenceLinearKernel()"


class ReferenceConvKernel:
    """Dense convolutions (cuDNN / oneDNN) on masked weights."""

    name = "reference"
    output_sparse = False
    grad_input_sparse = False

    def output(
        self, input: Tensor, weight_out: Tensor, bias: Tensor | None, geo: ConvGeometry
    ) -> Tensor:
        return conv_output(input, weight_out, bias, geo)

    def grad_input(
        self, grad_output: Tensor, input: Tensor, weight_gi: Tensor, geo: ConvGeometry
    ) -> Tensor:
        return conv_grad_input(grad_output, input, weight_gi, geo)

    def __repr__(self) -> str:
        return "ReferenceConvKernel()"


#: Stateless singletons: what ``backend="reference"`` (and ``auto`` on CPU) hands the
#: autograd functions.
REFERENCE_LINEAR = ReferenceLinearKernel()
REFERENCE_CONV = ReferenceConvKernel()
