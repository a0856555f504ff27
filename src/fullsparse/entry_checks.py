"""The checks and small tensor helpers shared by :func:`fullsparse.functional.sparse_conv2d`,
:func:`~fullsparse.functional.sparse_linear` and their autograd functions: argument checks
with one-line messages, the autocast compute dtype, and an untracked-alias output."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

from fullsparse.config import SparsityConfig
from fullsparse.kernels import check_backend
from fullsparse.kernels.reference import NO_CONTEXT
from fullsparse.recipes import resolve_config

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(t: object, what: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT:
        raise ValueError(
            f"{what} must be floating point (float16, bfloat16, float32 or float64), "
            f"got dtype {t.dtype}"
        )
    return t


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_off(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """A block with autocast off on ``device_type``: ``torch.autocast(..., enabled=False)``
    where autocast is on, else a shared empty context (the sparse layers enter one per
    forward and backward: entering a real one costs more than the rest of a small layer's
    bookkeeping)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return NO_CONTEXT


def _not_a_view(y: Tensor) -> Tensor:
    """``y`` as a tensor autograd does not track as a view (same storage, same strides).

    An autograd.Function output that is a view cannot be modified in place: autograd refuses,
    since its view+inplace logic would replace the Function's backward. ``F.linear`` on a
    ``[..., T, d]`` input returns a view of its 2-D product, and a kernel may return one too;
    that product is a temporary nothing else holds, so the untracked alias behaves exactly
    like the output of the torch layer (``y.mul_(2)``, ``relu_``, ``y[i] = v`` all work).
    In eager mode that alias is ``y.detach()`` (the forward runs without grad: the same
    tensor, untracked; a few µs where the ``_unsafe_view`` op costs about 20 µs inside an
    autograd function); a compiled graph gets ``_unsafe_view``.
    """
    if torch.compiler.is_compiling():
        return torch.ops.aten._unsafe_view(y, y.shape)
    return y if y._base is None else y.detach()  # no view (a convolution's output) as it is


def _checked_call(
    who: str,
    kind: str,
    config: SparsityConfig | str,
    backend: str,
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
) -> SparsityConfig:
    """The config for a layer of ``kind``, after the checks every entry point makes: a
    known backend, float tensors."""
    resolved = resolve_config(config).for_kind(kind)
    check_backend(backend)
    for name, t in (("input", input), ("weight", weight), ("bias", bias)):
        if t is not None:
            _check_tensor(t, f"{who} {name}")
    return resolved


def _check_same_dtype(input: Tensor, weight: Tensor, bias: Tensor | None, who: str) -> None:
    dtypes = {input.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set())
    if len(dtypes) > 1:
        raise ValueError(
            f"{who}: input ({input.dtype}), weight ({weight.dtype})"
            + (f" and bias ({bias.dtype})" if bias is not None else "")
            + " must share one dtype outside autocast"
        )


def stash_forward(
    ctx: Any,
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    config: SparsityConfig,
    compute: torch.dtype,
    kernel: Any,
) -> tuple[Tensor, Tensor | None]:
    """Store on an autograd ``ctx`` what every ``backward`` needs besides its saved tensors
    (config, compute dtype, kernel, whether there is a bias, the three argument dtypes);
    return the input and bias in the compute dtype."""
    ctx.config, ctx.compute, ctx.kernel = config, compute, kernel
    ctx.has_bias = bias is not None
    ctx.dtypes = (input.dtype, weight.dtype, bias.dtype if bias is not None else None)
    return cast(input, compute), (cast(bias, compute) if bias is not None else None)


def cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, without a call where ``t`` already has that dtype (the same tensor
    either way): the layers cast each operand, nearly always to its own dtype."""
    return t if t.dtype == dtype else t.to(dtype)
