"""Collect the quality study (scripts/quality_study.sh) into docs/results.

Copies each completed run's small files (summary.json, config.json, metrics.jsonl,
train.log) from RUNS/<task>/<variant>-seed<S>/ to docs/results/quality/<task>/..., writes
docs/results/quality.json ({"rows": [...]}, one row per task and variant), draws one
curve plot per task, and prints the markdown tables of docs/results/quality.md.

    python scripts/quality_collect.py [--runs runs/quality] [--docs docs/results] \\
        [--update-md docs/results/quality.md]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

from fullsparse.train.config import SPARSITY_OVERRIDES

#: study task folder -> (task name in quality.json, metric, summary key, lower is better)
TASKS = {
    "resnet20": ("resnet20-fashion-mnist-full", "top1", "final_top1", False),
    "vit": ("vit-fashion-mnist", "top1", "final_top1", False),
    "gpt": ("gpt-stdlib", "val_loss", "final_val_loss", True),
}
#: epoch metric plotted per task
CURVE_KEY = {"top1": "test_top1", "val_loss": "val_loss"}
#: goal per task for the best fully sparse run: top-1 points under dense, or val loss ratio
GOALS = {"resnet20": 0.5, "vit": 1.0, "gpt": 0.03}
#: earlier committed runs of the same setting: (task, variant, seed) -> folder
EARLIER = {
    ("resnet20", "dense", 0): "docs/results/full/dense-seed0",
    ("resnet20", "fst", 0): "docs/results/full/fst-seed0",
    # fst_is_batch on the GPT (no convolution) is fst_is over one group of the batch
    # keeping 0.59: the same computation as these runs
    ("gpt", "fst_is_batch", 0): "docs/results/quality/gpt/fst_is-g4096-s0.59-seed0",
    ("gpt", "fst_is_batch", 1): "docs/results/quality/gpt/fst_is-g4096-s0.59-seed1",
    **{
        ("gpt", "fst_is-g4096-s0.59", s): f"docs/results/quality/gpt/fst_is_batch-seed{s}"
        for s in (2, 3, 4, 5)
    },
}
#: whose FLOP account an earlier run (which predates the account) shares: the same model,
#: the same sparse layers and the same sparse roles
ACCOUNT_OF = {("resnet20", "fst"): "fst2-mvue", ("resnet20", "dense"): None}
#: the config fields that change what a named recipe does: its overrides and the layer
#: policy and schedule fields
OVERRIDES = (*SPARSITY_OVERRIDES, "keep_dense", "dense_warmup_steps", "dense_finish",
             "dense_finish_mode")  # fmt: skip
SMALL_FILES = ("summary.json", "config.json", "metrics.jsonl", "train.log")
ZERO_ACCOUNT = {"output": 0.0, "grad_input": 0.0, "grad_weight": 0.0, "total": 0.0,
                "fully_sparse": False}  # fmt: skip


def _completed(folder: Path) -> dict[str, Any] | None:
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if summary.get("status") == "completed" else None


def _overrides(config: dict[str, Any]) -> dict[str, Any]:
    """The config fields that change the named recipe (unset / zero ones left out)."""
    out = {k: config[k] for k in OVERRIDES if config.get(k) not in (None, 0, 0.0, "", [])}
    if not config.get("dense_finish"):
        out.pop("dense_finish_mode", None)
    return out


def _runs(runs: Path, docs: Path) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """(task, variant) -> runs ({seed, summary, path}), copying new runs into docs."""
    found: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for task in TASKS:
        fresh = sorted((runs / task).glob("*-seed*"))
        names = {f.name for f in fresh}
        # runs collected before (committed under docs/), whose run folders are gone
        kept = [f for f in sorted((docs / "quality" / task).glob("*-seed*")) if f.name not in names]
        for folder in fresh + kept:
            summary = _completed(folder)
            if summary is None:
                continue
            variant, seed = folder.name.rsplit("-seed", 1)
            target = docs / "quality" / task / folder.name
            if folder.resolve() != target.resolve():
                target.mkdir(parents=True, exist_ok=True)
                for name in SMALL_FILES:
                    if (folder / name).exists():
                        shutil.copyfile(folder / name, target / name)
            run = {"seed": int(seed), "summary": summary, "path": str(target / "summary.json")}
            found.setdefault((task, variant), []).append(run)
    for (task, variant, seed), folder in EARLIER.items():
        summary = _completed(Path(folder))
        if summary is not None and not any(
            r["seed"] == seed for r in found.get((task, variant), [])
        ):
            run = {"seed": seed, "summary": summary, "path": f"{folder}/summary.json"}
            found.setdefault((task, variant), []).append(run)
    return found


def _account(task: str, variant: str, runs: list[dict[str, Any]], found: dict) -> dict | None:
    accounts = [r["summary"].get("sparse_gemm_fraction") for r in runs]
    if all(accounts):
        keys = ("output", "grad_input", "grad_weight", "total")
        mean = {k: round(statistics.fmean(a[k] for a in accounts), 4) for k in keys}
        return {**mean, "fully_sparse": all(a["fully_sparse"] for a in accounts)}
    if (task, variant) in ACCOUNT_OF:
        twin = ACCOUNT_OF[(task, variant)]
        if twin is None:
            return dict(ZERO_ACCOUNT)
        twin_runs = found.get((task, twin))
        if twin_runs:
            account = twin_runs[0]["summary"]["sparse_gemm_fraction"]
            rounded = {k: round(v, 4) if isinstance(v, float) else v for k, v in account.items()}
            return {**rounded, "from": twin}
    return None


def build_rows(found: dict) -> list[dict[str, Any]]:
    rows = []
    for (task, variant), runs in sorted(found.items()):
        name, metric, key, lower = TASKS[task]
        runs = sorted(runs, key=lambda r: r["seed"])
        values = [round(float(r["summary"][key]), 4) for r in runs]
        config = runs[0]["summary"].get("config", {})
        rows.append({
            "task": name, "variant": variant, "recipe": runs[0]["summary"]["recipe"],
            "overrides": _overrides(config), "seeds": [r["seed"] for r in runs],
            "values": values, "metric": metric,
            "mean": round(statistics.fmean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else None,
            "sparse_gemm_fraction": _account(task, variant, runs, found),
            "runs": [r["path"] for r in runs],
        })  # fmt: skip
    for row in rows:
        dense = [r for r in rows if r["task"] == row["task"] and r["variant"] == "dense"]
        row["dense_mean"] = _dense_mean(row, dense[0]) if dense else None
        if row["dense_mean"] is not None:
            if row["metric"] == "top1":
                row["delta_vs_dense"] = round(row["mean"] - row["dense_mean"], 2)
            else:
                row["delta_vs_dense"] = round(row["mean"] / row["dense_mean"] - 1, 4)
    return rows


def _dense_mean(row: dict[str, Any], dense: dict[str, Any]) -> float:
    """Dense's mean over the row's own seeds where dense ran all of them (a seed fixes the
    initialisation and the data order of both, so the gap is measured on the same draws),
    else over all of dense's seeds; ``row["dense_seeds"]`` says which."""
    by_seed = dict(zip(dense["seeds"], dense["values"], strict=True))
    seeds = row["seeds"] if all(s in by_seed for s in row["seeds"]) else dense["seeds"]
    row["dense_seeds"] = list(seeds)
    return round(statistics.fmean(by_seed[s] for s in seeds), 4)


