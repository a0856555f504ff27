"""Hostile data and config files: bounded memory, one clear line, exit 2.

Each file here is crafted by the test in tmp_path and is a few kilobytes. Where the point is
bounded memory, the test asserts on the allocation path (how many bytes were inflated,
that no tensor was allocated, that a walk stopped), never on time or RSS.
"""

from __future__ import annotations

import gzip
import json
import pickle
import struct
import zlib
from pathlib import Path

import pytest
import torch

from fullsparse import limits
from fullsparse.cli import main
from fullsparse.data import fashion_mnist as fm
from fullsparse.data import idx as idx_module
from fullsparse.data import safe_pickle
from fullsparse.data.idx import read_idx
from fullsparse.errors import ConfigError, UserError
from fullsparse.limits import check_structure, escape, load_yaml_text, one_line
from test_data import py2_cifar_pickle, write_fake_fmnist


def one_line_error(capsys, argv, needle) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and needle in lines[0], lines[0]
    assert len(lines[0]) <= len("error: ") + limits.MESSAGE_CHARS
    assert "\x1b" not in lines[0]
    return lines[0]


def _gzip_with_zeros(header: bytes, zeros: int) -> bytes:
    """gzip of ``header`` then ``zeros`` zero bytes, compressed in chunks (never held)."""
    c = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    out = [c.compress(header)]
    chunk = bytes(1 << 20)
    for start in range(0, zeros, len(chunk)):
        out.append(c.compress(chunk[: min(len(chunk), zeros - start)]))
    out.append(c.flush())
    return b"".join(out)


_DECOMPRESSOBJ = zlib.decompressobj


class _CountingInflate:
    """zlib.decompressobj that counts the bytes it hands out."""

    total = 0

    def __init__(self, *args):
        self._d = _DECOMPRESSOBJ(*args)

    def decompress(self, data, max_length=0):
        out = self._d.decompress(data, max_length)
        _CountingInflate.total += len(out)
        return out

    def __getattr__(self, name):
        return getattr(self._d, name)


@pytest.fixture
def counting_inflate(monkeypatch):
    _CountingInflate.total = 0
    monkeypatch.setattr(idx_module.zlib, "decompressobj", _CountingInflate)
    return _CountingInflate


