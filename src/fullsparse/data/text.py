"""Byte-level text corpora for the language-model task.

The default corpus, ``pystdlib``, is the Python standard library's own ``.py`` sources —
present on every machine that runs fullsparse, no download. Files are taken in sorted
order of their path relative to the standard library; a file goes to validation when the
CRC-32 of that path is divisible by 10 (about 10 % of files), so the split is fixed for a
given Python version. The test suite (``test/``), ``idlelib`` and ``site-packages`` are left
out. A folder of ``.txt``/``.py``/``.md`` files can be used instead (``data_dir``).
"""

from __future__ import annotations

import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from fullsparse.errors import DataNotFoundError, UserError

__all__ = ["TextCorpus", "build_text_corpus", "lm_batches", "TEXT_SUFFIXES"]

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}


@dataclass(frozen=True)
class TextCorpus:
    """Train/validation byte streams (uint8 tensors) and where they came from."""

    name: str
    train: Tensor
    val: Tensor
    files_train: int
    files_val: int
    root: str

    def summary(self) -> dict[str, object]:
        return {
            "name": self.name,
            "root": self.root,
            "train_bytes": int(self.train.numel()),
            "val_bytes": int(self.val.numel()),
            "files_train": self.files_train,
            "files_val": self.files_val,
        }


def _text_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in filenames:
            if name.endswith(TEXT_SUFFIXES):
                files.append(Path(dirpath) / name)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def build_text_corpus(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    max_train_bytes: int = 4_000_000,
    max_val_bytes: int = 400_000,
) -> TextCorpus:
    """Read the corpus (``data_dir`` or the standard library) into byte tensors.

    Train and validation are each capped (``max_*_bytes``) by taking whole files in order
    until the cap, then cutting the last one; no more than the cap is ever read.
    """
    if max_train_bytes < 2 or max_val_bytes < 2:
        raise UserError("text corpus caps must be at least 2 bytes")
    if data_dir is None:
        root, name = Path(sysconfig.get_paths()["stdlib"]), "pystdlib"
    else:
        root, name = Path(data_dir), "textdir"
    if not root.is_dir():
        raise DataNotFoundError(f"text corpus folder {root} does not exist")
    files = _text_files(root)
    if not files:
        raise DataNotFoundError(
            f"no {'/'.join(TEXT_SUFFIXES)} files under {root} (looked recursively, skipping "
            f"{', '.join(sorted(_SKIP_DIRS))})"
        )
    parts: dict[str, list[bytes]] = {"train": [], "val": []}
    sizes = {"train": 0, "val": 0}
    counts = {"train": 0, "val": 0}
    caps = {"train": max_train_bytes, "val": max_val_bytes}
    for path in files:
        rel = path.relative_to(root).as_posix()
        split = "val" if zlib.crc32(rel.encode()) % 10 == 0 else "train"
        if sizes[split] >= caps[split]:
            if all(sizes[s] >= caps[s] for s in sizes):
                break
            continue
        try:  # only the bytes still needed: a huge file costs no more than the cap
            # read(n) allocates n bytes up front: ask for no more than the file holds
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                data = f.read(min(caps[split] - sizes[split], size))
        except OSError as exc:
            raise UserError(f"cannot read text file {path}: {exc.strerror or exc}") from None
        parts[split].append(data)
        sizes[split] += len(data)
        counts[split] += 1
    if sizes["val"] < 2 or sizes["train"] < 2:
        raise UserError(
            f"text corpus under {root} is too small to split (train {sizes['train']} bytes, "
            f"validation {sizes['val']} bytes); add more files"
        )

    def to_tensor(chunks: list[bytes]) -> Tensor:
        return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8).clone()

    return TextCorpus(
        name,
        to_tensor(parts["train"]),
        to_tensor(parts["val"]),
        counts["train"],
        counts["val"],
        str(root),
    )


def lm_batches(
    stream: Tensor,
    batch_size: int,
    context: int,
    *,
    generator: torch.Generator | None = None,
    num_batches: int | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """``(inputs [B, T], targets [B, T])`` int64 pairs of windows of ``stream``.

    With a ``generator``: random windows (training). Without: consecutive non-overlapping
    windows from the start (a fixed validation set), ``num_batches`` of them or as many as fit.
    """
    n = stream.numel() - context - 1
    if n < 1:
        raise UserError(f"stream of {stream.numel()} bytes is shorter than context+1={context + 1}")
    if generator is not None:
        starts = torch.randint(0, n + 1, (num_batches or 1, batch_size), generator=generator)
    else:
        total = n // context + 1
        count = (
            total // batch_size if num_batches is None else min(num_batches, total // batch_size)
        )
        if count < 1:
            raise UserError(f"validation stream too short for one batch of {batch_size}×{context}")
        starts = (torch.arange(count * batch_size) * context).reshape(count, batch_size)
    offsets = torch.arange(context + 1)
    out = []
    for row in starts:
        windows = stream[row[:, None] + offsets].long()  # (B, T+1)
        out.append((windows[:, :-1], windows[:, 1:]))
    return out
