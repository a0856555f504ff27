"""Count the operators and time one ResNet-20 training step per recipe (torch.profiler).

    OMP_NUM_THREADS=1 python scripts/step_profile.py --recipes dense,fst --batch 128

Prints, per recipe, the profiler's CPU events in one step (forward, backward, SGD
update), the self time of the step, and the top operators by self time. This is the
evidence behind docs/training-speed.md: fst does the same convolutions (with half of the
weight-gradient FLOPs) but issues several times more small operators (masks, the
IR shift, extra copies), which is what a CPU with busy cores punishes.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from fullsparse.models import build_model
from fullsparse.nn import sparsify_


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="dense,fst", help="comma-separated recipes")
    parser.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    parser.add_argument("--size", type=int, default=28, help="image size (default 28)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after warm-up")
    parser.add_argument("--top", type=int, default=8, help="operators listed per recipe")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.recipes.split(","):
        torch.manual_seed(0)
        model = build_model("resnet20", num_classes=10, in_channels=1)
        if name != "dense":
            sparsify_(model, name)
        x = torch.randn(args.batch, 1, args.size, args.size)
        y = torch.randint(0, 10, (args.batch,))
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(model=model, opt=opt, x=x, y=y) -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        for _ in range(2):
            step()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        seconds = (time.perf_counter() - start) / args.steps
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        events = len(prof.events())
        print(f"\n{name}: {events} profiler events per step, {seconds * 1e3:.0f} ms per step")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
