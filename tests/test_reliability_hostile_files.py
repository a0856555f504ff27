"""Hostile checkpoints, detection annotations and image files: refused before anything is
built from them, one line, exit 2 — never a silent wrong answer.

Files are crafted by the tests in tmp_path (a few kilobytes each). Needs Pillow, not
torchvision: the COCO/VOC checks run when the dataset is built, before any detector.
"""

from __future__ import annotations

import json
import struct
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

import fullsparse.models
from fullsparse.checkpoint_guard import refused_globals
from fullsparse.data import build_datasets
from fullsparse.data import fashion_mnist as fm
from fullsparse.data.detection import build_detection_datasets
from fullsparse.errors import CheckpointError, UserError
from fullsparse.limits import MESSAGE_CHARS, one_line
from fullsparse.train import checkpoint as ckpt
from fullsparse.train import load_checkpoint, train
from test_data import write_fake_fmnist
from test_reliability_limits import _shared_bomb, one_line_error
from tinyruns import tiny_classify


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("hostile")
    train(tiny_classify(run))
    return run / "run" / "last.pt"


def _forged(tmp_path: Path, good: Path, edit) -> Path:
    state = torch.load(good, weights_only=True)
    edit(state)
    path = tmp_path / "forged.pt"
    torch.save(state, path)
    return path


def _no_model_built(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built from a checkpoint that should be refused")

    monkeypatch.setattr(fullsparse.models, "build_model", refuse)


# ------------------------------------------------------------------ checkpoints


def test_a_huge_num_classes_is_refused_before_the_head_is_built(
    tmp_path, good, monkeypatch, capsys
):
    bad = _forged(tmp_path, good, lambda s: s["identity"].update(num_classes=12_000_000))
    _no_model_built(monkeypatch)
    line = one_line_error(capsys, ["eval", "--checkpoint", str(bad)], "num_classes")
    assert "12,000,000, over the limit 100,000" in line and "FULLSPARSE_MAX_CLASSES" in line


def test_a_checkpoint_epoch_of_the_wrong_type_is_one_line(tmp_path, good, capsys):
    bad = _forged(tmp_path, good, lambda s: s.update(epoch="one"))
    one_line_error(capsys, ["eval", "--checkpoint", str(bad)], "epoch must be an integer")


def test_an_identity_that_disagrees_with_its_data_is_refused(tmp_path, good, monkeypatch, capsys):
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "debian")
    write_fake_fmnist(tmp_path / "fmnist", n_train=4)

    def edit(state):  # weights and identity of 3-channel images, config of a 1-channel set
        state["config"].update(dataset="fashion-mnist", data_dir=str(tmp_path / "fmnist"))

    bad = _forged(tmp_path, good, edit)
    _no_model_built(monkeypatch)
    line = one_line_error(capsys, ["eval", "--checkpoint", str(bad)], "does not match the data")
    assert "in_channels 3 != 1" in line


def test_nan_weights_are_refused_unless_allowed(tmp_path, good, capsys):
    def poison(state):
        name = next(k for k, v in state["model"].items() if v.is_floating_point())
        state["model"][name].view(-1)[0] = float("nan")

    bad = _forged(tmp_path, good, poison)
    line = one_line_error(capsys, ["eval", "--checkpoint", str(bad)], "NaN/Inf values")
    assert "--allow-nonfinite" in line
    assert main_ok(["eval", "--checkpoint", str(bad), "--allow-nonfinite"], capsys)
    assert load_checkpoint(bad, allow_nonfinite=True)["epoch"] == 1


def main_ok(argv, capsys) -> bool:
    from fullsparse.cli import main

    rc = main(argv)
    out = capsys.readouterr()
    assert rc == 0, out.err
    return "top-1" in out.out


def test_eval_reads_the_checkpoint_once(good, monkeypatch, capsys):
    real = torch.load
    calls = []

    def counting(path, *args, **kwargs):
        calls.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "load", counting)
    assert main_ok(["eval", "--checkpoint", str(good)], capsys)
    assert len(calls) == 1


