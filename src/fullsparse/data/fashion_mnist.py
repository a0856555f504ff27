"""Fashion-MNIST (Xiao et al. 2017) from its four IDX files, found in well-known places.

Search order (first folder holding all four files wins):

1. ``data_dir`` and ``data_dir/fashion-mnist`` (a given ``data_dir`` that does not exist
   is an error, not a reason to look elsewhere)
2. ``$FULLSPARSE_DATA`` and ``$FULLSPARSE_DATA/fashion-mnist``
3. ``/usr/share/datasets/fashion-mnist`` — where Debian/Ubuntu's ``dataset-fashion-mnist``
   package installs the four ``*-ubyte.gz`` files.

Each file may be plain or ``.gz``. Nothing is downloaded: we had no way to pin the
upstream files' SHA-256 sums (the Debian package recompresses them), and an unverified
download is worse than a clear message saying where to put the files.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from fullsparse.data.idx import read_idx
from fullsparse.errors import DataNotFoundError, UserError

__all__ = [
    "DEBIAN_DIR",
    "ENV_VAR",
    "FILES",
    "MEAN",
    "STD",
    "NUM_CLASSES",
    "candidate_dirs",
    "find_fashion_mnist",
    "load_fashion_mnist",
]

#: Where ``apt-get install dataset-fashion-mnist`` puts the files (``dpkg -L`` checked).
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
#: Environment variable naming a data root shared by all datasets.
ENV_VAR = "FULLSPARSE_DATA"
#: The four IDX files, by role.
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
NUM_CLASSES = 10
#: Per-channel mean/std of the 60,000 training images in [0, 1] (computed from the files).
MEAN = (0.2860,)
STD = (0.3530,)


def candidate_dirs(data_dir: str | os.PathLike[str] | None) -> list[Path]:
    """The folders searched, in order (duplicates removed, nonexistent ones kept)."""
    dirs: list[Path] = []
    if data_dir is not None:
        dirs += [Path(data_dir), Path(data_dir) / "fashion-mnist"]
    env = os.environ.get(ENV_VAR)
    if env:
        dirs += [Path(env), Path(env) / "fashion-mnist"]
    dirs.append(DEBIAN_DIR)
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def _file_in(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def find_fashion_mnist(data_dir: str | os.PathLike[str] | None = None) -> dict[str, Path]:
    """Paths of the four files from the first folder that holds all of them.

    Raises:
        DataNotFoundError: one line naming every folder looked in and how to get the data;
            or naming ``data_dir`` when it was given but does not exist (a typo must not
            fall back to another copy of the data without a word).
    """
    if data_dir is not None and not Path(data_dir).exists():
        raise DataNotFoundError(
            f"Fashion-MNIST not found: --data-dir {data_dir} does not exist (fix the path, or "
            f"leave --data-dir out to use ${ENV_VAR} or {DEBIAN_DIR})"
        )
    searched = candidate_dirs(data_dir)
    for folder in searched:
        found = {role: _file_in(folder, stem) for role, stem in FILES.items()}
        if all(p is not None for p in found.values()):
            return {role: p for role, p in found.items() if p is not None}
    files = ", ".join(f"{stem}[.gz]" for stem in FILES.values())
    raise DataNotFoundError(
        f"Fashion-MNIST not found: looked for {files} in {', '.join(map(str, searched))}; "
        f"get it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or put the four "
        f"IDX files in --data-dir (or ${ENV_VAR})"
    )


def _load_split(images_path: Path, labels_path: Path) -> tuple[Tensor, Tensor]:
    images = read_idx(images_path, expect_dtype=torch.uint8, expect_shape=(None, 28, 28))
    labels = read_idx(labels_path, expect_dtype=torch.uint8, expect_shape=(None,))
    if images.shape[0] != labels.shape[0]:
        raise UserError(
            f"Fashion-MNIST files disagree: {images_path} has {images.shape[0]} images, "
            f"{labels_path} has {labels.shape[0]} labels"
        )
    if labels.numel() and int(labels.max()) >= NUM_CLASSES:
        raise UserError(
            f"Fashion-MNIST labels in {labels_path} go up to {int(labels.max())}; "
            f"expected classes 0..{NUM_CLASSES - 1}"
        )
    return images.unsqueeze(1), labels.to(torch.int64)  # [N, 1, rows, cols], [N]


def load_fashion_mnist(
    data_dir: str | os.PathLike[str] | None = None,
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """``((train_images, train_labels), (test_images, test_labels))``.

    Images are uint8 ``[N, 1, 28, 28]``, labels int64 ``[N]`` (60,000 / 10,000 for the real
    data). Raises ``DataNotFoundError`` (see :func:`find_fashion_mnist`) or ``UserError`` for
    a corrupt file.
    """
    paths = find_fashion_mnist(data_dir)
    train = _load_split(paths["train_images"], paths["train_labels"])
    test = _load_split(paths["test_images"], paths["test_labels"])
    return train, test