def _goal(task: str, row: dict[str, Any]) -> str:
    account = row["sparse_gemm_fraction"] or {}
    if row.get("delta_vs_dense") is None or not account.get("fully_sparse"):
        return "-"
    limit = GOALS[task]
    if row["metric"] == "top1":
        met = row["delta_vs_dense"] >= -limit
    else:
        met = row["delta_vs_dense"] <= limit
    return ("met" if met else "missed") + ("" if len(row["seeds"]) > 1 else " (1 seed)")


def format_tables(rows: list[dict[str, Any]]) -> dict[str, str]:
    """The markdown table of each task (quality.json's task name -> table lines)."""
    tables = {}
    for task, (name, metric, _, _) in TASKS.items():
        mine = [r for r in rows if r["task"] == name]
        if not mine:
            continue
        unit = "top-1 (%)" if metric == "top1" else "val loss (nats/byte)"
        delta = "Δ vs dense (pt)" if metric == "top1" else "vs dense"
        lines = [f"| variant | seeds | final {unit} | {delta} | sparse GEMM fraction "
                 "(out / gi / gw / total) | goal |", "|---|---:|---:|---:|---|---|"]  # fmt: skip
        for r in mine:
            values = " / ".join(f"{v:.2f}" if metric == "top1" else f"{v:.4f}" for v in r["values"])
            mean = f"{r['mean']:.2f}" if metric == "top1" else f"{r['mean']:.4f}"
            if r["std"] is not None:
                mean += f" ± {r['std']:.2f}" if metric == "top1" else f" ± {r['std']:.4f}"
            d = r.get("delta_vs_dense")
            d_text = (
                "-" if d is None else (f"{d:+.2f}" if metric == "top1" else f"{d * 100:+.1f} %")
            )
            a = r["sparse_gemm_fraction"]
            a_text = "-" if not a else (
                f"{a['output']:.2f} / {a['grad_input']:.2f} / {a['grad_weight']:.2f} / "
                f"{a['total']:.2f}" + (" fully sparse" if a["fully_sparse"] else "")
                + (f" (as {a['from']})" if a.get("from") else ""))  # fmt: skip
            lines.append(f"| `{r['variant']}` | {len(r['seeds'])} | {mean} ({values}) | "
                         f"{d_text} | {a_text} | {_goal(task, r)} |")  # fmt: skip
        tables[name] = "\n".join(lines)
    return tables


