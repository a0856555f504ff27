"""``fullsparse bench layers``: per-role layer timings of every recipe against dense."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fullsparse.errors import UserError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks (prints a table, saves JSON)")
    sub = parser.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    layers = sub.add_parser(
        "layers",
        help="time forward / grad_input / grad_weight / total per recipe at ResNet-18 shapes",
        description="Time each GEMM role of each recipe against dense at the conv shapes of "
        "ResNet-18 (CIFAR 32x32 and ImageNet 224x224 inputs), on this machine's CPU.",
    )
    layers.add_argument(
        "--recipes",
        default="all",
        help="comma-separated recipe names, or 'all' (dense is always timed)",
    )
    layers.add_argument(
        "--inputs",
        choices=("cifar", "imagenet", "all"),
        default="all",
        help="which input size's shapes to time (default: all)",
    )
    layers.add_argument("--cifar-batch", type=int, default=32, help="batch at 32x32 (32)")
    layers.add_argument("--imagenet-batch", type=int, default=8, help="batch at 224x224 (8)")
    layers.add_argument("--warmup", type=int, default=1, help="untimed runs per role (1)")
    layers.add_argument("--repeats", type=int, default=5, help="timed runs, median (5)")
    layers.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    layers.add_argument(
        "--json",
        type=Path,
        default=Path("bench-layers.json"),
        help="where to save the JSON (default: bench-layers.json)",
    )
    layers.add_argument(
        "--markdown", type=Path, default=None, help="also write the markdown table here"
    )
    layers.add_argument("--quiet", action="store_true", help="no progress lines")
    layers.set_defaults(func=run_layers)


def run_layers(args: argparse.Namespace) -> int:
    from fullsparse.bench import bench_layers, format_layers, resnet18_shapes
    from fullsparse.config import RECIPES

    recipes = (
        RECIPES
        if args.recipes == "all"
        else tuple(r.strip() for r in args.recipes.split(",") if r.strip())
    )
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        raise UserError(f"unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    for flag in ("cifar_batch", "imagenet_batch", "repeats"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1")
    shapes = resnet18_shapes(args.cifar_batch, args.imagenet_batch)
    if args.inputs != "all":
        shapes = [s for s in shapes if s.name.startswith(args.inputs)]
    total = len(shapes) * len({"dense", *recipes})
    done = [0]

    def progress(msg: str) -> None:
        done[0] += 1
        if not args.quiet:
            print(f"[{done[0]}/{total}] {msg}", file=sys.stderr, flush=True)

    result = bench_layers(
        shapes,
        recipes,
        warmup=args.warmup,
        repeats=args.repeats,
        threads=args.threads,
        progress=progress,
    )
    table = format_layers(result)
    m = result["machine"]
    header = (
        f"CPU: {m['cpu']} ({m['torch_threads']} torch threads), torch {m['torch']}, "
        f"{m['date']}, commit {m['commit']}"
    )
    print(header)
    print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"saved {args.json}")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(header + "\n\n" + table + "\n")
        print(f"saved {args.markdown}")
    return 0
