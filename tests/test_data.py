"""Datasets and loaders: file parsers, search order, safety, transforms, determinism, sharding."""

from __future__ import annotations

import base64
import gzip
import os
import pickle
import struct
import sys
import zlib
from collections import Counter
from pathlib import Path

import pytest
import torch

from fullsparse.data import (
    DATASETS,
    Augmentation,
    TensorImageDataset,
    build_datasets,
    make_loader,
    read_idx,
    safe_load,
    write_idx,
)
from fullsparse.data import fashion_mnist as fm
from fullsparse.data.imagefolder import center_crop_box, random_resized_crop_box
from fullsparse.data.tensor import crop_and_flip, normalize
from fullsparse.errors import DataNotFoundError, UserError

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- IDX


def test_read_idx_roundtrip_plain_and_gzip(tmp_path: Path) -> None:
    images = torch.randint(0, 256, (5, 3, 4), dtype=torch.uint8)
    write_idx(tmp_path / "a", images)
    write_idx(tmp_path / "a.gz", images, compress=True)
    assert (tmp_path / "a.gz").read_bytes()[:2] == b"\x1f\x8b"
    assert (tmp_path / "a").read_bytes()[:8] == bytes([0, 0, 8, 3, 0, 0, 0, 5])
    for name in ("a", "a.gz"):
        out = read_idx(tmp_path / name, expect_ndim=3, expect_dtype=torch.uint8)
        assert out.dtype == torch.uint8 and torch.equal(out, images)


def test_read_idx_decodes_big_endian_types(tmp_path: Path) -> None:
    # Hand-written: type 0x0C (int32), 1 dim of 3, big-endian payload.
    raw = bytes([0, 0, 0x0C, 1]) + struct.pack(">I", 3) + struct.pack(">3i", 1, -2, 70000)
    (tmp_path / "i32").write_bytes(raw)
    assert read_idx(tmp_path / "i32").tolist() == [1, -2, 70000]
    raw = bytes([0, 0, 0x0D, 2]) + struct.pack(">2I", 1, 2) + struct.pack(">2f", 1.5, -0.25)
    (tmp_path / "f32").write_bytes(raw)
    assert read_idx(tmp_path / "f32").tolist() == [[1.5, -0.25]]
    values = torch.tensor([[-300, 7], [12345, -1]], dtype=torch.int16)
    write_idx(tmp_path / "i16", values)
    assert torch.equal(read_idx(tmp_path / "i16"), values)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (bytes([0, 1, 8, 1, 0, 0, 0, 1, 9]), "bad magic number 0x00010801"),
        (bytes([0, 0, 7, 1, 0, 0, 0, 1, 9]), "bad magic number"),
        (bytes([0, 0, 8]), "too short"),
        (bytes([0, 0, 8, 2, 0, 0, 0, 2]), "truncated inside its header"),
        (bytes([0, 0, 8, 1, 0, 0, 0, 4, 1, 2]), r"truncated: header says dims \[4\]"),
        (bytes([0, 0, 8, 1, 0, 0, 0, 1, 1, 2]), "longer than its header says"),
        (bytes([0, 0, 8, 0]), "declares 0 dimensions"),
        (b"\x1f\x8b" + b"not really gzip", "corrupt or truncated gzip"),
        (gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 2, 1, 2]))[:-6], "corrupt or truncated gzip"),
    ],
)
def test_read_idx_rejects_corrupt_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_checks_expected_rank_and_type(tmp_path: Path) -> None:
    write_idx(tmp_path / "x", torch.zeros(4, dtype=torch.uint8))
    with pytest.raises(UserError, match=r"has 1 dimensions \[4\], expected 3"):
        read_idx(tmp_path / "x", expect_ndim=3)
    with pytest.raises(UserError, match="holds torch.uint8, expected torch.int32"):
        read_idx(tmp_path / "x", expect_dtype=torch.int32)


# ---------------------------------------------------------------- Fashion-MNIST


def write_fake_fmnist(folder: Path, n_train: int, n_test: int = 4, gz: bool = True) -> None:
    """Four IDX files (gzipped or plain) with ``n_train``/``n_test`` 28x28 images."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(n_train)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g)
        labels = (torch.arange(n) % 10).to(torch.uint8)
        suffix = ".gz" if gz else ""
        write_idx(folder / f"{stem}-images-idx3-ubyte{suffix}", images, compress=gz)
        write_idx(folder / f"{stem}-labels-idx1-ubyte{suffix}", labels, compress=gz)


@pytest.fixture
def isolated_fmnist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No real data visible: the Debian folder and $FULLSPARSE_DATA point into tmp_path."""
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "debian")
    monkeypatch.delenv("FULLSPARSE_DATA", raising=False)
    return tmp_path


