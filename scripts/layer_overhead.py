"""The sparse layers' fixed cost per training step: each ``bench steps`` model on tiny
inputs, where the products cost next to nothing, dense and each recipe interleaved in one
process (docs/benchmarks/cpu-steps.md, "The layer path's own cost").

Per case the model is built as ``fullsparse bench steps`` builds it, but on a batch of 4
and 8×8 images (a ViT: 2×2 patches) or 8 tokens; every round times one step of dense and
of each recipe in a rotating order (``fullsparse.bench.harness.interleaved_ms``). Printed
per recipe: the step time, its excess over dense, and that excess per sparse layer: the
bookkeeping of the sparse layer path (checks, weight operands, the autograd function, the
calls around the products), which a full-size step pays too. Warm: inside a real step,
where each small call follows a large product, the same work costs more. Three processes
on the project's VM within five minutes gave 307, 425 and 332 µs per layer for ``fst2`` on
ResNet-20 (dense's step 9.1, 10.4 and 11.9 ms): the machine's speed moves, so compare two
versions in alternating runs.

    OMP_NUM_THREADS=1 python scripts/layer_overhead.py --threads 1 --repeats 30
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from fullsparse.bench.harness import interleaved_ms, machine_info
from fullsparse.bench.steps import STEP_CASES, StepCase, _build, _step_fn
from fullsparse.nn import SparseConv2d, SparseLinear


def tiny(name: str) -> StepCase:
    """The case ``name`` on a batch of 4 and 8×8 images (2×2 patches for a ViT with its own
    patch size) or 8 tokens."""
    case = STEP_CASES[name]
    side = 2 * case.model_kwargs["patch_size"] if "patch_size" in case.model_kwargs else 8
    return dataclasses.replace(
        case,
        batch=min(case.batch, 4),
        image_size=min(case.image_size, side) if case.image_size else 0,
        context=min(case.context, 8) if case.context else 0,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="resnet20,vit,gpt", help="comma-separated")
    parser.add_argument("--recipes", default="fst2,fst,fst_is_batch,fst_mvue",
                        help="comma-separated")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be at least 1")
    unknown = [c for c in args.cases.split(",") if c not in STEP_CASES]
    if unknown:
        parser.error(f"unknown case {unknown[0]!r}; one of {', '.join(STEP_CASES)}")
    torch.set_num_threads(args.threads)
    info = machine_info()
    print(f"{info['cpu']}, {args.threads} threads, torch {info['torch']}, {info['date']}, "
          f"commit {info['commit']}")  # fmt: skip
    print("| case | recipe | sparse layers | step ms | dense step ms | excess ms | µs per layer |")
    print("|---|---|---:|---:|---:|---:|---:|")
    cpu = torch.device("cpu")
    rows = []
    for name in args.cases.split(","):
        case = tiny(name)
        fns = {"dense": _step_fn(case, _build(case, "dense", cpu), cpu)}
        layers = {}
        for r in args.recipes.split(","):
            model = _build(case, r, cpu)
            layers[r] = sum(isinstance(m, (SparseConv2d, SparseLinear)) for m in model.modules())
            fns[r] = _step_fn(case, model, cpu)
        ms = interleaved_ms(fns, warmup=3, repeats=args.repeats)
        for r, n in layers.items():
            excess = ms[r] - ms["dense"]
            per = 1000 * excess / n if n else float("nan")
            rows.append({"case": name, "recipe": r, "sparse_layers": n, "step_ms": ms[r],
                         "dense_step_ms": ms["dense"], "excess_ms": excess,
                         "excess_us_per_layer": per})  # fmt: skip
            print(f"| {name} | {r} | {n} | {ms[r]:.2f} | {ms['dense']:.2f} | {excess:.2f} | "
                  f"{per:.0f} |", flush=True)  # fmt: skip
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": info, "settings": vars(args) | {
            "json": str(args.json)}, "rows": rows}, indent=2) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
