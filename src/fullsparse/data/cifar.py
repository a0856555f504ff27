"""CIFAR-10 / CIFAR-100 from the "python version" archives (Krizhevsky 2009).

Layout expected (what ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` unpack to):

* ``<root>/cifar-10-batches-py/data_batch_1`` … ``data_batch_5``, ``test_batch``
* ``<root>/cifar-100-python/train``, ``test``

Each batch is a pickled dict with ``data`` (uint8 ``[N, 3072]``: 1024 red, 1024 green,
1024 blue values, rows top to bottom) and ``labels`` (CIFAR-10) or ``fine_labels``
(CIFAR-100, the 100-class task). Pickles are read with :func:`safe_load`, which refuses
anything but array reconstruction.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from fullsparse.data.safe_pickle import safe_load
from fullsparse.errors import DataNotFoundError, UserError
from fullsparse.limits import escape

__all__ = ["CifarSpec", "CIFAR10", "CIFAR100", "find_cifar", "load_cifar", "ENV_VAR"]

ENV_VAR = "FULLSPARSE_DATA"
_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


@dataclass(frozen=True)
class CifarSpec:
    """Where one CIFAR variant's files live and what they hold."""

    name: str
    folder: str
    archive: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    num_classes: int
    #: Per-channel mean/std of the 50,000 training images in [0, 1].
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


CIFAR10 = CifarSpec(
    name="CIFAR-10",
    folder="cifar-10-batches-py",
    archive="cifar-10-python.tar.gz",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    label_key="labels",
    num_classes=10,
    # True per-pixel std (not the 0.2023/0.1994/0.2010 often copied, which is a std of
    # per-image means).
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
)
CIFAR100 = CifarSpec(
    name="CIFAR-100",
    folder="cifar-100-python",
    archive="cifar-100-python.tar.gz",
    train_files=("train",),
    test_files=("test",),
    label_key="fine_labels",
    num_classes=100,
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
)


def _candidates(spec: CifarSpec, data_dir: str | os.PathLike[str] | None) -> list[Path]:
    roots: list[Path] = []
    if data_dir is not None:
        roots.append(Path(data_dir))
    env = os.environ.get(ENV_VAR)
    if env:
        roots.append(Path(env))
    dirs: list[Path] = []
    for root in roots:
        # The unpacked folder under the root, or the root itself if it *is* that folder.
        for d in (root / spec.folder, root):
            if d not in dirs:
                dirs.append(d)
    return dirs


def find_cifar(spec: CifarSpec, data_dir: str | os.PathLike[str] | None) -> Path:
    """The first folder holding all of ``spec``'s batch files.

    Searched: ``data_dir/<folder>``, ``data_dir``, ``$FULLSPARSE_DATA/<folder>``,
    ``$FULLSPARSE_DATA``.

    Raises:
        DataNotFoundError: one line naming the folders looked in and how to get the data;
            or naming ``data_dir`` when it was given but does not exist.
    """
    if data_dir is not None and not Path(data_dir).exists():
        raise DataNotFoundError(
            f"{spec.name} not found: --data-dir {data_dir} does not exist (fix the path, or "
            f"leave --data-dir out to use ${ENV_VAR})"
        )
    searched = _candidates(spec, data_dir)
    needed = spec.train_files + spec.test_files
    for d in searched:
        if all((d / f).is_file() for f in needed):
            return d
    where = ", ".join(map(str, searched)) if searched else "nowhere (no --data-dir given)"
    raise DataNotFoundError(
        f"{spec.name} not found: looked for {spec.folder}/{{{','.join(needed)}}} in {where}; "
        f"download {spec.archive} from {_URL} and unpack it into --data-dir "
        f"(or ${ENV_VAR})"
    )


def _load_batch(path: Path, spec: CifarSpec) -> tuple[Tensor, Tensor]:
    batch = safe_load(path)
    if not isinstance(batch, dict) or "data" not in batch or spec.label_key not in batch:
        keys = sorted(map(str, batch)) if isinstance(batch, dict) else type(batch).__name__
        raise UserError(
            f"{path} is not a {spec.name} batch: expected a dict with 'data' and "
            f"'{spec.label_key}', got {keys}"
        )
    data, labels = batch["data"], batch[spec.label_key]
    if not isinstance(data, Tensor) or data.dtype != torch.uint8 or data.dim() != 2:
        raise UserError(f"{path}: 'data' must be a uint8 [N, 3072] array, got {data!r:.80}")
    if data.shape[0] == 0:
        raise UserError(f"{path}: the batch holds no images ('data' has 0 rows)")
    if data.shape[1] != 3 * 32 * 32:
        raise UserError(f"{path}: 'data' has shape {tuple(data.shape)}, expected [N, 3072]")
    if not isinstance(labels, (list, tuple)):
        raise UserError(
            f"{path}: '{spec.label_key}' must be a list of ints, got {type(labels).__name__}"
        )
    odd = next((v for v in labels if not isinstance(v, int) or isinstance(v, bool)), None)
    if odd is not None:
        shown = escape(repr(odd), 40)
        raise UserError(
            f"{path}: '{spec.label_key}' must be a list of ints, it holds {shown} "
            f"({type(odd).__name__})"
        )
    bad = next((v for v in labels if not 0 <= v < spec.num_classes), None)
    if bad is not None:  # before torch.tensor: 10**20 does not fit an int64
        shown = bad if abs(bad) < 10**12 else f"a number of {len(str(bad))} digits"
        raise UserError(
            f"{path}: '{spec.label_key}' holds the label {shown}, expected "
            f"0..{spec.num_classes - 1}"
        )
    if len(labels) != data.shape[0]:
        raise UserError(
            f"{path}: {data.shape[0]} images but {len(labels)} '{spec.label_key}' entries"
        )
    y = torch.tensor(labels, dtype=torch.int64)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= spec.num_classes):
        raise UserError(
            f"{path}: labels span {int(y.min())}..{int(y.max())}, expected "
            f"0..{spec.num_classes - 1}"
        )
    return data.reshape(-1, 3, 32, 32), y


def load_cifar(
    spec: CifarSpec, data_dir: str | os.PathLike[str] | None
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """``((train_images, train_labels), (test_images, test_labels))``.

    Images uint8 ``[N, 3, 32, 32]``, labels int64 ``[N]`` (50,000 / 10,000 for the real
    data). Raises ``DataNotFoundError`` or ``UserError`` (bad/malicious file, named).
    """
    folder = find_cifar(spec, data_dir)

    def split(files: tuple[str, ...]) -> tuple[Tensor, Tensor]:
        parts = [_load_batch(folder / f, spec) for f in files]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    return split(spec.train_files), split(spec.test_files)