def test_fashion_mnist_from_data_dir(isolated_fmnist: Path) -> None:
    write_fake_fmnist(isolated_fmnist / "d", n_train=12, n_test=6, gz=False)
    bundle = build_datasets("fashion-mnist", isolated_fmnist / "d")
    assert (len(bundle.train), len(bundle.test)) == (12, 6)
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (10, 1, 28)
    assert bundle.mean == (0.2860,) and bundle.std == (0.3530,)
    raw = read_idx(isolated_fmnist / "d" / "train-images-idx3-ubyte")
    x, y = bundle.train[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == 3
    torch.testing.assert_close(x[0], (raw[3].float() / 255 - 0.2860) / 0.3530)
    assert bundle.train.augmentation == Augmentation(crop_padding=2, horizontal_flip=True)
    assert bundle.test.augmentation is None


def test_fashion_mnist_search_order(isolated_fmnist: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = isolated_fmnist
    env = root / "env"
    monkeypatch.setenv("FULLSPARSE_DATA", str(env))
    # Each place gets a different train size so the winner is visible.
    places = [
        (root / "d", 11),
        (root / "d" / "fashion-mnist", 12),
        (env, 13),
        (env / "fashion-mnist", 14),
        (root / "debian", 15),
    ]
    assert fm.candidate_dirs(root / "d") == [p for p, _ in places]
    for place, n in places:
        write_fake_fmnist(place, n)
    for place, n in places:
        assert len(build_datasets("fashion-mnist", root / "d").train) == n
        for suffix in ("", ".gz"):  # remove this place: the next one must win
            for stem in fm.FILES.values():
                (place / f"{stem}{suffix}").unlink(missing_ok=True)


def test_fashion_mnist_folder_with_missing_file_is_skipped(isolated_fmnist: Path) -> None:
    write_fake_fmnist(isolated_fmnist / "d", 11)
    write_fake_fmnist(isolated_fmnist / "debian", 15, gz=False)
    (isolated_fmnist / "d" / "t10k-labels-idx1-ubyte.gz").unlink()
    assert len(build_datasets("fashion-mnist", isolated_fmnist / "d").train) == 15


def test_fashion_mnist_not_found_message(
    isolated_fmnist: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FULLSPARSE_DATA", str(isolated_fmnist / "env"))
    (isolated_fmnist / "d").mkdir()  # exists but holds nothing: every place is searched
    with pytest.raises(DataNotFoundError) as info:
        build_datasets("fashion-mnist", isolated_fmnist / "d")
    err = info.value
    assert isinstance(err, UserError) and isinstance(err, FileNotFoundError)
    message = str(err)
    assert "\n" not in message
    places = [
        isolated_fmnist / "d",
        isolated_fmnist / "d" / "fashion-mnist",
        isolated_fmnist / "env",
        isolated_fmnist / "env" / "fashion-mnist",
        isolated_fmnist / "debian",
    ]
    assert f"in {', '.join(map(str, places))};" in message
    for stem in fm.FILES.values():
        assert f"{stem}[.gz]" in message
    assert "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu)" in message
    assert "put the four IDX files in --data-dir" in message


def test_fashion_mnist_inconsistent_files_are_user_errors(isolated_fmnist: Path) -> None:
    d = isolated_fmnist / "d"
    write_fake_fmnist(d, 12)
    write_idx(d / "train-labels-idx1-ubyte.gz", torch.zeros(11, dtype=torch.uint8), compress=True)
    with pytest.raises(UserError, match="has 12 images, .* has 11 labels"):
        build_datasets("fashion-mnist", d)
    write_idx(
        d / "train-labels-idx1-ubyte.gz", torch.full((12,), 10, dtype=torch.uint8), compress=True
    )
    with pytest.raises(UserError, match=r"labels in .* go up to 10; expected classes 0..9"):
        build_datasets("fashion-mnist", d)


def test_fashion_mnist_resize_on_request(isolated_fmnist: Path) -> None:
    write_fake_fmnist(isolated_fmnist / "d", 12)
    bundle = build_datasets("fashion-mnist", isolated_fmnist / "d", image_size=32)
    assert bundle.image_size == 32 and bundle.train[0][0].shape == (1, 32, 32)
    assert bundle.train.augmentation.crop_padding == 2  # round(2 * 32 / 28)


_DEBIAN_FILES = [fm.DEBIAN_DIR / f"{stem}.gz" for stem in fm.FILES.values()]


@pytest.mark.skipif(
    not all(p.is_file() for p in _DEBIAN_FILES),
    reason="real Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)
def test_real_debian_fashion_mnist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FULLSPARSE_DATA", raising=False)
    (train_x, train_y), (test_x, test_y) = fm.load_fashion_mnist(None)
    assert train_x.shape == (60_000, 1, 28, 28) and test_x.shape == (10_000, 1, 28, 28)
    assert train_y.bincount().tolist() == [6000] * 10
    assert test_y.bincount().tolist() == [1000] * 10
    pixels = train_x.float() / 255
    assert pixels.mean().item() == pytest.approx(fm.MEAN[0], abs=5e-5)
    assert pixels.std().item() == pytest.approx(fm.STD[0], abs=5e-5)


# ---------------------------------------------------------------- CIFAR pickles


def _short_or_long_string(data: bytes) -> bytes:
    # Python 2 ``str``: SHORT_BINSTRING (U) or BINSTRING (T), read back as bytes.
    if len(data) < 256:
        return b"U" + bytes([len(data)]) + data
    return b"T" + struct.pack("<I", len(data)) + data


def py2_cifar_pickle(data: torch.Tensor, labels: list[int], label_key: str) -> bytes:
    """A CIFAR batch pickled the way Python 2 numpy wrote the real files (protocol 2).

    Written opcode by opcode so the test needs no numpy: ``numpy.core.multiarray.
    _reconstruct(numpy.ndarray, (0,), 'b')`` then BUILD with ``(1, shape, dtype('u1'),
    False, raw)``; dict keys and the payload are Python 2 ``str``.
    """
    n, d = data.shape
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\n"
        + b"cnumpy\nndarray\n"
        + b"K\x00\x85"  # (0,)
        + _short_or_long_string(b"b")
        + b"\x87R"  # TUPLE3 REDUCE
        + b"(K\x01"  # MARK, version 1
        + b"J"
        + struct.pack("<i", n)
        + b"J"
        + struct.pack("<i", d)
        + b"\x86"  # shape
        + b"cnumpy\ndtype\n"
        + _short_or_long_string(b"u1")
        + b"K\x00K\x01\x87R"  # dtype('u1', 0, 1)
        + b"(K\x03"
        + _short_or_long_string(b"|")
        + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"  # dtype state, BUILD
        + b"\x89"  # is_fortran False
        + _short_or_long_string(bytes(data.reshape(-1).tolist()))
        + b"tb"  # state tuple, BUILD
    )
    label_list = b"](" + b"".join(b"J" + struct.pack("<i", v) for v in labels) + b"e"
    return (
        b"\x80\x02}("
        + _short_or_long_string(b"batch_label")
        + _short_or_long_string(b"fake batch")
        + _short_or_long_string(b"data")
        + array
        + _short_or_long_string(label_key.encode())
        + label_list
        + b"u."
    )


# {'data': uint8 [2, 3072] = arange % 251, 'labels': [3, 7], 'batch_label': 'fake'}, pickled
# by numpy 2.4 on Python 3.11 at protocols 2 and 5, zlib + base64 (so the test needs no numpy).
NUMPY_PICKLES = {
    2: (
        "eNrt2ldTU1EQB/AUIBBAerWLJbYo9t4rV6LGFgvGm+RikBA4yY2KglJT6L333nu3zex+MA2BT+HseThnZ/bs/+H3"
        "vAWyfCZR6fwkEomJF3kmNVodWTm5ar0x2yaosxwWMYO32fhcpd4mGLOtdtHmMIpKJtv4prSaNrpMzklKmZ/RO2YS"
        "jHalYF0vlMxfJ/UmG1iALsD7Wngxw5rMFE4WqGVBLqbUsmAVJ+VkqZIQJwvZzDSJuTne0VCdzDviSGZbPG4XC9Oy"
        "cBUn98XlsQiNRpPy13t8FycRWaTBY/bXuZO8balM7ucfoAgMUgaHhG4JC4+IjIqOiY2LT0jcum37jp27du9J2rtv"
        "/wHVwUOHjxxVHzuefOLkqdNnzp47f+HipctXrl67fuPmrdt37t67n8I9SNU8fPRY++Tps+cvdC9fvX6T9lb/jjcY"
        "TUL6e3PGh0xLljU7h9nsouPjp8+5X77m5X/7DgVQCEVQDCVQCk5wgRs8UAblUAGVUAXVUAO1UAf10ACN0ATN0AKt"
        "0Abt0AGd0AXd0AO90Af9MACDMATDMAKjMAbjMAGTMAXTMAOzMAfzsACLsATLsAKrsAY/4Cf8gt/wBwuwEIuwGEuw"
        "FJ3oQjd6sAzLsQIrsQqrsQZrsQ7rsQEbsQmbsQVbsQ3bsQM7sQu7sQd7sQ/7cQAHcQiHcQRHcQzHcQIncQqncQZn"
        "cQ7ncQEXcQmXcQVXcY3USZ3USZ3USZ3USZ3USZ3USZ3USZ3USZ3USZ3USZ3USZ3USZ3USZ3USZ3USZ3USZ3U/zd1"
        "FmVWOFm0lsWILNawuf9jECx2FpfG4lWcnFMIuuD17SBeNJr1vh5L8G0ipfOZAkt0qP8BlQZQKA=="
    ),
    5: (
        "eNprYJ26QoIBDGqnaPSwpCSWJE7pEc4rzS2o1ItPzi9K1QOyU4syk6f0cMenFeXnJpWmpaUWTZk8RWMaA1QnAyMT"
        "MwsrGzsHJxc3Dy8fv4CgkLCIqJi4hKSUtIysnLyCopKyiqqauoamlraOrp6+gaGRsYmpmbmFpZW1ja2dvYOjk7OL"
        "q5u7h6eXt4+vn39AYFBwSGhYeERkVHRMbFx8QmJSckpqWnpGZlZ2Tm5efkFhUXFJaVl5RWVVdU1tXX1DY1NzS2tb"
        "e0dnV3dPb1//hImTJk+ZOm36jJmzZs+ZO2/+goWLFi9Zumz5ipWrVq9Zu279ho2bNm/Zum37jp27du/Zu2//gYOH"
        "Dh85euz4iZOnTp85e+78hYuXLl+5eu36jZu3bt+5e+/+g4ePHj95+uz5i5evXr95++79h4+fPn/5+u37j5+/Rr0+"
        "6vVRr496fdTro14f9fqo10e9Pur1Ua+Pen3U66NeH/X6qNdHvT7q9VGvj3p91OujXh+2Xp/SwwqeMADSKSWVBalT"
        "Jk/pYSo1nNLZ0T4laIqGN3MPY80UPz8/r/9AACa8GUqmJHkz+TLwtE3pYXSeUgJU18OWk5iUmlM8JRakxZs9tYc7"
        "KbEkOSMeLDylhyUtMTt1SqkeAEcW3mo="
    ),
}


@pytest.mark.parametrize("protocol", sorted(NUMPY_PICKLES))
def test_safe_load_reads_numpy_written_pickles(tmp_path: Path, protocol: int) -> None:
    path = tmp_path / "batch"
    path.write_bytes(zlib.decompress(base64.b64decode(NUMPY_PICKLES[protocol])))
    batch = safe_load(path)
    assert batch["labels"] == [3, 7] and batch["batch_label"] == "fake"
    assert batch["data"].dtype == torch.uint8
    assert torch.equal(batch["data"], (torch.arange(2 * 3072) % 251).to(torch.uint8).view(2, 3072))


def test_safe_load_reads_python2_style_pickle(tmp_path: Path) -> None:
    data = torch.randint(0, 256, (3, 3072), dtype=torch.uint8)
    (tmp_path / "b").write_bytes(py2_cifar_pickle(data, [0, 5, 9], "labels"))
    batch = safe_load(tmp_path / "b")
    assert set(batch) == {"batch_label", "data", "labels"}  # bytes keys became str
    assert batch["batch_label"] == b"fake batch" and batch["labels"] == [0, 5, 9]
    assert torch.equal(batch["data"], data)


def write_fake_cifar(root: Path, kind: str, per_batch: int = 4) -> dict[str, torch.Tensor]:
    """A tiny CIFAR-10 (5 train batches + test) or CIFAR-100 (train + test) folder."""
    if kind == "cifar10":
        folder, files, key, classes = (
            root / "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
            "labels",
            10,
        )
    else:
        folder, files, key, classes = (
            root / "cifar-100-python",
            ["train", "test"],
            "fine_labels",
            100,
        )
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(len(files))
    written = {}
    for i, name in enumerate(files):
        data = torch.randint(0, 256, (per_batch, 3072), dtype=torch.uint8, generator=g)
        labels = [(i * per_batch + j * 7) % classes for j in range(per_batch)]
        (folder / name).write_bytes(py2_cifar_pickle(data, labels, key))
        written[name] = data
    return written


def test_cifar10_from_fake_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FULLSPARSE_DATA", raising=False)
    written = write_fake_cifar(tmp_path, "cifar10")
    bundle = build_datasets("cifar10", tmp_path)
    assert (len(bundle.train), len(bundle.test)) == (20, 4)
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (10, 3, 32)
    assert bundle.mean == (0.4914, 0.4822, 0.4465) and bundle.std == (0.2470, 0.2435, 0.2616)
    # Example 6 = batch 2, row 2. CIFAR rows hold 1024 R, then G, then B values, row-major.
    row = written["data_batch_2"][2]
    images = bundle.train.images
    for c, i, j in [(0, 0, 0), (1, 5, 31), (2, 31, 7)]:
        assert images[6, c, i, j] == row[c * 1024 + i * 32 + j]
    assert bundle.train.labels[6].item() == (1 * 4 + 2 * 7) % 10
    assert bundle.train.augmentation == Augmentation(crop_padding=4, horizontal_flip=True)
    assert torch.equal(bundle.test.images.reshape(4, -1), written["test_batch"])


def test_cifar100_uses_fine_labels_and_accepts_the_folder_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FULLSPARSE_DATA", raising=False)
    write_fake_cifar(tmp_path, "cifar100", per_batch=20)
    bundle = build_datasets("cifar100", tmp_path / "cifar-100-python")
    assert bundle.num_classes == 100 and len(bundle.train) == 20
    assert bundle.train.labels.tolist() == [(j * 7) % 100 for j in range(20)]


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_malicious_cifar_pickle_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FULLSPARSE_DATA", raising=False)
    write_fake_cifar(tmp_path, "cifar10")
    marker = tmp_path / "pwned"
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(pickle.dumps({"data": _Exploit(marker), "labels": [1]}, protocol=2))
    with pytest.raises(UserError, match=r"refusing to load .*data_batch_3: .*global posix.system"):
        build_datasets("cifar10", tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R.",
        b"\x80\x02cnumpy\nload\nX\x01\x00\x00\x00x\x85R.",
        b"\x80\x02csubprocess\nPopen\n.",
        b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x05\x00\x00\x00rot13\x86R.",
        b"\x80\x02X\x01\x00\x00\x00xQ.",  # persistent id
    ],
)
def test_safe_load_refuses_everything_but_arrays(tmp_path: Path, payload: bytes) -> None:
    path = tmp_path / "evil"
    path.write_bytes(payload)
    with pytest.raises(UserError, match=f"refusing to load {path}"):
        safe_load(path)


def test_cifar_truncated_or_wrong_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FULLSPARSE_DATA", raising=False)
    write_fake_cifar(tmp_path, "cifar10")
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    good = batch.read_bytes()
    batch.write_bytes(good[:500])
    with pytest.raises(UserError, match="test_batch is not a valid pickle"):
        build_datasets("cifar10", tmp_path)
    batch.write_bytes(py2_cifar_pickle(torch.zeros(2, 3072, dtype=torch.uint8), [1], "labels"))
    with pytest.raises(UserError, match="2 images but 1 'labels' entries"):
        build_datasets("cifar10", tmp_path)
    batch.write_bytes(py2_cifar_pickle(torch.zeros(2, 1024, dtype=torch.uint8), [1, 2], "labels"))
    with pytest.raises(UserError, match=r"shape \(2, 1024\), expected \[N, 3072\]"):
        build_datasets("cifar10", tmp_path)
    batch.write_bytes(py2_cifar_pickle(torch.zeros(1, 3072, dtype=torch.uint8), [10], "labels"))
    with pytest.raises(UserError, match=r"'labels' holds the label 10, expected 0..9"):
        build_datasets("cifar10", tmp_path)


def test_cifar_not_found_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FULLSPARSE_DATA", str(tmp_path / "env"))
    (tmp_path / "d").mkdir()  # exists but holds nothing: every place is searched
    with pytest.raises(DataNotFoundError) as info:
        build_datasets("cifar100", tmp_path / "d")
    message = str(info.value)
    assert "\n" not in message
    for place in (tmp_path / "d" / "cifar-100-python", tmp_path / "d", tmp_path / "env"):
        assert str(place) in message
    assert "cifar-100-python.tar.gz" in message and "https://www.cs.toronto.edu/~kriz/" in message


# ---------------------------------------------------------------- imagefolder


def write_png_folder(root: Path) -> None:
    from PIL import Image

    colours = {"cat": (200, 10, 10), "dog": (10, 10, 200)}
    sizes = [(40, 30), (30, 50), (64, 64)]
    for split, count in (("train", 3), ("val", 2)):
        for name, colour in colours.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", sizes[i], colour).save(folder / f"img{i}.png")
            (folder / "notes.txt").write_text("not an image")


def test_imagefolder_decodes_and_normalises(tmp_path: Path) -> None:
    write_png_folder(tmp_path)
    bundle = build_datasets("imagefolder", tmp_path, image_size=16)
    assert (len(bundle.train), len(bundle.test)) == (6, 4)
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (2, 3, 16)
    assert bundle.train.classes == ["cat", "dog"] and bundle.mean == (0.485, 0.456, 0.406)
    mean, std = torch.tensor(bundle.mean)[:, None, None], torch.tensor(bundle.std)[:, None, None]
    for dataset, index, colour, label in [
        (bundle.train, 0, (200, 10, 10), 0),
        (bundle.test, 3, (10, 10, 200), 1),
    ]:
        x, y = dataset[index]
        assert x.shape == (3, 16, 16) and y == label
        # A one-colour image stays one colour through crop/resize/flip.
        expected = (torch.tensor(colour, dtype=torch.float32)[:, None, None] / 255 - mean) / std
        torch.testing.assert_close(x, expected.expand(3, 16, 16), atol=1e-5, rtol=0)


def test_imagefolder_eval_transform_geometry(tmp_path: Path) -> None:
    from PIL import Image

    # 40x20 image, left half white: resize short side to round(16*256/224) = 18 -> 36x18,
    # center-crop 16 -> columns 10..25 of the 36, white until column 18 (exclusive).
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        img.save(tmp_path / split / "a" / "x.png")
    x, _ = build_datasets("imagefolder", tmp_path, image_size=16).test[0]
    white = x[0, 8] > 0  # middle row, red channel, normalised
    assert white[:7].all() and not white[9:].any()


def test_random_resized_crop_box_rules() -> None:
    g = torch.Generator().manual_seed(0)
    boxes = [random_resized_crop_box(100, 200, g) for _ in range(200)]
    for top, left, h, w in boxes:
        assert top >= 0 and top + h <= 100 and left >= 0 and left + w <= 200
        assert 0.07 <= h * w / 20000 <= 1.0
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05
    g2 = torch.Generator().manual_seed(0)
    assert boxes[:5] == [random_resized_crop_box(100, 200, g2) for _ in range(5)]
    # Impossible scale: fall back to the largest centered box with an allowed aspect ratio.
    assert random_resized_crop_box(10, 100, g, scale=(2.0, 3.0)) == (0, 43, 10, 13)
    assert random_resized_crop_box(30, 20, g, scale=(2.0, 3.0)) == (1, 0, 27, 20)  # 20 / 0.75
    assert random_resized_crop_box(24, 20, g, scale=(2.0, 3.0)) == (0, 0, 24, 20)
    assert center_crop_box(18, 36, 16) == (1, 10, 16, 16)


def test_imagefolder_loader_is_seeded_across_worker_counts(tmp_path: Path) -> None:
    write_png_folder(tmp_path)
    train = build_datasets("imagefolder", tmp_path, image_size=8).train
    a, b = train[(2, 123)], train[(2, 123)]
    assert torch.equal(a[0], b[0])

    def epoch(workers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        loader = make_loader(train, 2, train=True, seed=5, workers=workers)
        loader.set_epoch(1)
        return list(loader)

    serial, parallel = epoch(0), epoch(2)
    assert len(serial) == 3
    for (x0, y0), (x1, y1) in zip(serial, parallel, strict=True):
        assert x0.shape == (2, 3, 8, 8) and x0.dtype == torch.float32 and y0.dtype == torch.int64
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_imagefolder_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="needs --data-dir"):
        build_datasets("imagefolder", None)
    with pytest.raises(DataNotFoundError, match=f"{tmp_path / 'train'} not found"):
        build_datasets("imagefolder", tmp_path)
    write_png_folder(tmp_path)
    (tmp_path / "val" / "bird").mkdir()
    with pytest.raises(UserError, match=r"class folders \['bird'\] that the train split"):
        build_datasets("imagefolder", tmp_path)


def test_imagefolder_without_pillow_names_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_png_folder(tmp_path)
    train = build_datasets("imagefolder", tmp_path, image_size=8).train
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(UserError, match="pip install pillow"):
        train[0]


# ---------------------------------------------------------------- synthetic


def test_synthetic_is_seeded_sized_and_learnable() -> None:
    a = build_datasets("synthetic", seed=3, synthetic_train=200, synthetic_test=100)
    b = build_datasets("synthetic", seed=3, synthetic_train=200, synthetic_test=100)
    c = build_datasets("synthetic", seed=4, synthetic_train=200, synthetic_test=100)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.train.images, c.train.images)
    assert a.train.images.shape == (200, 3, 32, 32) and (a.num_classes, a.in_channels) == (10, 3)
    assert a.train.labels.bincount().tolist() == [20] * 10
    assert a.train.augmentation is None
    # Learnable: nearest class mean (from train) classifies the test split.
    x_train = a.train.images.flatten(1).float()
    means = torch.stack([x_train[a.train.labels == k].mean(0) for k in range(10)])
    pred = torch.cdist(a.test.images.flatten(1).float(), means).argmin(1)
    assert (pred == a.test.labels).float().mean().item() > 0.9
    # Normalisation uses the train statistics.
    x = torch.stack([a.train[i][0] for i in range(200)])
    assert x.mean().abs().item() < 0.01 and abs(x.std().item() - 1) < 0.01


def test_synthetic_respects_size_and_classes() -> None:
    bundle = build_datasets("synthetic", image_size=12, synthetic_classes=3, synthetic_train=9)
    assert bundle.image_size == 12 and bundle.train[0][0].shape == (3, 12, 12)
    assert bundle.num_classes == 3 and len(bundle.train) == 9 and len(bundle.test) == 256


def test_unknown_dataset_lists_choices() -> None:
    with pytest.raises(UserError) as info:
        build_datasets("mnist")
    for name in DATASETS:
        assert name in str(info.value)


# ---------------------------------------------------------------- augmentation


def crop_and_flip_reference(images, padding, offsets, flips):  # type: ignore[no-untyped-def]
    """Per-image loop: pad with zeros, slice the crop, mirror."""
    out = torch.empty_like(images)
    H, W = images.shape[-2:]
    for b in range(images.shape[0]):
        padded = torch.nn.functional.pad(images[b], (padding,) * 4)
        dy, dx = offsets[b].tolist()
        crop = padded[:, dy : dy + H, dx : dx + W]
        out[b] = crop.flip(-1) if flips[b] else crop
    return out


def test_crop_and_flip_matches_reference() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 7, 9), dtype=torch.uint8, generator=g)
    aug = Augmentation(crop_padding=3, horizontal_flip=True)
    offsets, flips = aug.draw(16, g)
    assert offsets.min() >= 0 and offsets.max() <= 6 and 0 < flips.sum() < 16
    assert torch.equal(
        crop_and_flip(images, 3, offsets, flips),
        crop_and_flip_reference(images, 3, offsets, flips),
    )
    no_flip = Augmentation(crop_padding=2).draw(100, g)[1]
    assert not no_flip.any()


