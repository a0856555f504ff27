"""The command line is generated from one source: every command's parser (every subcommand,
nested ``bench`` and ``analyze`` ones included) is walked and held to the same rules.

- a name option takes exactly the values of its canonical tuple in the code (``choices``)
  and its help lists them; no help lists ``a|b`` alternatives the parser does not check;
- every recipe of :data:`fullsparse.RECIPES` and every weight-gradient mode appear in
  ``train --help``;
- JSON output is ``--json PATH`` wherever a command writes JSON;
- every option with a default shows it, written one way: ``(default: VALUE)``;
- no option is accepted and then ignored: ``compare`` and ``study`` pass every train flag
  they take into the runs (or refuse it), and every other command reads each option.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
from collections.abc import Iterator

import pytest

from fullsparse import RECIPES
from fullsparse.analysis.fidelity import REFERENCES
from fullsparse.bench.cases import INPUT_SETS
from fullsparse.bench.gpu_common import GPU_DTYPES
from fullsparse.bench.steps import STEP_DEVICES
from fullsparse.cli import build_parser, main
from fullsparse.commands.analyze import SPLITS
from fullsparse.config import (
    CONV_LAYOUT,
    CONV_SAMPLE_UNIT,
    DECAY_KIND,
    GRAD_INPUT_SOURCE,
    GRAD_WEIGHT_MODE,
    OUTPUT_WEIGHT,
)
from fullsparse.kernels.dispatch import BACKENDS
from fullsparse.train.config import (
    AMP_MODES,
    DEVICES,
    LOG_LEVELS,
    OPTIMIZERS,
    TASKS,
    TrainConfig,
    config_from_sources,
)
from fullsparse.train.inference import EXPORT_FORMATS
from fullsparse.train.schedule import DENSE_FINISH_MODES
from test_train_flags import FLAGS

#: The name options of the train flags (train, compare, study) and their canonical tuples.
TRAIN_ENUMS = {
    "task": TASKS,
    "recipe": RECIPES,
    "grad_input_source": GRAD_INPUT_SOURCE,
    "conv_layout": CONV_LAYOUT,
    "conv_sample_unit": CONV_SAMPLE_UNIT,
    "decay_kind": DECAY_KIND,
    "output_weight": OUTPUT_WEIGHT,
    "grad_weight_mode": GRAD_WEIGHT_MODE,
    "grad_weight_mode_linear": GRAD_WEIGHT_MODE,
    "dense_finish_mode": DENSE_FINISH_MODES,
    "optimizer": OPTIMIZERS,
    "device": DEVICES,
    "amp": AMP_MODES,
    "backend": BACKENDS,
    "log_level": LOG_LEVELS,
}
TRAIN_COMMANDS = {("train",), ("compare",), ("study",)}
#: The name options of the other commands: (command path, dest) -> canonical tuple.
OTHER_ENUMS = {
    (("eval",), "device"): DEVICES,
    (("eval",), "amp"): AMP_MODES,
    (("export",), "layout"): CONV_LAYOUT,
    (("export",), "format"): EXPORT_FORMATS,
    (("bench", "layers"), "inputs"): INPUT_SETS,
    (("bench", "gpu"), "dtype"): tuple(GPU_DTYPES),
    (("bench", "steps"), "device"): STEP_DEVICES,
    (("bench", "steps"), "conv_sample_unit"): CONV_SAMPLE_UNIT,
    (("bench", "steps"), "decay_kind"): DECAY_KIND,
    (("bench", "steps"), "backend"): BACKENDS,
    (("analyze", "fidelity"), "reference"): REFERENCES,
    (("analyze", "overhead"), "recipe"): RECIPES,
    **{(("analyze", a), "split"): SPLITS for a in ("similarity", "neighbors", "fidelity")},
    **{
        (("analyze", a), "device"): DEVICES
        for a in ("similarity", "neighbors", "fidelity", "overhead")
    },
}
#: Commands that write a JSON result file (or print JSON): they take ``--json PATH``.
JSON_COMMANDS = {("eval",), ("bench", "layers"), ("bench", "steps"), ("bench", "gpu")}


def _walk(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, (*path, name))


PARSERS = dict(_walk(build_parser()))
LEAVES = {p: parser for p, parser in PARSERS.items() if "func" in parser._defaults}


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The options a user sees (not --help/--version, not hidden ones)."""
    return [
        a
        for a in parser._actions
        if a.option_strings
        and a.help is not argparse.SUPPRESS
        and not isinstance(a, (argparse._HelpAction, argparse._VersionAction))
    ]


