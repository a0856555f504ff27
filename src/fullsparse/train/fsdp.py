"""Fully sharded data parallel (FSDP2, ``torch.distributed.fsdp.fully_shard``) for sparse
models, and the full (unsharded) state dicts that checkpoints hold.

:func:`shard_model_` makes every sparse layer its own FSDP unit, then the whole model one
more (the remaining parameters: embeddings, norms, the dense head). FSDP gathers a unit's
full weight just before that unit's forward and frees it after, so inside a sparse layer's
forward — where its masks are computed (``S_K``, ``S_Co``, the TSM mask) — ``self.weight``
is the whole, unsharded weight, the same on every rank: the masks are those of one process
training on the global batch. The TSM mask cache and its clock are buffers, which FSDP does
not shard; every rank computes the same mask.

Outside a forward the parameters are sharded ``DTensor``s. Checkpoints therefore go through
:func:`full_state_dicts` / :func:`load_full_state_dicts_`: collectives that every rank calls,
which gather plain CPU tensors under the usual keys (the file a single process writes, and
loads) and scatter them back.

One caveat comes with a unit per layer: a sparse Linear given ``[..., T, d_in]`` returns a
view, and an in-place op on a unit's output (``y = layer(x); y += r``) drops FSDP's
pre-backward all-gather, for which torch prints a warning ("returned a view tensor"). The
models of :mod:`fullsparse.models` add residuals out of place; a model that does not must
clone that output or add out of place.

Works with the process group that :func:`fullsparse.train.distributed.init_distributed`
starts: gloo on CPU, nccl on CUDA.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fullsparse.errors import UserError
from fullsparse.nn import sparse_modules

__all__ = ["shard_model_", "full_state_dicts", "load_full_state_dicts_"]


def _fully_shard() -> Any:
    try:
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import fully_shard  # torch 2.4, 2.5
        except ImportError:
            raise UserError(
                f"FSDP2 (fully_shard) needs torch >= 2.4; this is torch {torch.__version__}"
            ) from None
    return fully_shard


def shard_model_(model: nn.Module, *, reshard_after_forward: bool = True) -> nn.Module:
    """Shard ``model`` in place over the default process group; returns it.

    Call after :func:`fullsparse.sparsify_` (the sparse layers must already be in place),
    with the model on this rank's device, and build the optimizer afterwards (from the
    sharded parameters). Every rank must call it, with the same model.

    Raises:
        UserError: no process group, or a torch without FSDP2.
    """
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise UserError("FSDP needs a process group: start with torchrun --nproc_per_node N")
    fully_shard = _fully_shard()
    for _, module in sparse_modules(model):
        if module is not model:
            fully_shard(module, reshard_after_forward=reshard_after_forward)
    fully_shard(model, reshard_after_forward=reshard_after_forward)
    return model


def _options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_state_dicts(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(model state, optimizer state)`` of a sharded model, gathered whole on CPU.

    A collective: every rank calls it. The model state has the keys and shapes of the
    unsharded model's ``state_dict()``; the optimizer state is keyed by parameter name
    (``torch.distributed.checkpoint.state_dict``'s form). Rank 0 gets the tensors; the
    other ranks get empty dicts (``cpu_offload`` keeps one copy, on rank 0).
    """
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = _options(cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optim_state = (
        get_optimizer_state_dict(model, optimizer, options=options)
        if optimizer is not None
        else None
    )
    return model_state, optim_state


def load_full_state_dicts_(
    model: nn.Module,
    model_state: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    optim_state: dict[str, Any] | None = None,
) -> None:
    """Load the full state dicts of :func:`full_state_dicts` into a sharded model and its
    optimizer, in place.

    A collective: every rank calls it with the same dicts (each rank reads the checkpoint
    file); each keeps its own shard.
    """
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    set_model_state_dict(model, model_state, options=_options())
    if optimizer is not None and optim_state is not None:
        set_optimizer_state_dict(model, optimizer, optim_state, options=_options())
