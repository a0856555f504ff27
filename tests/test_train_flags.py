"""Every ``train``/``compare`` flag and every run-config key that has ever worked keeps
working, and parses to the same value.

The tables below list the flags and keys with the values they must give; they are written
out by hand (not derived from the code under test) so that a renamed or dropped flag fails
here. Their coverage is checked against the code: every config field and every ``train``
option must appear in them.
"""

from __future__ import annotations

import argparse
import json

import pytest
import yaml

from fullsparse.cli import build_parser
from fullsparse.commands.train import overrides_from_args
from fullsparse.train.config import TrainConfig, config_from_sources

LM = {"task": "lm"}
DET = {"task": "detection"}

# (command-line tokens, the field values they give, the other fields a valid config needs)
FLAGS: list[tuple[list[str], dict, dict]] = [
    (["--task", "lm"], {"task": "lm"}, {}),
    (["--model", "resnet32"], {"model": "resnet32"}, {}),
    (["--model-kwargs", '{"depth": 2}'], {"model_kwargs": {"depth": 2}}, {}),
    (["--dataset", "synthetic"], {"dataset": "synthetic"}, {}),
    (["--data-dir", "/d"], {"data_dir": "/d"}, {}),
    (["--image-size", "16"], {"image_size": 16}, {}),
    (["--train-subset", "500"], {"train_subset": 500}, {}),
    (["--train-subset", "all"], {"train_subset": None}, {}),
    (["--train-subset", "none"], {"train_subset": None}, {}),
    (["--test-subset", "50"], {"test_subset": 50}, {}),
    (["--test-subset", "all"], {"test_subset": None}, {}),
    (["--synthetic-train", "64"], {"synthetic_train": 64}, {}),
    (["--synthetic-test", "32"], {"synthetic_test": 32}, {}),
    (["--synthetic-classes", "4"], {"synthetic_classes": 4}, {}),
    (["--text-train-bytes", "1000"], {"text_train_bytes": 1000}, LM),
    (["--text-val-bytes", "500"], {"text_val_bytes": 500}, LM),
    (["--recipe", "srste"], {"recipe": "srste"}, {}),
    (["--ir-alpha", "0.5"], {"ir_alpha": 0.5}, {}),
    (["--decay", "0.001"], {"decay": 0.001}, {"recipe": "srste"}),
    (["--grad-input-source", "pruned"], {"grad_input_source": "pruned"}, {}),
    (["--tsm-interval", "7"], {"tsm_interval": 7}, {"recipe": "tsm"}),
    (["--optimizer", "adamw"], {"optimizer": "adamw"}, {}),
    (["--epochs", "3"], {"epochs": 3}, {}),
    (["--steps-per-epoch", "5"], {"steps_per_epoch": 5}, LM),
    (["--batch-size", "32"], {"batch_size": 32}, {}),
    (["--lr", "0.05"], {"lr": 0.05}, {}),
    (["--momentum", "0.8"], {"momentum": 0.8}, {}),
    (["--weight-decay", "0.01"], {"weight_decay": 0.01}, {}),
    (["--no-wd-bn-bias"], {"no_wd_bn_bias": True}, {}),
    (["--wd-bn-bias"], {"no_wd_bn_bias": False}, {}),
    (["--no-wd-bn-bias", "--wd-bn-bias"], {"no_wd_bn_bias": False}, {}),
    (["--wd-bn-bias", "--no-wd-bn-bias"], {"no_wd_bn_bias": True}, {}),
    (["--label-smoothing", "0.2"], {"label_smoothing": 0.2}, {}),
    (["--warmup-epochs", "0.5"], {"warmup_epochs": 0.5}, {}),
    (["--grad-clip", "2.5"], {"grad_clip": 2.5}, {}),
    (["--seed", "3"], {"seed": 3}, {}),
    (["--workers", "2"], {"workers": 2}, {}),
    (["--device", "cpu"], {"device": "cpu"}, {}),
    (["--amp"], {"amp": "bf16"}, {}),
    (["--amp", "fp16"], {"amp": "fp16"}, {}),
    (["--amp", "none"], {"amp": "none"}, {}),
    (["--backend", "cpu_sparse"], {"backend": "cpu_sparse"}, {}),
    (["--channels-last"], {"channels_last": True}, {}),
    (["--no-channels-last"], {"channels_last": False}, {}),
    (["--compile"], {"compile": True}, {}),
    (["--no-compile"], {"compile": False}, {}),
    (["--sync-bn"], {"sync_bn": True}, {}),
    (["--no-sync-bn"], {"sync_bn": False}, {}),
    (["--fsdp"], {"fsdp": True}, {}),
    (["--no-fsdp"], {"fsdp": False}, {}),
    (["--deterministic"], {"deterministic": True}, {}),
    (["--no-deterministic"], {"deterministic": False}, {}),
    (["--skip-nonfinite"], {"skip_nonfinite": True}, {}),
    (["--no-skip-nonfinite"], {"skip_nonfinite": False}, {}),
    (["--out", "runs/x"], {"out": "runs/x"}, {}),
    (["--resume"], {"resume": True}, {}),
    (["--resume", "a/last.pt"], {"resume": "a/last.pt"}, {}),
    (["--force"], {"force": True}, {}),
    (["--no-force"], {"force": False}, {}),
    (["--stop-after", "1"], {"stop_after": 1}, {}),
    (["--checkpoint-every", "10"], {"checkpoint_every": 10}, {}),
    (["--progress"], {"progress": True}, {}),
    (["--no-progress"], {"progress": False}, {}),
    (["--quiet"], {"quiet": True}, {}),
    (["--no-quiet"], {"quiet": False}, {}),
    (["--plot"], {"plot": True}, {}),
    (["--no-plot"], {"plot": False}, {}),
    (["--conv-layout", "channel"], {"conv_layout": "channel"}, {}),
    (["--output-weight", "soft_2:4"], {"output_weight": "soft_2:4"}, {}),
    (["--decay-kind", "masked_grad"], {"decay_kind": "masked_grad"}, {"recipe": "srste"}),
    (["--dense-finish", "0.25"], {"dense_finish": 0.25}, {}),
    (
        ["--dense-finish-mode", "all", "--dense-finish", "0.25"],
        {"dense_finish_mode": "all", "dense_finish": 0.25},
        {},
    ),  # fmt: skip
    (["--dense-warmup-steps", "7"], {"dense_warmup_steps": 7}, {}),
    (["--mask-interval", "3"], {"mask_interval": 3}, {}),
    (["--grad-weight-mode", "mvue"], {"grad_weight_mode": "mvue"}, {}),
    (["--grad-weight-mode-linear", "dense"], {"grad_weight_mode_linear": "dense"}, {}),
    (["--ir-alpha-linear", "0.25"], {"ir_alpha_linear": 0.25}, {}),
    (["--keep-dense", "stem,first_linear"], {"keep_dense": "stem,first_linear"}, {}),
    (["--threads", "2"], {"threads": 2}, {}),
    (["--init-from", "runs/dense"], {"init_from": "runs/dense"}, {"recipe": "asp"}),
    (["--variance-budget", "0.5"], {"variance_budget": 0.5}, {"recipe": "fst_adaptive"}),
    (["--variance-interval", "7"], {"variance_interval": 7}, {"recipe": "fst_adaptive"}),
    (["--sample-group", "16"], {"sample_group": 16}, {"recipe": "fst_is"}),
    (["--sample-group", "0"], {"sample_group": 0}, {"recipe": "fst_is"}),
    (["--conv-sample-unit", "sample"], {"conv_sample_unit": "sample"}, {"recipe": "fst_is"}),
    (["--sample-share", "0.625"], {"sample_share": 0.625}, {"recipe": "fst_is"}),
    (["--grad-accum-steps", "4"], {"grad_accum_steps": 4}, {}),
    (["--log-every", "5"], {"log_every": 5}, {}),
    (["--log-level", "warning"], {"log_level": "warning"}, {}),
    (["--report-to", "csv,tensorboard"], {"report_to": "csv,tensorboard"}, {}),
]