def _help_of(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    return " ".join(parser._get_formatter()._expand_help(action).split())


def test_the_walk_reaches_every_command_and_nested_subcommand():
    assert set(LEAVES) == {
        ("train",), ("compare",), ("eval",), ("export",), ("convert",), ("study",),
        ("bench", "layers"), ("bench", "steps"), ("bench", "gpu"),
        ("analyze", "similarity"), ("analyze", "neighbors"), ("analyze", "fidelity"),
        ("analyze", "overhead"),
    }  # fmt: skip


@pytest.mark.parametrize("path", sorted(LEAVES), ids="-".join)
def test_every_name_option_takes_exactly_its_canonical_tuple(path):
    parser = LEAVES[path]
    expected = {
        **({d: t for d, t in TRAIN_ENUMS.items()} if path in TRAIN_COMMANDS else {}),
        **{dest: t for (p, dest), t in OTHER_ENUMS.items() if p == path},
    }
    if path == ("study",):
        expected.pop("recipe")  # set per run (--recipes): refused, see below
    if path == ("compare",):
        expected.pop("recipe")
    found = {}
    for action in _options(parser):
        text = _help_of(parser, action)
        if action.choices is not None:
            found[action.dest] = tuple(action.choices)
            assert action.metavar is not None, action.dest
            assert text.endswith("one of: " + ", ".join(action.choices)), text
        else:
            # a|b alternatives written into a help are choices the parser does not check
            assert not re.search(r"\w\|\w", text), f"{action.option_strings}: {text}"
    assert found == expected


def test_every_recipe_and_weight_gradient_mode_is_in_train_help():
    text = " ".join(PARSERS[("train",)].format_help().split())
    assert "fst_mvue" in RECIPES
    for name in RECIPES:
        assert re.search(rf"[ ,]{re.escape(name)}[ ,]", text), name
    assert "topk_grad_output" in GRAD_WEIGHT_MODE
    recipe = next(a for a in PARSERS[("train",)]._actions if a.dest == "recipe")
    mode = next(a for a in PARSERS[("train",)]._actions if a.dest == "grad_weight_mode")
    assert _help_of(PARSERS[("train",)], recipe).endswith(", ".join(RECIPES))
    assert _help_of(PARSERS[("train",)], mode).endswith(", ".join(GRAD_WEIGHT_MODE))


def test_model_and_dataset_help_lists_the_names_of_the_code():
    """--model and --dataset also take free names (tv:<name>, timm:<name>), so they have no
    choices; their help lists the built-in names from the code's tuples."""
    from fullsparse.data import DATASETS
    from fullsparse.models import LM_MODELS, MODELS
    from fullsparse.models.detection import DETECTION_MODELS
    from fullsparse.train.config import DETECTION_DATASETS, LM_DATASETS

    parser = PARSERS[("train",)]
    helps = {a.dest: _help_of(parser, a) for a in _options(parser)}
    for name in (*MODELS, *LM_MODELS, *DETECTION_MODELS):
        assert re.search(rf"[ :]{name}[ ,;]", helps["model"]), name
    for name in (*DATASETS, *LM_DATASETS, *DETECTION_DATASETS):
        assert re.search(rf"[ :]{name}[ ,;]", helps["dataset"]), name
    assert "{" not in helps["model"] + helps["dataset"]  # every placeholder replaced


def test_train_help_is_in_argument_groups():
    parser = PARSERS[("train",)]
    titles = [g.title for g in parser._action_groups if g._group_actions]
    assert titles[1:] == [
        "what is trained",
        "sparsity (recipe and overrides)",
        "schedules",
        "optimisation",
        "execution",
        "run folder and output",
    ]
    grouped = [a.dest for g in parser._action_groups[2:] for a in g._group_actions]
    assert [a.dest for a in parser._action_groups[1]._group_actions] == ["help", "config_file"]
    assert set(grouped) == {f.name for f in dataclasses.fields(TrainConfig)}


@pytest.mark.parametrize("path", sorted(LEAVES), ids="-".join)
def test_json_output_is_spelled_json_path_everywhere(path):
    parser = LEAVES[path]
    json_actions = [
        a for a in parser._actions if any("json" in s.lower() for s in a.option_strings)
    ]
    writes_json = [a for a in json_actions if a.dest == "json"]
    visible = [a for a in writes_json if a.help is not argparse.SUPPRESS]
    if path in JSON_COMMANDS:
        assert [a.option_strings for a in visible] == [["--json"]]
        assert visible[0].metavar == "PATH"
    else:
        assert writes_json == []
    # no other option writes JSON under another name
    for action in _options(parser):
        if action.dest != "json":
            assert "save the json" not in (action.help or "").lower(), action.option_strings


def test_old_json_spellings_still_work():
    args = build_parser().parse_args(["bench", "steps", "--out", "x.json"])
    assert str(args.json) == "x.json"
    assert build_parser().parse_args(["eval", "--checkpoint", "c.pt", "--json"]).json == "-"
    args = build_parser().parse_args(["eval", "--checkpoint", "c.pt", "--json", "r.json"])
    assert args.json == "r.json"


def _effective_default(path: tuple[str, ...], action: argparse.Action) -> object:
    """What the option means when not given: the train flags take the field's default."""
    if action.default is not argparse.SUPPRESS:
        return action.default
    field = {f.name: f for f in dataclasses.fields(TrainConfig)}[action.dest]
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory()  # type: ignore[misc]


@pytest.mark.parametrize("path", sorted(LEAVES), ids="-".join)
def test_every_default_is_shown_one_way(path):
    parser = LEAVES[path]
    assert not re.search(r"\(default [^:]", parser.description or ""), parser.description
    for action in _options(parser):
        text = _help_of(parser, action)
        # one way of writing: "(default: VALUE)", never "(VALUE)" or "(default VALUE)"
        assert not re.search(r"\((default [^:]|\d[\d.]*\))", text), text
        assert "default:" not in text or "(default: " in text, text
        flag = action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)
        default = _effective_default(path, action)
        if flag or default is None or default == {}:
            continue
        assert "(default: " in text, f"{path} {action.option_strings}: {text}"
        if action.default is not argparse.SUPPRESS and "%(default)" in (
            parser._get_formatter()._get_help_string(action)
        ):
            assert f"(default: {default})" in text


