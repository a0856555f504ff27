"""A validating reader for the IDX format of (Fashion-)MNIST.

IDX layout (LeCun's MNIST page): two zero bytes, a type code, the number of dimensions d,
then d big-endian uint32 sizes, then the data in C order, big-endian. Files may be gzipped
(detected by the gzip magic bytes, not the name). Every mismatch raises ``UserError``
naming the file and what is wrong, because a half-downloaded file is a common problem.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import sys
import zlib
from pathlib import Path

import torch
from torch import Tensor

from fullsparse.errors import UserError

__all__ = ["IDX_TYPES", "read_idx", "write_idx"]

#: IDX type code -> (torch dtype, bytes per element).
IDX_TYPES: dict[int, tuple[torch.dtype, int]] = {
    0x08: (torch.uint8, 1),
    0x09: (torch.int8, 1),
    0x0B: (torch.int16, 2),
    0x0C: (torch.int32, 4),
    0x0D: (torch.float32, 4),
    0x0E: (torch.float64, 8),
}

_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read IDX file {path}: {exc}") from exc
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"IDX file {path} is a corrupt or truncated gzip file: {exc}") from exc


def read_idx(
    path: str | os.PathLike[str],
    *,
    expect_ndim: int | None = None,
    expect_dtype: torch.dtype | None = None,
) -> Tensor:
    """Read an IDX file (plain or gzipped) into a tensor of its stored shape and type.

    Args:
        path: the file.
        expect_ndim: if given, the number of dimensions the file must have (3 for images
            ``[N, rows, cols]``, 1 for labels ``[N]``).
        expect_dtype: if given, the element type the file must have (uint8 for MNIST).

    Returns:
        Tensor of shape ``dims`` in native byte order.

    Raises:
        UserError: unreadable file, bad gzip, bad magic number, unknown type code, a size
            that does not match the header (truncated or trailing bytes), or an unexpected
            ndim/dtype. The message names the file.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise UserError(f"IDX file {path} is too short ({len(data)} bytes) to hold a header")
    zero, code, ndim = data[0:2], data[2], data[3]
    if zero != b"\x00\x00" or code not in IDX_TYPES:
        raise UserError(
            f"IDX file {path} has a bad magic number 0x{data[:4].hex()}: expected 0x0000 then a "
            f"type code in {{{', '.join(f'0x{c:02x}' for c in IDX_TYPES)}}} and the ndim byte"
        )
    if ndim == 0:
        raise UserError(f"IDX file {path} declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(
            f"IDX file {path} is truncated inside its header: {ndim} dims need {header} bytes, "
            f"file has {len(data)}"
        )
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype, itemsize = IDX_TYPES[code]
    expected = header + math.prod(dims) * itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise UserError(
            f"IDX file {path} is {what}: header says dims {list(dims)} of {dtype} "
            f"({expected} bytes with header), file has {len(data)} bytes"
        )
    if expect_ndim is not None and ndim != expect_ndim:
        raise UserError(
            f"IDX file {path} has {ndim} dimensions {list(dims)}, expected {expect_ndim}"
        )
    if expect_dtype is not None and dtype != expect_dtype:
        raise UserError(f"IDX file {path} holds {dtype}, expected {expect_dtype}")
    body = bytearray(data[header:])  # writable copy: torch.frombuffer warns on read-only bytes
    if not body:
        return torch.empty(dims, dtype=dtype)
    if itemsize > 1 and sys.byteorder == "little":
        # IDX is big-endian: reverse the bytes of each element before reinterpreting.
        swapped = torch.frombuffer(body, dtype=torch.uint8).view(-1, itemsize).flip(1)
        return swapped.contiguous().view(dtype).reshape(dims)
    return torch.frombuffer(body, dtype=dtype).reshape(dims)


def write_idx(path: str | os.PathLike[str], tensor: Tensor, *, compress: bool = False) -> None:
    """Write ``tensor`` as an IDX file (gzipped if ``compress``); the inverse of :func:`read_idx`.

    Used to build small test files and to cache converted data.
    """
    codes = {dtype: code for code, (dtype, _) in IDX_TYPES.items()}
    if tensor.dtype not in codes or tensor.dim() < 1 or tensor.dim() > 255:
        raise ValueError(
            f"cannot write {tensor.dtype} tensor of shape {tuple(tensor.shape)} as IDX"
        )
    t = tensor.detach().cpu().contiguous()
    itemsize = IDX_TYPES[codes[t.dtype]][1]
    raw = t.reshape(-1).view(torch.uint8).reshape(-1, itemsize)
    if itemsize > 1 and sys.byteorder == "little":
        raw = raw.flip(1)
    header = bytes([0, 0, codes[t.dtype], t.dim()]) + struct.pack(f">{t.dim()}I", *t.shape)
    # tolist() keeps numpy out of the dependencies; this writer is for small files.
    payload = header + bytes(raw.reshape(-1).tolist())
    Path(path).write_bytes(gzip.compress(payload) if compress else payload)