def tiny_dataset(n: int, augmentation: Augmentation | None = None) -> TensorImageDataset:
    """Images with a unique label per example (label = index) so batches can be traced."""
    g = torch.Generator().manual_seed(n)
    images = torch.randint(0, 256, (n, 2, 6, 6), dtype=torch.uint8, generator=g)
    return TensorImageDataset(images, torch.arange(n), (0.5, 0.4), (0.25, 0.2), augmentation)


def test_loader_batches_are_augmented_crops_of_their_examples() -> None:
    ds = tiny_dataset(24, Augmentation(crop_padding=2, horizontal_flip=True))
    loader = make_loader(ds, 8, train=True, seed=1)
    moved = 0
    for x, y in loader:
        for xi, yi in zip(x, y, strict=True):
            original = ds.images[yi][None]
            candidates = [
                crop_and_flip(original, 2, torch.tensor([[dy, dx]]), torch.tensor([flip]))
                for dy in range(5)
                for dx in range(5)
                for flip in (False, True)
            ]
            normed = [normalize(c[0], ds.mean, ds.std) for c in candidates]
            assert any(torch.equal(xi, c) for c in normed)
            moved += not torch.equal(xi, normalize(ds.images[yi], ds.mean, ds.std))
    assert moved > 12  # 49 of 50 parameter draws change the image
    x_eval, y_eval = next(iter(make_loader(ds, 8, train=False)))
    assert torch.equal(y_eval, torch.arange(8))
    assert torch.equal(x_eval, normalize(ds.images[:8], ds.mean, ds.std))


