"""Whole training steps with the native CPU kernels (``fullsparse.native``) on and off,
interleaved in one process with dense (docs/benchmarks/cpu-steps.md).

Per case, dense and each recipe's model are built as ``fullsparse bench steps`` builds them;
every round times one step of dense, of each recipe with ``FULLSPARSE_NATIVE=off`` (the
eager path) and of each recipe with the native kernels, in a rotating order
(``fullsparse.bench.harness.interleaved_ms``); the medians are printed as ratios to dense.
The two ways of one recipe run on two models built from the same seed.

    OMP_NUM_THREADS=2 python scripts/native_ab.py --threads 2 --repeats 8
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch

from fullsparse import native
from fullsparse.bench.harness import interleaved_ms, machine_info
from fullsparse.bench.steps import DEFAULT_CASES, STEP_CASES, _build, _step_fn


def _with_native(step: Callable[[int], None], on: bool) -> Callable[[int], None]:
    def run(i: int) -> None:
        before = os.environ.get("FULLSPARSE_NATIVE")
        os.environ["FULLSPARSE_NATIVE"] = "auto" if on else "off"
        try:
            step(i)
        finally:
            if before is None:
                del os.environ["FULLSPARSE_NATIVE"]
            else:
                os.environ["FULLSPARSE_NATIVE"] = before

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES), help="comma-separated")
    parser.add_argument("--recipes", default="fst,fst_is_batch", help="comma-separated")
    parser.add_argument("--repeats", type=int, default=8, help="timed rounds (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not native.available():
        parser.error("the native kernels are not available here (no C compiler, or switched off)")
    info = machine_info()
    print(f"{info['cpu']}, {args.threads} threads, torch {info['torch']}, {info['date']}, "
          f"commit {info['commit']}")  # fmt: skip
    recipes = args.recipes.split(",")
    print("| case | " + " | ".join(f"`{r}` eager | `{r}` native" for r in recipes) + " |")
    print("|---|" + "---:|---:|" * len(recipes))
    cpu = torch.device("cpu")
    for name in args.cases.split(","):
        case = STEP_CASES[name]
        fns = {"dense": _step_fn(case, _build(case, "dense", cpu), cpu)}
        for r in recipes:
            for on in (False, True):
                step = _step_fn(case, _build(case, r, cpu), cpu)
                fns[f"{r}/{'native' if on else 'eager'}"] = _with_native(step, on)
        ms = interleaved_ms(fns, warmup=2, repeats=args.repeats)
        cells = [f"{ms['dense'] / ms[f'{r}/{way}']:.2f}×" for r in recipes
                 for way in ("eager", "native")]  # fmt: skip
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
