"""``fullsparse compare``: the same run under several recipes, one table (markdown + JSON)."""

from __future__ import annotations

import argparse
from typing import Any

from fullsparse.commands.train import add_train_arguments, overrides_from_args, refuse_flags
from fullsparse.errors import ConfigError
from fullsparse.recipes import COMPARE_RECIPES

#: The line of ``fullsparse --help`` and the text of ``fullsparse compare --help``.
HELP = "train several recipes with identical settings and print one table"
DESCRIPTION = (
    "Train the same model/data/schedule once per recipe (default: dense, fst and "
    "fst_mvue) into OUT/<recipe>/ and print best/final top-1 (with --task lm: "
    "validation loss, perplexity, bits per byte) and time per epoch side by side; the table "
    "is also written to OUT/compare.md and OUT/compare.json. Takes every train flag; --out is "
    "the comparison folder (default: runs/compare-<dataset>-<model>-seed<seed>)."
)


def run(args: argparse.Namespace) -> int:
    from fullsparse.train import compare
    from fullsparse.train.config import config_from_sources

    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if not recipes:
        raise ConfigError("--recipes needs a comma-separated list, e.g. dense,fst")
    overrides = overrides_from_args(args)
    out = overrides.pop("out", None)
    config = config_from_sources(args.config_file, overrides)
    result = compare(config, recipes, out=out if out is not None else config.out)
    if config.quiet:
        return 0
    print()
    print(result.text_table())
    for note in result.notes:
        print(f"note: {note}")
    print(f"table: {result.out / 'compare.md'} and {result.out / 'compare.json'}")
    return 0


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("compare", help=HELP, description=DESCRIPTION)
    parser.add_argument(
        "--recipes",
        metavar="RECIPES",
        default=",".join(COMPARE_RECIPES),
        help="comma-separated recipes",
    )
    add_train_arguments(parser, skip=("recipe",))
    refuse_flags(parser, {"recipe": "compare trains each of --recipes"})
    parser.set_defaults(func=run)
