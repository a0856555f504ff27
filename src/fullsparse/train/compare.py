"""Side-by-side runs: the same TrainConfig under several recipes, one table.

``compare(config, ("dense", "fst"))`` trains each recipe into ``<out>/<recipe>/`` with
identical settings (seed, data, schedule) and writes ``compare.md`` and ``compare.json``.
Classification rows show top-1; language-model rows (``task="lm"``) the final validation
loss, perplexity and bits per byte.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fullsparse.errors import ConfigError, UserError
from fullsparse.recipes import COMPARE_RECIPES, RECIPES, applicable_overrides
from fullsparse.train.config import SPARSITY_OVERRIDES, TrainConfig
from fullsparse.train.schedule import fraction_text

__all__ = ["compare", "CompareResult", "recipe_configs", "default_compare_dir"]

#: "sparse GEMMs": the run's FLOP account (fullsparse.train.schedule), its total fraction.
COLUMNS = (
    "recipe", "best top-1 (%)", "final top-1 (%)", "sparse GEMMs", "s/epoch", "time vs dense",
)  # fmt: skip
LM_COLUMNS = (
    "recipe", "val loss", "perplexity", "bits/byte", "sparse GEMMs", "s/epoch", "time vs dense",
)  # fmt: skip
DETECTION_COLUMNS = (
    "recipe", "final mAP", "final mAP@0.5", "best mAP", "final train loss", "sparse GEMMs",
    "s/epoch", "time vs dense",
)  # fmt: skip


#: The summary.json key behind each column of a task's rows.
_SCORES: dict[str, dict[str, str]] = {
    "classify": {"best_top1": "best_top1", "final_top1": "final_top1"},
    "lm": {
        "val_loss": "final_val_loss",
        "perplexity": "final_perplexity",
        "bits_per_byte": "final_bits_per_byte",
        "best_val_loss": "best_val_loss",
        "best_epoch": "best_epoch",
        "tokens_per_second": "tokens_per_second",
    },
    "detection": {
        "map": "final_map",
        "map_50": "final_map_50",
        "map_75": "final_map_75",
        "best_map": "best_map",
        "best_epoch": "best_epoch",
        "train_loss": "final_train_loss",
        "first_train_loss": "first_train_loss",
    },
}


def _load_average() -> float:
    """The 1-minute load average (0 where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def default_compare_dir(config: TrainConfig) -> Path:
    return Path("runs") / f"compare-{config.dataset}-{config.model}-seed{config.seed}".replace(
        ":", "_"
    )


@dataclass
class CompareResult:
    out: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: ``classify``, ``lm`` or ``detection``: which columns the table has.
    task: str = "classify"

    @property
    def columns(self) -> tuple[str, ...]:
        if self.task == "detection":
            return DETECTION_COLUMNS
        return LM_COLUMNS if self.task == "lm" else COLUMNS

    def table_cells(self) -> list[tuple[str, ...]]:
        dense = next((r for r in self.rows if r["recipe"] == "dense"), None)
        cells = []
        for r in self.rows:
            ratio = "-"
            if dense is not None and dense["seconds_per_epoch"] > 0:
                ratio = f"{r['seconds_per_epoch'] / dense['seconds_per_epoch']:.2f}x"
            if self.task == "detection":
                scores = (
                    _num(r["map"], 2),
                    _num(r["map_50"], 2),
                    _num(r["best_map"], 2),
                    _num(r["train_loss"], 4),
                )
            elif self.task == "lm":
                scores = (
                    _num(r["val_loss"], 4),
                    _num(r["perplexity"], 3),
                    _num(r["bits_per_byte"], 3),
                )
            else:
                scores = (_pct(r["best_top1"]), _pct(r["final_top1"]))
            flops = fraction_text(r.get("sparse_gemm_fraction"))
            cells.append((r["recipe"], *scores, flops, f"{r['seconds_per_epoch']:.1f}", ratio))
        return cells

    def text_table(self) -> str:
        cells = self.table_cells()
        columns = self.columns
        widths = [max(len(c) for c in col) for col in zip(columns, *cells, strict=False)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
        lines.append("  ".join("-" * w for w in widths))
        for row in cells:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
        return "\n".join(line.rstrip() for line in lines)

    def markdown(self) -> str:
        columns = self.columns
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(row) + " |" for row in self.table_cells()]
        return "\n".join(lines) + "\n"


def _pct(value: float) -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else (f"{value:.2f}")
    )


