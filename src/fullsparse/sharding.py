"""Whole tensors and FSDP2's sharded ``DTensor``\\ s, outside a forward (where FSDP2 has
gathered nothing): the two conversions the library needs, each a no-op for a plain tensor,
and importing ``torch.distributed`` only when a ``DTensor`` is in hand."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["whole", "laid_out_as"]


def whole(t: Tensor) -> Tensor:
    """A sharded ``DTensor`` gathered whole (a collective: every process calls it, in the
    same order); any other tensor as it is."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


def laid_out_as(t: Tensor, like: Tensor) -> Tensor:
    """``t`` — a whole tensor every process holds alike (a cached mask) — laid out as
    ``like`` when that is a sharded ``DTensor``: each process keeps its own part, no
    communication; ``t`` itself otherwise."""
    if type(like) in (torch.Tensor, nn.Parameter) or type(t) is not torch.Tensor:
        return t
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return t
    return distribute_tensor(t, like.device_mesh, like.placements, src_data_rank=None)
