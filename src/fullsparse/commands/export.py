"""``fullsparse export --checkpoint PATH --out FILE``: 2:4-pruned weights, plain state_dict
(``--format pt|safetensors``), verified 2:4 in the conv layout (``--layout im2col|channel``)."""

from __future__ import annotations

import argparse
from typing import Any

#: The line of ``fullsparse --help`` and the text of ``fullsparse export --help``.
HELP = "write a checkpoint's 2:4-pruned weights as a plain state_dict"
DESCRIPTION = (
    "Export the inference weights of a checkpoint: every sparse layer's weight is its pruned "
    "forward weight, verified 2:4 along K in the conv layout it was trained with. The file "
    "loads into the dense model (fullsparse.models.build_model) with load_state_dict; "
    "FILE.json holds the build arguments."
)


def run(args: argparse.Namespace) -> int:
    from fullsparse.train import export_checkpoint

    report = export_checkpoint(
        args.checkpoint, args.out, force=args.force, layout=args.layout, fmt=args.format
    )
    print(report)
    print(f"wrote {report.out} (load into the dense model; build arguments in {report.meta_path})")
    return 0


def add_parser(subparsers: Any) -> None:
    from fullsparse.config import CONV_LAYOUT
    from fullsparse.train.inference import EXPORT_FORMATS

    parser = subparsers.add_parser("export", help=HELP, description=DESCRIPTION)
    required = parser.add_argument_group("required arguments")
    required.add_argument(
        "--checkpoint", metavar="PATH", required=True, help="a run's last.pt or best.pt"
    )
    required.add_argument("--out", metavar="FILE", required=True, help="the file to write")
    parser.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    parser.add_argument(
        "--layout",
        choices=CONV_LAYOUT,
        metavar="LAYOUT",
        default=None,
        help="conv layout the weights must be 2:4 in: im2col (groups of 4 along Ci*kh*kw) or "
        "channel (4 input channels at each kernel tap: ASP/TensorRT) (default: the one the "
        "run trained with, --conv-layout; another one is refused)",
    )
    parser.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        metavar="FORMAT",
        default="pt",
        help="pt (torch.save state_dict) or safetensors (needs the export extra)",
    )
    parser.set_defaults(func=run)
