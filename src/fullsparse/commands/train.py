"""``fullsparse train``: parse flags, layer them over ``--config``, call fullsparse.train.

Every flag maps to a TrainConfig field of the same name (dashes for underscores). Flags are
parsed as text and converted here, so a bad value is one ``error:`` line (exit 2) naming
the field, like a bad config-file value — not an argparse usage dump.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from fullsparse.errors import ConfigError

# (flag, kind, help). kind: int | float | str | json | bool (--x / --no-x, so a flag can
# turn off what a config file turned on) | flag (store_true). Defaults live in TrainConfig.
_TRAIN_FLAGS: tuple[tuple[str, str, str], ...] = (
    (
        "--task",
        "str",
        "classify (images, default) | lm (byte-level language model) | detection "
        "(torchvision detectors; the vision extra)",
    ),
    (
        "--model",
        "str",
        "classify: resnet20 (default)|resnet32|resnet56|resnet18|resnet50|vit_tiny|"
        "tv:<name>; lm: gpt_tiny (default); detection: fcos_tiny (default)|"
        "fasterrcnn_resnet50_fpn|retinanet_resnet50_fpn|ssd300_vgg16",
    ),
    (
        "--model-kwargs",
        "json",
        "extra model options as JSON, e.g. '{\"depth\": 2}' or, for gpt_tiny, "
        '\'{"context": 128, "depth": 4, "embed_dim": 128, "num_heads": 4}\'',
    ),
    (
        "--dataset",
        "str",
        "classify: fashion-mnist (default)|cifar10|cifar100|imagefolder|synthetic; "
        "lm: pystdlib (default: Python's standard library) | text (--data-dir folder); "
        "detection: synthetic-det (default, generated shapes) | coco | voc (--data-dir)",
    ),
    (
        "--data-dir",
        "str",
        "dataset folder (default: $FULLSPARSE_DATA, system locations); lm: a folder of "
        ".py/.txt/.md/.rst files",
    ),
    (
        "--image-size",
        "int",
        "input resolution (default: the dataset's; detection: the detector's resize side, "
        "128 for synthetic-det)",
    ),
    (
        "--train-subset",
        "int",
        "train on a fixed random subset of N images (default 10000 "
        "for a short main job; 'all' for full epochs)",
    ),
    ("--test-subset", "int", "evaluate on the first N test images (lm: validation windows)"),
    ("--synthetic-train", "int", "synthetic dataset: train images"),
    ("--synthetic-test", "int", "synthetic dataset: test images"),
    ("--synthetic-classes", "int", "synthetic dataset: classes (synthetic-det: 1-5 shapes)"),
    ("--text-train-bytes", "int", "lm: bytes of training text read (default 4000000)"),
    ("--text-val-bytes", "int", "lm: bytes of validation text read (default 400000)"),
    ("--recipe", "str", "dense|srste|tsm|fst2|fst_noir|fst|wg|wx|gg|gx (default fst)"),
    ("--ir-alpha", "float", "override: information-restoration strength α"),
    ("--decay", "float", "override: SR-STE decay λ"),
    ("--grad-input-source", "str", "override: dense|pruned source of the backward mask"),
    ("--tsm-interval", "int", "override: steps between TSM mask recomputations"),
    (
        "--conv-layout",
        "str",
        "override: im2col|channel grouping of conv weights for 2:4 (channel: ASP/TensorRT)",
    ),
    ("--optimizer", "str", "sgd|adamw (default: sgd for classify, adamw for lm and detection)"),
    ("--epochs", "int", "epochs (default 2)"),
    ("--steps-per-epoch", "int", "lm: optimizer steps per epoch (default 200)"),
    (
        "--batch-size",
        "int",
        "global batch size over all processes (default 128; lm: sequences of context bytes)",
    ),
    ("--lr", "float", "peak lr (default: sgd 0.1 x batch/256, adamw 3e-3)"),
    ("--momentum", "float", "SGD momentum, or AdamW beta1 (default 0.9)"),
    ("--weight-decay", "float", "weight decay (default: classify 7e-5, lm 0.1, detection 0.05)"),
    ("--no-wd-bn-bias", "flag", "no weight decay on norm layers and biases (lm: default)"),
    ("--label-smoothing", "float", "label smoothing (default: classify 0.1, lm 0)"),
    (
        "--warmup-epochs",
        "float",
        "linear warm-up epochs before the cosine decay (default: classify 0, lm 10%% of the run)",
    ),
    (
        "--grad-clip",
        "float",
        "clip the gradient norm, 0 = off (default: lm 1.0, detection 10, else 0)",
    ),
    ("--seed", "int", "random seed (default 0)"),
    ("--workers", "int", "data loader worker processes (image folders)"),
    ("--device", "str", "auto|cpu|cuda (default auto)"),
    ("--channels-last", "bool", "channels-last memory format"),
    ("--compile", "bool", "torch.compile the model (refused clearly if it cannot work)"),
    ("--sync-bn", "bool", "SyncBatchNorm under torchrun (global batch statistics)"),
    ("--deterministic", "bool", "deterministic algorithms: bit-identical reruns and resumes"),
    ("--skip-nonfinite", "bool", "skip steps with a NaN/Inf loss or gradient instead of stopping"),
    ("--out", "str", "run folder (default runs/<dataset>-<model>-<recipe>-seed<seed>)"),
    ("--force", "bool", "replace the results in an existing run folder"),
    ("--stop-after", "int", "end this invocation after epoch N (resume later)"),
    ("--checkpoint-every", "int", "also write last.pt every N steps within an epoch (classify)"),
    ("--progress", "bool", "progress bar on stderr (default on)"),
    ("--quiet", "bool", "print nothing but errors (train.log still gets everything)"),
    ("--plot", "bool", "draw curves.png when matplotlib is installed (default on)"),
)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The TrainConfig flags (shared by ``train`` and ``compare``)."""
    parser.add_argument(
        "--config",
        dest="config_file",
        metavar="FILE",
        default=None,
        help="run config (.yaml needs PyYAML, or .json); flags override it",
    )
    for flag, kind, help_text in _TRAIN_FLAGS:
        dest = _dest(flag)
        if kind == "flag":
            parser.add_argument(
                flag, dest=dest, action="store_true", default=argparse.SUPPRESS, help=help_text
            )
        elif kind == "bool":
            parser.add_argument(
                flag,
                dest=dest,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            parser.add_argument(
                flag,
                dest=dest,
                metavar=kind.upper() if kind != "str" else None,
                default=argparse.SUPPRESS,
                help=help_text,
            )
    parser.add_argument(
        "--amp",
        nargs="?",
        const="bf16",
        default=argparse.SUPPRESS,
        metavar="MODE",
        help="autocast: bf16 (the default when given alone; CPU and CUDA) or fp16 (CUDA, "
        "with a GradScaler); none to turn off a config file's setting",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=argparse.SUPPRESS,
        metavar="CHECKPOINT",
        help="continue the run in --out from its last.pt (or from CHECKPOINT)",
    )


def _convert(dest: str, kind: str, text: str) -> Any:
    if dest in ("train_subset", "test_subset") and text.lower() in ("all", "none"):
        return None
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
    except ValueError:
        raise ConfigError(f"--{dest.replace('_', '-')} expects {kind}, got {text!r}") from None
    if kind == "json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--{dest.replace('_', '-')} expects JSON: {exc}") from None
    return text


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields given explicitly on the command line."""
    given = vars(args)
    out: dict[str, Any] = {}
    for flag, kind, _ in _TRAIN_FLAGS:
        dest = _dest(flag)
        if dest in given:
            value = given[dest]
            out[dest] = _convert(dest, kind, value) if isinstance(value, str) else value
    for dest in ("amp", "resume"):
        if dest in given:
            out[dest] = given[dest]
    return out


def config_from_args(args: argparse.Namespace) -> Any:
    from fullsparse.train.config import config_from_sources

    return config_from_sources(args.config_file, overrides_from_args(args))


def run(args: argparse.Namespace) -> int:
    from fullsparse.train import train

    config = config_from_args(args)
    train(config)
    return 0


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model with a sparsity recipe (default: ResNet-20, Fashion-MNIST, fst)",
        description="Train a model from scratch with a 2:4 recipe. With no arguments: "
        "ResNet-20 on Fashion-MNIST with the fst recipe for 2 epochs. With --task lm: a "
        "byte-level GPT (gpt_tiny) on the Python standard library's sources, AdamW, "
        "epochs of --steps-per-epoch steps, validation loss/perplexity/bits per byte. With "
        "--task detection: a torchvision detector (fcos_tiny by default) on generated "
        "shapes or COCO/VOC folders, AdamW, COCO mAP. Under torchrun, trains data-parallel "
        "(DDP; not for detection).",
    )
    add_train_arguments(parser)
    parser.set_defaults(func=run)
