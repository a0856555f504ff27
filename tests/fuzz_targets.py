"""The readers the fuzz harness (``tests/fuzzing.py``) drives: for each, the small valid
input it starts from and how ``fullsparse`` reads it (the library function the CLI calls,
or the CLI itself for checkpoints: ``eval``, ``export``, ``train --resume``,
``train --recipe asp --init-from``)."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import shutil
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

# ---------------------------------------------------------------------------------------
# Valid files and the readers


def _idx_bytes() -> bytes:
    header = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 2, 28, 28)
    return header + bytes((7 * i) % 256 for i in range(2 * 28 * 28))


def _png(path: Path, size: tuple[int, int] = (12, 10), kind: str = "PNG") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.frombytes(
        "RGB", size, bytes((i * 37) % 256 for i in range(size[0] * size[1] * 3))
    )
    image.save(path, kind)


_COCO = {
    "images": [{"id": 1, "file_name": "a.png", "width": 12, "height": 10}],
    "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 4],
                     "iscrowd": 0, "area": 20, "segmentation": [[1, 1, 6, 1, 6, 5]]}],
    "categories": [{"id": 1, "name": "thing", "supercategory": "x"}],
}  # fmt: skip
_VOC = (
    "<annotation><folder>VOC</folder><filename>a.jpg</filename><size><width>12</width>"
    "<height>10</height><depth>3</depth></size><object><name>cat</name><pose>Left</pose>"
    "<truncated>0</truncated><difficult>0</difficult><bndbox><xmin>1</xmin><ymin>1</ymin>"
    "<xmax>5</xmax><ymax>5</ymax></bndbox></object></annotation>"
)
_YAML = "recipe: fst\nmodel: resnet20\nepochs: 2\nlr: 0.1\nmodel_kwargs:\n  {}\nseed: 3\n"
_TINY = ["--dataset", "synthetic", "--synthetic-train", "16", "--synthetic-test", "16",
         "--image-size", "8", "--batch-size", "16", "--no-progress", "--no-plot",
         "--quiet"]  # fmt: skip


@dataclass
class Target:
    """A reader: the valid file it starts from and how the CLI reads it."""

    name: str
    text: bool
    #: Writes the valid inputs under a folder; returns the file the mutations go into.
    setup: Callable[[Path], Path]
    #: Reads the (mutated) inputs under the case folder; returns normally for valid data.
    read: Callable[[Path], Any]
    #: Mutate the content of a gzip file, not its compressed bytes (half the cases).
    gzip_inner: bool = False
    #: Mutate the pickle inside a checkpoint's zip and write a valid zip (half the cases).
    zip_inner: bool = False


def _cli(argv: list[str]) -> None:
    """Run the CLI; exit 2 with one ``error:`` line becomes a UserError, exit 0 passes."""
    from fullsparse.cli import main
    from fullsparse.errors import UserError

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    lines = err.getvalue().strip().splitlines()
    if rc == 2 and len(lines) == 1 and lines[0].startswith("error: "):
        raise UserError(lines[0][len("error: ") :])
    if rc != 0:
        raise RuntimeError(f"exit {rc} with stderr {err.getvalue()[-300:]!r}")


def _read_idx(folder: Path) -> Any:
    from fullsparse.data.idx import read_idx

    return read_idx(next(folder.glob("x-idx3-ubyte*")))


def _cifar_setup(folder: Path) -> Path:
    import torch

    from test_data import py2_cifar_pickle

    data = (torch.arange(4 * 3072) % 251).to(torch.uint8).reshape(4, 3072)
    path = folder / "data_batch_1"
    path.write_bytes(py2_cifar_pickle(data, [3, 7, 0, 9], "labels"))
    return path


def _cifar_read(folder: Path) -> Any:
    from fullsparse.data.cifar import CIFAR10, _load_batch

    return _load_batch(folder / "data_batch_1", CIFAR10)


def _imagefolder_setup(folder: Path) -> Path:
    for split in ("train", "val"):
        for c in ("a", "b"):
            _png(folder / split / c / "0.png", kind="PNG")
    _png(folder / "train" / "a" / "1.jpg", kind="JPEG")
    return folder / "train" / "a" / "1.jpg"


def _imagefolder_read(folder: Path) -> Any:
    from fullsparse.data import build_datasets

    bundle = build_datasets("imagefolder", folder, image_size=8)
    return [bundle.train[i] for i in range(len(bundle.train))]


def _coco_setup(folder: Path) -> Path:
    for split in ("train2017", "val2017"):
        _png(folder / split / "a.png")
    (folder / "annotations").mkdir()
    for split in ("train2017", "val2017"):
        (folder / "annotations" / f"instances_{split}.json").write_text(json.dumps(_COCO))
    return folder / "annotations" / "instances_train2017.json"


def _detection_read(name: str) -> Callable[[Path], Any]:
    def read(folder: Path) -> Any:
        from fullsparse.data.detection import build_detection_datasets

        bundle = build_detection_datasets(name, folder)
        return [bundle.train[i] for i in range(len(bundle.train))]

    return read


def _voc_setup(folder: Path) -> Path:
    _png(folder / "JPEGImages" / "a.jpg", kind="JPEG")
    (folder / "Annotations").mkdir(parents=True)
    (folder / "Annotations" / "a.xml").write_text(_VOC)
    (folder / "ImageSets" / "Main").mkdir(parents=True)
    for split in ("train", "val"):
        (folder / "ImageSets" / "Main" / f"{split}.txt").write_text("a\n")
    return folder / "Annotations" / "a.xml"


def _text_setup(folder: Path) -> Path:
    # f2.txt goes to validation, f0.txt to training (the split hashes the file's path)
    (folder / "f2.txt").write_text("the second file of the corpus\n" * 20)
    (folder / "f0.txt").write_text("import os\nprint('hello')\n" * 20)
    return folder / "f0.txt"


def _text_read(folder: Path) -> Any:
    from fullsparse.data.text import build_text_corpus

    return build_text_corpus(folder, max_train_bytes=4096, max_val_bytes=1024)


def _config_setup(suffix: str) -> Callable[[Path], Path]:
    def setup(folder: Path) -> Path:
        path = folder / f"run{suffix}"
        if suffix == ".json":
            path.write_text(json.dumps({"recipe": "fst", "model": "resnet20", "epochs": 2,
                                        "lr": 0.1, "model_kwargs": {}, "seed": 3}))  # fmt: skip
        else:
            path.write_text(_YAML)
        return path

    return setup


def _config_read(folder: Path) -> Any:
    from fullsparse.train.config import config_from_sources

    return config_from_sources(next(folder.glob("run.*")))


#: The valid dense run every checkpoint target starts from (made once per process).
_RUN: dict[str, Path] = {}


def base_run(root: Path) -> Path:
    """A dense run of 1 epoch of 2 (so ``--resume`` has an epoch left), once per process."""
    if "run" not in _RUN:
        from fullsparse.train import TrainConfig, train

        run = root / "base-run"
        config = TrainConfig(
            out=str(run), model="resnet20", dataset="synthetic", recipe="dense",
            synthetic_train=16, synthetic_test=16, image_size=8, batch_size=16, epochs=2,
            stop_after=1, progress=False, quiet=True, plot=False,
        )  # fmt: skip
        train(config)
        _RUN["run"] = run
    return _RUN["run"]


def _checkpoint_setup(folder: Path) -> Path:
    run = base_run(folder.parent)
    shutil.copytree(run, folder / "run")
    return folder / "run" / "last.pt"


def _checkpoint_read(command: str) -> Callable[[Path], Any]:
    def read(folder: Path) -> Any:
        path = folder / "run" / "last.pt"
        if command == "eval":
            return _cli(["eval", "--checkpoint", str(path)])
        if command == "export":
            return _cli(["export", "--checkpoint", str(path), "--out", str(folder / "w.pt")])
        if command == "resume":
            return _cli(["train", "--out", str(folder / "run"), "--resume", "--no-progress",
                         "--quiet", "--no-plot"])  # fmt: skip
        return _cli(["train", *_TINY, "--epochs", "1", "--recipe", "asp", "--init-from",
                     str(path), "--out", str(folder / "asp")])  # fmt: skip

    return read


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _idx_gzip_setup(folder: Path) -> Path:
    return _write(folder / "x-idx3-ubyte.gz", gzip.compress(_idx_bytes()))


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("idx", False, lambda d: _write(d / "x-idx3-ubyte", _idx_bytes()), _read_idx),
        Target(
            "idx-gzip",
            False,
            lambda d: _write(d / "x-idx3-ubyte.gz", gzip.compress(_idx_bytes())),
            _read_idx,
            gzip_inner=True,
        ),  # fmt: skip
        Target("cifar", False, _cifar_setup, _cifar_read),
        Target("imagefolder", False, _imagefolder_setup, _imagefolder_read),
        Target("coco", True, _coco_setup, _detection_read("coco")),
        Target("voc", True, _voc_setup, _detection_read("voc")),
        Target("text", True, _text_setup, _text_read),
        Target("config-yaml", True, _config_setup(".yaml"), _config_read),
        Target("config-json", True, _config_setup(".json"), _config_read),
        *(
            Target(
                f"ckpt-{command}",
                False,
                _checkpoint_setup,
                _checkpoint_read(command),
                zip_inner=True,
            )  # fmt: skip
            for command in ("eval", "export", "resume", "init-from")
        ),
    )
}
