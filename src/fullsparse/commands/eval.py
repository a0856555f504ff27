"""``fullsparse eval --checkpoint PATH``: top-1/top-5 of a checkpoint on its test set, or a
language model's validation loss, perplexity and bits per byte."""

from __future__ import annotations

import argparse
import json
from typing import Any

from fullsparse.errors import ConfigError, UserError

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

    if not args.checkpoint:
        raise UserError("fullsparse eval needs --checkpoint PATH (a run's last.pt or best.pt)")
    batch_size = None
    if args.batch_size is not None:
        try:
            batch_size = int(args.batch_size)
        except ValueError:
            raise ConfigError(f"--batch-size expects int, got {args.batch_size!r}") from None
    result = evaluate_checkpoint(
        args.checkpoint,
        data_dir=args.data_dir,
        batch_size=batch_size,
        device=args.device,
        amp=args.amp,
        allow_nonfinite=args.allow_nonfinite,
    )
    if args.json:
        print(json.dumps(result, indent=2))
    elif result.get("task") == "detection":
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
    parser = subparsers.add_parser("eval", help=HELP, description=DESCRIPTION)
    parser.add_argument("--checkpoint", metavar="PATH", default=None, help="a last.pt/best.pt")
    parser.add_argument("--data-dir", default=None, help="dataset folder, if it moved")
    parser.add_argument("--batch-size", default=None, help="evaluation batch size")
    parser.add_argument("--device", default="auto", help="auto|cpu|cuda")
    parser.add_argument("--amp", default="none", help="none|bf16|fp16 autocast")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="evaluate even if the checkpoint's weights hold NaN/Inf (refused by default)",
    )
    parser.set_defaults(func=run)
