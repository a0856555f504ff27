"""``fullsparse train``: parse flags, layer them over ``--config``, call fullsparse.train.

Every flag maps to a TrainConfig field of the same name (dashes for underscores). Flags are
parsed as text and converted here, so a bad value is one ``error:`` line (exit 2) naming
the field, like a bad config-file value — not an argparse usage dump.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

from fullsparse.errors import ConfigError

_BOOL = "bool"


#: The line of ``fullsparse --help`` and the text of ``fullsparse train --help``.
HELP = "train a model with a sparsity recipe (default: ResNet-20, Fashion-MNIST, fst)"
DESCRIPTION = (
    "Train a model from scratch with a 2:4 recipe. With no arguments: ResNet-20 on "
    "Fashion-MNIST with the fst recipe for 2 epochs. With --task lm: a byte-level GPT "
    "(gpt_tiny) on the Python standard library's sources, AdamW, epochs of --steps-per-epoch "
    "steps, validation loss/perplexity/bits per byte. With --task detection: a torchvision "
    "detector (fcos_tiny by default) on generated shapes or COCO/VOC folders, AdamW, COCO "
    "mAP. Under torchrun, trains data-parallel (DDP; not for detection)."
)


def _shown(value: Any) -> str:
    """A default as the help shows it (booleans as on/off)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:,}".replace(",", "") if isinstance(value, int) else f"{value}"


def _help(f: dataclasses.Field) -> str:
    """The field's help with its default: the field's own, or each task's."""
    text = f.metadata["help"]
    if "default" in text:
        return text
    if f.default is None:
        from fullsparse.train.config import TASKS, task_defaults

        by_task = {
            task: task_defaults(
                SimpleNamespace(task=task, dataset=None, data_dir=None, epochs=2)
            ).get(f.name)
            for task in TASKS
        }
        shown = [f"{task} {_shown(v)}" for task, v in by_task.items() if v is not None]
        return f"{text} (default: {', '.join(shown)})" if shown else text
    if f.default is dataclasses.MISSING or f.metadata["cli"] == "flag":
        return text
    return f"{text} (default {_shown(f.default)})"


def cli_options() -> Iterator[tuple[str, str, str, str | None]]:
    """(field name, kind, help, cli) of every TrainConfig field, in declaration order: what
    the ``train``/``compare``/``study`` flags are built from."""
    from fullsparse.train.config import TrainConfig, field_spec

    for f in dataclasses.fields(TrainConfig):
        yield f.name, field_spec(f)[0], _help(f), f.metadata["cli"]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_train_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per TrainConfig field (``--name-with-dashes``), built from the field's
    declaration (:func:`fullsparse.train.config.cli_options`); ``skip`` names fields the
    command sets its own way. Shared by ``train``, ``compare`` and ``study``."""
    parser.add_argument(
        "--config",
        dest="config_file",
        metavar="FILE",
        default=None,
        help="run config (.yaml needs PyYAML, or .json); flags override it",
    )
    for name, kind, help_text, cli in cli_options():
        if name in skip:
            continue
        common = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        if cli == "flag":
            parser.add_argument(_flag(name), action="store_true", **common)
        elif cli == "append":  # repeated or comma-separated: a list the config joins
            parser.add_argument(_flag(name), action="append", metavar="NAMES", **common)
        elif cli is not None and cli.startswith("optional:"):
            const: Any = cli.removeprefix("optional:")
            const = True if const == "True" else const
            metavar = "CHECKPOINT" if name == "resume" else "MODE"
            parser.add_argument(_flag(name), nargs="?", const=const, metavar=metavar, **common)
        elif kind == _BOOL:
            parser.add_argument(_flag(name), action=argparse.BooleanOptionalAction, **common)
        else:
            metavar = {"dict": "JSON", "str": None}.get(kind, kind.upper())
            parser.add_argument(_flag(name), metavar=metavar, **common)


def _convert(name: str, kind: str, text: str) -> Any:
    """A flag's text as the field's value; a bad one is a one-line ConfigError."""
    if name in ("train_subset", "test_subset") and text.lower() in ("all", "none"):
        return None
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
    except ValueError:
        raise ConfigError(f"{_flag(name)} expects {kind}, got {text!r}") from None
    if kind == "dict":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{_flag(name)} expects JSON: {exc}") from None
    return text


def overrides_from_args(args: argparse.Namespace, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The TrainConfig fields given explicitly on the command line (but ``skip``)."""
    given = vars(args)
    out: dict[str, Any] = {}
    for name, kind, _, _ in cli_options():
        if name in given and name not in skip:
            value = given[name]
            textual = isinstance(value, str) and kind != "bool_or_str"
            out[name] = _convert(name, kind, value) if textual else value
    return out


def config_from_args(args: argparse.Namespace) -> Any:
    from fullsparse.train.config import config_from_sources

    return config_from_sources(args.config_file, overrides_from_args(args))


def run(args: argparse.Namespace) -> int:
    from fullsparse.train import train
    from fullsparse.train.run_folder import resume_config

    # --resume continues the saved run: its config.json, with only the flags that may change
    config = resume_config(args.config_file, overrides_from_args(args))
    train(config)
    return 0


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("train", help=HELP, description=DESCRIPTION)
    add_train_arguments(parser)
    parser.set_defaults(func=run)