# Every key a run config (YAML/JSON, and so config.json) accepts, with a value to try.
KEYS: dict[str, object] = {
    "task": "lm", "model": "resnet32", "model_kwargs": {"depth": 2}, "dataset": "synthetic",
    "data_dir": "/d", "image_size": 16, "train_subset": 500, "test_subset": 50,
    "synthetic_train": 64, "synthetic_test": 32, "synthetic_classes": 4,
    "text_train_bytes": 1000, "text_val_bytes": 500, "recipe": "srste", "ir_alpha": 0.5,
    "decay": 0.001, "grad_input_source": "pruned", "tsm_interval": 7, "optimizer": "adamw",
    "epochs": 3, "steps_per_epoch": 5, "batch_size": 32, "lr": 0.05, "momentum": 0.8,
    "weight_decay": 0.01, "no_wd_bn_bias": True, "label_smoothing": 0.2,
    "warmup_epochs": 0.5, "grad_clip": 2.5, "seed": 3, "workers": 2, "device": "cpu",
    "amp": "bf16", "channels_last": True, "compile": True, "sync_bn": True, "backend": "cpu_sparse",
    "fsdp": True, "deterministic": True, "skip_nonfinite": True, "out": "runs/x", "resume": True,
    "force": True, "stop_after": 1, "checkpoint_every": 10, "progress": False,
    "quiet": True, "plot": False, "conv_layout": "channel", "output_weight": "soft_2:4",
    "decay_kind": "masked_grad", "dense_finish": 0.25, "dense_finish_mode": "all",
    "dense_warmup_steps": 7, "mask_interval": 3, "grad_weight_mode": "mvue",
    "grad_weight_mode_linear": "dense", "ir_alpha_linear": 0.25,
    "keep_dense": "stem,first_linear", "threads": 2, "init_from": "runs/dense",
    "variance_budget": 0.5, "variance_interval": 7, "grad_accum_steps": 4, "log_every": 5,
    "log_level": "warning", "report_to": "csv", "sample_group": 16, "sample_share": 0.625,
    "conv_sample_unit": "sample",
}  # fmt: skip
#: The extra fields a key's value needs to make a valid config.
KEY_CONTEXT = {
    "task": {"model": "gpt_tiny", "dataset": "pystdlib"},
    "text_train_bytes": LM, "text_val_bytes": LM, "steps_per_epoch": LM,
    "decay": {"recipe": "srste"}, "tsm_interval": {"recipe": "tsm"},
    "decay_kind": {"recipe": "srste"}, "dense_finish_mode": {"dense_finish": 0.25},
    "init_from": {"recipe": "asp"}, "variance_budget": {"recipe": "fst_adaptive"},
    "variance_interval": {"recipe": "fst_adaptive"}, "sample_group": {"recipe": "fst_is"},
    "sample_share": {"recipe": "fst_is"}, "conv_sample_unit": {"recipe": "fst_is"},
}  # fmt: skip