@pytest.fixture
def no_tensor_allocation(monkeypatch):
    """Any tensor the IDX reader would allocate fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was allocated before the header was checked")

    monkeypatch.setattr(idx_module.torch, "frombuffer", refuse)
    monkeypatch.setattr(idx_module.torch, "empty", refuse)


def _idx_header(dims, code=0x08) -> bytes:
    return bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


# ------------------------------------------------------------------ IDX


def test_idx_gzip_bomb_inflates_no_more_than_the_header_promises(tmp_path, counting_inflate):
    header = _idx_header([1, 28, 28])
    bomb = tmp_path / "train-images-idx3-ubyte.gz"
    bomb.write_bytes(_gzip_with_zeros(header, 784 + 50_000_000))  # ~50 kB on disk
    assert bomb.stat().st_size < 100_000
    with pytest.raises(UserError, match="longer than its header says"):
        read_idx(bomb)
    assert counting_inflate.total <= len(header) + 784 + 1


def test_idx_header_promising_more_than_the_limit_is_refused_before_reading(
    tmp_path, counting_inflate, no_tensor_allocation, monkeypatch
):
    header = _idx_header([3_840_000], code=0x0E)  # float64: 30.7 MB promised
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(header + bytes(1000)))
    monkeypatch.setenv("FULLSPARSE_MAX_IDX_BYTES", "1000000")
    with pytest.raises(UserError, match="FULLSPARSE_MAX_IDX_BYTES") as info:
        read_idx(path)
    assert "30,720,000" in str(info.value)
    assert counting_inflate.total == len(header)  # nothing of the payload was inflated


def test_idx_header_is_checked_against_the_file_size_before_allocating(
    tmp_path, no_tensor_allocation
):
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(_idx_header([2, 6000, 6000]) + bytes(70_000))
    with pytest.raises(UserError, match="truncated: header says dims"):
        read_idx(path)


def test_fashion_mnist_must_be_28x28(tmp_path, counting_inflate, monkeypatch, capsys):
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "debian")
    monkeypatch.delenv("FULLSPARSE_DATA", raising=False)
    data = tmp_path / "d"
    write_fake_fmnist(data, n_train=4)
    header = _idx_header([2, 6000, 6000])
    (data / "train-images-idx3-ubyte.gz").write_bytes(_gzip_with_zeros(header, 72_000_000))
    line = one_line_error(
        capsys, ["train", "--dataset", "fashion-mnist", "--data-dir", str(data), "--out",
                 str(tmp_path / "run"), "--no-progress"], "must be Nx28x28"
    )  # fmt: skip
    assert "[2, 6000, 6000]" in line
    assert counting_inflate.total < 10_000  # the header of one file; never the 72 MB


def test_idx_dims_with_a_zero_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "debian")
    data = tmp_path / "d"
    write_fake_fmnist(data, n_train=4)
    (data / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_header([0])))
    (data / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_header([0, 28, 28])))
    one_line_error(
        capsys, ["train", "--dataset", "fashion-mnist", "--data-dir", str(data), "--out",
                 str(tmp_path / "run"), "--no-progress"], "hold a 0"
    )  # fmt: skip


def test_a_limit_override_must_be_a_positive_integer(monkeypatch):
    monkeypatch.setenv("FULLSPARSE_MAX_DEPTH", "lots")
    with pytest.raises(UserError, match="FULLSPARSE_MAX_DEPTH must be a positive integer"):
        limits.limit("depth")
    monkeypatch.setenv("FULLSPARSE_MAX_DEPTH", "1_000")
    assert limits.limit("depth") == 1000


# ------------------------------------------------------------------ CIFAR pickles


def _cifar_folder(root: Path, batch: bytes) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(batch)
    return root


def test_a_cifar_label_of_10_to_the_20_is_one_line(tmp_path, capsys):
    good = py2_cifar_pickle(torch.zeros(1, 3072, dtype=torch.uint8), [0], "labels")
    label = b"](J" + struct.pack("<i", 0) + b"e"
    assert good.count(label) == 1
    huge = (10**20).to_bytes(9, "little", signed=True)
    _cifar_folder(tmp_path / "c", good.replace(label, b"](\x8a\x09" + huge + b"e"))
    one_line_error(
        capsys, ["train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "c"), "--out",
                 str(tmp_path / "run"), "--no-progress"], "holds the label a number of 21 digits"
    )  # fmt: skip


def _shared_bomb(levels: int, width: int = 10) -> list:
    node: list = [0] * width
    for _ in range(levels):
        node = [node] * width  # one object, referenced `width` times
    return node


def test_a_pickle_of_shared_references_is_refused_before_it_is_copied(tmp_path, monkeypatch):
    path = tmp_path / "bomb"
    path.write_bytes(pickle.dumps({"data": _shared_bomb(8)}, protocol=2))  # 10^9 on expansion
    assert path.stat().st_size < 1000

    def never(obj):
        raise AssertionError("the structure was expanded")

    monkeypatch.setattr(safe_pickle, "_convert", never)
    with pytest.raises(UserError, match="number of objects .* FULLSPARSE_MAX_OBJECTS"):
        safe_pickle.safe_load(path)


def test_a_deeply_nested_pickle_is_refused(tmp_path):
    value: list = []
    for _ in range(200):
        value = [value]
    path = tmp_path / "deep"
    path.write_bytes(pickle.dumps(value, protocol=2))
    with pytest.raises(UserError, match="nesting depth is 65"):
        safe_pickle.safe_load(path)


def test_an_oversized_pickle_is_refused_before_it_is_read(tmp_path, monkeypatch):
    path = tmp_path / "big"
    path.write_bytes(pickle.dumps(b"x" * 5000))
    monkeypatch.setenv("FULLSPARSE_MAX_PICKLE_BYTES", "1000")
    with pytest.raises(UserError, match="its size in bytes is 5,0"):
        safe_pickle.safe_load(path)


def test_the_structure_walk_stops_at_the_limit(monkeypatch):
    monkeypatch.setenv("FULLSPARSE_MAX_OBJECTS", "500")
    with pytest.raises(UserError, match="is 501, over the limit 500"):
        check_structure(_shared_bomb(12), "x")  # 10^13 on expansion: must stop at once


# ------------------------------------------------------------------ configs


@pytest.mark.parametrize(
    "field, value, needle",
    [
        ("seed", 10**30, "seed must be in 0..9,223,372,036,854,775,807, got a number of 31"),
        ("image_size", 100_000, "image_size must be in 1..8,192, got 100000"),
        ("epochs", 10**23, "epochs must be in 1..100,000"),
    ],
    ids=["seed", "image_size", "epochs"],
)
def test_config_values_out_of_range_are_one_line(tmp_path, capsys, field, value, needle):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"dataset": "synthetic", field: value}))
    line = one_line_error(capsys, ["train", "--config", str(config)], needle)
    assert "raise the top with" in line or field == "seed"


def test_a_5_mb_recipe_string_is_a_short_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:  # the flag's choices refuse it
        main(["train", "--recipe", "x" * 5_000_000])
    assert info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: argument --recipe: invalid choice")
    assert len(lines[0]) <= len("error: ") + limits.MESSAGE_CHARS
    assert lines[0].endswith("(see `fullsparse train --help`)")
    # from a config file (under its 1 MB cap), the config's own range check says it
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"recipe": "x" * 500_000}))
    one_line_error(capsys, ["train", "--config", str(config)], "length of recipe is 500,000")


def test_config_ranges_can_be_raised(monkeypatch):
    from fullsparse.train import TrainConfig

    with pytest.raises(ConfigError, match="FULLSPARSE_MAX_EPOCHS"):
        TrainConfig(epochs=200_000)
    monkeypatch.setenv("FULLSPARSE_MAX_EPOCHS", "300000")
    assert TrainConfig(epochs=200_000).epochs == 200_000


LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
)


@pytest.mark.parametrize(
    "name, text, needle",
    [
        ("laughs.yaml", "model_kwargs:\n  " + LAUGHS.replace("\n", "\n  "), "number of objects"),
        ("aliases.yaml", "a: &a 1\nb: [" + ", ".join(["*a"] * 150) + "]\n", "YAML aliases is 101"),
        ("deep.yaml", "a: " + "[" * 5000 + "]" * 5000 + "\n", "nesting depth is 65"),
        ("deep.json", '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", "nesting depth is 100,001"),
        ("big.json", '{"a": "' + "x" * 2_000_000 + '"}', "its size in bytes is 2,000,0"),
    ],
    ids=["laughs", "aliases", "deep-yaml", "deep-json", "big"],
)
def test_expanding_or_deep_config_files_are_one_line(tmp_path, capsys, name, text, needle):
    path = tmp_path / name
    path.write_text(text)
    one_line_error(capsys, ["train", "--config", str(path)], needle)


def test_yaml_alias_limit_is_checked_while_composing():
    # 80 aliases of a 9-fold fan-out: within the alias limit, refused by the object walk.
    with pytest.raises(UserError, match="number of objects"):
        load_yaml_text(LAUGHS, "x")


# ------------------------------------------------------------------ messages


def test_escape_shows_control_characters_and_cuts_with_an_ellipsis():
    assert escape("a\nb\x1b[2Jc") == "a\\nb\\x1b[2Jc"
    cut = one_line("x" * 10_000_000 + " the rule")
    assert len(cut) == limits.MESSAGE_CHARS and "…" in cut and cut.endswith("the rule")


def test_file_names_with_newlines_and_terminal_escapes_are_shown_escaped(tmp_path, capsys):
    path = tmp_path / "evil\x1b[2J\nname.json"
    path.write_text("{not json")
    line = one_line_error(capsys, ["train", "--config", str(path)], "evil\\x1b[2J\\nname.json")
    assert "not valid JSON" in line


def test_a_worker_error_is_shown_as_its_own_message():
    wrapped = (
        "Caught UserError in DataLoader worker process 1.\nOriginal Traceback (most recent "
        'call last):\n  File "x.py", line 3, in f\nfullsparse.errors.UserError: imagefolder: '
        "cannot decode /d/a.jpg: image file is truncated"
    )
    got = limits.worker_message(wrapped, "UserError")
    assert got == "imagefolder: cannot decode /d/a.jpg: image file is truncated"
    assert limits.worker_message("plain", "UserError") == "plain"


# ------------------------------------------------------------------ text corpus


def test_the_text_corpus_reads_no_more_than_its_caps(tmp_path, monkeypatch):
    from fullsparse.data import text as text_module

    for i in range(30):
        (tmp_path / f"f{i:02d}.txt").write_bytes(b"abc\n" * 250_000)  # 1 MB each
    read = []
    real_open = open

    class Counting:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def read(self, n=-1):
            data = self.f.read(n)
            read.append(len(data))
            return data

    monkeypatch.setattr(text_module, "open", lambda *a, **k: Counting(real_open(*a, **k)),
                        raising=False)  # fmt: skip
    corpus = text_module.build_text_corpus(tmp_path, max_train_bytes=5000, max_val_bytes=500)
    assert corpus.train.numel() == 5000 and corpus.val.numel() == 500
    assert sum(read) == 5500