def test_a_compressed_entry_bomb_is_refused_before_torch_load(tmp_path, good, monkeypatch):
    bad = tmp_path / "bomb.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info.filename))
        prefix = src.namelist()[0].split("/")[0]
        dst.writestr(f"{prefix}/data/999", bytes(8_000_000), zipfile.ZIP_DEFLATED)

    def never(*args, **kwargs):
        raise AssertionError("torch.load ran on a compression bomb")

    monkeypatch.setattr(ckpt.torch, "load", never)
    with pytest.raises(CheckpointError, match="compression ratio .* FULLSPARSE_MAX_COMPRESSION"):
        load_checkpoint(bad)


def test_shared_references_in_a_checkpoint_are_refused(tmp_path, good):
    bad = _forged(tmp_path, good, lambda s: s.update(notes=_shared_bomb(8)))
    assert bad.stat().st_size < good.stat().st_size + 10_000
    with pytest.raises(CheckpointError, match="number of objects"):
        load_checkpoint(bad)


class _OpensFile:
    def __reduce__(self):
        return (open, ("/nonexistent/never-written", "w"))


def test_a_refused_pickle_global_is_named_whatever_torch_prints(tmp_path, good, capsys):
    bad = _forged(tmp_path, good, lambda s: s.update(notes=_OpensFile()))
    # Read from the pickle opcodes, not from torch's message (no text given here).
    assert any(name.endswith(".open") for name in refused_globals(bad, "")), refused_globals(
        bad, ""
    )
    line = one_line_error(capsys, ["eval", "--checkpoint", str(bad)], "weights-only unpickler")
    assert ".open (a checkpoint holds only tensors" in line


# ------------------------------------------------------------------ COCO


def _png(path: Path, w: int = 12, h: int = 10) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), (10, 200, 30)).save(path)


def _coco(root: Path, data: dict | bytes) -> Path:
    for split in ("train2017", "val2017"):
        _png(root / split / "a.png")
    (root / "annotations").mkdir(parents=True)
    for split in ("train2017", "val2017"):
        raw = data if isinstance(data, bytes) else json.dumps(data).encode()
        (root / "annotations" / f"instances_{split}.json").write_bytes(raw)
    return root


def _coco_data(**changes) -> dict:
    ann = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 0}
    data = {"images": [{"id": 1, "file_name": "a.png"}], "annotations": [ann],
            "categories": [{"id": 1, "name": "thing"}]}  # fmt: skip
    for key, value in changes.items():
        if key in ("image", "ann"):
            target = data["images"][0] if key == "image" else ann
            for k, v in value.items():
                if v is None:
                    target.pop(k)
                else:
                    target[k] = v
        else:
            data[key] = value
    return data


@pytest.mark.parametrize(
    "data, needle",
    [
        (_coco_data(ann={"image_id": None}), "annotations[0].image_id must be an integer"),
        (_coco_data(image={"id": "abc"}), "images[0].id must be an integer, got 'abc'"),
        (json.dumps(_coco_data(image={"id": 1.5})).replace("1.5", "NaN").encode(), "got nan"),
        (_coco_data(images="oops"), "'images' must be a list of objects, got 'oops'"),
        (_coco_data(ann={"bbox": [1, 2, 3]}), "bbox must be a list of 4 finite numbers"),
        (_coco_data(ann={"bbox": ["1", "2", "3", "4"]}), "bbox must be a list of 4 finite"),
        (_coco_data(ann={"iscrowd": "yes"}), "iscrowd must be 0 or 1, got 'yes'"),
        (_coco_data(image={"file_name": "../../../../etc/hostname"}), "leaves the dataset"),
        (_coco_data(image={"file_name": "/etc/hostname"}), "leaves the dataset folder"),
        (b'{"images": "' + b"\xff" * 10_000_000 + b'"}', "is not UTF-8 text (invalid start byte"),
    ],
    ids=["no-image-id", "id-abc", "id-nan", "images-oops", "bbox-3", "bbox-strings",
         "iscrowd-yes", "file-name-dotdot", "file-name-absolute", "invalid-utf8"],
)  # fmt: skip
def test_malformed_coco_fields_are_one_short_line(tmp_path, data, needle):
    with pytest.raises(UserError) as info:
        build_detection_datasets("coco", _coco(tmp_path / "coco", data))
    message = str(info.value)
    assert needle in message and "\n" not in message
    assert len(message) < MESSAGE_CHARS + len(str(tmp_path)) + 60
    assert one_line(message) == message or len(message) > MESSAGE_CHARS


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that declares ``width`` x ``height`` pixels in its IHDR and holds none."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_a_decompression_bomb_png_is_one_line(tmp_path, monkeypatch):
    root = _coco(tmp_path / "coco", _coco_data())
    _png_header_only(root / "train2017" / "a.png", 40_000, 40_000)
    # refused from the header when the dataset is built, before any run file is written
    with pytest.raises(UserError, match="decompression bomb; if the image is real, raise"):
        build_detection_datasets("coco", root)
    # Under Pillow's own guard, our limit (checked before decoding) decides.
    _png(root / "train2017" / "a.png", 20, 20)
    bundle = build_detection_datasets("coco", root)
    monkeypatch.setenv("FULLSPARSE_MAX_IMAGE_PIXELS", "100")
    with pytest.raises(UserError, match="pixels is 400, over the limit 100"):
        build_detection_datasets("coco", root)
    with pytest.raises(UserError, match="pixels is 400, over the limit 100"):
        bundle.train[0]  # and again when it is decoded


