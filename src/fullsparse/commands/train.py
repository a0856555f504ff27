"""``fullsparse train``: parse flags, layer them over ``--config``, call fullsparse.train.

Every flag maps to a TrainConfig field of the same name (dashes for underscores), and its
type, ``choices``, help, default and argument group are read from the field's declaration.
Numbers are parsed as text and converted here, so a bad value is one ``error:`` line (exit
2) naming the field, like a bad config-file value; a name outside a field's canonical tuple
is refused by the parser, in one line too (``fullsparse.cli``).
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


#: ``train --help`` in groups: a field starts the group named here, and the fields declared
#: after it (in :class:`~fullsparse.train.config.TrainConfig`) join it until the next one.
GROUPS = {
    "task": "what is trained",
    "recipe": "sparsity (recipe and overrides)",
    "mask_interval": "schedules",
    "optimizer": "optimisation",
    "device": "execution",
    "out": "run folder and output",
}


def _shown(value: Any) -> str:
    """A default as the help shows it (booleans as on/off)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:,}".replace(",", "") if isinstance(value, int) else f"{value}"


#: Placeholders a field's help may hold, each the names of a canonical tuple (for the
#: fields that also take free names, so they have no ``choices``), as (module, name).
NAME_LISTS = {
    "MODELS": ("fullsparse.models", "MODELS"),
    "LM_MODELS": ("fullsparse.models", "LM_MODELS"),
    "DETECTION_MODELS": ("fullsparse.models.detection", "DETECTION_MODELS"),
    "DATASETS": ("fullsparse.data", "DATASETS"),
    "LM_DATASETS": ("fullsparse.train.config", "LM_DATASETS"),
    "DETECTION_DATASETS": ("fullsparse.train.config", "DETECTION_DATASETS"),
}


def _names(text: str) -> str:
    """``text`` with each ``{NAME}`` of :data:`NAME_LISTS` replaced by the tuple's names."""
    import importlib

    for key, (module, attr) in NAME_LISTS.items():
        if "{" + key + "}" in text:
            names = getattr(importlib.import_module(module), attr)
            text = text.replace("{" + key + "}", ", ".join(names))
    return text


def _help(f: dataclasses.Field) -> str:
    """The field's help with its default — the field's own, or each task's — written the
    one way every command writes it (``(default: VALUE)``, as :class:`fullsparse.cli.
    HelpFormatter` does; the formatter lists a name field's values after it)."""
    text = _names(f.metadata["help"])
    if "default" not in text:
        if f.default is None:
            from fullsparse.train.config import TASKS, task_defaults

            by_task = {
                task: task_defaults(
                    SimpleNamespace(task=task, dataset=None, data_dir=None, epochs=2)
                ).get(f.name)
                for task in TASKS
            }
            shown = [f"{task} {_shown(v)}" for task, v in by_task.items() if v is not None]
            text = f"{text} (default: {', '.join(shown)})" if shown else text
        elif f.default is not dataclasses.MISSING:
            text = f"{text} (default: {_shown(f.default)})"
    return text


def cli_options() -> Iterator[tuple[str, str, str, str | None]]:
    """(field name, kind, help, cli) of every TrainConfig field, in declaration order: what
    the ``train``/``compare``/``study`` flags are built from."""
    from fullsparse.train.config import TrainConfig, field_spec

    for f in dataclasses.fields(TrainConfig):
        yield f.name, field_spec(f)[0], _help(f), f.metadata["cli"]


def field_choices() -> dict[str, tuple[str, ...]]:
    """The canonical tuple of every TrainConfig name field that has one (``recipe``:
    :data:`fullsparse.RECIPES`, ...)."""
    from fullsparse.train.config import TrainConfig

    return {
        f.name: f.metadata["choices"]
        for f in dataclasses.fields(TrainConfig)
        if f.metadata.get("choices")
    }


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_train_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per TrainConfig field (``--name-with-dashes``), built from the field's
    declaration (:func:`cli_options`), in the argument groups of :data:`GROUPS`; ``skip``
    names fields the command sets its own way. Shared by ``train``, ``compare`` and
    ``study``. Name fields take only their canonical values (``choices``); a bool field
    ``no_<x>`` is the pair ``--no-<x>`` (true) / ``--<x>`` (false)."""
    parser.add_argument(
        "--config",
        dest="config_file",
        metavar="FILE",
        default=None,
        help="run config (.json, or .yaml with the yaml extra); flags override it",
    )
    choices = field_choices()
    group: Any = parser
    for name, kind, help_text, cli in cli_options():
        if name in GROUPS:
            group = parser.add_argument_group(GROUPS[name])
        if name in skip:
            continue
        common: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        if name in choices and cli != "append":
            common.update(choices=choices[name], metavar=name.upper())
        if cli == "append":  # repeated or comma-separated: a list the config joins
            group.add_argument(_flag(name), action="append", metavar="NAMES", **common)
        elif kind == _BOOL and name.startswith("no_"):
            group.add_argument(_flag(name), action="store_const", const=True, **common)
            positive = _flag(name.removeprefix("no_"))
            common["help"] = f"the opposite of {_flag(name)}"
            group.add_argument(positive, action="store_const", const=False, **common)
        elif cli is not None and cli.startswith("optional:"):
            const: Any = cli.removeprefix("optional:")
            const = True if const == "True" else const
            common.setdefault("metavar", "CHECKPOINT" if name == "resume" else "MODE")
            group.add_argument(_flag(name), nargs="?", const=const, **common)
        elif kind == _BOOL:
            group.add_argument(_flag(name), action=argparse.BooleanOptionalAction, **common)
        else:
            common.setdefault("metavar", {"dict": "JSON", "str": None}.get(kind, kind.upper()))
            group.add_argument(_flag(name), **common)


class _Refused(argparse.Action):
    """A flag a command does not take (hidden from its help): one ``error:`` line, exit 2,
    with what to use instead — never accepted and dropped."""

    def __init__(self, option_strings: list[str], dest: str, hint: str = "", **kw: Any) -> None:
        self.hint = hint
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS, **kw)

    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        parser.error(f"{option} is not taken by this command; {self.hint}")


def refuse_flags(parser: argparse.ArgumentParser, hints: dict[str, str]) -> None:
    """Make each train flag of ``hints`` (field name -> what to use instead) a refused one:
    for the fields a command sets its own way and skips in :func:`add_train_arguments`."""
    kinds = {name: (kind, cli) for name, kind, _, cli in cli_options()}
    for name, hint in hints.items():
        flags = [_flag(name)]
        if kinds[name] == (_BOOL, None):  # an on/off pair: both spellings
            flags.append("--no-" + name.replace("_", "-"))
        for flag in flags:
            parser.add_argument(
                flag, dest=f"_refused_{name}", action=_Refused, hint=hint,
                default=argparse.SUPPRESS,
            )  # fmt: skip


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
    for name, kind, _, cli in cli_options():
        if name in given and name not in skip:
            value = given[name]
            if cli == "append":  # a repeated flag: its values joined, as the config keeps them
                value = ",".join(value)
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