def test_the_wd_bn_bias_pair_turns_the_setting_both_ways():
    parse = build_parser().parse_args
    assert parse(["train", "--no-wd-bn-bias"]).no_wd_bn_bias is True
    assert parse(["train", "--wd-bn-bias"]).no_wd_bn_bias is False
    lm = {"task": "lm"}  # lm turns it on by default; --wd-bn-bias turns it off
    assert config_from_sources(None, lm).no_wd_bn_bias is True
    assert config_from_sources(None, {**lm, "no_wd_bn_bias": False}).no_wd_bn_bias is False


def test_eval_amp_takes_the_same_values_as_train_amp():
    parse = build_parser().parse_args
    for argv, mode in ([["--amp"], "bf16"], [["--amp", "fp16"], "fp16"], [[], "none"]):
        assert parse(["eval", "--checkpoint", "c.pt", *argv]).amp == mode
        train = parse(["train", *argv])
        assert getattr(train, "amp", "none") == mode


@pytest.mark.parametrize("path", [("eval",), ("export",)], ids="-".join)
def test_eval_and_export_show_their_required_arguments_as_required(path):
    parser = LEAVES[path]
    required = {a.dest for a in parser._actions if a.required}
    assert required == ({"checkpoint"} if path == ("eval",) else {"checkpoint", "out"})
    usage = parser.format_usage()
    assert " --checkpoint PATH" in usage and "[--checkpoint" not in usage