def epoch_batches(loader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:  # type: ignore[no-untyped-def]
    loader.set_epoch(epoch)
    return list(loader)


def test_loader_is_deterministic_in_seed_and_epoch() -> None:
    ds = tiny_dataset(40, Augmentation(crop_padding=1, horizontal_flip=True))
    one, two = make_loader(ds, 8, train=True, seed=7), make_loader(ds, 8, train=True, seed=7)
    for epoch in (0, 3):
        for (x0, y0), (x1, y1) in zip(
            epoch_batches(one, epoch), epoch_batches(two, epoch), strict=True
        ):
            assert torch.equal(x0, x1) and torch.equal(y0, y1)
    order = lambda loader, e: torch.cat([y for _, y in epoch_batches(loader, e)])  # noqa: E731
    assert not torch.equal(order(one, 0), order(one, 1))
    assert torch.equal(order(one, 0), order(one, 0))  # going back to epoch 0 replays it
    assert not torch.equal(order(one, 0), order(make_loader(ds, 8, train=True, seed=8), 0))
    assert sorted(order(one, 2).tolist()) == list(range(40))  # a permutation


def test_a_loader_started_mid_epoch_yields_the_rest_of_that_epoch(tmp_path: Path) -> None:
    # A mid-epoch resume (--checkpoint-every) skips the done steps: the batches after them
    # must be those of an uninterrupted epoch, augmentation included, and the epoch after
    # must start from step 0 again.
    ds = tiny_dataset(40, Augmentation(crop_padding=1, horizontal_flip=True))
    write_png_folder(tmp_path)
    folder = build_datasets("imagefolder", tmp_path, image_size=8).train
    for dataset, batch in ((ds, 8), (folder, 2)):
        loader = make_loader(dataset, batch, train=True, seed=3)
        full = epoch_batches(loader, 2)
        loader.set_epoch(2, first_step=2)
        rest = list(loader)
        assert len(rest) == len(full) - 2 >= 1
        for (x0, y0), (x1, y1) in zip(full[2:], rest, strict=True):
            assert torch.equal(x0, x1) and torch.equal(y0, y1)
        assert len(epoch_batches(loader, 3)) == len(full)


def test_loader_leaves_global_rng_alone() -> None:
    ds = tiny_dataset(16, Augmentation(crop_padding=2, horizontal_flip=True))
    torch.manual_seed(0)
    state = torch.get_rng_state()
    list(make_loader(ds, 4, train=True, seed=0))
    assert torch.equal(torch.get_rng_state(), state)


def test_loader_lengths_and_drop_last() -> None:
    ds = tiny_dataset(21)
    assert len(make_loader(ds, 4, train=True)) == 5  # drop_last: 21 // 4
    assert len(make_loader(ds, 4, train=False)) == 6  # every example: ceil(21 / 4)
    assert len(make_loader(ds, 4, train=True, drop_last=False)) == 6
    batches = list(make_loader(ds, 4, train=False))
    assert [len(y) for _, y in batches] == [4] * 5 + [1]
    x, y = batches[0]
    assert x.shape == (4, 2, 6, 6) and x.dtype == torch.float32 and y.dtype == torch.int64


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_see_what_one_process_sees_with_the_global_batch(world_size: int) -> None:
    ds = tiny_dataset(50, Augmentation(crop_padding=2, horizontal_flip=True))
    b = 3
    single = epoch_batches(make_loader(ds, b * world_size, train=True, seed=11), 2)
    ranks = [
        epoch_batches(make_loader(ds, b, train=True, seed=11, rank=r, world_size=world_size), 2)
        for r in range(world_size)
    ]
    assert all(len(r) == len(single) == 50 // (b * world_size) for r in ranks)
    for step, (x, y) in enumerate(single):
        xs = torch.cat([ranks[r][step][0] for r in range(world_size)])
        ys = torch.cat([ranks[r][step][1] for r in range(world_size)])
        assert Counter(ys.tolist()) == Counter(y.tolist())
        # Same examples *and* the same augmentation for each of them.
        assert torch.equal(xs[ys.argsort()], x[y.argsort()])


def test_eval_shards_cover_every_example_once() -> None:
    ds = tiny_dataset(23)
    loaders = [make_loader(ds, 4, train=False, rank=r, world_size=3) for r in range(3)]
    seen = [torch.cat([y for _, y in loader]) for loader in loaders]
    assert sorted(torch.cat(seen).tolist()) == list(range(23))
    assert [len(loader) for loader in loaders] == [2, 2, 2]
    assert seen[1].tolist() == [1, 4, 7, 10, 13, 16, 19, 22]  # strided, like DistributedSampler


def test_loader_rejects_bad_arguments() -> None:
    ds = tiny_dataset(10)
    with pytest.raises(UserError, match="rank must be in"):
        make_loader(ds, 2, train=True, rank=2, world_size=2)
    with pytest.raises(UserError, match="batch_size must be >= 1"):
        make_loader(ds, 0, train=False)
    with pytest.raises(UserError, match="10 examples, fewer than one global batch of 4 x 3"):
        make_loader(ds, 4, train=True, world_size=3)
