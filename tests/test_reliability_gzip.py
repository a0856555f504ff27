"""gzip'd IDX files of several members: read as one stream, never a hang.

A gzip file may hold several members (``cat a.gz b.gz``, ``pigz``, ``bgzip``, an empty
trailing member). Each test runs under a 5 s alarm, so a reader that loops without
consuming input or producing output fails here instead of hanging the suite.
"""

from __future__ import annotations

import gzip
import signal
import struct
import time
import zlib
from pathlib import Path

import pytest
import torch

from fullsparse.data import fashion_mnist as fm
from fullsparse.data.idx import read_idx
from fullsparse.errors import UserError
from test_data import write_fake_fmnist
from test_reliability_limits import one_line_error


@pytest.fixture(autouse=True)
def deadline():
    """Fail (not hang) after 5 s: the reader's loop is Python, so the alarm interrupts it."""

    def fire(signum, frame):
        raise TimeoutError("read_idx did not end within 5 s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(5)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _raw(n: int = 3) -> tuple[torch.Tensor, bytes]:
    g = torch.Generator().manual_seed(n)
    images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g)
    header = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", n, 28, 28)
    return images, header + bytes(images.reshape(-1).tolist())


def _read(tmp_path: Path, data: bytes) -> torch.Tensor:
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(data)
    return read_idx(path)