def print_tables(rows: list[dict[str, Any]]) -> None:
    for name, table in format_tables(rows).items():
        print(f"\n### {name}\n")
        print(table)


def update_tables(markdown: str, tables: dict[str, str]) -> str:
    """``markdown`` with the first table after each task's heading (the line naming the task
    as `` (`<task>`) ``) replaced by that task's new table; a task without a heading there
    is left out, a heading without a table below it gets none."""
    lines = markdown.split("\n")
    for name, table in tables.items():
        heading = next((i for i, line in enumerate(lines) if f"(`{name}`)" in line), None)
        if heading is None:
            continue
        start = next((i for i in range(heading + 1, len(lines)) if lines[i].startswith("|")), None)
        if start is None or any(lines[i].startswith("#") for i in range(heading + 1, start)):
            continue
        end = start
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
        lines[start:end] = table.split("\n")
    return "\n".join(lines)


def plot(found: dict, docs: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no curves", file=sys.stderr)
        return
    for task, (name, metric, _, _) in TASKS.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        drawn = False
        for (t, variant), runs in sorted(found.items()):
            if t != task:
                continue
            for r in runs:
                folder = Path(r["path"]).parent
                try:
                    lines = (folder / "metrics.jsonl").read_text().splitlines()
                except OSError:
                    continue
                epochs = [json.loads(x) for x in lines if x.strip()]
                key = CURVE_KEY[metric]
                xs = [e["epoch"] for e in epochs if key in e]
                ax.plot(xs, [e[key] for e in epochs if key in e],
                        label=f"{variant} s{r['seed']}", alpha=0.8)  # fmt: skip
                drawn = True
        if drawn:
            ax.set_xlabel("epoch")
            ax.set_ylabel("test top-1 (%)" if metric == "top1" else "val loss (nats/byte)")
            ax.set_title(name)
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(docs / "quality" / f"curves-{task}.png", dpi=90)
        plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs/quality", help="the study folder")
    parser.add_argument("--docs", default="docs/results", help="where results go")
    parser.add_argument(
        "--update-md", metavar="PATH", help="also replace each task's table in this page"
    )
    args = parser.parse_args()
    runs, docs = Path(args.runs), Path(args.docs)
    if not runs.is_dir():
        print(f"error: no study folder {runs}", file=sys.stderr)
        return 2
    found = _runs(runs, docs)
    rows = build_rows(found)
    (docs / "quality.json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    print_tables(rows)
    if args.update_md:
        page = Path(args.update_md)
        page.write_text(update_tables(page.read_text(), format_tables(rows)))
    plot(found, docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
