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
import gzip
import io
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

from fuzz_targets import _RUN, TARGETS, Target  # noqa: E402

__all__ = ["MUTATIONS", "TARGETS", "Outcome", "Target", "fuzz", "mutate", "run_case", "summary"]

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
