"""``fullsparse eval --checkpoint PATH``: top-1/top-5 of a checkpoint on its test set, or a
language model's validation loss, perplexity and bits per byte."""

from __future__ import annotations

import argparse
import json
from typing import Any

from fullsparse.commands.output import STDOUT, add_json_argument, save_text

#: The line of ``fullsparse --help`` and the text of ``fullsparse eval --help``.
HELP = "evaluate a checkpoint on its dataset's test split"
DESCRIPTION = (
    "Rebuild the sparse model of a checkpoint and report top-1/top-5 accuracy on the test "
    "split of the dataset it was trained on — or, for a language model (--task lm), "
    "validation loss, perplexity and bits per byte on the run's fixed validation windows; for"
    " a detector (--task detection), COCO mAP, mAP@0.5 and mAP@0.75."
)


def run(args: argparse.Namespace) -> int:
    from fullsparse.train import evaluate_checkpoint

    result = evaluate_checkpoint(
        args.checkpoint,
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        device=args.device,
        amp=args.amp,
        allow_nonfinite=args.allow_nonfinite,
    )
    if args.json == STDOUT:
        print(json.dumps(result, indent=2))
        return 0
    if args.json is not None:
        save_text(args.json, json.dumps(result, indent=2))
    if result.get("task") == "detection":
        print(
            f"{result['model']} / {result['dataset']} / {result['recipe']} "
            f"(epoch {result['epoch']}): mAP {result['map']:.2f}  mAP@0.5 "
            f"{result['map_50']:.2f}  mAP@0.75 {result['map_75']:.2f}  on "
            f"{result['images']} test images"
        )
    elif result.get("task") == "lm":
        print(
            f"{result['model']} / {result['dataset']} / {result['recipe']} "
            f"(epoch {result['epoch']}): val loss {result['loss']:.4f}  perplexity "
            f"{result['perplexity']:.3f}  {result['bits_per_byte']:.3f} bits/byte  "
            f"on {result['tokens']} validation bytes"
        )
    else:
        print(
            f"{result['model']} / {result['dataset']} / {result['recipe']} "
            f"(epoch {result['epoch']}): top-1 {result['top1']:.2f}%  "
            f"top-5 {result['top5']:.2f}%  on {result['images']} test images"
        )
    return 0


def add_parser(subparsers: Any) -> None:
    from fullsparse.train.config import AMP_MODES, DEVICES

    parser = subparsers.add_parser("eval", help=HELP, description=DESCRIPTION)
    required = parser.add_argument_group("required arguments")
    required.add_argument(
        "--checkpoint", metavar="PATH", required=True, help="a run's last.pt or best.pt"
    )
    parser.add_argument("--data-dir", default=None, help="dataset folder, if it moved")
    parser.add_argument(
        "--batch-size", type=int, metavar="INT", default=None,
        help="evaluation batch size (default: the run's)",
    )  # fmt: skip
    parser.add_argument(
        "--device", choices=DEVICES, metavar="DEVICE", default="auto",
        help="where to evaluate",
    )  # fmt: skip
    parser.add_argument(
        "--amp",
        nargs="?",
        const="bf16",
        choices=AMP_MODES,
        metavar="AMP",
        default="none",
        help="autocast, as train's --amp (alone: bf16)",
    )
    add_json_argument(parser, stdout=True)
    parser.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="evaluate even if the checkpoint's weights hold NaN/Inf (refused by default)",
    )
    parser.set_defaults(func=run)