@pytest.mark.parametrize("command", ["train", "compare"])
@pytest.mark.parametrize(("argv", "expected", "context"), FLAGS, ids=lambda v: str(v))
def test_every_flag_parses_to_its_field_value(command, argv, expected, context):
    if command == "compare" and "recipe" in expected:  # compare takes --recipes instead
        with pytest.raises(SystemExit) as info:
            build_parser().parse_args([command, *argv])
        assert info.value.code == 2
        return
    args = build_parser().parse_args([command, *argv])
    overrides = overrides_from_args(args)
    assert overrides == expected
    if "resume" in expected:
        return  # resume clashes with nothing alone, but needs a run folder to build
    config = config_from_sources(None, {**context, **overrides})
    for name, value in expected.items():
        assert getattr(config, name) == value, name


def _train_options() -> dict[str, str]:
    """The ``train`` parser's options as the code defines them: option string -> dest."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {
        option: action.dest
        for action in sub.choices["train"]._actions
        for option in action.option_strings
        if action.dest not in ("help", "config_file")
    }


def test_every_config_field_has_a_key_and_a_flag_tried_here():
    """Derived from the code: every TrainConfig field is a key of the table (so its YAML /
    JSON round trip runs) and the dest of a train option whose every spelling the flag
    table tries (so its flag round trip runs)."""
    fields = set(TrainConfig().to_dict())
    assert set(KEYS) == fields, sorted(fields ^ set(KEYS))
    options = _train_options()
    assert set(options.values()) == fields, sorted(fields ^ set(options.values()))
    tried = {token for argv, _, _ in FLAGS for token in argv if token.startswith("--")}
    assert set(options) <= tried, sorted(set(options) - tried)
    flagged = {name for _, expected, _ in FLAGS for name in expected}
    assert flagged == fields, sorted(fields ^ flagged)


@pytest.mark.parametrize("spelling", ["snake", "dash"])
@pytest.mark.parametrize("key", sorted(KEYS))
def test_every_config_key_loads_from_yaml_and_json(tmp_path, key, spelling):
    value = KEYS[key]
    values = {**KEY_CONTEXT.get(key, {}), key: value}
    if key == "resume":
        values["force"] = False
    written = {(k.replace("_", "-") if spelling == "dash" else k): v for k, v in values.items()}
    (tmp_path / "run.json").write_text(json.dumps(written))
    config = config_from_sources(tmp_path / "run.json")
    assert getattr(config, key) == value
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(written))
    assert getattr(config_from_sources(tmp_path / "run.yaml"), key) == value


def test_every_listed_key_is_still_a_config_field():
    assert set(KEYS) <= set(TrainConfig().to_dict())
