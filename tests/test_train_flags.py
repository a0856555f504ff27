"""Every ``train``/``compare`` flag and every run-config key that has ever worked keeps
working, and parses to the same value.

The tables below are the complete list of flags and keys as they stood when the config
became declared once; they are written out by hand (not derived from the code under test)
so that a renamed or dropped flag fails here.
"""

from __future__ import annotations

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
    "amp": "bf16", "channels_last": True, "compile": True, "sync_bn": True,
    "fsdp": True, "deterministic": True, "skip_nonfinite": True, "out": "runs/x", "resume": True,
    "force": True, "stop_after": 1, "checkpoint_every": 10, "progress": False,
    "quiet": True, "plot": False,
}  # fmt: skip
#: The extra fields a key's value needs to make a valid config.
KEY_CONTEXT = {
    "task": {"model": "gpt_tiny", "dataset": "pystdlib"},
    "text_train_bytes": LM, "text_val_bytes": LM, "steps_per_epoch": LM,
    "decay": {"recipe": "srste"}, "tsm_interval": {"recipe": "tsm"},
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


def test_the_flag_table_covers_every_config_key():
    flagged = {name for _, expected, _ in FLAGS for name in expected}
    assert flagged == set(KEYS)


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