def test_two_members_read_as_the_one_member_file(tmp_path):
    images, raw = _raw()
    one = _read(tmp_path, gzip.compress(raw))
    two = _read(tmp_path, gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    assert torch.equal(one, images) and torch.equal(two, images)


def test_members_split_at_every_byte_of_the_header_and_payload_start(tmp_path):
    images, raw = _raw(1)
    for cut in range(0, 16 + 2 + 1):  # 16-byte header, the first payload bytes
        data = gzip.compress(raw[:cut]) + gzip.compress(raw[cut:])
        assert torch.equal(_read(tmp_path, data), images), cut
    # three members, the middle one empty, at every cut inside the header
    for cut in range(0, 17):
        data = gzip.compress(raw[:cut]) + gzip.compress(b"") + gzip.compress(raw[cut:])
        assert torch.equal(_read(tmp_path, data), images), cut


def test_a_member_ending_exactly_where_a_read_stops_then_an_empty_member(tmp_path):
    """The reported hang: zlib sets eof with input left over, and nothing is produced."""
    images, raw = _raw()
    for tail in (gzip.compress(b""), gzip.compress(b"") * 50, bytes(64)):
        assert torch.equal(_read(tmp_path, gzip.compress(raw) + tail), images)


def _bgzf_member(data: bytes) -> bytes:
    """A BGZF block as bgzip writes it: a gzip member with an FEXTRA 'BC' field."""
    c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = c.compress(data) + c.flush()
    size = 12 + 6 + len(body) + 8 - 1  # the whole block's size minus one
    header = b"\x1f\x8b\x08\x04" + bytes(4) + b"\x00\xff" + struct.pack("<H", 6)
    header += b"BC" + struct.pack("<HH", 2, size)
    return header + body + struct.pack("<II", zlib.crc32(data), len(data))


def test_a_bgzip_file_of_blocks_and_its_empty_end_block(tmp_path):
    images, raw = _raw()
    blocks = b"".join(_bgzf_member(raw[i : i + 1000]) for i in range(0, len(raw), 1000))
    data = blocks + _bgzf_member(b"")  # bgzip's 28-byte end-of-file block
    assert len(_bgzf_member(b"")) == 28
    assert torch.equal(_read(tmp_path, data), images)


def test_a_60_byte_file_of_a_header_member_and_a_data_member(tmp_path):
    header = bytes([0, 0, 0x08, 1]) + struct.pack(">I", 4)
    data = gzip.compress(header) + gzip.compress(bytes([1, 2, 3, 4]))
    assert len(data) < 64
    assert _read(tmp_path, data).tolist() == [1, 2, 3, 4]


def test_truncated_members_are_one_line(tmp_path):
    _, raw = _raw(1)
    whole = gzip.compress(raw[:10]) + gzip.compress(raw[10:])
    first = len(gzip.compress(raw[:10]))
    refused = 0
    for cut in [*range(3, first + 12), *range(len(whole) - 12, len(whole))]:
        with pytest.raises(UserError, match=r"x-idx3-ubyte\.gz.*(truncated|too short)"):
            _read(tmp_path, whole[:cut])
        refused += 1
    assert refused == first + 9 + 12


@pytest.mark.parametrize(
    "tail, needle",
    [
        (b"garbage!", "neither a gzip member nor NUL padding"),
        (bytes(5) + b"x", "neither a gzip member nor NUL padding"),
        (b"\x1f\x8b\x08\x00junk-not-a-member", "corrupt or truncated gzip"),
        (gzip.compress(b"")[:10], "ended before its end marker"),
    ],
)
def test_trailing_garbage_after_the_last_member_is_one_line(tmp_path, tail, needle):
    _, raw = _raw(1)
    with pytest.raises(UserError, match=needle):
        _read(tmp_path, gzip.compress(raw) + tail)


def test_data_in_a_trailing_member_is_more_than_the_header_promised(tmp_path):
    _, raw = _raw(1)
    with pytest.raises(UserError, match="longer than its header says"):
        _read(tmp_path, gzip.compress(raw) + gzip.compress(b"\x00"))


def test_bombs_of_many_members_end_in_well_under_a_second(tmp_path):
    _, raw = _raw(1)
    # 2 MB of members that each inflate 1 MiB of zeros, after a valid file
    zeros = gzip.compress(bytes(1 << 20))
    data = gzip.compress(raw) + zeros * (2_000_000 // len(zeros))
    start = time.perf_counter()
    with pytest.raises(UserError, match="longer than its header says"):
        _read(tmp_path, data)
    # 2 MB of empty members: 100,000 members that inflate nothing
    data = gzip.compress(raw) + gzip.compress(b"") * 100_000
    images = _read(tmp_path, data)
    assert images.shape == (1, 28, 28)
    assert time.perf_counter() - start < 3.0


def test_an_inflater_that_makes_no_progress_is_refused_not_looped(tmp_path, monkeypatch):
    """The loop's guard: a step that neither consumes input nor produces output ends it."""

    class Stuck:
        eof = False
        unused_data = b""

        def __init__(self, *args):
            self.unconsumed_tail = b""

        def decompress(self, data, max_length=0):
            self.unconsumed_tail = data
            return b""

    from fullsparse.data import idx as idx_module

    monkeypatch.setattr(idx_module.zlib, "decompressobj", Stuck)
    _, raw = _raw(1)
    with pytest.raises(UserError, match="consumed no input and produced no output"):
        _read(tmp_path, gzip.compress(raw))


def test_multi_member_fashion_mnist_trains_and_a_bomb_is_one_line(tmp_path, monkeypatch, capsys):
    from fullsparse.cli import main

    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "debian")
    monkeypatch.delenv("FULLSPARSE_DATA", raising=False)
    data = tmp_path / "d"
    write_fake_fmnist(data, n_train=4)
    for name in ("train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        raw = gzip.decompress((data / name).read_bytes())
        members = gzip.compress(raw[:7]) + gzip.compress(raw[7:]) + gzip.compress(b"")
        (data / name).write_bytes(members)
    argv = ["train", "--dataset", "fashion-mnist", "--data-dir", str(data), "--model", "resnet20",
            "--epochs", "1", "--batch-size", "4",
            "--no-progress"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "ok")]) == 0, capsys.readouterr().err
    labels = data / "t10k-labels-idx1-ubyte.gz"
    bomb = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    labels.write_bytes(labels.read_bytes() + bomb.compress(bytes(2_000_000)) + bomb.flush())
    one_line_error(capsys, [*argv, "--out", str(tmp_path / "bomb")], "longer than its header")
    assert not (tmp_path / "bomb").exists()
