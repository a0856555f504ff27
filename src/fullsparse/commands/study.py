"""``fullsparse study``: a resumable grid of training runs (recipes × seeds × overrides).

The grid comes from ``--spec study.yaml`` and/or flags; the shared run settings from every
``fullsparse train`` flag (and ``--config``). Precedence, lowest first: TrainConfig
defaults, ``--config`` file, the spec's ``base``, explicit train flags. Rerunning the same
command skips complete runs and resumes interrupted ones.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from fullsparse.commands.train import add_train_arguments, overrides_from_args, refuse_flags
from fullsparse.errors import ConfigError

#: The line of ``fullsparse --help`` and the text of ``fullsparse study --help``.
HELP = "run a grid of trainings (recipes × seeds × overrides), resumable; one table"
DESCRIPTION = (
    "Train every combination of --recipes, --seeds and --grid values into "
    "OUT/<recipe>[-<key><value>]-seed<seed>/, skipping complete runs and resuming interrupted"
    " ones, then write OUT/study.md (mean ± std over seeds of best and final top-1, s/epoch),"
    " study.json and curves.png. Takes every train flag for the shared settings; --out is the"
    " study folder (default: runs/study-<dataset>-<model>)."
)


#: Train flags the study sets per run, refused on its command line (with what to use).
SET_PER_RUN = {
    "recipe": "the study sets it per run: use --recipes",
    "seed": "the study sets it per run: use --seeds",
    "resume": "interrupted runs are resumed automatically",
    "force": "delete a run's folder to rerun it",
}


def _parse_value(text: str) -> Any:
    """A grid value from the command line: JSON (numbers, true/false, null) or a string."""
    if text.lower() in ("none", "null", "default"):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def _grid_from_flags(items: list[str]) -> dict[str, tuple[Any, ...]]:
    grid: dict[str, tuple[Any, ...]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key or not values.strip():
            raise ConfigError(f"--grid expects KEY=V1,V2,..., got {item!r}")
        if key in grid:
            raise ConfigError(f"--grid {key} is given twice")
        grid[key] = tuple(_parse_value(v.strip()) for v in values.split(","))
    return grid


def spec_from_args(args: argparse.Namespace) -> Any:
    """The StudySpec of the command line: spec file, then flags over it."""
    from fullsparse.analysis.study import StudySpec, load_study_spec
    from fullsparse.train.config import load_config_file

    spec = load_study_spec(args.spec) if args.spec else StudySpec()
    overrides = overrides_from_args(args, skip=("threads",))
    out = overrides.pop("out", None)
    base: dict[str, Any] = {}
    if args.config_file:
        base.update(
            {str(k).replace("-", "_"): v for k, v in load_config_file(args.config_file).items()}
        )
    base.update(spec.base)
    base.update(overrides)
    recipes = spec.recipes
    if args.recipes:
        recipes = tuple(r.strip() for r in args.recipes.split(",") if r.strip())
    seeds = spec.seeds
    if args.seeds:
        try:
            seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
        except ValueError:
            raise ConfigError(f"--seeds expects integers like 0,1,2, got {args.seeds!r}") from None
    grid = dict(spec.grid)
    grid.update(_grid_from_flags(args.grid or []))
    return StudySpec(
        recipes=recipes, seeds=seeds, grid=grid, base=base, out=out if out else spec.out
    )


def run(args: argparse.Namespace) -> int:
    from fullsparse.analysis.study import plan_study, run_status, run_study, study_table

    spec = spec_from_args(args)
    if args.dry_run or args.table_only:
        runs, notes = plan_study(spec)
        for note in notes:
            print(f"note: {note}")
        if args.dry_run:
            print(f"study {spec.out_dir}: {len(runs)} runs")
            for r in runs:
                print(f"  {r.name:40s} {run_status(r):8s} {r.run_dir}")
            return 0
        table, _ = study_table(runs)
        print(table)
        return 0
    report = run_study(
        spec,
        parallel=args.parallel,
        threads=args.threads,
        log=None if args.quiet_study else print,
        plot=getattr(args, "plot", True),
    )
    print()
    print(report.table)
    for note in report.notes:
        print(f"note: {note}")
    print(
        f"saved {report.out / 'study.md'}, study.json, plan.json"
        + (", curves.png" if report.curves else "")
    )
    if report.stopped:
        print(
            f"{len(report.stopped)} run(s) stopped early (--stop-after); rerun the command "
            "without it to finish them"
        )
    if report.failed:
        names = ", ".join(o.name for o in report.failed)
        print(f"{len(report.failed)} run(s) failed: {names}; rerun the command to retry them")
        return 1
    return 0


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("study", help=HELP, description=DESCRIPTION)
    g = parser.add_argument_group("the grid")
    g.add_argument(
        "--spec",
        metavar="FILE",
        default=None,
        help="study spec (.json, or .yaml with the yaml extra) with keys out, recipes, seeds, "
        "grid, base; flags override it",
    )
    g.add_argument("--recipes", default=None, help="comma-separated recipes (default: dense,fst)")
    g.add_argument("--seeds", default=None, help="comma-separated seeds (default: 0)")
    g.add_argument(
        "--grid",
        action="append",
        metavar="KEY=V1,V2",
        help="a TrainConfig field and its values, e.g. ir_alpha=1.0,0.03 (repeatable; "
        "a cartesian product)",
    )
    g = parser.add_argument_group("running the study")
    g.add_argument("--parallel", type=int, default=1, help="runs at once (subprocesses if > 1)")
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for the whole study, split evenly over --parallel (default: all)",
    )
    g.add_argument("--dry-run", action="store_true", help="print the plan and each run's status")
    g.add_argument(
        "--table-only", action="store_true", help="only tabulate the runs already in OUT"
    )
    g.add_argument(
        "--quiet-study", action="store_true", help="no study progress lines (runs still log)"
    )
    add_train_arguments(parser, skip=("threads", *SET_PER_RUN))
    refuse_flags(parser, SET_PER_RUN)
    parser.set_defaults(func=run)
