"""Fully sharded data parallel (FSDP2, ``torch.distributed.fsdp.fully_shard``) for sparse
models, and the full (unsharded) state dicts that checkpoints hold.

:func:`shard_model_` makes every sparse layer its own FSDP unit, then the whole model one
more (the remaining parameters: embeddings, norms, the dense head). FSDP gathers a unit's
full weight just before that unit's forward and frees it after, so inside a sparse layer's
forward — where its masks are computed (``S_K``, ``S_Co``, the TSM mask) — ``self.weight``
is the whole, unsharded weight, the same on every rank: the masks are those of one process
training on the global batch. The TSM mask cache and its clock are buffers, which FSDP does
not shard; every rank computes the same mask.

Outside a forward the parameters are sharded ``DTensor``s. :func:`full_state_dicts` /
:func:`load_full_state_dicts_` are collectives that every rank calls, which gather plain CPU
tensors under the usual keys (the file a single process writes, and loads) and scatter them
back.

One caveat comes with a unit per layer: a sparse Linear given ``[..., T, d_in]`` returns a
view, and an in-place op on a unit's output (``y = layer(x); y += r``) drops FSDP's
pre-backward all-gather, for which torch prints a warning ("returned a view tensor"). The
models of :mod:`fullsparse.models` add residuals out of place; a model that does not must
clone that output or add out of place.

Works with the process group that :func:`fullsparse.train.distributed.init_distributed`
starts: gloo on CPU, nccl on CUDA.

``fullsparse train --fsdp`` (under ``torchrun``) calls :func:`shard_model_` before it
builds the optimizer; :func:`save_sharded_states` for its checkpoints and
:func:`load_sharded_states_` to resume one under ``--fsdp``; :func:`load_model_state_` and
:func:`load_optimizer_state_` to resume a single-file checkpoint (of a run without
``--fsdp``) under it; and :func:`unsharded` for evaluation, where the ranks may run
different numbers of test batches.

Sharded checkpoints: :func:`save_sharded_states` has every rank write its own shards of the
model and optimizer state (``torch.distributed.checkpoint``) into a new folder of the run,
so no rank ever holds the whole model; :func:`load_sharded_states_` loads such a folder
into a sharded model and its optimizer on any number of processes (DCP reshards). The
folder and the file that names it: :mod:`fullsparse.train.sharded_checkpoint`.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fullsparse.errors import CheckpointError, UserError
from fullsparse.nn import sparse_modules
from fullsparse.train.sharded_checkpoint import check_metadata, dcp_reason, new_folder_name

__all__ = [
    "check_fsdp",
    "shard_model_",
    "full_state_dicts",
    "load_full_state_dicts_",
    "checkpoint_states",
    "load_model_state_",
    "load_optimizer_state_",
    "save_sharded_states",
    "load_sharded_states_",
    "is_sharded",
    "unsharded",
]


def check_fsdp(world: int) -> None:
    """``--fsdp`` needs several processes (it shards the model over them)."""
    if world < 2:
        raise UserError(
            "--fsdp shards the model over processes: start with torchrun --nproc_per_node N "
            "(N >= 2) -m fullsparse train ..., or run without it (--no-fsdp)"
        )


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
    if not hasattr(_fsdp_module(), "set_reshard_after_forward"):  # used by unsharded()
        raise UserError(
            f"--fsdp needs FSDPModule.set_reshard_after_forward, which torch "
            f"{torch.__version__} lacks (added in 2025, torch 2.7 at the earliest): upgrade torch"
        )
    return fully_shard


def _fsdp_module() -> type:
    """FSDP2's module class (public in torch 2.6; before, in ``_composable.fsdp``)."""
    try:
        from torch.distributed.fsdp import FSDPModule  # torch >= 2.6
    except ImportError:
        from torch.distributed._composable.fsdp import FSDPModule  # torch 2.4, 2.5
    return FSDPModule


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


