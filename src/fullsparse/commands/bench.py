"""``fullsparse bench layers`` (CPU, per-role timings of every recipe against dense) and
``fullsparse bench gpu`` (the one-call GPU suite, :mod:`fullsparse.bench_gpu`)."""

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
    layers.add_argument("--cifar-batch", type=int, default=128, help="batch at 32x32 (128)")
    layers.add_argument("--imagenet-batch", type=int, default=16, help="batch at 224x224 (16)")
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

    gpu = sub.add_parser(
        "gpu",
        help="GPU suite: correctness vs reference, per-layer roles, whole steps, overhead",
        description="On a CUDA GPU: check the 2:4 kernels against the reference, then time "
        "forward / grad_input / grad_weight / total per layer (ViT-B/L, GPT MLP, ResNet-50 "
        "1x1 and 3x3) for dense, srste, fst2 and fst, whole ViT-B/16 and ResNet-50 training "
        "steps in bf16, and the per-step overhead (S(W), S(W^T), packing, IR shift). Fits one "
        "10-minute call (--budget-s). Refuses on a machine without CUDA, except --dry-run.",
    )
    gpu.add_argument("--quick", action="store_true", help="fewer shapes and runs (~3-5 min)")
    gpu.add_argument(
        "--budget-s",
        type=float,
        default=540.0,
        help="stop starting new items after this many seconds (540)",
    )
    gpu.add_argument(
        "--dry-run",
        action="store_true",
        help="run the whole suite's logic at tiny sizes on CPU (emulation backend); "
        "numbers mean nothing",
    )
    gpu.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16", help="compute dtype")
    gpu.add_argument("--vit-batch", type=int, default=64, help="ViT layer batch (x197 tokens)")
    gpu.add_argument("--conv-batch", type=int, default=64, help="ResNet-50 layer batch (64)")
    gpu.add_argument(
        "--step-batch",
        type=int,
        default=None,
        help="batch of the whole-model steps (default 128, 64 with --quick)",
    )
    gpu.add_argument(
        "--json", type=Path, default=Path("bench-gpu.json"), help="JSON output (bench-gpu.json)"
    )
    gpu.add_argument("--markdown", type=Path, default=None, help="also write the tables here")
    gpu.add_argument("--quiet", action="store_true", help="no progress lines")
    gpu.set_defaults(func=run_gpu)


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


def run_gpu(args: argparse.Namespace) -> int:
    import torch

    from fullsparse.bench_gpu import format_gpu, run_gpu_suite

    for flag in ("vit_batch", "conv_batch", "step_batch"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.budget_s <= 0:
        raise UserError("--budget-s must be > 0")

    def progress(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    result = run_gpu_suite(
        quick=args.quick,
        budget_s=args.budget_s,
        dry_run=args.dry_run,
        dtype=torch.float16 if args.dtype == "fp16" else torch.bfloat16,
        vit_batch=args.vit_batch,
        conv_batch=args.conv_batch,
        step_batch=args.step_batch,
        progress=progress,
    )
    table = format_gpu(result)
    print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, default=str))
    print(f"saved {args.json}")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table + "\n")
        print(f"saved {args.markdown}")
    failed = [c for c in result["correctness"] if not c["passed"]]
    if failed:
        print(
            f"error: {len(failed)} correctness check(s) failed; see the table",
            file=sys.stderr,
        )
        return 1
    return 0