# ------------------------------------------------------------------ VOC


def _voc(root: Path, difficult: str = "0", ids: str = "a") -> Path:
    _png(root / "JPEGImages" / "a.jpg")
    (root / "Annotations").mkdir(parents=True)
    (root / "Annotations" / "a.xml").write_text(
        "<annotation><filename>a.jpg</filename><object><name>cat</name>"
        f"<difficult>{difficult}</difficult><bndbox><xmin>1</xmin><ymin>1</ymin>"
        "<xmax>5</xmax><ymax>5</ymax></bndbox></object></annotation>"
    )
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for split in ("train", "val"):
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text(ids + "\n")
    return root


def test_voc_difficult_must_be_0_or_1(tmp_path):
    with pytest.raises(UserError, match=r"<difficult> must be 0 or 1, got 'maybe'"):
        build_detection_datasets("voc", _voc(tmp_path / "voc", difficult="maybe"))


def test_voc_ids_cannot_leave_the_dataset_folder(tmp_path):
    with pytest.raises(UserError, match="image id '../../../etc/passwd' is not a plain name"):
        build_detection_datasets("voc", _voc(tmp_path / "voc", ids="../../../etc/passwd"))


# ------------------------------------------------------------------ image folders


def _imagefolder(root: Path, classes=("a", "b"), n: int = 2) -> Path:
    for split in ("train", "val"):
        for c in classes:
            for i in range(n):
                path = root / split / c / f"{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (16, 16), (40 * i, 90, 200)).save(path, quality=90)
    return root


def test_an_empty_class_folder_is_an_error(tmp_path):
    root = _imagefolder(tmp_path / "imgs")
    (root / "train" / "empty").mkdir()
    with pytest.raises(UserError, match="class folder .*empty holds no images"):
        build_datasets("imagefolder", root, image_size=8)
    (root / "train" / "empty").rmdir()
    (root / "val" / "b" / "0.jpg").unlink()
    (root / "val" / "b" / "1.jpg").unlink()  # an empty val class folder is fine
    assert len(build_datasets("imagefolder", root, image_size=8).test) == 2


def test_a_truncated_jpeg_in_a_worker_is_the_same_one_line(tmp_path, capsys):
    root = _imagefolder(tmp_path / "imgs")
    bad = root / "train" / "b" / "1.jpg"
    noise = torch.randint(0, 256, (64, 64, 3), generator=torch.Generator().manual_seed(0))
    Image.frombytes("RGB", (64, 64), bytes(noise.flatten().tolist())).save(bad, quality=90)
    bad.write_bytes(bad.read_bytes()[:2000])  # the header is whole, the scan is cut
    assert Image.open(bad).size == (64, 64)
    line = one_line_error(
        capsys,
        ["train", "--dataset", "imagefolder", "--data-dir", str(root), "--image-size", "8",
         "--batch-size", "2", "--epochs", "1", "--workers", "2", "--out", str(tmp_path / "run"),
         "--no-progress", "--no-plot", "--quiet"],
        "imagefolder: cannot decode",
    )  # fmt: skip
    assert str(bad) in line and "DataLoader" not in line
