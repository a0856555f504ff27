"""Scan PyTorch's CPU convolutions in bfloat16 for wrong results and crashes.

    python scripts/onednn_scan.py                  # oneDNN on (PyTorch's default)
    python scripts/onednn_scan.py --no-onednn      # PyTorch's own kernels
    python scripts/onednn_scan.py --cases 2500 --seed 0 --json scan.json

Draws random small convolutions (kernels 1-4, stride 1-3, padding 0-2, dilation 1-2,
sizes 1-8), runs the forward, grad_input and grad_weight convolutions in bfloat16 and
compares each with the same computation in float64 on the same (bf16-rounded) values.
Each case runs in a forked child, so a crash is counted rather than ending the scan.
The table splits the cases by whether an output side is 1, the condition under which
``fullsparse.kernels.reference.onednn_guard`` routes around oneDNN. This tests PyTorch, not
fullsparse; docs/reliability.md has the recorded results.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import sys
import warnings
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F

from fullsparse.geometry import conv_output_size

OPS = ("forward", "grad_input", "grad_weight")
TOLERANCE = 0.03  # relative; bfloat16 accumulation stays near 1e-2


def draw_cases(n: int, seed: int) -> list[tuple[int, ...]]:
    rng = random.Random(seed)
    cases = []
    while len(cases) < n:
        kh, kw = rng.choice((1, 2, 3, 4)), rng.choice((1, 2, 3, 4))
        sh, sw = rng.choice((1, 2, 3)), rng.choice((1, 2, 3))
        ph, pw = rng.choice((0, 1, 2)), rng.choice((0, 1, 2))
        dh, dw = rng.choice((1, 2)), rng.choice((1, 2))
        h, w = rng.choice((1, 2, 3, 4, 5, 6, 8)), rng.choice((1, 2, 3, 4, 5, 6, 8))
        if h + 2 * ph < dh * (kh - 1) + 1 or w + 2 * pw < dw * (kw - 1) + 1:
            continue  # empty output: PyTorch refuses it, nothing to compare
        batch, ci, co = rng.choice((1, 2)), rng.choice((1, 3, 8, 16)), rng.choice((1, 4, 8))
        cases.append((batch, ci, co, h, w, kh, kw, sh, sw, ph, pw, dh, dw))
    return cases


def output_size(case: tuple[int, ...]) -> tuple[int, int]:
    _, _, _, h, w, kh, kw, sh, sw, ph, pw, dh, dw = case
    return conv_output_size(h, kh, sh, ph, dh), conv_output_size(w, kw, sw, pw, dw)


def relative_error(case: tuple[int, ...], op: str) -> float:
    batch, ci, co, h, w, kh, kw, sh, sw, ph, pw, dh, dw = case
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, ci, h, w, generator=gen).bfloat16()
    weight = torch.randn(co, ci, kh, kw, generator=gen).bfloat16()
    gy = torch.randn(batch, co, *output_size(case), generator=gen).bfloat16()

    def run(x: torch.Tensor, weight: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
        if op == "forward":
            return F.conv2d(x, weight, None, (sh, sw), (ph, pw), (dh, dw))
        mask = [op == "grad_input", op == "grad_weight", False]
        out = torch.ops.aten.convolution_backward(
            gy, x, weight, None, [sh, sw], [ph, pw], [dh, dw], False, [0, 0], 1, mask
        )
        return out[0] if op == "grad_input" else out[1]

    got = run(x, weight, gy).double()
    want = run(x.double(), weight.double(), gy.double())
    return ((got - want).norm() / max(want.norm().item(), 1e-9)).item()


def in_child(case: tuple[int, ...], op: str) -> Any:
    """The relative error, computed in a forked child: "crash" if the child died."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read)
        try:
            result: Any = relative_error(case, op)
        except Exception as exc:  # a refusal is a result too
            result = f"error: {type(exc).__name__}"
        os.write(write, pickle.dumps(result))
        os._exit(0)
    os.close(write)
    data = b""
    while chunk := os.read(read, 65536):
        data += chunk
    os.close(read)
    os.waitpid(pid, 0)
    return pickle.loads(data) if data else "crash"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=2500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-onednn", action="store_true", help="PyTorch's own kernels")
    parser.add_argument("--json", help="also save every case's result here")
    args = parser.parse_args(argv)
    if not hasattr(os, "fork"):
        print("this scan needs os.fork (Linux or macOS)", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = not args.no_onednn
    counts: Counter[tuple[str, str, str]] = Counter()
    records = []
    for case in draw_cases(args.cases, args.seed):
        side = "an output side is 1" if min(output_size(case)) == 1 else "both sides > 1"
        for op in OPS:
            result = in_child(case, op)
            if isinstance(result, float):
                verdict = "right" if result < TOLERANCE else "wrong"
            else:
                verdict = "crash" if result == "crash" else "error"
            counts[(op, side, verdict)] += 1
            counts[(op, side, "cases")] += 1
            records.append({"case": case, "op": op, "result": result, "verdict": verdict})
    kernel = "PyTorch's own" if args.no_onednn else "oneDNN"
    print(f"torch {torch.__version__}, {kernel} kernels, bfloat16, {args.cases} cases")
    print("| convolution | output | cases | wrong | crashed | refused |")
    print("|---|---|---:|---:|---:|---:|")
    for op in OPS:
        for side in ("an output side is 1", "both sides > 1"):
            c = [counts[(op, side, k)] for k in ("cases", "wrong", "crash", "error")]
            print(f"| {op} | {side} | " + " | ".join(str(v) for v in c) + " |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"torch": torch.__version__, "kernel": kernel, "runs": records}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
