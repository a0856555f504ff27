"""Checkpoints: atomic writes, ``weights_only`` reads, identity checks, RNG capture.

Everything a checkpoint holds is a tensor or a plain Python value (dict, list, tuple, str,
number, bool, None), so :func:`load_checkpoint` can use ``torch.load(weights_only=True)``
— loading a checkpoint never runs code from the file.

Layout (``FORMAT``, version ``VERSION``)::

    format, version          what this file is
    identity                 model / dataset / recipe (+ sparsity fields, shapes): a resume
                             or an eval refuses a checkpoint whose identity differs
    config                   the resolved TrainConfig as a dict
    epoch                    completed epochs (= the loader epoch to continue from)
    model                    the (unwrapped) model's state_dict
    sparse_state             fullsparse.nn.sparse_state_dict(model): cached masks, step clocks
    optimizer, scheduler     their state_dicts
    scaler                   GradScaler state_dict (fp16 AMP) or None
    rng                      torch CPU, CUDA (per device), Python random, NumPy states
    history                  per-epoch metrics so far (rewrites metrics.jsonl on resume)
    best_top1, best_epoch
    shards                   only in a sharded checkpoint (``fullsparse train --fsdp``, format
                             version 2): the folder beside the file that holds the model
                             and optimizer state, which are then empty here
                             (:mod:`fullsparse.train.sharded_checkpoint`)
"""

from __future__ import annotations

import contextlib
import glob
import os
import pickle
import random
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from fullsparse.checkpoint_guard import (
    check_contents,
    check_zip_entries,
    nonfinite_weights,
    refused_globals,
)
from fullsparse.config import upgrade_config_dict
from fullsparse.errors import CheckpointError, UserError
from fullsparse.train.sharded_checkpoint import SHARDED_VERSION, read_full_states

__all__ = [
    "FORMAT",
    "VERSION",
    "IDENTITY_KEYS",
    "atomic_write_bytes",
    "atomic_torch_save",
    "remove_stale_temp_files",
    "save_checkpoint",
    "copy_checkpoint",
    "load_checkpoint",
    "convert_checkpoint",
    "check_identity",
    "capture_rng",
    "restore_rng",
]

FORMAT = "fullsparse-checkpoint"
#: The format version of a single-file checkpoint (a sharded one is ``SHARDED_VERSION``).
VERSION = 1
#: Identity fields: a checkpoint is only usable by a run/model that agrees on all of them.
IDENTITY_KEYS = (
    "model",
    "model_kwargs",
    "dataset",
    "num_classes",
    "in_channels",
    "image_size",
    "recipe",
    "sparsity",
    "parameters",  # task custom: the user's model's parameter shapes
)
_UMASK = os.umask(0)
os.umask(_UMASK)
_REQUIRED = ("identity", "config", "epoch", "model", "sparse_state", "optimizer", "rng")


def _fsync_dir(directory: Path) -> None:
    # The rename is only durable once the directory entry is; not every OS allows it.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_prefix(name: str) -> str:
    return f".{name}."


def _atomic_write(path: Path, write: Any) -> None:
    """Write via ``write(fileobj)`` into a temp file beside ``path``, fsync, rename.

    A crash at any point leaves either the old file or the new one, never a torn file; a
    killed process may leave its hidden temp file (``.<name>.<random>.tmp``), which no
    reader ever opens and :func:`remove_stale_temp_files` deletes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are ordinary files
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def remove_stale_temp_files(folder: str | Path, names: Any) -> list[Path]:
    """Delete the temp files an interrupted :func:`_atomic_write` of ``folder/<name>`` left
    behind (the rename is the commit: such a file was never a checkpoint). Call it only
    when no other process writes into ``folder``. Returns what was removed."""
    removed = []
    for name in names:
        for tmp in Path(folder).glob(f"{glob.escape(_temp_prefix(name))}*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    _atomic_write(Path(path), lambda f: f.write(data))


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    """``torch.save(obj)`` to ``path`` atomically."""
    _atomic_write(Path(path), lambda f: torch.save(obj, f))


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Atomically ``torch.save`` ``state`` (with format and version stamped in: a state with
    a ``shards`` field is a sharded checkpoint's)."""
    version = SHARDED_VERSION if "shards" in state else VERSION
    state = {"format": FORMAT, "version": version, **state}
    _atomic_write(Path(path), lambda f: torch.save(state, f))


def copy_checkpoint(src: str | Path, dst: str | Path) -> None:
    """Atomic copy (``best.pt`` from ``last.pt`` without serialising twice)."""
    src = Path(src)

    def write(f: Any) -> None:
        with open(src, "rb") as s:
            while chunk := s.read(1 << 22):
                f.write(chunk)

    _atomic_write(Path(dst), write)


def _reason(exc: BaseException, path: Path) -> str:
    """Why a load failed, as a whole sentence without torch's internal wording (a zip
    reader's advice, a bare ``KeyError: 101`` from unpickling a text file); for a refused
    pickle, the globals it asked for (read from the file, whatever torch says)."""
    text = " ".join(str(exc).split())
    if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in text:
        names = refused_globals(path, text)
        if names:
            return (
                f"the weights-only unpickler refused it: it asks for the Python global(s) "
                f"{', '.join(names[:3])} (a checkpoint holds only tensors and plain values)"
            )
        if "WeightsUnpickler error:" in text:
            return "the weights-only unpickler finds no torch checkpoint in it"
    if "zip archive" in text or "central directory" in text or isinstance(exc, EOFError):
        return "the file ends early or its zip archive is damaged"
    return "the file is not a torch checkpoint"


