"""Which layers of each detector get which recipe: the sparsify_ report, counted by part.

    python scripts/detection_layers.py [--recipe fst] [--out docs/detection/layers]

Builds every model of ``fullsparse.models.detection.DETECTION_MODELS`` with random weights
(nothing is downloaded; needs the vision extra), sparsifies it twice — with
``detection_filter`` (what ``fullsparse train --task detection`` does) and with
``sparsify_``'s default selection — and writes ``<out>.json`` (every layer: part, shape,
action, reason) and ``<out>.md`` (counts per part, and each distinct reason for staying
dense). No forward pass is run, so it takes seconds.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from torch import nn

from fullsparse.models.detection import (
    DETECTION_MODELS,
    build_detection_model,
    detection_filter,
)
from fullsparse.nn import sparsify_

#: Model-part of a layer, from its name (torchvision's detector layouts).
PARTS = (
    ("backbone.fpn", "neck (FPN)"),
    ("backbone", "backbone"),
    ("rpn", "RPN head"),
    ("roi_heads", "box head (RoI)"),
    ("head", "head"),
)


def part_of(name: str) -> str:
    for prefix, part in PARTS:
        if name == prefix or name.startswith(prefix + "."):
            return part
    return "other"


def describe(name: str, recipe: str, use_filter: bool) -> dict:
    model = build_detection_model(name, num_classes=91)
    report = sparsify_(model, recipe, detection_filter if use_filter else None)
    weights = {n: m.weight.numel() for n, m in model.named_modules() if hasattr(m, "weight")}
    layers = [
        {
            "name": r.name,
            "part": part_of(r.name),
            "kind": r.kind,
            "shape": list(r.shape),
            "action": r.action,
            "reason": r.reason,
            "weights": weights.get(r.name, 0),
        }
        for r in report
    ]
    total = sum(p.numel() for p in model.parameters())
    convs = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    return {
        "model": name,
        "filter": "detection_filter" if use_filter else "default",
        "recipe": recipe,
        "parameters": total,
        "gemm_layers": convs,
        "sparse_layers": sum(r["action"] == "sparse" for r in layers),
        "sparse_weights": sum(r["weights"] for r in layers if r["action"] == "sparse"),
        "layers": layers,
    }


def markdown(results: list[dict]) -> str:
    lines = [
        "| model | selection | part | sparse / layers | sparse weights |",
        "|---|---|---|---|---|",
    ]
    for res in results:
        parts: dict[str, list[dict]] = {}
        for layer in res["layers"]:
            parts.setdefault(layer["part"], []).append(layer)
        for part, layers in parts.items():
            sparse = [x for x in layers if x["action"] == "sparse"]
            lines.append(
                f"| {res['model']} | {res['filter']} | {part} | {len(sparse)} / {len(layers)} | "
                f"{sum(x['weights'] for x in sparse) / 1e6:.2f}M of "
                f"{sum(x['weights'] for x in layers) / 1e6:.2f}M |"
            )
        lines.append(
            f"| {res['model']} | {res['filter']} | **all** | {res['sparse_layers']} / "
            f"{len(res['layers'])} | {res['sparse_weights'] / 1e6:.2f}M of "
            f"{res['parameters'] / 1e6:.2f}M parameters |"
        )
    lines += ["", "Reasons a layer stays dense, and notes on sparse layers (counts):", ""]
    for res in results:
        dense = Counter(x["reason"] for x in res["layers"] if x["action"] == "dense")
        notes = Counter(x["reason"] for x in res["layers"] if x["action"] == "sparse")
        lines.append(f"- {res['model']} ({res['filter']}):")
        for reason, n in dense.most_common():
            names = [x["name"] for x in res["layers"] if x["reason"] == reason][:4]
            lines.append(f"  - dense ×{n}: {reason} — e.g. {', '.join(names)}")
        for reason, n in notes.most_common():
            if reason != "2:4":
                names = [x["name"] for x in res["layers"] if x["reason"] == reason][:3]
                lines.append(f"  - sparse ×{n}, {reason} — e.g. {', '.join(names)}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="fst")
    parser.add_argument("--out", default="docs/detection/layers")
    args = parser.parse_args()
    results = [
        describe(name, args.recipe, use_filter)
        for name in DETECTION_MODELS
        for use_filter in (True, False)
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    text = markdown(results)
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
