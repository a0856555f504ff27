"""``fullsparse convert --checkpoint PATH --out FILE``: a sharded checkpoint of
``fullsparse train --fsdp`` (``last.pt``/``best.pt`` and the run's ``shards/`` folder) as one
single-file checkpoint."""

from __future__ import annotations

import argparse
from typing import Any

#: The line of ``fullsparse --help`` and the text of ``fullsparse convert --help``.
HELP = "write a sharded (--fsdp) checkpoint as one single-file checkpoint"
DESCRIPTION = (
    "Under --fsdp every process writes its own shards of the model and optimizer state into "
    "the run folder's shards/ folder, and last.pt/best.pt name them. eval, export and "
    "--resume read such a checkpoint in place; convert writes it as one file (the format of a "
    "single-process run) to copy or keep without the folder. It reads the whole model in "
    "this process."
)


def run(args: argparse.Namespace) -> int:
    from fullsparse.train import convert_checkpoint

    out = convert_checkpoint(args.checkpoint, args.out, force=args.force)
    print(f"wrote {out} (a single-file checkpoint of {args.checkpoint})")
    return 0


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("convert", help=HELP, description=DESCRIPTION)
    required = parser.add_argument_group("required arguments")
    required.add_argument(
        "--checkpoint",
        metavar="PATH",
        required=True,
        help="a sharded last.pt or best.pt (its run folder's shards/ beside it)",
    )
    required.add_argument("--out", metavar="FILE", required=True, help="the file to write")
    parser.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    parser.set_defaults(func=run)
