"""Count the operators of one training step (forward, backward, optimizer) of a sparse model.

Op counts, not timings: they do not depend on how busy the machine is, so they compare two
versions of the code anywhere. Used to see the weight-side work of a step shrink::

    PYTHONPATH=src python scripts/profile_step_ops.py --recipe fst --model resnet18 \\
        --batch 8 --size 160
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import torch

import fullsparse
from fullsparse.models import build_model

#: Operators that only make views, allocate, or wrap another counted operator: left out of
#: the "data ops" count, which is then the operators that read or write tensor data.
_NOT_DATA_NAMES = (
    "as_strided",
    "as_strided_",
    "view",
    "_reshape_alias",
    "reshape",
    "unsqueeze",
    "squeeze",
    "select",
    "slice",
    "narrow",
    "permute",
    "movedim",
    "unbind",
    "transpose",
    "t",
    "expand",
    "detach",
    "alias",
    "empty",
    "empty_strided",
    "empty_like",
    "resize_",
    "to",
    "_to_copy",
    "contiguous",
    "lift_fresh",
    "__and__",
    "__or__",
    "__invert__",
    "split",
    "chunk",
    "flatten",
    "_unsafe_view",
    "stack",
)
NOT_DATA = {"aten::" + name for name in _NOT_DATA_NAMES}


def count_step_ops(model_name: str, recipe: str, batch: int, size: int) -> Counter[str]:
    torch.manual_seed(0)
    model = build_model(model_name, num_classes=10, image_size=size)
    if recipe != "none":
        fullsparse.sparsify_(model, recipe)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    step()  # warm: lazy state (optimizer buffers, TSM masks) is not part of a step
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return Counter({e.key: e.count for e in prof.key_averages() if e.key.startswith("aten::")})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--recipe", default="fst", help="a recipe, or 'none' for the torch model")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--json", help="also write all counts to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    counts = count_step_ops(args.model, args.recipe, args.batch, args.size)
    print(f"{args.model} batch {args.batch} {args.size}x{args.size}, recipe {args.recipe}")
    data = Counter({k: n for k, n in counts.items() if k not in NOT_DATA})
    print(
        f"aten ops: {sum(counts.values())}; data ops (no views, allocations, wrappers): "
        f"{sum(data.values())}"
    )
    for key, n in data.most_common(args.top):
        print(f"{n:7d}  {key}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            summary = {"aten_ops": sum(counts.values()), "data_ops": sum(data.values())}
            json.dump({**summary, "counts": dict(counts)}, f, indent=1)


if __name__ == "__main__":
    main()