def _num(value: float | None, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def recipe_configs(
    config: TrainConfig, recipes: tuple[str, ...] | list[str], out: Path
) -> tuple[list[TrainConfig], list[str]]:
    """One config per recipe (run folder ``out/<recipe>``), validated before anything runs.

    The recipe overrides of ``config`` (``ir_alpha``, ``decay``, ...) go to every recipe
    that takes them; a recipe they would clash with (e.g. ``ir_alpha`` for ``dense``) keeps
    its own value, and a note says so.
    """
    if not recipes:
        raise ConfigError("compare needs at least one recipe")
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        raise ConfigError(
            f"unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(RECIPES)}"
        )
    if len(set(recipes)) != len(recipes):
        raise ConfigError(f"recipes are listed twice: {', '.join(recipes)}")
    overrides = {
        k: getattr(config, k) for k in SPARSITY_OVERRIDES if getattr(config, k) is not None
    }
    configs, notes = [], []
    for name in recipes:
        kept = applicable_overrides(name, overrides)
        notes += [
            f"{key}={value} does not apply to {name} (kept its default)"
            for key, value in overrides.items()
            if key not in kept
        ]
        cleared = {k: None for k in SPARSITY_OVERRIDES}
        resume = config.resume
        if resume is True and not (out / name / "last.pt").is_file():
            resume = False  # the comparison stopped before this recipe's first epoch
        configs.append(
            config.replace(recipe=name, out=str(out / name), resume=resume, **{**cleared, **kept})
        )
    return configs, notes


def compare(
    config: TrainConfig,
    recipes: tuple[str, ...] | list[str] = COMPARE_RECIPES,
    out: str | Path | None = None,
) -> CompareResult:
    """Train ``config`` once per recipe; returns the rows (also in ``compare.md/.json``)."""
    from fullsparse.train.checkpoint import atomic_write_bytes
    from fullsparse.train.common import resolve_device
    from fullsparse.train.distributed import init_distributed, shutdown_distributed
    from fullsparse.train.run_folder import check_run_dir
    from fullsparse.train.trainer import train

    out = Path(out) if out is not None else default_compare_dir(config)
    configs, notes = recipe_configs(config, recipes, out)
    tables = [name for name in ("compare.json", "compare.md") if (out / name).exists()]
    if tables and not (config.resume or config.force):
        raise UserError(
            f"{out} already holds a comparison ({', '.join(tables)}; cat compare.md to reprint "
            "its table); pass --resume to continue it, --force to replace it, or --out for a "
            "new folder"
        )
    for cfg in configs:  # refuse before the first run starts, not after it
        check_run_dir(cfg)
    device = resolve_device(config.device)
    info = init_distributed(device.type)
    result = CompareResult(out=out, notes=notes, task=config.task)
    load = 0.0
    try:
        for cfg in configs:
            summary = train(cfg)
            scores = {column: summary[key] for column, key in _SCORES[config.task].items()}
            load = max(load, _load_average())
            result.rows.append(
                {
                    "recipe": cfg.recipe,
                    **scores,
                    "sparse_gemm_fraction": summary.get("sparse_gemm_fraction"),
                    "seconds_per_epoch": summary["seconds_per_epoch"],
                    "epochs": summary["epochs_done"],
                    "run_dir": summary["run_dir"],
                }
            )
    finally:
        shutdown_distributed(info)
    threads = config.threads or torch.get_num_threads()
    if device.type == "cpu" and load > threads:
        notes.append(
            f"the machine was busy: load average {load:.1f} above the {threads} threads these "
            "runs used, so the time columns include waiting for other work; rerun on an idle "
            "machine or with --threads at most the free cores"
        )
    if info.is_main:
        dense = next((r for r in result.rows if r["recipe"] == "dense"), None)
        for r in result.rows:
            r["time_vs_dense"] = (
                r["seconds_per_epoch"] / dense["seconds_per_epoch"]
                if dense and dense["seconds_per_epoch"] > 0
                else None
            )
        payload = {
            "task": config.task,
            "rows": result.rows,
            "notes": notes,
            "config": config.to_dict(),
        }
        atomic_write_bytes(out / "compare.json", (json.dumps(payload, indent=2) + "\n").encode())
        atomic_write_bytes(out / "compare.md", result.markdown().encode())
    return result
