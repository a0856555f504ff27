"""Recompute every table and curve of docs/results.md from the committed run folders.

    python scripts/results.py                      # reads docs/results/, writes tables + PNGs
    python scripts/results.py --runs runs/results  # the same from the live study folders

Each run folder (``<study>/<recipe>[-<grid>]-seed<N>/``) holds the ``summary.json`` and
``metrics.jsonl`` that ``fullsparse train`` wrote; ``--collect SRC`` copies just those two
files (and ``config.json``) from a live study tree into the results tree, leaving the
checkpoints behind. Nothing here trains: it only reads numbers back.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

#: The paper's ImageNet ResNet-18 top-1 (%) for each recipe (Tables 1, 3 and 5).
PAPER = {
    "dense": 71.2,
    "srste": 71.2,
    "tsm": 70.7,
    "fst2": 71.3,
    "fst_noir": 69.4,
    "fst": 71.0,
    "wg": 67.5,
    "wx": 69.9,
    "gg": 0.1,
    "gx": 0.1,
    "asp": 70.7,
    "meprop": 32.5,
}
TABLE5 = ("dense", "srste", "fst2", "fst_noir", "fst")
TABLE1 = ("dense", "wx", "wg", "gg", "gx")
#: Studies of ResNet-20 on the 5,000-image subset (``full`` is all 60,000; ``vit`` is ViT).
SMALL_RESNET = ("table5", "table1", "fst-choices")
KEPT = ("summary.json", "metrics.jsonl", "config.json")
RUN_NAME = re.compile(r"^(?P<variant>.+)-seed(?P<seed>\d+)$")


def collect(src: Path, dst: Path) -> int:
    """Copy the small result files of every completed run under ``src`` into ``dst``."""
    n = 0
    for summary in sorted(src.glob("*/*/summary.json")):
        run = summary.parent
        if json.loads(summary.read_text()).get("status") != "completed":
            continue
        out = dst / run.relative_to(src)
        out.mkdir(parents=True, exist_ok=True)
        for name in KEPT:
            if (run / name).is_file():
                shutil.copyfile(run / name, out / name)
        n += 1
    return n


def load_runs(root: Path) -> list[dict[str, Any]]:
    """One dict per completed run: study, variant, seed, summary, per-epoch metrics."""
    runs = []
    for summary_path in sorted(root.glob("*/*/summary.json")):
        summary = json.loads(summary_path.read_text())
        if summary.get("status") != "completed":
            continue
        match = RUN_NAME.match(summary_path.parent.name)
        if not match:
            continue
        metrics_path = summary_path.parent / "metrics.jsonl"
        history = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
        runs.append(
            {
                "study": summary_path.parent.parent.name,
                "variant": match["variant"],
                "seed": int(match["seed"]),
                "summary": summary,
                "history": history,
            }
        )
    return runs


def _stats(values: list[float]) -> tuple[float, float, int]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return mean, std, len(values)


def _cell(values: list[float], digits: int = 2) -> str:
    if not values:
        return "–"
    mean, std, n = _stats(values)
    if n == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _group(runs: list[dict[str, Any]], study: str, variant: str) -> list[dict[str, Any]]:
    return [r for r in runs if r["study"] == study and r["variant"] == variant]


def _final(rs: list[dict[str, Any]]) -> list[float]:
    return [r["summary"]["final_top1"] for r in rs]


def _best(rs: list[dict[str, Any]]) -> list[float]:
    return [r["summary"]["best_top1"] for r in rs]


def _train_s(rs: list[dict[str, Any]]) -> list[float]:
    return [r["summary"]["seconds_per_epoch"] for r in rs]


def _find(runs: list[dict[str, Any]], variant: str, studies: tuple[str, ...]) -> list[dict]:
    for study in studies:
        found = _group(runs, study, variant)
        if found:
            return found
    return []


def accuracy_table(
    runs: list[dict[str, Any]], variants: tuple[str, ...], studies: tuple[str, ...]
) -> str:
    """Final/best top-1 (mean ± std over seeds), Δ vs dense, and the paper's row."""
    dense = _final(_find(runs, "dense", studies))
    dense_mean = statistics.fmean(dense) if dense else math.nan
    lines = [
        "| recipe | seeds | final top-1 (%) | best top-1 (%) | Δ final vs dense | "
        "paper (ImageNet R-18) | paper Δ |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for variant in variants:
        rs = _find(runs, variant, studies)
        final = _final(rs)
        delta = f"{statistics.fmean(final) - dense_mean:+.2f}" if final and dense else "–"
        paper = PAPER.get(variant)
        paper_delta = f"{paper - PAPER['dense']:+.1f}" if paper is not None else "–"
        lines.append(
            f"| `{variant}` | {len(rs)} | {_cell(final)} | {_cell(_best(rs))} | {delta} | "
            f"{paper if paper is not None else '–'} | {paper_delta} |"
        )
    return "\n".join(lines)


def choices_table(runs: list[dict[str, Any]]) -> str:
    """fst's open choices: α (0 = fst_noir, 1 = fst) and the backward-mask source."""
    rows = [
        ("ir_alpha = 0 (`fst_noir`)", _group(runs, "table5", "fst_noir")),
        ("ir_alpha = 0.03", _group(runs, "fst-choices", "fst-ir_alpha0.03")),
        ("ir_alpha = 0.25", _group(runs, "fst-choices", "fst-ir_alpha0.25")),
        ("ir_alpha = 1 (`fst`, default)", _group(runs, "table5", "fst")),
        (
            "ir_alpha = 1, grad_input_source = pruned",
            _group(runs, "fst-choices", "fst-grad_input_sourcepruned"),
        ),
    ]
    lines = [
        "| fst variant | seed 0 final top-1 (%) | all seeds final top-1 (%) | seeds |",
        "|---|---:|---:|---:|",
    ]
    for label, rs in rows:
        seed0 = [r for r in rs if r["seed"] == 0]
        lines.append(f"| {label} | {_cell(_final(seed0))} | {_cell(_final(rs))} | {len(rs)} |")
    return "\n".join(lines)


def vit_table(runs: list[dict[str, Any]]) -> str:
    dense = _final(_group(runs, "vit", "dense"))
    lines = [
        "| recipe | final top-1 (%) | best top-1 (%) | Δ final vs dense | train s/epoch |",
        "|---|---:|---:|---:|---:|",
    ]
    for variant in ("dense", "fst2", "fst_noir", "fst"):
        rs = _group(runs, "vit", variant)
        final = _final(rs)
        delta = "–"
        if final and dense:
            delta = f"{statistics.fmean(final) - statistics.fmean(dense):+.2f}"
        lines.append(
            f"| `{variant}` | {_cell(final)} | {_cell(_best(rs))} | {delta} | "
            f"{_cell(_train_s(rs), 1)} |"
        )
    return "\n".join(lines)


def full_table(runs: list[dict[str, Any]]) -> str:
    """The ``full`` study: ResNet-20 on all of Fashion-MNIST, next to the 5,000-image runs."""
    dense = _final(_group(runs, "full", "dense"))
    small_dense = _final(_group(runs, "table5", "dense"))
    lines = [
        "| recipe | seeds | final top-1 (%) | best top-1 (%) | Δ final vs dense | "
        "5,000-image Δ (Table 5) | train s/epoch |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for variant in sorted({r["variant"] for r in runs if r["study"] == "full"}, key=TABLE5.index):
        rs = _group(runs, "full", variant)
        final, small = _final(rs), _final(_group(runs, "table5", variant))
        delta = f"{statistics.fmean(final) - statistics.fmean(dense):+.2f}" if dense else "–"
        small_delta = (
            f"{statistics.fmean(small) - statistics.fmean(small_dense):+.2f}"
            if small and small_dense
            else "–"
        )
        lines.append(
            f"| `{variant}` | {len(rs)} | {_cell(final)} | {_cell(_best(rs))} | {delta} | "
            f"{small_delta} | {_cell(_train_s(rs), 1)} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- Table 3
#: Table 3 analogue rows: (run variant, studies to look in). ``dense10`` is ASP's dense
#: pre-training alone; ``asp10+5`` fine-tunes it for 5 epochs (15 in all, the from-scratch
#: budget), ``asp10+15`` for 15 (25 in all).
TABLE3 = (
    ("dense", ("table5",)),
    ("srste", ("table5",)),
    ("tsm", ("table1",)),
    ("fst", ("table5",)),
    ("dense10", ("table3",)),
    ("asp10+5", ("table3",)),
    ("asp10+15", ("table3",)),
    ("meprop", ("table3",)),
)
#: Forward GEMM FLOPs (2 × multiply-adds) of ResNet-20's 21 sparsifiable convolutions for
#: one 28×28 Fashion-MNIST image (forward hooks on the model; the 64→10 head, 1,280 FLOPs,
#: is left out).
RESNET20_FORWARD_FLOPS = 62_042_624
#: The reduction axis of each GEMM: an operand sparse along it halves that GEMM.
_REDUCES = (("output", "K"), ("grad_input", "Co"), ("grad_weight", "T"))


def step_units(recipe_name: str) -> float:
    """A training step's GEMM work of ``recipe_name`` in forward-GEMM units (dense = 3): a
    GEMM counts 1/2 when one of its operands is 2:4 along its reduction axis
    (``fullsparse.config.SPARSE_ALONG``) or is meProp's 50 % top-k (a count of
    multiply-adds: no hardware runs unstructured top-k faster)."""
    from fullsparse.config import SPARSE_ALONG
    from fullsparse.recipes import recipe

    ops = recipe(recipe_name).operands
    operands = {
        "output": (ops.output_weight,),
        "grad_input": (ops.grad_input_weight, ops.grad_input_dy),
        "grad_weight": (ops.grad_weight_dy, ops.grad_weight_input),
    }
    units = 0.0
    for gemm, axis in _REDUCES:
        sparse = any(
            axis in SPARSE_ALONG[s].split(",") or s.startswith("TopK") for s in operands[gemm]
        )
        units += 0.5 if sparse else 1.0
    return units


def _train_flops(run: dict[str, Any], recipe_name: str) -> float:
    """Training GEMM FLOPs of a run, plus its dense pre-training (ASP)."""
    images = sum(h.get("train_images", 5000) for h in run["history"])
    flops = images * step_units(recipe_name) * RESNET20_FORWARD_FLOPS
    pre = run["summary"].get("pretraining") or {}
    if pre.get("epochs"):
        per_epoch = images / max(1, len(run["history"]))
        flops += pre["epochs"] * per_epoch * step_units("dense") * RESNET20_FORWARD_FLOPS
    return flops


def table3(runs: list[dict[str, Any]]) -> str:
    """Accuracy, total epochs, training FLOPs (with ASP's dense pre-training) and the runs'
    own time per epoch, for the from-scratch recipes, ASP and meProp."""
    dense = _final(_find(runs, "dense", ("table5",)))
    dense_mean = statistics.fmean(dense) if dense else math.nan
    lines = [
        "| method | seeds | epochs (dense + sparse) | final top-1 (%) | Δ vs dense | "
        "train GEMM TFLOPs | × dense | train s/epoch (loaded) | paper R-18 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = None
    for variant, studies in TABLE3:
        rs = _find(runs, variant, studies)
        if not rs:
            continue
        name = re.match(r"[a-z_]+", variant)[0]  # type: ignore[index]
        summary = rs[0]["summary"]
        own = len(rs[0]["history"])
        pre = (summary.get("pretraining") or {}).get("epochs") or 0
        epochs = f"{pre} + {own}" if pre else (f"{own} + 0" if name == "dense" else f"0 + {own}")
        flops = statistics.fmean(_train_flops(r, name) for r in rs)
        base = base or (flops if variant == "dense" else None)
        ratio = f"{flops / base:.2f}×" if base else "–"
        final = _final(rs)
        delta = f"{statistics.fmean(final) - dense_mean:+.2f}" if dense else "–"
        paper = PAPER.get(name, "–") if variant != "dense10" else "–"
        lines.append(
            f"| `{variant}` | {len(rs)} | {epochs} | {_cell(final)} | {delta} | "
            f"{flops / 1e12:.1f} | {ratio} | {_cell(_train_s(rs), 1)} | {paper} |"
        )
    return "\n".join(lines)


def time_table(runs: list[dict[str, Any]]) -> str:
    """Seconds per epoch (training only, and evaluation) per recipe, ratio to dense, over
    the ResNet-20 runs on the 5,000-image subset."""
    resnet = [r for r in runs if r["study"] in SMALL_RESNET]
    variants = sorted({r["variant"] for r in resnet}, key=lambda v: (v != "dense", v))
    dense = _train_s([r for r in resnet if r["variant"] == "dense"])
    lines = [
        "| ResNet-20 variant | runs | train s/epoch | × dense | eval s/epoch | img/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for variant in variants:
        rs = [r for r in resnet if r["variant"] == variant]
        train_s = _train_s(rs)
        evals = [statistics.fmean(h["eval_seconds"] for h in r["history"]) for r in rs]
        ips = [r["summary"]["images_per_second"] for r in rs]
        ratio = statistics.fmean(train_s) / statistics.fmean(dense) if dense else math.nan
        lines.append(
            f"| `{variant}` | {len(rs)} | {_cell(train_s, 1)} | {ratio:.2f}× | "
            f"{_cell(evals, 1)} | {_cell(ips, 0)} |"
        )
    return "\n".join(lines)


def plot_curves(runs: list[dict[str, Any]], groups: dict[str, tuple], out: Path) -> bool:
    """Mean test top-1 per epoch for each variant (one panel per group)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cols = 2
    rows = (len(groups) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat[len(groups) :]:
        ax.set_visible(False)
    for ax, (title, (studies, variants, ymin)) in zip(axes.flat, groups.items(), strict=False):
        for variant in variants:
            rs = _find(runs, variant, studies)
            if not rs:
                continue
            epochs = min(len(r["history"]) for r in rs)
            ys = [statistics.fmean(r["history"][e]["test_top1"] for r in rs) for e in range(epochs)]
            ax.plot(range(1, epochs + 1), ys, marker=".", label=f"{variant} (n={len(rs)})")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test top-1 (%)")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.set_ylim(bottom=ymin)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("docs/results"), help="results tree")
    parser.add_argument("--collect", type=Path, help="copy small files from this study tree first")
    parser.add_argument("--out", type=Path, help="where tables.md/PNGs go (default: --runs)")
    args = parser.parse_args(argv)
    if args.collect:
        print(f"collected {collect(args.collect, args.runs)} completed runs into {args.runs}")
    runs = load_runs(args.runs)
    if not runs:
        print(f"no completed runs under {args.runs}", file=sys.stderr)
        return 1
    out = args.out or args.runs
    out.mkdir(parents=True, exist_ok=True)
    resnet = ("table5", "table1")
    sections = [
        ("Table 5 analogue (ResNet-20, Fashion-MNIST)", accuracy_table(runs, TABLE5, resnet)),
        (
            "Table 1 analogue, with the TSM baseline",
            accuracy_table(runs, (*TABLE1, "tsm"), ("table1", "table5")),
        ),
        ("fst's open choices", choices_table(runs)),
        ("Table 3 analogue: ASP and meProp against training from scratch", table3(runs)),
        ("ViT (Fashion-MNIST)", vit_table(runs)),
        ("Time per epoch in the study runs (mixed load: see docs/results.md)", time_table(runs)),
    ]
    if any(r["study"] == "full" for r in runs):
        sections.insert(4, ("Full data (ResNet-20, all 60,000 images)", full_table(runs)))
    text = "\n\n".join(f"### {title}\n\n{table}" for title, table in sections) + "\n"
    (out / "tables.md").write_text(text)
    print(text)
    groups = {
        "Table 5 rows (mean over seeds)": (resnet, TABLE5, 50),
        "Table 1 rows + tsm": (("table1", "table5"), (*TABLE1, "tsm"), 0),
        "fst variants: α and the backward-mask source": (
            ("table5", "fst-choices"),
            (
                "fst_noir",
                "fst-ir_alpha0.03",
                "fst-ir_alpha0.25",
                "fst",
                "fst-grad_input_sourcepruned",
            ),
            50,
        ),
        "ViT (4 blocks, ViT-tiny width)": (("vit",), ("dense", "fst2", "fst_noir", "fst"), 30),
    }
    if plot_curves(runs, groups, out / "curves.png"):
        print(f"wrote {out / 'tables.md'} and {out / 'curves.png'}")
    else:
        print(f"wrote {out / 'tables.md'} (matplotlib missing: no curves)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
