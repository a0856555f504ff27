"""Seconds per training step of torchvision's detectors, dense vs fst, on this machine.

    OMP_NUM_THREADS=1 python docs/detection/step_time.py --size 512 --rounds 3 \
        --out docs/detection/step_time.json

One step = forward with targets, backward, AdamW step, on a batch of ``--batch`` generated
synthetic-det images. Recipes alternate within each round (order rotated), and the first
round is a warm-up that is not counted; the median of the rest is reported. Random
weights, nothing downloaded; needs the vision extra.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from fullsparse.bench import machine_info
from fullsparse.data.detection import SyntheticDetection, training_target
from fullsparse.models.detection import SSD_MIN_SIZE, build_detection_model, detection_filter
from fullsparse.nn import sparsify_

MODELS = ("fasterrcnn_resnet50_fpn", "retinanet_resnet50_fpn", "ssd300_vgg16")
RECIPES = ("dense", "fst")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    data = SyntheticDetection(args.batch, args.size, 3, seed=0)
    images, targets = zip(*(data[i] for i in range(args.batch)), strict=True)
    targets = [training_target(t) for t in targets]
    results = []
    for name in MODELS:
        size = max(args.size, SSD_MIN_SIZE) if name == "ssd300_vgg16" else args.size
        runs = {}
        for recipe in RECIPES:
            torch.manual_seed(0)
            model = build_detection_model(name, 4, image_size=size)
            sparsify_(model, recipe, detection_filter)
            model.train()
            runs[recipe] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
        times: dict[str, list[float]] = {r: [] for r in RECIPES}
        for i in range(args.rounds):
            order = RECIPES if i % 2 == 0 else RECIPES[::-1]
            for recipe in order:
                model, opt = runs[recipe]
                start = time.perf_counter()
                losses = model(list(images), targets)
                opt.zero_grad(set_to_none=True)
                sum(losses.values()).backward()
                opt.step()
                times[recipe].append(time.perf_counter() - start)
        row = {"model": name, "image_size": size, "batch": args.batch}
        for recipe in RECIPES:
            counted = times[recipe][1:] or times[recipe]
            row[f"{recipe}_s"] = statistics.median(counted)
            row[f"{recipe}_all_s"] = times[recipe]
        row["fst_vs_dense"] = row["fst_s"] / row["dense_s"]
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("all_s")}), flush=True)
        results.append(row)
    if args.out:
        payload = {"machine": machine_info(), "args": vars(args), "rows": results}
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
