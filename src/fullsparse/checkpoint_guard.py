"""Checks of a checkpoint file before and after ``torch.load(weights_only=True)``.

Before: a zip entry may not expand past the ``compression_ratio`` limit (a few kilobytes
of deflated zeros must not become gigabytes of tensor). On refusal: the name of the Python
global the file asked for, read from the pickle opcodes themselves (never executed), so
the message does not depend on how a torch version words its error. After: the loaded
structure against the ``depth``/``objects`` limits, the type of every field the commands
read, the identity sizes against the ``classes``/``channels``/``image_side`` limits (a
forged ``num_classes = 12,000,000`` must be refused before the head is built), and the
weights for NaN/Inf.

Imports only the standard library, torch and :mod:`fullsparse.limits`.
"""

from __future__ import annotations

import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from fullsparse.errors import CheckpointError
from fullsparse.limits import check_structure, escape, exceeded, limit

__all__ = [
    "check_zip_entries",
    "refused_globals",
    "check_contents",
    "nonfinite_weights",
    "state_dict_mismatch",
]

_SLACK = 1 << 20  # entries this small may compress any amount: they cannot hurt


def check_zip_entries(path: Path) -> None:
    """Refuse a zip checkpoint whose entries declare more bytes than ``compression_ratio``
    times their stored size (torch writes them uncompressed: ratio 1)."""
    try:
        if not zipfile.is_zipfile(path):
            return  # the legacy single-pickle format; torch.load judges it
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (OSError, zipfile.BadZipFile, ValueError, NotImplementedError):  # version, method
        return  # torch.load reports an unreadable file in its own words
    ratio = limit("compression_ratio")
    for info in infos:
        if info.file_size > ratio * info.compress_size + _SLACK:
            raise CheckpointError(
                f"checkpoint {path}: entry {escape(info.filename, 80)} expands from "
                f"{info.compress_size:,} to {info.file_size:,} bytes: "
                f"{exceeded('its compression ratio', info.file_size // max(1, info.compress_size), 'compression_ratio')}"  # noqa: E501
            )


def _pickle_bytes(path: Path) -> bytes:
    cap = 64 << 20
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
                with archive.open(name) as f:
                    return f.read(cap)
        with open(path, "rb") as f:
            return f.read(cap)
    except (OSError, StopIteration, zipfile.BadZipFile, ValueError, NotImplementedError):
        return b""


def refused_globals(path: Path, text: str) -> list[str]:
    """The Python globals (``module.name``) a pickle refused by torch asks for: from
    torch's message if it names one, else from the file's GLOBAL/STACK_GLOBAL opcodes."""
    names = re.findall(r"GLOBAL ([A-Za-z_][\w.]*)", text)
    if names:
        return list(dict.fromkeys(names))
    found: list[str] = []
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(_pickle_bytes(path)):
            if op.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str) and "UNICODE" in op.name:
                strings.append(arg)
            if len(found) >= 8:
                break
    except Exception:  # noqa: BLE001 - garbage opcodes: report what was found so far
        pass
    allowed = ("torch.", "collections.OrderedDict", "_codecs.encode", "builtins.set")
    return [n for n in dict.fromkeys(found) if not n.startswith(allowed)]


def _int_field(state: dict[str, Any], key: str, low: int, high: int, limit_name: str) -> str:
    value = state.get(key)
    if value is None:
        return ""
    if not isinstance(value, int) or isinstance(value, bool):
        return f"identity field {key} must be an integer, got {escape(repr(value), 40)}"
    if not low <= value <= high:
        if value > high and limit_name:
            return f"identity field {key}: {exceeded('its value', value, limit_name)}"
        return f"identity field {key} must be in {low}..{high:,}, got {value}"
    return ""


def check_contents(path: Path, state: dict[str, Any]) -> None:
    """Refuse (CheckpointError, one line) a loaded checkpoint whose structure or fields
    break a rule, before anything is built from it."""
    check_structure(state, f"checkpoint {path}", CheckpointError)
    epoch = state.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise CheckpointError(
            f"checkpoint {path}: field epoch must be an integer >= 0, got {escape(repr(epoch), 40)}"
        )
    for key in ("identity", "config", "model", "sparse_state"):
        if not isinstance(state.get(key), dict):
            raise CheckpointError(
                f"checkpoint {path}: field {key} must be a mapping, got "
                f"{type(state.get(key)).__name__}"
            )
    identity = state["identity"]
    for key in ("model", "recipe", "dataset"):
        if not isinstance(identity.get(key), str):
            raise CheckpointError(
                f"checkpoint {path}: identity field {key} must be a string, got "
                f"{escape(repr(identity.get(key)), 40)}"
            )
    for key in ("model_kwargs", "sparsity"):
        if not isinstance(identity.get(key, {}), dict):
            raise CheckpointError(f"checkpoint {path}: identity field {key} must be a mapping")
    problems = [
        _int_field(identity, "num_classes", 1, limit("classes"), "classes"),
        _int_field(identity, "vocab_size", 1, limit("classes"), "classes"),
        _int_field(identity, "in_channels", 1, limit("channels"), "channels"),
        _int_field(identity, "image_size", 1, limit("image_side"), "image_side"),
    ]
    problems = [p for p in problems if p]
    if problems:
        raise CheckpointError(f"checkpoint {path}: {'; '.join(problems)}")
    bad = [k for k, v in state["model"].items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise CheckpointError(
            f"checkpoint {path}: field model must map names to tensors; "
            f"{escape(repr(bad[0]), 60)} is not"
        )


def nonfinite_weights(state: dict[str, Any]) -> tuple[str, int] | None:
    """``(name, count)`` of the first weight of ``state["model"]`` holding NaN/Inf."""
    for name, tensor in state["model"].items():
        if tensor.is_floating_point() or tensor.is_complex():
            count = int((~torch.isfinite(tensor)).sum())
            if count:
                return name, count
    return None


def _listed(names: list[str], shown: int = 3) -> str:
    more = f" (+{len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def state_dict_mismatch(model: torch.nn.Module, saved: Any) -> str:
    """What keeps ``saved`` (a checkpoint's weights) from loading into ``model``: the
    missing and unexpected keys and the shape mismatches, each listed by name (first
    three and a count), on one line; ``""`` if it fits. Torch's own error puts the keys
    on the lines after its first, which a one-line message would lose."""
    if not isinstance(saved, dict):
        return f"the weights are a {type(saved).__name__}, not a dict of tensors"
    expected = model.state_dict()
    missing = [k for k in expected if k not in saved]
    unexpected = [str(k) for k in saved if k not in expected]
    shapes = [
        f"{k} {list(saved[k].shape)} != {list(v.shape)}"
        for k, v in expected.items()
        if k in saved and isinstance(saved[k], torch.Tensor) and saved[k].shape != v.shape
    ]
    not_tensors = [k for k in expected if k in saved and not isinstance(saved[k], torch.Tensor)]
    parts = [
        f"{what}: {_listed(names)}"
        for what, names in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", shapes),
            ("not tensors", not_tensors),
        )
        if names
    ]
    return escape("; ".join(parts), width=1 << 12)
