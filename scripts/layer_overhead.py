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

The recipe name ``path`` is no recipe: every layer a sparse one with dense's three products
and nothing else (no masks, no decay, no sampling): the cost of the sparse layers' path
alone, which the masks, the decay and the sampling of a recipe add to. ``function``: the
same layers, each a minimal Python ``autograd.Function`` calling dense's own forward and
backward kernels: the floor of any layer written as a Python autograd function. ``--full-size`` runs
the cases at their ``fullsparse bench steps`` size instead, where that cost is a share of a
real step: read the paired column (dense / recipe round by round, its median and a
distribution-free interval).

    OMP_NUM_THREADS=1 python scripts/layer_overhead.py --threads 1 --repeats 30
    OMP_NUM_THREADS=2 python scripts/layer_overhead.py --threads 2 --repeats 16 \\
        --cases gpt --recipes path,fst2,fst_is_batch --full-size
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
from pathlib import Path

import torch

from fullsparse.bench.harness import interleaved_times, machine_info, paired_speedup
from fullsparse.bench.steps import STEP_CASES, StepCase, _build, _step_fn
from fullsparse.config import SparsityConfig
from fullsparse.nn import SparseConv2d, SparseLinear, sparsify_
from fullsparse.recipes import RECIPES

#: the pseudo-recipes of dense's products through the sparse layers, and through a
#: minimal Python autograd function at the same layers (module docstring)
PATH, FUNCTION = "path", "function"


class _LinearFn(torch.autograd.Function):
    """Dense's Linear products, nothing else, as a Python autograd function."""

    @staticmethod
    def forward(ctx, x, w, b):  # type: ignore[no-untyped-def, override]
        ctx.save_for_backward(x, w)
        return torch.nn.functional.linear(x, w, b)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[no-untyped-def, override]
        x, w = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        return dy.matmul(w), dy2.t().mm(x.reshape(-1, x.shape[-1])), dy2.sum(0)


class _ConvFn(torch.autograd.Function):
    """Dense's convolution forward and backward kernels as a Python autograd function."""

    @staticmethod
    def forward(ctx, x, w, b, conv):  # type: ignore[no-untyped-def, override]
        ctx.save_for_backward(x, w)
        ctx.conv, ctx.has_bias = conv, b is not None
        return torch.nn.functional.conv2d(
            x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups
        )

    @staticmethod
    def backward(ctx, dy):  # type: ignore[no-untyped-def, override]
        x, w = ctx.saved_tensors
        c = ctx.conv
        bias = [w.shape[0]] if ctx.has_bias else None
        dx, dw, db = torch.ops.aten.convolution_backward(
            dy, x, w, bias, c.stride, c.padding, c.dilation, False, [0, 0], c.groups,
            [True, True, ctx.has_bias],
        )  # fmt: skip
        return dx, dw, db, None


class _FnLinear(torch.nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LinearFn.apply(x, self.weight, self.bias)


class _FnConv2d(torch.nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ConvFn.apply(x, self.weight, self.bias, self)


def _as_functions(model: torch.nn.Module, names: list[str]) -> torch.nn.Module:
    """``model`` with the layers ``names`` (Linear / Conv2d, no string padding) swapped for
    the minimal autograd-function layers, with the same parameters."""
    for name in names:
        layer = model.get_submodule(name)
        if isinstance(layer, torch.nn.Conv2d):
            layer.__class__ = _FnConv2d
        else:
            layer.__class__ = _FnLinear
    return model


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


def build(case: StepCase, recipe: str) -> torch.nn.Module:
    """The case's model under ``recipe`` (``path``: sparse layers with every operand dense;
    ``function``: the minimal autograd-function layers where those are)."""
    cpu = torch.device("cpu")
    if recipe not in (PATH, FUNCTION):
        return _build(case, recipe, cpu)
    model = _build(case, "dense", cpu)
    sparse = copy.deepcopy(model)
    sparsify_(sparse, SparsityConfig())
    if recipe == PATH:
        return sparse
    names = [n for n, m in sparse.named_modules() if isinstance(m, (SparseConv2d, SparseLinear))]
    return _as_functions(model, names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="resnet20,vit,gpt", help="comma-separated")
    parser.add_argument("--recipes", default="fst2,fst,fst_is_batch,fst_mvue",
                        help="comma-separated")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--full-size", action="store_true",
                        help="the cases at their bench steps size, not tiny")  # fmt: skip
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be at least 1")
    unknown = [c for c in args.cases.split(",") if c not in STEP_CASES]
    if unknown:
        parser.error(f"unknown case {unknown[0]!r}; one of {', '.join(STEP_CASES)}")
    bad = [r for r in args.recipes.split(",") if r not in (*RECIPES, PATH, FUNCTION)]
    if bad or "dense" in args.recipes.split(","):
        parser.error(f"unknown recipe {(bad or ['dense'])[0]!r} (dense always runs); one of "
                     f"{PATH}, {FUNCTION}, {', '.join(RECIPES[1:])}")  # fmt: skip
    torch.set_num_threads(args.threads)
    info = machine_info()
    print(f"{info['cpu']}, {args.threads} threads, torch {info['torch']}, {info['date']}, "
          f"commit {info['commit']}")  # fmt: skip
    print("| case | recipe | sparse layers | step ms | dense step ms | excess ms | µs per layer "
          "| dense / recipe, paired (interval, coverage) |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    cpu = torch.device("cpu")
    rows = []
    for name in args.cases.split(","):
        case = STEP_CASES[name] if args.full_size else tiny(name)
        fns = {"dense": _step_fn(case, _build(case, "dense", cpu), cpu)}
        layers = {}
        for r in args.recipes.split(","):
            model = build(case, r)
            layers[r] = sum(isinstance(m, (SparseConv2d, SparseLinear, _FnLinear, _FnConv2d))
                            for m in model.modules())  # fmt: skip
            fns[r] = _step_fn(case, model, cpu)
        times = interleaved_times(fns, warmup=3, repeats=args.repeats)
        ms = {r: statistics.median(t) for r, t in times.items()}
        for r, n in layers.items():
            excess = ms[r] - ms["dense"]
            per = 1000 * excess / n if n else float("nan")
            paired = paired_speedup(times["dense"], times[r])
            rows.append({"case": name, "recipe": r, "sparse_layers": n, "step_ms": ms[r],
                         "dense_step_ms": ms["dense"], "excess_ms": excess,
                         "excess_us_per_layer": per, "speedup_paired": paired,
                         "full_size": args.full_size})  # fmt: skip
            print(f"| {name} | {r} | {n} | {ms[r]:.2f} | {ms['dense']:.2f} | {excess:.2f} | "
                  f"{per:.0f} | {paired['median']:.3f}× ({paired['low']:.3f}–{paired['high']:.3f}"
                  f", {100 * paired['coverage']:.0f} %) |", flush=True)  # fmt: skip
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": info, "settings": vars(args) | {
            "json": str(args.json)}, "rows": rows}, indent=2) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