def _names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter names in the order of ``optimizer.state_dict()``'s integer ids."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def checkpoint_states(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(model.state_dict(), optimizer.state_dict())`` as the unsharded model and its
    optimizer would give them: the model's keys, the optimizer's integer parameter ids.

    A collective: every rank calls it; rank 0 gets the state, the others empty dicts.
    """
    model_state, by_name = full_state_dicts(model, optimizer)
    if not model_state:
        return {}, {}
    assert by_name is not None
    index = {name: i for i, name in enumerate(_names(model, optimizer))}
    groups = [
        {**group, "params": [index[n] for n in group["params"]]}
        for group in by_name["param_groups"]
    ]
    state = {index[name]: value for name, value in by_name["state"].items()}
    return model_state, {"state": state, "param_groups": groups}


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` was sharded by :func:`shard_model_` (in a process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False  # no process group, no sharding (and no FSDP import)
    return isinstance(model, _fsdp_module())


def load_model_state_(model: nn.Module, state: dict[str, Any]) -> None:
    """Load an unsharded ``model.state_dict()`` (of :func:`checkpoint_states`, or of a
    single-process run) into ``model``, sharded or not. Sharded: a collective, every rank
    calls it with the same dict and keeps its shard."""
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_options())


def load_optimizer_state_(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load an unsharded ``optimizer.state_dict()`` (integer parameter ids) into the
    optimizer of ``model``, sharded or not; a collective when sharded.

    Raises:
        ValueError: the state's parameter groups do not fit this optimizer.
    """
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _names(model, optimizer)
    groups = state["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in optimizer.param_groups]:
        raise ValueError("loaded state dict has a different number of parameter groups or sizes")
    by_name = {
        "state": {names[int(i)]: value for i, value in state["state"].items()},
        "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in groups],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=_options())


def save_sharded_states(
    model: nn.Module, optimizer: torch.optim.Optimizer, run_dir: str | Path
) -> str:
    """Write the model's and optimizer's states into a new folder of ``run_dir``, each rank
    its own shards (DCP); returns the folder's name relative to ``run_dir`` (the
    checkpoint's ``shards`` field). A collective: every rank calls it.

    On a multi-node run ``run_dir`` must be one shared folder that every node sees.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    token = [uuid.uuid4().hex[:16] if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(token, src=0)  # one folder name for every rank
    name = new_folder_name(str(token[0]))
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save(
        {"model": model_state, "optimizer": optim_state},
        storage_writer=dcp.FileSystemWriter(str(Path(run_dir) / name)),
    )
    return name


def load_sharded_states_(
    model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path, path: str | Path
) -> None:
    """Load the states :func:`save_sharded_states` wrote into ``folder`` (of checkpoint
    ``path``) into a sharded model and its optimizer, in place: each rank reads the parts of
    the shards it holds now, whatever the number of processes that wrote them. A
    collective: every rank calls it.

    Raises:
        CheckpointError: ``folder``'s metadata is refused (see
            :func:`fullsparse.train.sharded_checkpoint.check_metadata`), a shard file is
            unreadable, or a weight holds NaN/Inf.
        RuntimeError, KeyError, ValueError: the states do not fit this model.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    check_metadata(folder, path)
    model_state, optim_state = get_state_dict(model, optimizer)
    states = {"model": model_state, "optimizer": optim_state}
    try:
        dcp.load(states, storage_reader=dcp.FileSystemReader(str(folder)))
    except CheckpointException as exc:  # a damaged shard file; every rank raises it
        raise CheckpointError(
            f"cannot read the sharded states of checkpoint {path} in {folder}: {dcp_reason(exc)}"
        ) from None
    set_state_dict(
        model,
        optimizer,
        model_state_dict=states["model"],
        optim_state_dict=states["optimizer"],
    )
    _refuse_nonfinite(model, path)


def _refuse_nonfinite(model: nn.Module, path: str | Path) -> None:
    """Refuse (CheckpointError, on every rank) weights that hold NaN/Inf in some rank's
    shard, as a single-file checkpoint's load does."""
    bad, device = "", None
    for name, value in model.state_dict().items():
        local = value.to_local() if hasattr(value, "to_local") else value
        device = device or local.device
        if local.is_floating_point() and not bool(torch.isfinite(local).all()):
            bad = bad or name
    flag = torch.tensor([1.0 if bad else 0.0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if flag.item() > 0:
        where = f"weight {bad}" if bad else "a weight (in another process's shard)"
        raise CheckpointError(
            f"checkpoint {path}: {where} holds NaN/Inf values; a resume would train from "
            "meaningless weights"
        )


@contextlib.contextmanager
def unsharded(model: nn.Module) -> Iterator[None]:
    """Every FSDP unit of ``model`` gathered whole, and kept whole through its forwards,
    until the block ends (a no-op for a model without FSDP units).

    For evaluation: with no all-gather left inside a forward, the ranks may run different
    numbers of batches (the last test batches of an uneven split).
    """
    if not is_sharded(model):
        yield
        return
    units = [m for m in model.modules() if isinstance(m, _fsdp_module())]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)
