"""The sharded states of a ``fullsparse train --fsdp`` checkpoint, read in one process.

Under ``--fsdp`` no rank gathers the model: each rank writes its own shards of the model and
optimizer state with ``torch.distributed.checkpoint`` (DCP) into a folder of the run,
``shards/<token>/`` (one ``__<rank>_0.distcp`` file per rank and DCP's ``.metadata``), and
rank 0 writes ``last.pt`` as usual but with an empty ``model`` and ``optimizer`` and the
field ``shards`` naming that folder (relative to the checkpoint's own folder). ``best.pt``
is a copy of ``last.pt`` and names the same folder; a folder that neither names is deleted.
Such a file is stamped format version :data:`SHARDED_VERSION`, which an older fullsparse
refuses in one line instead of finding no weights.

:func:`read_full_states` reads the folder whole in the calling process (no process group),
into the state dicts of the single-file format: the model's keys, the optimizer's integer
parameter ids. ``fullsparse eval``/``export``, ``--init-from``, a resume without ``--fsdp``
and ``fullsparse convert`` go through it; a resume under ``--fsdp`` loads the shards each
rank needs instead (:func:`fullsparse.train.fsdp.load_sharded_states_`), in any number of
processes.

DCP writes its ``.metadata`` with :mod:`pickle`. Before DCP opens a folder,
:func:`check_metadata` unpickles that file with an allow-list of DCP's own classes and a
few torch types, so that reading a checkpoint still never runs code from the file (the
shard files themselves are read with ``weights_only``).
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from fullsparse.errors import CheckpointError
from fullsparse.limits import escape, one_line

__all__ = [
    "SHARDS",
    "dcp_reason",
    "SHARDED_VERSION",
    "new_folder_name",
    "shards_folder",
    "check_metadata",
    "read_full_states",
    "optimizer_by_ids",
]

#: The subfolder of a run folder that holds the sharded states of its checkpoints.
SHARDS = "shards"
#: The format version of a checkpoint whose states are sharded (a single file stays 1).
SHARDED_VERSION = 2
_NAME = re.compile(rf"{SHARDS}/[0-9a-f]{{8,64}}")
_METADATA_CAP = 256 << 20


def new_folder_name(token: str) -> str:
    """The ``shards`` field of a checkpoint whose states a save writes now."""
    return f"{SHARDS}/{token}"


def shards_folder(path: str | Path, state: dict[str, Any]) -> Path:
    """The folder that holds the sharded states of checkpoint ``path`` (loaded: ``state``).

    Raises:
        CheckpointError: the field is malformed, or the folder is missing or incomplete.
    """
    path = Path(path)
    name = state.get("shards")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise CheckpointError(
            f"checkpoint {path}: field shards must name a folder {SHARDS}/<hex>, got "
            f"{escape(repr(name), 60)}"
        )
    folder = path.parent / name
    if not (folder / ".metadata").is_file():
        raise CheckpointError(
            f"checkpoint {path}: its shards folder {name} (model and optimizer state) is "
            "missing or incomplete; copy the whole run folder, or use `fullsparse convert`"
        )
    return folder


_ALLOWED_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.filesystem",
    "torch.distributed.checkpoint.planner",
)
_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only DCP's metadata classes and plain torch values (sizes, dtypes)."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = (
            module in _ALLOWED_MODULES
            or (module, name) in _ALLOWED
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.layout))
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.memory_format))
        )
        if not allowed:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def check_metadata(folder: Path, path: str | Path) -> None:
    """Refuse (one line) a shards folder whose ``.metadata`` asks for any Python global
    besides DCP's metadata classes and torch types, or is not a pickle at all."""
    meta = folder / ".metadata"
    try:
        size = meta.stat().st_size
        if size > _METADATA_CAP:
            raise CheckpointError(f"checkpoint {path}: {meta} is {size:,} bytes, too large")
        data = meta.read_bytes()
        _MetadataUnpickler(io.BytesIO(data)).load()
    except CheckpointError:
        raise
    except Exception as exc:  # UnpicklingError, EOFError, ValueError, ... from a bad file
        raise CheckpointError(
            f"checkpoint {path}: cannot read {meta}: {one_line(str(exc) or type(exc).__name__)}"
        ) from None


def _empty_load_planner() -> Any:
    """DCP's planner that rebuilds a whole state dict from a checkpoint's metadata."""
    try:
        from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    except ImportError:  # older torch keep it beside dcp_to_torch_save
        from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    return _EmptyStateDictLoadPlanner()


def optimizer_by_ids(by_name: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state keyed by parameter name (DCP's form) in ``optimizer.state_dict()``'s
    form: parameters numbered in the order of the parameter groups."""
    names = [name for group in by_name["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(names)}
    return {
        "state": {index[name]: value for name, value in by_name["state"].items()},
        "param_groups": [
            {**group, "params": [index[n] for n in group["params"]]}
            for group in by_name["param_groups"]
        ],
    }


def dcp_reason(exc: BaseException) -> str:
    """One line on why DCP failed: the first rank's error, not DCP's per-rank tracebacks."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        exc = first[0] if isinstance(first, tuple) and first else first
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return one_line(" ".join(text.split()), 160)


def read_full_states(path: str | Path, state: dict[str, Any]) -> tuple[dict, dict]:
    """``(model state, optimizer state)`` of sharded checkpoint ``path`` (loaded: ``state``),
    whole, on CPU, in this process: the single-file format's ``model`` and ``optimizer``.

    Raises:
        CheckpointError: the folder is missing, refused by :func:`check_metadata`, or
            unreadable, or it does not hold a model and an optimizer state.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    folder = shards_folder(path, state)
    check_metadata(folder, path)
    full: dict[str, Any] = {}
    try:
        _load_state_dict(
            full,
            storage_reader=FileSystemReader(str(folder)),
            planner=_empty_load_planner(),
            no_dist=True,
        )
        model, optimizer = full["model"], optimizer_by_ids(full["optimizer"])
    except (Exception, CheckpointException) as exc:  # a damaged shard file, a foreign folder
        raise CheckpointError(
            f"cannot read the sharded states of checkpoint {path} in {folder}: {dcp_reason(exc)}"
        ) from None
    return dict(model), optimizer
