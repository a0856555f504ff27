"""Time one step's weight-gradient sampling with the water-filling level found by capping
(the CPU path of ``fullsparse.sampling.keep_probabilities``) against the sort, interleaved
in one process (docs/benchmarks/cpu-steps.md).

The operands are one training step's of a ``fullsparse bench steps`` case under a sampled
recipe (every sparse layer's X and dY, captured as the benchmark does); each round runs the
sampling of every layer once per way, alternating; the median over ``--rounds`` is printed,
with the level alone (every layer's keep probabilities) the same way.

    OMP_NUM_THREADS=2 python scripts/sampling_level_ab.py --cases gpt,vit,resnet20 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

from fullsparse import sampling
from fullsparse.bench.steps import STEP_CASES, _build, _sampling_fn

WAYS = {"capping": sampling.CAPPING_PASSES, "sorting": 0}


def _ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="gpt,vit,resnet20", help="comma-separated cases")
    parser.add_argument("--recipe", default="fst_is_batch", help="a sampled recipe")
    parser.add_argument("--rounds", type=int, default=40, help="timed rounds (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, recipe {args.recipe}")
    print("| case | layers | sampling, capping ms | sorting ms | ratio | level alone, capping"
          " ms | sorting ms |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    cpu = torch.device("cpu")
    for name in args.cases.split(","):
        case = STEP_CASES[name]
        layers, work = _sampling_fn(case, _build(case, args.recipe, cpu), cpu)
        scores = _scores(work)
        times: dict[str, list[float]] = {f"{w}{p}": [] for w in WAYS for p in ("", "-level")}
        for i in range(args.rounds + 3):
            for way, passes in WAYS.items():
                sampling.CAPPING_PASSES = passes
                work_ms = _ms(partial(work, 0))
                level_ms = _ms(partial(_levels, scores))
                if i >= 3:  # warm-up rounds
                    times[way].append(work_ms)
                    times[f"{way}-level"].append(level_ms)
        sampling.CAPPING_PASSES = WAYS["capping"]
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"| {name} | {layers} | {med['capping']:.2f} | {med['sorting']:.2f} | "
              f"{med['capping'] / med['sorting']:.2f} | {med['capping-level']:.2f} | "
              f"{med['sorting-level']:.2f} |")  # fmt: skip
    return 0


def _levels(scores: list[tuple[torch.Tensor, int]]) -> None:
    for s, k in scores:
        sampling.keep_probabilities(s, k)


def _scores(work: Callable[[int], None]) -> list[tuple[torch.Tensor, int]]:
    """Every layer's scores as one group and the count kept of it, from the captured
    operands of ``work`` (the closure of ``bench.steps._sampling_fn``)."""
    from fullsparse.sampled_grad import block_scores, sample_scores, token_scores

    cells = [c.cell_contents for c in work.__closure__ or ()]
    layers = next(c for c in cells if isinstance(c, list))
    out = []
    for config, x, dy, w, geo in layers:
        if geo is None:
            s = token_scores(x, dy)
        elif config.conv_sample_unit == "sample":
            s = sample_scores(x, dy)
        else:
            s = block_scores(x, dy, w.shape[3], geo)
        share = config.sample_share if config.grad_weight_mode == "is_half" else 0.5
        group = s.numel() // 4 * 4 if config.sample_group == 0 else config.sample_group
        out.append((s[: s.numel() // group * group].view(-1, group), round(share * group)))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
