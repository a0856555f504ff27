"""A resumable grid of training runs: recipes × seeds × overrides, then one table.

A study is a :class:`StudySpec` — a base :class:`~fullsparse.train.TrainConfig` (as a dict),
recipes, seeds and a ``grid`` of TrainConfig fields to vary (``ir_alpha``,
``grad_input_source``, ``lr``, ...) — written as YAML/JSON or given as flags::

    out: runs/study-ir
    recipes: [dense, fst, fst_noir]
    seeds: [0, 1, 2]
    grid:
      ir_alpha: [1.0, 0.03]
    base:
      model: resnet20
      dataset: fashion-mnist
      epochs: 2

:func:`plan_study` expands it into runs with deterministic folder names
``<out>/<recipe>[-<key><value>...]-seed<seed>``. A grid value that does not apply to a
recipe (``ir_alpha`` for ``dense``) leaves that recipe at its own value, with a note, and
identical runs are planned once — so the ``dense`` baseline is run once per seed.

:func:`run_study` then runs what is not done, in plan order:

- a run whose ``summary.json`` says ``completed`` is skipped;
- a run with ``last.pt`` (killed, or stopped by ``stop_after``) is resumed from it;
- any other run starts afresh (partial files of a run killed before its first checkpoint
  are replaced);
- a folder holding a run of a *different* config is refused before anything starts.

``parallel`` runs execute at once, each a ``fullsparse train`` subprocess with the CPU
threads split between them (``OMP_NUM_THREADS``/``MKL_NUM_THREADS``); ``parallel=1``
trains in this process. Finally :func:`study_table` writes ``study.md`` (mean ± std over
seeds of best and final top-1, seconds per epoch, seeds done) and ``study.json``, and
:func:`~fullsparse.analysis.plots.plot_study_curves` the overlaid test-accuracy curves.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fullsparse.errors import ConfigError, UserError
from fullsparse.recipes import applicable_overrides
from fullsparse.recipes import recipe as make_recipe
from fullsparse.train.config import SPARSITY_OVERRIDES, TrainConfig
from fullsparse.train.run_folder import RUN_CONTROL
from fullsparse.train.schedule import fraction_text, mean_account

__all__ = [
    "StudySpec",
    "StudyRun",
    "RunOutcome",
    "StudyReport",
    "load_study_spec",
    "plan_study",
    "run_status",
    "run_study",
    "run_in_process",
    "run_subprocess",
    "collect_results",
    "study_table",
    "format_study_table",
]

#: Fields a study sets per run; a base config or grid may not set them.
_PER_RUN = ("recipe", "seed", "out", "resume", "force")
_SPEC_KEYS = ("out", "recipes", "seeds", "grid", "base")


@dataclass(frozen=True)
class StudySpec:
    """What to run. ``base``: TrainConfig fields shared by every run; ``grid``: fields to
    vary, each with its list of values (a cartesian product)."""

    recipes: tuple[str, ...] = ("dense", "fst")
    seeds: tuple[int, ...] = (0,)
    grid: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    base: dict[str, Any] = field(default_factory=dict)
    out: str | None = None

    def __post_init__(self) -> None:
        if not self.recipes:
            raise ConfigError("a study needs at least one recipe")
        if len(set(self.recipes)) != len(self.recipes):
            raise ConfigError(f"recipes are listed twice: {', '.join(self.recipes)}")
        if not self.seeds:
            raise ConfigError("a study needs at least one seed")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ConfigError(f"seeds must be integers >= 0, got {list(self.seeds)}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds are listed twice: {list(self.seeds)}")
        for key in (*self.grid, *self.base):
            if key in _PER_RUN:
                raise ConfigError(
                    f"{key!r} is set per run by the study (recipes, seeds, out); "
                    "remove it from base/grid"
                )
        tasks = {self.base.get("task", "classify"), *self.grid.get("task", ())}
        if tasks != {"classify"}:
            # the study tables are top-1 accuracy; an lm run has none
            raise ConfigError(
                "a study compares classification runs (top-1); for a language model use "
                "fullsparse compare --task lm"
            )
        for key, values in self.grid.items():
            if not isinstance(values, (tuple, list)) or not values:
                raise ConfigError(f"grid {key!r} needs a non-empty list of values, got {values!r}")
            if len(set(map(repr, values))) != len(values):
                raise ConfigError(f"grid {key!r} lists a value twice: {list(values)}")

    @property
    def out_dir(self) -> Path:
        if self.out is not None:
            return Path(self.out)
        base = TrainConfig.from_dict(dict(self.base), source="study base")
        return Path("runs") / f"study-{base.dataset}-{base.model}".replace(":", "_")

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out_dir),
            "recipes": list(self.recipes),
            "seeds": list(self.seeds),
            "grid": {k: list(v) for k, v in self.grid.items()},
            "base": dict(self.base),
        }


def load_study_spec(path: str | Path) -> StudySpec:
    """Read a study spec from ``.yaml``/``.yml`` (the yaml extra: PyYAML) or ``.json``."""
    from fullsparse.train.config import load_config_file

    data = load_config_file(path)  # same file handling and messages as train --config
    unknown = sorted(set(data) - set(_SPEC_KEYS))
    if unknown:
        raise ConfigError(
            f"unknown key(s) in study spec {path}: {', '.join(unknown)}; valid keys: "
            f"{', '.join(_SPEC_KEYS)} (TrainConfig fields go under 'base')"
        )
    base = data.get("base") or {}
    grid = data.get("grid") or {}
    if not isinstance(base, dict) or not isinstance(grid, dict):
        raise ConfigError(f"study spec {path}: 'base' and 'grid' must be mappings")
    recipes = data.get("recipes", ["dense", "fst"])
    seeds = data.get("seeds", [0])
    if isinstance(recipes, str):
        recipes = [recipes]
    if isinstance(seeds, int):
        seeds = [seeds]
    return StudySpec(
        recipes=tuple(recipes),
        seeds=tuple(seeds),
        grid={
            str(k).replace("-", "_"): tuple(v) if isinstance(v, list) else v
            for k, v in grid.items()
        },
        base={str(k).replace("-", "_"): v for k, v in base.items()},
        out=data.get("out"),
    )


@dataclass(frozen=True)
class StudyRun:
    """One planned training run."""

    #: Folder name: ``<variant>-seed<seed>``.
    name: str
    #: Recipe plus the grid values that apply to it (the table's row).
    variant: str
    recipe: str
    seed: int
    #: Grid values this run uses, in grid order.
    overrides: tuple[tuple[str, Any], ...]
    #: The run's full config (``out`` = its folder).
    config: TrainConfig

    @property
    def run_dir(self) -> Path:
        return Path(self.config.out)  # type: ignore[arg-type]


def _name_value(value: Any) -> str:
    if value is None:
        return "default"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
    return "".join(c if c.isalnum() or c in "._" else "_" for c in text)


def plan_study(spec: StudySpec) -> tuple[list[StudyRun], list[str]]:
    """Expand ``spec`` into runs (plan order: recipe, grid combination, seed) and notes.

    Every config is validated here, so a bad field fails before any training.
    """
    for name in spec.recipes:
        try:
            make_recipe(name)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    out = spec.out_dir
    keys = list(spec.grid)
    combos = list(itertools.product(*(spec.grid[k] for k in keys))) or [()]
    runs: list[StudyRun] = []
    notes: list[str] = []
    seen: set[str] = set()
    for name in spec.recipes:
        for combo in combos:
            pairs = list(zip(keys, combo, strict=True))
            sparsity = {k: v for k, v in pairs if k in SPARSITY_OVERRIDES and v is not None}
            taken = applicable_overrides(name, sparsity)  # together (decay_kind with decay)
            applied: list[tuple[str, Any]] = []
            for key, value in pairs:
                if key in sparsity and key not in taken:
                    note = f"{key}={value} does not apply to {name} (kept its default)"
                    if note not in notes:
                        notes.append(note)
                    continue
                applied.append((key, value))
            variant = "-".join([name, *(f"{k}{_name_value(v)}" for k, v in applied)])
            if variant in seen:
                continue
            seen.add(variant)
            for seed in spec.seeds:
                run_name = f"{variant}-seed{seed}"
                values = {**spec.base, **dict(applied)}
                values.update(recipe=name, seed=seed, out=str(out / run_name))
                config = TrainConfig.from_dict(values, source=f"study run {run_name}")
                runs.append(StudyRun(run_name, variant, name, seed, tuple(applied), config))
    return runs, notes


def run_status(run: StudyRun) -> str:
    """``complete`` (summary says completed), ``partial`` (``last.pt`` to resume from) or
    ``new``."""
    summary = run.run_dir / "summary.json"
    if summary.is_file():
        try:
            status = json.loads(summary.read_text(encoding="utf-8")).get("status")
        except (OSError, ValueError):
            status = None
        if status == "completed":
            return "complete"
    if (run.run_dir / "last.pt").is_file():
        return "partial"
    return "new"


def _check_same_config(run: StudyRun) -> None:
    stored = run.run_dir / "config.json"
    if not stored.is_file():
        return
    try:
        old = json.loads(stored.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # an unreadable leftover: the run restarts and replaces it
    new = run.config.to_dict()
    diffs = [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if k not in RUN_CONTROL and old.get(k) != new.get(k)  # how it runs may differ
    ]
    if diffs:
        raise UserError(
            f"run folder {run.run_dir} holds a run with another config ({'; '.join(diffs)}); "
            "use another study --out, or delete that folder to rerun it"
        )


def _config_for(run: StudyRun, resume: bool) -> TrainConfig:
    fresh_over_leftovers = not resume and run.run_dir.exists() and any(run.run_dir.iterdir())
    return run.config.replace(resume=resume, force=fresh_over_leftovers, progress=False)


def run_in_process(run: StudyRun, resume: bool, threads: int | None) -> None:
    """Train ``run`` here (``threads`` torch threads, restored afterwards)."""
    import torch

    from fullsparse.train import train

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        train(_config_for(run, resume))
    finally:
        torch.set_num_threads(before)


_CHILDREN: set[subprocess.Popen] = set()
_CHILDREN_LOCK = threading.Lock()


def child_command(run: StudyRun, resume: bool) -> tuple[list[str], Path]:
    """The ``fullsparse train`` command line for ``run`` and the config file it reads
    (written into the run folder as ``study-run.json``)."""
    path = run.run_dir / "study-run.json"
    return [sys.executable, "-m", "fullsparse", "train", "--config", str(path)], path


def run_subprocess(run: StudyRun, resume: bool, threads: int | None) -> None:
    """Train ``run`` as a ``fullsparse train`` subprocess with ``threads`` CPU threads;
    its output goes to ``<run>/study-run.log``. Raises UserError when it fails."""
    from fullsparse.train.checkpoint import atomic_write_bytes

    cmd, path = child_command(run, resume)
    config = _config_for(run, resume).replace(quiet=True)
    atomic_write_bytes(path, (json.dumps(config.to_dict(), indent=2) + "\n").encode())
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    src = str(Path(__file__).resolve().parents[2])  # the folder holding the package
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    log_path = run.run_dir / "study-run.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        with _CHILDREN_LOCK:
            _CHILDREN.add(proc)
        try:
            code = proc.wait()
        finally:
            with _CHILDREN_LOCK:
                _CHILDREN.discard(proc)
    if code != 0:
        lines = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        last = lines[-1] if lines else f"exit status {code}"
        raise UserError(f"run {run.name} failed (exit {code}): {last} (see {log_path})")


def _stop_children() -> None:
    with _CHILDREN_LOCK:
        children = list(_CHILDREN)
    for proc in children:
        if proc.poll() is None:
            proc.terminate()
    for proc in children:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@dataclass
class RunOutcome:
    name: str
    #: Status before this invocation: complete / partial / new.
    before: str
    #: What happened: skipped / resumed / trained / stopped (``stop_after``) / failed.
    action: str
    error: str | None = None


@dataclass
class StudyReport:
    out: Path
    runs: list[StudyRun]
    outcomes: list[RunOutcome] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    table: str = ""
    curves: Path | None = None

    @property
    def failed(self) -> list[RunOutcome]:
        return [o for o in self.outcomes if o.action == "failed"]

    @property
    def stopped(self) -> list[RunOutcome]:
        return [o for o in self.outcomes if o.action == "stopped"]


RunOne = Callable[[StudyRun, bool, int | None], None]


def run_study(
    spec: StudySpec,
    *,
    parallel: int = 1,
    threads: int | None = None,
    run_one: RunOne | None = None,
    log: Callable[[str], None] | None = print,
    plot: bool = True,
) -> StudyReport:
    """Run every planned run that is not complete, then write the table and curves.

    Args:
        spec: the study.
        parallel: runs at once (subprocesses when > 1).
        threads: CPU threads for the whole study (default: all cores), split evenly:
            each run gets ``max(1, threads // parallel)``.
        run_one: ``run_one(run, resume, threads)`` trains one run (default
            :func:`run_in_process` for ``parallel=1``, :func:`run_subprocess` otherwise) —
            a seam for tests and other launchers. An exception from it marks the run
            failed and the study goes on; KeyboardInterrupt stops the study.
        log: progress lines (None: silent).
        plot: draw ``curves.png`` (needs matplotlib; skipped with a note otherwise).

    Returns:
        A :class:`StudyReport`; ``study.md``, ``study.json`` and ``plan.json`` are in
        ``spec.out_dir``.
    """
    from fullsparse.train.checkpoint import atomic_write_bytes

    if parallel < 1:
        raise UserError(f"--parallel must be >= 1, got {parallel}")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    say = log or (lambda _msg: None)
    runs, notes = plan_study(spec)
    for run in runs:
        _check_same_config(run)
    out = spec.out_dir
    out.mkdir(parents=True, exist_ok=True)
    plan = {"spec": spec.to_dict(), "notes": notes, "runs": [_run_dict(r) for r in runs]}
    atomic_write_bytes(out / "plan.json", (json.dumps(plan, indent=2) + "\n").encode())
    for note in notes:
        say(f"note: {note}")
    total_threads = threads or os.cpu_count() or 1
    per_run = max(1, total_threads // parallel)
    if run_one is None:
        run_one = run_in_process if parallel == 1 else run_subprocess
    report = StudyReport(out=out, runs=runs, notes=list(notes))
    statuses = {run.name: run_status(run) for run in runs}
    todo = [run for run in runs if statuses[run.name] != "complete"]
    for run in runs:
        if statuses[run.name] == "complete":
            report.outcomes.append(RunOutcome(run.name, "complete", "skipped"))
    say(
        f"study {out}: {len(runs)} runs, {len(runs) - len(todo)} complete, "
        f"{sum(statuses[r.name] == 'partial' for r in todo)} to resume, "
        f"{sum(statuses[r.name] == 'new' for r in todo)} to start; "
        f"{min(parallel, max(1, len(todo)))} at a time, {per_run} threads each"
    )
    counter = itertools.count(1)
    lock = threading.Lock()

    def execute(run: StudyRun) -> RunOutcome:
        before = statuses[run.name]
        resume = before == "partial"
        with lock:
            i = next(counter)
        say(f"[{i}/{len(todo)}] {run.name}: {'resuming' if resume else 'training'}")
        try:
            run_one(run, resume, per_run)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # one failed run must not stop the others
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            say(f"[{i}/{len(todo)}] {run.name}: FAILED: {first}")
            return RunOutcome(run.name, before, "failed", first)
        after = run_status(run)
        if after == "partial":  # stop_after ended it early: resumable, not a failure
            say(f"[{i}/{len(todo)}] {run.name}: stopped before its last epoch (resumable)")
            return RunOutcome(run.name, before, "stopped")
        if after != "complete":
            say(f"[{i}/{len(todo)}] {run.name}: ended without a checkpoint or summary")
            return RunOutcome(run.name, before, "failed", "ended without a completed summary")
        return RunOutcome(run.name, before, "resumed" if resume else "trained")

    try:
        if parallel == 1:
            for run in todo:
                report.outcomes.append(execute(run))
        else:
            with ThreadPoolExecutor(max_workers=parallel) as pool:
                report.outcomes.extend(pool.map(execute, todo))
    except KeyboardInterrupt:
        _stop_children()
        raise
    report.table, payload = study_table(runs)
    payload.update(notes=notes, outcomes=[o.__dict__ for o in report.outcomes])
    atomic_write_bytes(out / "study.json", (json.dumps(payload, indent=2) + "\n").encode())
    atomic_write_bytes(out / "study.md", (report.table + "\n").encode())
    if plot:
        from fullsparse.analysis.plots import plot_study_curves

        curves = out / "curves.png"
        if plot_study_curves(collect_results(runs), curves, title=str(out)):
            report.curves = curves
        else:
            report.notes.append(
                "curves.png skipped: matplotlib is not installed (pip install 'fullsparse[plot]')"
            )
    return report


def _run_dict(run: StudyRun) -> dict[str, Any]:
    names = ("name", "variant", "recipe", "seed")
    return {**{k: getattr(run, k) for k in names}, "overrides": dict(run.overrides),
            "run_dir": str(run.run_dir)}  # fmt: skip


# ---------------------------------------------------------------------------------------
# Results


def _read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a torn last line of a killed run
    return rows


def collect_results(runs: Sequence[StudyRun]) -> list[dict[str, Any]]:
    """Per run: its plan entry, status, summary (if complete) and per-epoch metrics."""
    results = []
    for run in runs:
        status = run_status(run)
        summary = run.run_dir / "summary.json"
        entry = {**_run_dict(run), "status": status, "summary": None}
        if status == "complete":
            entry["summary"] = json.loads(summary.read_text("utf-8"))
        results.append({**entry, "history": _read_metrics(run.run_dir)})
    return results


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def _cell(mean: float, std: float, n: int, digits: int = 2) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f}" if n < 2 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def study_table(runs: Sequence[StudyRun]) -> tuple[str, dict[str, Any]]:
    """Markdown table and JSON payload: one row per variant, mean ± sample std over the
    seeds whose run is complete."""
    results = collect_results(runs)
    variants: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        variants.setdefault(r["variant"], []).append(r)
    rows = []
    for variant, group in variants.items():
        done = [r["summary"] for r in group if r["summary"] is not None]
        best = _mean_std([s["best_top1"] for s in done])
        final = _mean_std([s["final_top1"] for s in done])
        spe = _mean_std([s["seconds_per_epoch"] for s in done])
        rows.append(
            {
                "variant": variant,
                "recipe": group[0]["recipe"],
                "overrides": group[0]["overrides"],
                "seeds": [r["seed"] for r in group],
                "seeds_done": [r["seed"] for r in group if r["summary"] is not None],
                "n": len(done),
                "best_top1_mean": best[0],
                "best_top1_std": best[1],
                "final_top1_mean": final[0],
                "final_top1_std": final[1],
                "seconds_per_epoch_mean": spe[0],
                "seconds_per_epoch_std": spe[1],
                "sparse_gemm_fraction": mean_account(done),
            }
        )
    payload = {
        "rows": rows,
        "runs": [{k: v for k, v in r.items() if k != "history"} for r in results],
    }
    return format_study_table(rows), payload


def format_study_table(rows: Sequence[dict[str, Any]]) -> str:
    """The markdown of :func:`study_table`'s rows."""
    lines = [
        "| variant | best top-1 (%) | final top-1 (%) | s / epoch | seeds done | sparse GEMMs |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        n = r["n"]
        lines.append(
            f"| {r['variant']} | {_cell(r['best_top1_mean'], r['best_top1_std'], n)} | "
            f"{_cell(r['final_top1_mean'], r['final_top1_std'], n)} | "
            f"{_cell(r['seconds_per_epoch_mean'], r['seconds_per_epoch_std'], n, 1)} | "
            f"{n}/{len(r['seeds'])} | {fraction_text(r.get('sparse_gemm_fraction'))} |"
        )
    lines.append("")
    lines.append("mean ± sample standard deviation over the seeds whose run completed.")
    return "\n".join(lines)
