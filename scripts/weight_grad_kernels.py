"""A convolution's weight gradient on a CPU: oneDNN's kernel against one GEMM on the unfolded
input (``fullsparse.kernels.reference.conv_weight_gemm``), on ResNet-18's shapes.

    OMP_NUM_THREADS=2 python scripts/weight_grad_kernels.py --threads 2 \\
        --json docs/benchmarks/cpu-weight-grad-kernels.json

For each shape: the weight gradient alone (``convolution_backward`` with only the weight
asked, against the GEMM) and both gradients (one ``convolution_backward`` call, against the
input gradient from it plus the GEMM), the two interleaved, median over ``--repeats``
rounds. The last column says whether ``weight_grad_by_gemm`` picks the GEMM for the shape.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch

from fullsparse.bench.harness import interleaved_ms, machine_info
from fullsparse.geometry import ConvGeometry
from fullsparse.kernels.reference import conv_weight_gemm, weight_grad_by_gemm

# (batch, Ci, Co, input side, kernel, stride): ResNet-18 at 160×160 (sides 40, 20, 10, 5)
# at the batches a reduced-size weight gradient keeps (5 of 8, 16 of 32) and at full batches
SHAPES = [
    (2, 512, 512, 5, 3, 1),
    (5, 512, 512, 5, 3, 1),
    (8, 512, 512, 5, 3, 1),
    (16, 512, 512, 5, 3, 1),
    (32, 512, 512, 5, 3, 1),
    (5, 256, 512, 10, 3, 2),
    (8, 256, 512, 10, 3, 2),
    (8, 256, 512, 10, 1, 2),
    (5, 256, 256, 10, 3, 1),
    (8, 256, 256, 10, 3, 1),
    (5, 128, 128, 20, 3, 1),
    (5, 64, 64, 40, 3, 1),
]


def measure(shape: tuple[int, ...], repeats: int) -> dict[str, object]:
    n, ci, co, side, k, s = shape
    p = k // 2
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, ci, side, side, generator=gen)
    w = torch.randn(co, ci, k, k, generator=gen)
    out = (side + 2 * p - k) // s + 1
    dy = torch.randn(n, co, out, out, generator=gen)
    geo = ConvGeometry.make(s, p)

    def onednn(mask: list[bool]) -> Callable[[int], object]:
        args = (dy, x, w, None, [s, s], [p, p], [1, 1], False, [0, 0], 1, mask)
        return lambda _: torch.ops.aten.convolution_backward(*args)

    def split(_: int) -> object:
        return onednn([True, False, False])(0), conv_weight_gemm(dy, x, w, geo)

    t = interleaved_ms(
        {
            "weight_onednn": onednn([False, True, False]),
            "weight_gemm": lambda _: conv_weight_gemm(dy, x, w, geo),
            "both_onednn": onednn([True, True, False]),
            "both_split": split,
        },
        warmup=1,
        repeats=repeats,
    )
    return {
        "shape": {"batch": n, "ci": ci, "co": co, "side": side, "kernel": k, "stride": s},
        "reduction": n * out * out,
        "weight_entries": w.numel(),
        "ms": t,
        "weight_ratio": t["weight_gemm"] / t["weight_onednn"],
        "both_ratio": t["both_split"] / t["both_onednn"],
        "rule_picks_gemm": weight_grad_by_gemm(dy, x, w, geo),
    }


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 6 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: six positive integers N,CI,CO,SIDE,K,S")
    return shape


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved rounds (15)")
    parser.add_argument("--shape", action="append", type=_shape, metavar="N,CI,CO,SIDE,K,S",
                        help="a shape instead of ResNet-18's (repeatable)")  # fmt: skip
    parser.add_argument("--json", help="save the rows here")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    rows = []
    print(f"torch {torch.__version__}, {args.threads} threads; ms, median of {args.repeats}")
    print(f"{'batch Ci->Co side k s':>26} {'N·Ho·Wo':>8} {'weight: oneDNN':>15} {'GEMM':>7} "
          f"{'ratio':>6} {'both: oneDNN':>13} {'split':>7} {'ratio':>6} {'rule':>5}")  # fmt: skip
    for shape in args.shape or SHAPES:
        row = measure(shape, args.repeats)
        rows.append(row)
        t, (n, ci, co, side, k, s) = row["ms"], shape
        print(f"{n:>5} {ci:>4}->{co:<4} {side:>4} {k} {s} {row['reduction']:>8} "
              f"{t['weight_onednn']:>15.2f} {t['weight_gemm']:>7.2f} {row['weight_ratio']:>6.2f} "
              f"{t['both_onednn']:>13.2f} {t['both_split']:>7.2f} {row['both_ratio']:>6.2f} "
              f"{'GEMM' if row['rule_picks_gemm'] else '-':>5}", flush=True)  # fmt: skip
    if args.json:
        result = {"machine": machine_info(), "threads": args.threads, "repeats": args.repeats,
                  "rows": rows}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
