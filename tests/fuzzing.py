"""A fuzz harness over every reader the command line reaches.

Each target starts from a small valid file (made here), applies 1 to 3 seeded mutations
(bit flips, truncation, a repeated block, an inserted block, a size field set to an
extreme, deep nesting; for gzip also mutations of the inflated content) and reads the
result the way ``fullsparse`` does, in a forked child under a wall-clock budget and a
memory cap (``RLIMIT_AS``). The invariant: the child either reads valid data or raises a
one-line ``UserError`` (the CLI: exit 2 and one ``error:`` line) within the budget; any
other exception, a crash, a hang or running out of the memory cap is a failure.

Case ``i`` of target ``t`` with seed ``s`` draws from ``random.Random(f"{t}/{s}/{i}")``,
the same in every process, so a failure is reproduced with ``--target t --seed s
--only i``. Run the long form with::

    OMP_NUM_THREADS=1 PYTHONPATH=src python tests/fuzzing.py --cases 200 --seed 1
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import multiprocessing
import os
import random
import re
import resource
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

#: Extra address space a child may map beyond what the parent already has.
MEMORY_CAP = 1536 << 20
_EXTREMES = (0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)
_TEXT_EXTREMES = ("0", "-1", "4294967295", "1e308", "-1e308", "1" + "0" * 400, "NaN", "1.5")
_NESTS = ("[", "{", '{"a":', "<a>", "- ", "a:\n  ", "(")


# ---------------------------------------------------------------------------------------
# Mutations


def _flip(data: bytes, rng: random.Random, text: bool) -> tuple[bytes, str]:
    out = bytearray(data)
    bits = rng.randint(1, 8)
    for _ in range(bits):
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out), f"flip {bits} bits"


def _truncate(data: bytes, rng: random.Random, text: bool) -> tuple[bytes, str]:
    cut = rng.randrange(len(data))
    return data[:cut], f"truncate at {cut}"


def _repeat(data: bytes, rng: random.Random, text: bool) -> tuple[bytes, str]:
    i = rng.randrange(len(data))
    j = min(len(data), i + rng.randint(1, 256))
    times = rng.choice((2, 3, 16, 256))
    return data[:j] + data[i:j] * (times - 1) + data[j:], f"repeat [{i}:{j}] x{times}"


def _insert(data: bytes, rng: random.Random, text: bool) -> tuple[bytes, str]:
    i = rng.randrange(len(data) + 1)
    block = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    return data[:i] + block + data[i:], f"insert {len(block)} bytes at {i}"


def _position(data: bytes, rng: random.Random, width: int) -> int:
    """Headers first: the first 64 bytes, the last 512 (zip directories), or anywhere."""
    where = rng.random()
    top = max(len(data) - width, 0)
    if where < 0.5:
        return min(rng.randrange(0, 64, 4), top)
    if where < 0.75:
        return max(top - rng.randrange(0, 512), 0)
    return rng.randrange(top + 1)


def _extreme(data: bytes, rng: random.Random, text: bool) -> tuple[bytes, str]:
    if text:
        numbers = [m.span() for m in re.finditer(rb"-?\d+(\.\d+)?", data)]
        if numbers:
            a, b = rng.choice(numbers)
            value = rng.choice(_TEXT_EXTREMES).encode()
            return data[:a] + value + data[b:], f"number at {a} -> {value[:12]!r}"
    value = rng.choice(_EXTREMES)
    fmt = rng.choice((">I", "<I", ">Q", "<Q"))
    packed = struct.pack(fmt, value)
    at = _position(data, rng, len(packed))
    out = data[:at] + packed + data[at + len(packed) :]
    return out, f"field at {at} = {value:#x} ({fmt})"


def _nest(data: bytes, rng: random.Random, text: bool) -> tuple[bytes, str]:
    opener = rng.choice(_NESTS).encode()
    depth = rng.choice((70, 1000, 100_000))
    i = rng.randrange(len(data) + 1)
    return data[:i] + opener * depth + data[i:], f"nest {opener!r} x{depth} at {i}"


MUTATIONS: dict[str, Callable[[bytes, random.Random, bool], tuple[bytes, str]]] = {
    "flip": _flip,
    "truncate": _truncate,
    "repeat": _repeat,
    "insert": _insert,
    "extreme": _extreme,
    "nest": _nest,
}


def mutate(data: bytes, rng: random.Random, text: bool) -> tuple[bytes, list[str]]:
    """``data`` after 1 to 3 mutations drawn from ``rng``, and what each did."""
    done = []
    for _ in range(rng.randint(1, 3)):
        name = rng.choice(list(MUTATIONS))
        if not data:
            data = b"\x00"
        data, what = MUTATIONS[name](data, rng, text)
        done.append(what)
    return data, done


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


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _idx_gzip_setup(folder: Path) -> Path:
    return _write(folder / "x-idx3-ubyte.gz", gzip.compress(_idx_bytes()))


# ---------------------------------------------------------------------------------------
# Running one case in a child


@dataclass
class Outcome:
    target: str
    index: int
    mutations: list[str]
    kind: str  # "valid", "refused: <message>" or "FAIL: ..."
    seconds: float


def _vm_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _child(target: Target, folder: str, conn: Any) -> None:
    from fullsparse.errors import UserError

    try:
        cap = _vm_bytes() + MEMORY_CAP
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        target.read(Path(folder))
        result = "valid"
    except UserError as exc:
        message = str(exc)
        several = f"FAIL: a UserError of several lines: {message[:200]!r}"
        result = f"refused: {message[-160:]}" if "\n" not in message else several
    except MemoryError:
        result = "FAIL: MemoryError (over the memory cap)"
    except BaseException as exc:  # noqa: BLE001 - every other outcome is the finding
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        result = f"FAIL: {type(exc).__name__}: {first}"
    conn.send(result)
    conn.close()
    os._exit(0)


def _mutate_in_zip(data: bytes, rng: random.Random) -> tuple[bytes, list[str]]:
    """A checkpoint whose ``data.pkl`` (or, one time in four, a tensor's bytes) is mutated,
    in a well-formed zip: what reaches the unpickler and the checks after it."""
    import zipfile

    source = zipfile.ZipFile(io.BytesIO(data))
    names = source.namelist()
    pickles = [n for n in names if n.endswith("data.pkl")]
    tensors = [n for n in names if "/data/" in n]
    name = rng.choice(tensors) if tensors and rng.random() < 0.25 else pickles[0]
    inner, done = mutate(source.read(name), rng, False)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for n in names:
            archive.writestr(n, inner if n == name else source.read(n))
    return out.getvalue(), [f"inside {name}: " + ", ".join(done)]


def run_case(target: Target, root: Path, seed: int, index: int, budget: float) -> Outcome:
    """Mutate target's valid input with case ``index`` of ``seed`` and read it in a child."""
    rng = random.Random(f"{target.name}/{seed}/{index}")
    folder = root / f"{target.name}-{index}"
    folder.mkdir(parents=True)
    path = target.setup(folder)
    data = path.read_bytes()
    if target.gzip_inner and rng.random() < 0.5:
        inner, done = mutate(gzip.decompress(data), rng, target.text)
        data, done = gzip.compress(inner), ["inside gzip: " + ", ".join(done)]
    elif target.zip_inner and rng.random() < 0.5:
        data, done = _mutate_in_zip(data, rng)
    else:
        data, done = mutate(data, rng, target.text)
    path.write_bytes(data)
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    start = time.perf_counter()
    child = context.Process(target=_child, args=(target, str(folder), send))
    child.start()
    send.close()
    kind = None
    if receive.poll(budget):
        try:
            kind = receive.recv()
        except EOFError:
            kind = None
    child.join(1.0 if kind is not None else 0.1)
    if child.is_alive():
        child.kill()
        child.join()
        kind = kind or f"FAIL: no result within the {budget:.0f} s budget (a hang)"
    elif kind is None:
        kind = f"FAIL: the child died with exit code {child.exitcode}"
    shutil.rmtree(folder, ignore_errors=True)
    return Outcome(target.name, index, done, kind, time.perf_counter() - start)


def fuzz(
    targets: list[str],
    cases: int,
    seed: int,
    budget: float,
    only: int | None = None,
    check_valid: bool = True,
) -> list[Outcome]:
    """Run ``cases`` cases of each target (or just case ``only``); every outcome.

    ``check_valid``: first read each target's valid input in this process (it must pass;
    this also imports what the reader needs before the children fork under their cap)."""
    base_run_dir = Path(tempfile.mkdtemp(prefix="fullsparse-fuzz-"))
    outcomes = []
    try:
        for name in targets:
            target = TARGETS[name]
            # The valid input reads as valid here, in the parent: a check of the harness,
            # and every import done before the children fork under their memory cap.
            if check_valid:
                warm = base_run_dir / f"{name}-valid"
                warm.mkdir()
                target.setup(warm)
                target.read(warm)
                shutil.rmtree(warm)
            for index in range(cases) if only is None else [only]:
                outcomes.append(run_case(target, base_run_dir, seed, index, budget))
    finally:
        shutil.rmtree(base_run_dir, ignore_errors=True)
        _RUN.clear()
    return outcomes


def summary(outcomes: list[Outcome]) -> str:
    """A Markdown table: cases, valid, refused and failures per target, and the slowest."""
    rows = ["| reader | cases | read as valid | refused (one line) | failures | slowest (s) |",
            "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    names = list(dict.fromkeys(o.target for o in outcomes))
    for name in [*names, None]:
        mine = [o for o in outcomes if name is None or o.target == name]
        counts = [sum(o.kind.startswith(k) for o in mine) for k in ("valid", "refused")]
        failures = sum(o.kind.startswith("FAIL") for o in mine)
        slowest = max((o.seconds for o in mine), default=0.0)
        label = f"**{'total' if name is None else name}**" if name is None else name
        rows.append(f"| {label} | {len(mine):,} | {counts[0]:,} | {counts[1]:,} | {failures} | "
                    f"{slowest:.1f} |")  # fmt: skip
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=50, help="cases per target")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=float, default=60.0, help="seconds per case")
    parser.add_argument("--target", action="append", choices=list(TARGETS))
    parser.add_argument("--only", type=int, help="run just this case index")
    parser.add_argument("--show", action="store_true", help="print every outcome")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    outcomes = fuzz(args.target or list(TARGETS), args.cases, args.seed, args.budget, args.only)
    print(summary(outcomes))
    for o in outcomes:
        if o.kind.startswith("FAIL") or args.show:
            what = "; ".join(o.mutations)
            print(
                f"{o.target} case {o.index} (seed {args.seed}, {o.seconds:.1f} s): {what}: {o.kind}"
            )
    print(f"{len(outcomes)} cases in {time.perf_counter() - start:.0f} s")
    return 1 if any(o.kind.startswith("FAIL") for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