class _Captured(Exception):
    """Raised by a stubbed library call, carrying what the command passed to it."""


# --------------------------------------------------------------- accepted and ignored
@pytest.mark.parametrize(("argv", "expected", "context"), FLAGS, ids=lambda v: str(v))
def test_compare_passes_every_train_flag_into_the_runs_or_refuses_it(
    monkeypatch, capsys, argv, expected, context
):
    def fake_compare(config, recipes, out=None):
        raise _Captured(config, recipes, out)

    monkeypatch.setattr("fullsparse.train.compare", fake_compare)
    given = [*(t for k, v in context.items() for t in (f"--{k}", str(v))), *argv]
    if "recipe" in expected or "recipe" in context:
        with pytest.raises(SystemExit) as info:
            main(["compare", *given])
        assert info.value.code == 2
        assert "--recipe is not taken by this command" in capsys.readouterr().err
        return
    with pytest.raises(_Captured) as info:
        main(["compare", *given])
    config, _, out = info.value.args
    for name, value in expected.items():
        assert (out if name == "out" else getattr(config, name)) == value, name


@pytest.mark.parametrize(("argv", "expected", "context"), FLAGS, ids=lambda v: str(v))
def test_study_passes_every_train_flag_into_the_runs_or_refuses_it(
    monkeypatch, capsys, argv, expected, context
):
    def fake_run_study(spec, **kwargs):
        raise _Captured(spec, kwargs)

    monkeypatch.setattr("fullsparse.analysis.study.run_study", fake_run_study)
    if "task" in expected:  # refused: a study tabulates classification runs
        assert main(["study", *argv]) == 2
        assert "a study compares classification runs" in capsys.readouterr().err
        return
    if set(expected) & {"recipe", "seed", "resume", "force"}:
        with pytest.raises(SystemExit) as info:
            main(["study", *argv])
        assert info.value.code == 2
        assert "is not taken by this command" in capsys.readouterr().err
        return
    with pytest.raises(_Captured) as info:
        main(["study", *argv])
    spec, kwargs = info.value.args
    for name, value in expected.items():
        if name == "threads":  # study's own --threads: the whole study's CPU threads
            assert kwargs["threads"] == value and "threads" not in spec.base
            continue
        assert (str(spec.out) if name == "out" else spec.base[name]) == value, name


def _reads(func: types.FunctionType, seen: set[str] | None = None) -> str:
    """The source of ``func`` and of the functions of its module it calls, recursively."""
    seen = set() if seen is None else seen
    if func.__name__ in seen:
        return ""
    seen.add(func.__name__)
    text = inspect.getsource(func)
    module = inspect.getmodule(func)
    names: list[str] = []
    codes = [func.__code__]
    while codes:  # the function's own names and those of its lambdas and inner functions
        code = codes.pop()
        names += code.co_names
        codes += [c for c in code.co_consts if isinstance(c, types.CodeType)]
    for name in names:
        helper = getattr(module, name, None)
        if isinstance(helper, types.FunctionType) and helper.__module__ == module.__name__:
            text += _reads(helper, seen)
    return text


@pytest.mark.parametrize("path", sorted(set(LEAVES) - TRAIN_COMMANDS), ids="-".join)
def test_every_option_of_the_other_commands_is_read(path):
    parser = LEAVES[path]
    source = _reads(parser._defaults["func"])
    for action in _options(parser):
        read = f"args.{action.dest}" in source or f'"{action.dest}"' in source
        assert read, f"{' '.join(path)} {action.option_strings[0]} is accepted and never read"