def load_checkpoint(
    path: str | Path, *, allow_nonfinite: bool = False, shards: bool = True
) -> dict[str, Any]:
    """Read a fullsparse checkpoint on CPU with ``weights_only=True``.

    A sharded checkpoint (of ``fullsparse train --fsdp``) comes back whole, its model and
    optimizer state read from its shards folder in this process, without its ``shards``
    field: the single-file format. ``shards=False`` leaves them in the folder (empty
    ``model``/``optimizer``, the ``shards`` field kept) for a resume under FSDP, where each
    rank loads only its own shards.

    A missing, truncated, corrupt, foreign or newer-format file raises CheckpointError with
    one line saying which and where; so does one that breaks a limit of
    :mod:`fullsparse.limits` (a compressed entry, nesting, shared references, identity
    sizes), has a field of the wrong type, or holds NaN/Inf weights (unless
    ``allow_nonfinite``). Nothing is built from the file before these checks pass.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    check_zip_entries(path)
    try:
        with warnings.catch_warnings():  # e.g. "pickle protocol 4": the error says enough
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (zip reader), EOFError, ...
        reason = _reason(exc, path)
        if reason.startswith("the weights-only unpickler refused"):
            raise CheckpointError(f"cannot read checkpoint {path}: {reason}") from None
        raise CheckpointError(
            f"cannot read checkpoint {path} (truncated, corrupt, or not a weights-only "
            f"fullsparse checkpoint): {reason}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fullsparse checkpoint (no '{FORMAT}' stamp)")
    version = state.get("version")
    if not isinstance(version, int) or version > SHARDED_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version!r:.40}; this fullsparse reads "
            f"versions up to {SHARDED_VERSION} (upgrade fullsparse)"
        )
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    check_contents(path, state)
    if "shards" in state and shards:
        _read_shards_(path, state)
    bad = None if allow_nonfinite else nonfinite_weights(state)
    if bad is not None:
        raise CheckpointError(
            f"checkpoint {path}: weight {bad[0]} holds {bad[1]:,} NaN/Inf values; its results "
            "would be meaningless (`fullsparse eval --allow-nonfinite` evaluates it anyway)"
        )
    return state


def _read_shards_(path: Path, state: dict[str, Any]) -> None:
    """Fill a sharded checkpoint's ``model`` and ``optimizer`` from its shards folder, in
    place, and drop its ``shards`` field: the single-file form."""
    state["model"], state["optimizer"] = read_full_states(path, state)
    del state["shards"]
    check_contents(path, state)


def convert_checkpoint(src: str | Path, out: str | Path, *, force: bool = False) -> Path:
    """Write sharded checkpoint ``src`` (``fullsparse train --fsdp``: a ``last.pt``/``best.pt``
    with its ``shards/`` folder) as one single-file checkpoint ``out``, which
    ``eval``/``export``/``--resume``/``--init-from`` read without the folder. Reads the
    whole model in this process. Returns ``out``.

    Raises:
        CheckpointError: ``src`` is unreadable, or not sharded (it already is one file).
        UserError: ``out`` exists (without ``force``) or is ``src``.
    """
    src, out = Path(src), Path(out)
    if out.exists() and (not force or out.resolve() == src.resolve()):
        why = "is the checkpoint itself" if out.resolve() == src.resolve() else "exists"
        raise UserError(f"--out {out} {why}; choose another file (or --force to overwrite)")
    state = load_checkpoint(src, allow_nonfinite=True, shards=False)
    if "shards" not in state:
        raise CheckpointError(
            f"checkpoint {src} is already a single file: eval, export and --resume read it as it is"
        )
    _read_shards_(src, state)
    save_checkpoint(out, {k: v for k, v in state.items() if k not in ("format", "version")})
    return out


def check_identity(path: str | Path, found: dict[str, Any], expected: dict[str, Any]) -> None:
    """Refuse a checkpoint made for another model, dataset or recipe (one line).

    A checkpoint saved before SparsityConfig's field renames is read with the new names, and
    a field added after it was written takes its default, so older checkpoints of the same
    run still match."""
    if isinstance(found.get("sparsity"), dict):
        found = {**found, "sparsity": _with_defaults(upgrade_config_dict(found["sparsity"]))}
    diffs = [
        f"{key} {found.get(key)!r} != {expected.get(key)!r}"
        for key in IDENTITY_KEYS
        if found.get(key) != expected.get(key)
    ]
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} belongs to another run (checkpoint vs this run: {'; '.join(diffs)})"
        )


def _with_defaults(sparsity: Any) -> Any:
    from fullsparse.config import SparsityConfig

    try:
        return SparsityConfig(**sparsity).to_dict()
    except (TypeError, ValueError):  # not a SparsityConfig: compared as it is
        return sparsity


# ---------------------------------------------------------------------------------------
# RNG states as tensors and plain values (weights_only-loadable).


def _numpy() -> Any:
    """NumPy if installed (not a core dependency: the extras' packages bring it), else None."""
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": None,
    }
    np = sys.modules.get("numpy")  # only if something in this process uses NumPy
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype("int64")),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        n = min(len(cuda_states), torch.cuda.device_count())
        for i in range(n):
            torch.cuda.set_rng_state(cuda_states[i], i)
    np_state = state.get("numpy")
    np = _numpy() if np_state is not None else None
    if np is not None:  # without NumPy installed nothing here can draw from its generator
        np.random.set_state(
            (
                np_state["kind"],
                np_state["keys"].numpy().astype("uint32"),
                np_state["pos"],
                np_state["has_gauss"],
                np_state["cached_gaussian"],
            )
        )
