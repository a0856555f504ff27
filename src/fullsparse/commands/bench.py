"""``fullsparse bench layers`` (CPU, per-role timings of every recipe against dense),
``fullsparse bench steps`` (whole training steps per recipe) and ``fullsparse bench gpu``
(the one-call GPU suite). The suites live in :mod:`fullsparse.bench`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fullsparse.commands.output import add_json_argument, save_text
from fullsparse.errors import UserError

_FORCE_HELP = "overwrite existing output files"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from fullsparse.bench.cases import INPUT_SETS
    from fullsparse.bench.gpu_common import GPU_DTYPES

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
        choices=INPUT_SETS,
        metavar="INPUTS",
        default="all",
        help="which input size's shapes to time",
    )
    layers.add_argument("--cifar-batch", type=int, default=128, help="batch at 32x32")
    layers.add_argument("--imagenet-batch", type=int, default=16, help="batch at 224x224")
    layers.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed rounds per role before timing (at least 1 always runs)",
    )
    layers.add_argument("--repeats", type=int, default=5, help="timed runs, median")
    layers.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    add_json_argument(layers, Path("bench-layers.json"))
    layers.add_argument(
        "--markdown", type=Path, default=None, help="also write the markdown table here"
    )
    layers.add_argument("--quiet", action="store_true", help="no progress lines")
    layers.add_argument("--force", action="store_true", help=_FORCE_HELP)
    layers.set_defaults(func=run_layers)

    _add_steps_parser(sub)

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
        help="stop starting new items after this many seconds",
    )
    gpu.add_argument(
        "--dry-run",
        action="store_true",
        help="run the whole suite's logic at tiny sizes on CPU (emulation backend); "
        "numbers mean nothing",
    )
    gpu.add_argument(
        "--dtype", choices=tuple(GPU_DTYPES), metavar="DTYPE", default="bf16",
        help="compute dtype",
    )  # fmt: skip
    gpu.add_argument("--vit-batch", type=int, default=64, help="ViT layer batch (x197 tokens)")
    gpu.add_argument("--conv-batch", type=int, default=64, help="ResNet-50 layer batch")
    gpu.add_argument(
        "--step-batch",
        type=int,
        default=None,
        help="batch of the whole-model steps (default: 128, 64 with --quick)",
    )
    add_json_argument(gpu, Path("bench-gpu.json"))
    gpu.add_argument("--markdown", type=Path, default=None, help="also write the tables here")
    gpu.add_argument("--quiet", action="store_true", help="no progress lines")
    gpu.add_argument("--force", action="store_true", help=_FORCE_HELP)
    gpu.set_defaults(func=run_gpu)


def _add_steps_parser(sub: argparse._SubParsersAction) -> None:
    from fullsparse.bench.steps import DEFAULT_CASES, DEFAULT_RECIPES, STEP_CASES, STEP_DEVICES
    from fullsparse.config import CONV_SAMPLE_UNIT, DECAY_KIND
    from fullsparse.kernels.dispatch import BACKENDS

    steps = sub.add_parser(
        "steps",
        help="time whole training steps (forward, backward, optimizer) per recipe vs dense",
        description="Time one whole training step (forward, loss, backward, optimizer step) "
        "of dense and each recipe, interleaved in one process, median over --repeats rounds; "
        "also each step's peak memory, the weight-side mask work of the sparse layers and "
        "the weight-gradient sampling (replayed alone, and clocked inside the timed steps) as "
        "shares of a dense step timed beside them, and the fst weight gradient alone at a "
        "56x56 conv shape. "
        f"Cases: {', '.join(STEP_CASES)}.",
    )
    steps.add_argument(
        "--cases",
        default=",".join(DEFAULT_CASES),
        help="comma-separated case names; 'tiny' means the three tiny-* cases",
    )
    steps.add_argument(
        "--recipes",
        default=",".join(DEFAULT_RECIPES),
        help="comma-separated recipes (dense always runs)",
    )
    steps.add_argument(
        "--mask-interval",
        type=int,
        default=1,
        help="recipes with an S_K forward recompute their weight masks every N steps",
    )
    steps.add_argument(
        "--sample-group",
        type=int,
        metavar="INT",
        default=None,
        help="units per sampling group of fst_is / fst_adaptive (a multiple of 4; 0: one per call)",
    )
    steps.add_argument(
        "--conv-sample-unit",
        choices=CONV_SAMPLE_UNIT,
        metavar="UNIT",
        default=None,
        help="what the convolutions of fst_is / fst_adaptive sample (default: block)",
    )
    steps.add_argument(
        "--sample-share",
        type=float,
        metavar="FLOAT",
        default=None,
        help="the share of every group fst_is keeps",
    )
    steps.add_argument(
        "--decay-kind",
        choices=DECAY_KIND,
        metavar="KIND",
        default=None,
        help="the decay of every recipe with a sparse forward and a decay: srste (in each "
        "backward, the recipes' own) or masked_grad (2by4's, once per optimizer step)",
    )
    steps.add_argument(
        "--decay",
        type=float,
        metavar="FLOAT",
        default=None,
        help="λ of that decay (default: each recipe's own)",
    )
    steps.add_argument(
        "--backend",
        choices=BACKENDS,
        metavar="BACKEND",
        default="auto",
        help="the sparse layers' backend (sparsify_'s; cpu_sparse: the Linear layers' 2:4 "
        "products on the CPU's vector units)",
    )
    steps.add_argument("--warmup", type=int, default=2, help="untimed rounds (at least 1 runs)")
    steps.add_argument("--repeats", type=int, default=10, help="timed rounds, median")
    steps.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    steps.add_argument(
        "--device", choices=STEP_DEVICES, metavar="DEVICE", default="cpu", help="where to run"
    )
    steps.add_argument(
        "--grad-weight-batch",
        type=int,
        default=32,
        help="batch of the fst-vs-dense grad_weight comparison at 64x56x56 3x3 (0: skip)",
    )
    add_json_argument(steps, Path("bench-steps.json"), old=("--out",))
    steps.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    steps.add_argument("--quiet", action="store_true", help="no progress lines")
    steps.add_argument("--force", action="store_true", help=_FORCE_HELP)
    steps.set_defaults(func=run_steps)


def _refuse_overwrite(args: argparse.Namespace, *paths: Path | None) -> None:
    """One line, exit 2, before any timing: an existing output file is kept unless --force."""
    for path in paths:
        if path is not None and path.exists() and not args.force:
            raise UserError(f"{path} already exists; pass --force to overwrite it")


def _save(path: Path, text: str) -> None:
    save_text(path, text)  # any text: the markdown tables too


def run_layers(args: argparse.Namespace) -> int:
    from fullsparse.bench import bench_layers, format_layers, resnet18_shapes
    from fullsparse.bench.ops import RECIPES
    from fullsparse.bench.report import machine_line

    _refuse_overwrite(args, args.json, args.markdown)

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
    total = len(shapes) * 4  # one progress line per shape and role
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
    header = machine_line(result["machine"])
    print(header)
    print(table)
    _save(args.json, json.dumps(result, indent=2))
    if args.markdown:
        _save(args.markdown, header + "\n\n" + table + "\n")
    return 0


def run_steps(args: argparse.Namespace) -> int:
    from fullsparse.bench.cases import ConvShape
    from fullsparse.bench.ops import RECIPES
    from fullsparse.bench.report import format_steps
    from fullsparse.bench.steps import GRAD_WEIGHT_SHAPE, STEP_CASES, bench_steps
    from fullsparse.recipes import recipe

    cases: list[str] = []
    for c in (c.strip() for c in args.cases.split(",")):
        if c == "tiny":
            cases += [n for n in STEP_CASES if n.startswith("tiny-")]
        elif c:
            cases.append(c)
    unknown = [c for c in cases if c not in STEP_CASES]
    if unknown or not cases:
        raise UserError(
            f"unknown case(s) {', '.join(unknown) or '(none given)'}; choose from "
            f"{', '.join(STEP_CASES)} or 'tiny'"
        )
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    bad = [r for r in recipes if r not in RECIPES]
    if bad:
        raise UserError(f"unknown recipe(s) {', '.join(bad)}; choose from {', '.join(RECIPES)}")
    if args.repeats < 1:
        raise UserError("--repeats must be >= 1")
    if args.grad_weight_batch < 0:
        raise UserError("--grad-weight-batch must be >= 0")
    if args.mask_interval < 1:
        raise UserError(f"--mask-interval must be >= 1, got {args.mask_interval}")
    sampling = {"sample_group": args.sample_group, "sample_share": args.sample_share}
    sampling["conv_sample_unit"] = args.conv_sample_unit
    decay = {"decay_kind": args.decay_kind, "decay": args.decay}
    try:  # the values alone, before any timing
        recipe("fst_is", **{k: v for k, v in sampling.items() if v is not None})
        recipe("fst", **{k: v for k, v in decay.items() if v is not None})
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: this PyTorch sees no CUDA device; use --device cpu")
    if args.backend == "cpu_sparse":
        from fullsparse.kernels.cpu_sparse import unavailable_reason

        why = "runs on the CPU only" if args.device != "cpu" else unavailable_reason()
        if why:
            raise UserError(f"--backend cpu_sparse: {why}")
    _refuse_overwrite(args, args.json, args.markdown)
    shape = None
    if args.grad_weight_batch:
        g = GRAD_WEIGHT_SHAPE
        shape = ConvShape(g.name, g.cin, g.cout, g.kernel, g.stride, g.size, args.grad_weight_batch)

    def progress(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    result = bench_steps(
        dict.fromkeys(cases),
        recipes,
        warmup=args.warmup,
        repeats=args.repeats,
        mask_interval=args.mask_interval,
        sampling=sampling,
        decay=decay,
        backend=args.backend,
        threads=args.threads,
        device=args.device,
        grad_weight_shape=shape,
        progress=progress,
    )
    table = format_steps(result)
    print(table)
    _save(args.json, json.dumps(result, indent=2))
    if args.markdown:
        _save(args.markdown, table + "\n")
    return 0


def run_gpu(args: argparse.Namespace) -> int:
    from fullsparse.bench.gpu import run_gpu_suite
    from fullsparse.bench.gpu_common import GPU_DTYPES
    from fullsparse.bench.report import format_gpu

    for flag in ("vit_batch", "conv_batch", "step_batch"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.budget_s <= 0:
        raise UserError("--budget-s must be > 0")
    _refuse_overwrite(args, args.json, args.markdown)

    def progress(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    result = run_gpu_suite(
        quick=args.quick,
        budget_s=args.budget_s,
        dry_run=args.dry_run,
        dtype=GPU_DTYPES[args.dtype],
        vit_batch=args.vit_batch,
        conv_batch=args.conv_batch,
        step_batch=args.step_batch,
        progress=progress,
    )
    table = format_gpu(result)
    print(table)
    _save(args.json, json.dumps(result, indent=2, default=str))
    if args.markdown:
        _save(args.markdown, table + "\n")
    failed = [c for c in result["correctness"] if not c["passed"]]
    if failed:
        print(
            f"error: {len(failed)} correctness check(s) failed; see the table",
            file=sys.stderr,
        )
        return 1
    return 0
