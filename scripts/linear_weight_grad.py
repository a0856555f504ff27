"""A Linear layer's weight gradient on a CPU: the dense product against ``fst_is_batch``'s
sampled one (scores, draw, copies of the kept rows, then the smaller product), by width.

    OMP_NUM_THREADS=2 python scripts/linear_weight_grad.py --threads 2 \\
        --json docs/benchmarks/cpu-linear-weight-grad.json

For each width d and the three shapes of a transformer block's Linear layers (d → 3d, the
attention's qkv; d → 4d and 4d → d, the MLP's), over ``--tokens`` rows: ``dW = dYᵀ·X``
(dense), the sampled estimate of ``linear_sampled_grad_weight`` keeping ``--share`` of the
rows (``is_half`` over one group of every row, as the recipe runs it), and that estimate's
sampling alone (``sampled_grad._kept_rows``). Each round times the three in turn (rotated);
the speed-up is dense / sampled round by round, its median and distribution-free interval
(``fullsparse.bench.harness.paired_speedup``). The operands stay in the cache between
calls where they fit, which a training step's X (made in the forward) does not: the
sampling's share here is a lower bound.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from fullsparse import sampled_grad
from fullsparse.bench.harness import interleaved_times, machine_info, paired_speedup

WIDTHS = (128, 192, 256, 384, 512, 768)
#: (name, d_in, d_out) as multiples of the width
BLOCK = (("qkv", 1, 3), ("fc1", 1, 4), ("fc2", 4, 1))


def measure(tokens: int, d_in: int, d_out: int, share: float, repeats: int) -> dict[str, object]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, d_in, generator=gen)
    dy = torch.randn(tokens, d_out, generator=gen)
    t = interleaved_times(
        {
            "dense": lambda _: dy.t().mm(x),
            "sampled": lambda _: sampled_grad.linear_sampled_grad_weight(
                x, dy, "is_half", group=0, share=share
            ),
            "sampling": lambda _: sampled_grad._kept_rows(x, dy, share, 0),
        },
        warmup=1,
        repeats=repeats,
    )
    ms = {name: statistics.median(v) for name, v in t.items()}
    return {
        "tokens": tokens,
        "d_in": d_in,
        "d_out": d_out,
        "ms": ms,
        "speedup": paired_speedup(t["dense"], t["sampled"]),
        "sampling_share_of_dense": ms["sampling"] / ms["dense"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved rounds (15)")
    parser.add_argument("--tokens", type=int, default=2048, help="rows of X and dY (2048)")
    parser.add_argument("--share", type=float, default=0.59, help="share kept (0.59)")
    parser.add_argument("--width", type=int, action="append", metavar="D",
                        help="a width instead of 128 … 768 (repeatable)")  # fmt: skip
    parser.add_argument("--json", help="save the rows here")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.threads < 1 or args.tokens < 2:
        parser.error("--repeats and --threads must be at least 1, --tokens at least 2")
    if not 0.0 < args.share < 1.0:
        parser.error(f"--share must be in (0, 1), got {args.share}")
    if any(w < 1 for w in args.width or ()):
        parser.error("--width must be at least 1")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.tokens} rows, share "
          f"{args.share}; ms, median of {args.repeats}")  # fmt: skip
    print(f"{'layer':>5} {'d_in':>5} {'d_out':>5} {'dense':>8} {'sampled':>8} {'speed-up':>9} "
          f"{'interval':>13} {'sampling':>9} {'/ dense':>8}")  # fmt: skip
    rows = []
    for width in args.width or WIDTHS:
        for name, a, b in BLOCK:
            row = measure(args.tokens, a * width, b * width, args.share, args.repeats)
            rows.append({"layer": name, "width": width, **row})
            t, s, part = row["ms"], row["speedup"], row["sampling_share_of_dense"]
            print(f"{name:>5} {a * width:>5} {b * width:>5} {t['dense']:>8.3f} "
                  f"{t['sampled']:>8.3f} {s['median']:>8.2f}× {s['low']:>6.2f}–{s['high']:<6.2f} "
                  f"{t['sampling']:>9.3f} {part:>8.2f}", flush=True)  # fmt: skip
    if args.json:
        result = {"machine": machine_info(), "threads": args.threads, "repeats": args.repeats,
                  "tokens": args.tokens, "share": args.share, "rows": rows}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
