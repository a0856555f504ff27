"""Load the CIFAR "python version" pickles without letting them run code, and without numpy.

A pickle can call any importable function (``os.system`` is the classic), so these files
are read with an unpickler whose ``find_class`` knows only the handful of globals that a
pickled numpy array needs, and maps each to a small stand-in written here:

* ``numpy.core.multiarray._reconstruct`` / ``numpy._core.multiarray._reconstruct``,
  ``numpy.ndarray``, ``numpy.dtype`` — how ``ndarray.__reduce__`` pickles (protocols 0-4;
  the CIFAR files are Python 2 protocol-2 pickles of this kind);
* ``numpy.core.numeric._frombuffer`` / ``numpy._core.numeric._frombuffer`` — protocol 5;
* ``_codecs.encode`` — how Python 3 writes ``bytes`` at protocol ≤ 2 (only latin-1 text).

The stand-ins only record shape, dtype and raw bytes; :func:`safe_load` turns them into
torch tensors. numpy is never imported, so it stays out of the core dependencies, and a
file asking for anything else is refused with ``UserError`` before anything runs.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fullsparse.errors import UserError
from fullsparse.limits import check_structure, limit, read_capped

__all__ = ["safe_load", "ALLOWED_GLOBALS"]

# numpy dtype string (without byte order) -> torch dtype. Only plain numeric types.
_DTYPES: dict[str, torch.dtype] = {
    "u1": torch.uint8,
    "i1": torch.int8,
    "i2": torch.int16,
    "i4": torch.int32,
    "i8": torch.int64,
    "f2": torch.float16,
    "f4": torch.float32,
    "f8": torch.float64,
    "b1": torch.bool,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "float32": torch.float32,
    "float64": torch.float64,
}


class _Refused(Exception):
    """Raised inside the unpickler; turned into ``UserError`` with the file name."""


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, str):
        return value
    raise _Refused(f"expected a string, got {type(value).__name__}")


class _DType:
    """Stand-in for ``numpy.dtype(spec, align, copy)`` plus its ``__setstate__``."""

    def __init__(self, spec: Any, align: Any = False, copy: Any = True) -> None:
        spec = _text(spec)
        order = ""
        if spec[:1] in "<>|=":
            order, spec = spec[0], spec[1:]
        if spec not in _DTYPES:
            raise _Refused(f"unsupported numpy dtype {spec!r}")
        self.spec = spec
        self.byteorder = order or "="

    def __setstate__(self, state: Any) -> None:
        # numpy dtype state: (version, byteorder, subarray, names, fields, elsize, align, flags)
        if not isinstance(state, tuple) or len(state) < 2:
            raise _Refused("malformed numpy dtype state")
        if state[2:5] != (None, None, None) and len(state) >= 5:
            raise _Refused("structured/sub-array numpy dtypes are not supported")
        self.byteorder = _text(state[1])

    def torch_dtype(self) -> torch.dtype:
        if self.byteorder == ">" and _DTYPES[self.spec].itemsize > 1:
            raise _Refused(f"big-endian numpy dtype >{self.spec} is not supported")
        return _DTYPES[self.spec]


class _Array:
    """Stand-in for a numpy ndarray: shape, dtype, C-order raw bytes."""

    def __init__(self) -> None:
        self.shape: tuple[int, ...] = (0,)
        self.dtype: _DType | None = None
        self.raw: bytes = b""

    def __setstate__(self, state: Any) -> None:
        # ndarray.__setstate__ accepts (version, shape, dtype, is_fortran, data) or the
        # older 4-tuple without version.
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise _Refused("malformed numpy array state")
        shape, dtype, fortran, raw = state[-4:]
        self._set(shape, dtype, raw)
        if fortran and len(self.shape) > 1:
            raise _Refused("Fortran-ordered numpy arrays are not supported")

    def _set(self, shape: Any, dtype: Any, raw: Any) -> None:
        if not isinstance(dtype, _DType):
            raise _Refused("numpy array without a plain dtype")
        if not isinstance(shape, tuple) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise _Refused(f"bad numpy array shape {shape!r}")
        if isinstance(raw, str):  # Python 2 str read with a text encoding
            raw = raw.encode("latin-1")
        if not isinstance(raw, (bytes, bytearray)):
            raise _Refused("numpy array data is not raw bytes (object arrays are refused)")
        self.shape, self.dtype, self.raw = shape, dtype, bytes(raw)

    def to_tensor(self) -> Tensor:
        if self.dtype is None:
            raise _Refused("numpy array state was never set")
        dtype = self.dtype.torch_dtype()
        expected = math.prod(self.shape) * dtype.itemsize
        if len(self.raw) != expected:
            raise _Refused(
                f"numpy array of shape {self.shape} {self.dtype.spec} needs {expected} bytes, "
                f"has {len(self.raw)}"
            )
        if expected == 0:
            return torch.empty(self.shape, dtype=dtype)
        return torch.frombuffer(bytearray(self.raw), dtype=dtype).reshape(self.shape)


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _Array:
    if cls is not _Array:
        raise _Refused("_reconstruct called for something other than numpy.ndarray")
    return _Array()


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any = "C") -> _Array:
    if _text(order) != "C" and len(shape) > 1:
        raise _Refused("Fortran-ordered numpy arrays are not supported")
    arr = _Array()
    arr._set(tuple(shape), dtype, buf)
    return arr


def _codecs_encode(obj: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    if not isinstance(obj, str) or _text(encoding).lower() not in ("latin1", "latin-1"):
        raise _Refused("_codecs.encode is allowed only for latin-1 text (pickled bytes)")
    return obj.encode("latin-1")


#: (module, name) the unpickler resolves, and to what. Everything else is refused.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): _Array,
    ("numpy", "dtype"): _DType,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _codecs_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        target = ALLOWED_GLOBALS.get((module, name))
        if target is None:
            raise _Refused(
                f"it asks for the Python global {module}.{name}, and only numpy array "
                f"reconstruction is allowed"
            )
        return target

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("it uses persistent ids")


def _convert(obj: Any) -> Any:
    """Stand-in arrays -> tensors, bytes keys -> str, recursively through dict/list/tuple."""
    if isinstance(obj, _Array):
        return obj.to_tensor()
    if isinstance(obj, dict):
        return {(_text(k) if isinstance(k, bytes) else k): _convert(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_convert(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_convert(v) for v in obj)
    if isinstance(obj, _DType):
        raise _Refused("a bare numpy dtype outside an array")
    return obj


@contextlib.contextmanager
def _refusals_as_user_errors(path: Path) -> Iterator[None]:
    """Turn a refused global or an unreadable pickle into a one-line error naming ``path``."""
    try:
        yield
    except _Refused as exc:
        raise UserError(f"refusing to load {path}: {exc}") from None
    except Exception as exc:  # truncated/garbled pickles raise many types; none run code
        raise UserError(
            f"{path} is not a valid pickle ({type(exc).__name__}: {exc}); the file may be "
            f"truncated or corrupt"
        ) from None


def safe_load(path: str | os.PathLike[str]) -> Any:
    """Unpickle ``path`` allowing only plain data and numpy arrays (returned as tensors).

    Returns dict/list/tuple/str/bytes/int/float/bool/None structures in which each numpy
    array has become a CPU tensor of the same shape and dtype, and ``bytes`` dict keys (as
    Python 2 pickles have) have become ``str``.

    Raises:
        UserError: the file asks for any other global (e.g. ``os.system``: a malicious or
            foreign pickle), is not a readable pickle, is larger than the ``pickle_bytes``
            limit, or nests or shares objects past the ``depth``/``objects`` limits
            (:mod:`fullsparse.limits`); the message names the file.
    """
    path = Path(path)
    raw = read_capped(path, limit("pickle_bytes"), "pickle", "pickle_bytes")
    with _refusals_as_user_errors(path):
        # encoding="bytes": Python 2 str (array data, dict keys) must stay raw bytes.
        obj = _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    # Shared references (the pickle memo) would be copied once per use by _convert.
    check_structure(obj, f"pickle {path}")
    with _refusals_as_user_errors(path):
        converted = _convert(obj)
    return converted
