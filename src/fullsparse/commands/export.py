"""``fullsparse export --checkpoint PATH --out FILE``: 2:4-pruned weights, plain state_dict."""

from __future__ import annotations

import argparse
from typing import Any

from fullsparse.errors import UserError

#: The line of ``fullsparse --help`` and the text of ``fullsparse export --help``.
HELP = "write a checkpoint's 2:4-pruned weights as a plain state_dict"
DESCRIPTION = (
    "Export the inference weights of a checkpoint: every sparse layer's weight is its pruned "
    "forward weight, verified 2:4 along K. The file loads into the dense model "
    "(fullsparse.models.build_model) with load_state_dict; FILE.json holds the build "
    "arguments."
)


def run(args: argparse.Namespace) -> int:
    from fullsparse.train import export_checkpoint

    if not args.checkpoint or not args.out:
        raise UserError("fullsparse export needs --checkpoint PATH and --out FILE")
    report = export_checkpoint(args.checkpoint, args.out, force=args.force)
    print(report)
    print(f"wrote {report.out} (load into the dense model; build arguments in {report.meta_path})")
    return 0


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("export", help=HELP, description=DESCRIPTION)
    parser.add_argument("--checkpoint", metavar="PATH", default=None, help="a last.pt/best.pt")
    parser.add_argument("--out", metavar="FILE", default=None, help="output .pt file")
    parser.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    parser.set_defaults(func=run)
