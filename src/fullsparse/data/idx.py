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
from typing import Any

import torch
from torch import Tensor

from fullsparse.errors import UserError
from fullsparse.limits import exceeded, limit

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
_CHUNK = 1 << 16


class _Stream:
    """Reads an IDX file plain or through gunzip, ``n`` bytes at a time, so that no more
    is ever decompressed than the header has promised (and the header is checked first).

    A gzip file may hold several members (``cat a.gz b.gz``, ``pigz``, ``bgzip``, an
    empty trailing member): their data is read as one stream, as gzip(1) does. NUL bytes
    after the last member are padding and ignored; anything else there is refused. Every
    step of the loop either consumes compressed input or produces output, so the reader
    ends on any file: at most one pass over its bytes plus what the caller asked for.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.file = open(path, "rb")  # noqa: SIM115 - closed by read_idx
            self.size = os.fstat(self.file.fileno()).st_size
            self.gzip = self.file.read(2) == _GZIP_MAGIC
            self.file.seek(0)
        except OSError as exc:
            raise UserError(f"cannot read IDX file {path}: {exc.strerror or exc}") from None
        #: The inflater of the member being read; None between members.
        self.inflate: Any = None
        #: Compressed bytes read from the file and not yet consumed by an inflater.
        self.pending = b""
        #: Only NUL padding may follow (a NUL byte was seen after a member).
        self.padding = False
        self.members = 0

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes (fewer only at the end of the data)."""
        if not self.gzip:
            return self.file.read(n)
        try:
            return self._inflate(n)
        except (OSError, EOFError, zlib.error) as exc:
            raise UserError(
                f"IDX file {self.path} is a corrupt or truncated gzip file: {exc}"
            ) from None

    def _inflate(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            if not self.pending:
                self.pending = self.file.read(_CHUNK)
                if not self.pending:
                    if self.inflate is not None:
                        raise EOFError(
                            f"member {self.members} of the compressed stream ended "
                            "before its end marker"
                        )
                    break  # the end of the last member: the end of the data
                continue
            if self.inflate is None:
                if self.padding or self.pending[0] == 0:
                    rest = self.pending.lstrip(b"\0")
                    if rest:
                        raise zlib.error(
                            f"bytes after gzip member {self.members} are neither a gzip "
                            "member nor NUL padding"
                        )
                    self.padding, self.pending = True, b""
                    continue
                if not _GZIP_MAGIC.startswith(self.pending[:2]):
                    raise zlib.error(
                        f"bytes after gzip member {self.members} are neither a gzip "
                        "member nor NUL padding"
                    )
                self.inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
                self.members += 1
            before = len(self.pending)
            chunk = self.inflate.decompress(self.pending, n - len(out))
            if self.inflate.eof:
                # unused_data: what follows the member; the tail would repeat part of it
                self.pending, self.inflate = self.inflate.unused_data, None
            else:
                self.pending = self.inflate.unconsumed_tail
            if not chunk and len(self.pending) >= before:
                raise zlib.error("the inflater consumed no input and produced no output")
            out += chunk
        return bytes(out)

    def close(self) -> None:
        self.file.close()


def read_idx(
    path: str | os.PathLike[str],
    *,
    expect_ndim: int | None = None,
    expect_dtype: torch.dtype | None = None,
    expect_shape: tuple[int | None, ...] | None = None,
) -> Tensor:
    """Read an IDX file (plain or gzipped) into a tensor of its stored shape and type.

    The header is checked before the payload is read: against the file size (plain
    files), the ``idx_bytes`` limit, the expected rank/type/shape and, for image files,
    the ``image_side`` limit (:mod:`fullsparse.limits`). A gzipped file is inflated as a
    stream, never past what the header promised plus one byte.

    Args:
        path: the file.
        expect_ndim: if given, the number of dimensions the file must have (3 for images
            ``[N, rows, cols]``, 1 for labels ``[N]``).
        expect_dtype: if given, the element type the file must have (uint8 for MNIST).
        expect_shape: if given, the dims the file must have (None: any size).

    Returns:
        Tensor of shape ``dims`` in native byte order.

    Raises:
        UserError: unreadable file, bad gzip, bad magic number, unknown type code, a size
            that does not match the header (truncated or trailing bytes), a zero or
            over-limit dimension, or an unexpected ndim/dtype/shape. The message names the
            file.
    """
    path = Path(path)
    stream = _Stream(path)
    try:
        return _read(stream, path, expect_ndim, expect_dtype, expect_shape)
    finally:
        stream.close()


def _read(
    stream: _Stream,
    path: Path,
    expect_ndim: int | None,
    expect_dtype: torch.dtype | None,
    expect_shape: tuple[int | None, ...] | None,
) -> Tensor:
    magic = stream.read(4)
    if len(magic) < 4:
        raise UserError(f"IDX file {path} is too short ({len(magic)} bytes) to hold a header")
    zero, code, ndim = magic[0:2], magic[2], magic[3]
    if zero != b"\x00\x00" or code not in IDX_TYPES:
        raise UserError(
            f"IDX file {path} has a bad magic number 0x{magic.hex()}: expected 0x0000 then a "
            f"type code in {{{', '.join(f'0x{c:02x}' for c in IDX_TYPES)}}} and the ndim byte"
        )
    if ndim == 0:
        raise UserError(f"IDX file {path} declares 0 dimensions")
    header = 4 + 4 * ndim
    raw_dims = stream.read(4 * ndim)
    if len(raw_dims) < 4 * ndim:
        raise UserError(
            f"IDX file {path} is truncated inside its header: {ndim} dims need {header} bytes, "
            f"file has {4 + len(raw_dims)}"
        )
    dims = struct.unpack(f">{ndim}I", raw_dims)
    dtype, itemsize = IDX_TYPES[code]
    payload = math.prod(dims) * itemsize
    expected = header + payload
    if not stream.gzip and stream.size != expected:
        what = "truncated" if stream.size < expected else "longer than its header says"
        raise UserError(
            f"IDX file {path} is {what}: header says dims {list(dims)} of {dtype} "
            f"({expected} bytes with header), file has {stream.size} bytes"
        )
    if expect_ndim is not None and ndim != expect_ndim:
        raise UserError(
            f"IDX file {path} has {ndim} dimensions {list(dims)}, expected {expect_ndim}"
        )
    if expect_dtype is not None and dtype != expect_dtype:
        raise UserError(f"IDX file {path} holds {dtype}, expected {expect_dtype}")
    if 0 in dims:
        raise UserError(f"IDX file {path}: dims {list(dims)} hold a 0 (an empty file)")
    if expect_shape is not None and (
        len(expect_shape) != ndim
        or any(e is not None and e != d for e, d in zip(expect_shape, dims, strict=False))
    ):
        want = "x".join("N" if e is None else str(e) for e in expect_shape)
        raise UserError(f"IDX file {path}: dims {list(dims)} must be {want}")
    if ndim >= 3 and max(dims[1:]) > limit("image_side"):
        raise UserError(
            f"IDX file {path}: dims {list(dims)}: "
            f"{exceeded('an image side', max(dims[1:]), 'image_side')}"
        )
    if payload > limit("idx_bytes"):
        raise UserError(
            f"IDX file {path}: header dims {list(dims)}: "
            f"{exceeded('the payload in bytes', payload, 'idx_bytes')}"
        )
    body = bytearray(stream.read(payload))  # writable: torch.frombuffer warns on bytes
    if len(body) != payload or stream.read(1):
        got = header + len(body) + (len(body) == payload)
        what = "truncated" if len(body) < payload else "longer than its header says"
        raise UserError(
            f"IDX file {path} is {what}: header says dims {list(dims)} of {dtype} "
            f"({expected} bytes with header), {'data' if stream.gzip else 'file'} has "
            f"{'more than ' if got > expected else ''}{got} bytes"
        )
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
