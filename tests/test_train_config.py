"""TrainConfig: validation, config files, layering of sources, derived values."""

from __future__ import annotations

import json

import pytest

from fullsparse.errors import ConfigError
from fullsparse.train.config import TrainConfig, config_from_sources, load_config_file


def test_defaults_are_the_main_job_and_the_paper_optimiser():
    c = TrainConfig()
    assert (c.model, c.dataset, c.recipe, c.epochs) == ("resnet20", "fashion-mnist", "fst", 2)
    assert c.momentum == 0.9 and c.weight_decay == 7e-5 and c.label_smoothing == 0.1
    assert c.peak_lr == pytest.approx(0.1 * c.batch_size / 256)
    assert TrainConfig(batch_size=256).peak_lr == pytest.approx(0.1)
    assert TrainConfig(lr=0.3).peak_lr == 0.3
    assert str(c.run_dir) == "runs/fashion-mnist-resnet20-fst-seed0"


def test_recipe_overrides_reach_the_sparsity_config():
    s = TrainConfig(recipe="fst", ir_alpha=0.03, grad_input_source="pruned", decay=1e-4).sparsity()
    assert (s.name, s.ir_alpha, s.grad_input_source, s.decay) == ("fst", 0.03, "pruned", 1e-4)
    assert TrainConfig(recipe="tsm", tsm_interval=7).sparsity().tsm_interval == 7


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({"recipe": "nope"}, "unknown recipe 'nope'"),
        ({"recipe": "dense", "ir_alpha": 0.5}, "ir_alpha"),  # clashes with a dense recipe
        ({"grad_input_source": "sideways"}, "grad_input_source"),
        ({"epochs": 0}, "epochs must be an integer >= 1, got 0"),
        ({"epochs": "two"}, "epochs must be an integer >= 1, got 'two'"),
        ({"lr": float("nan")}, "lr must be a finite number"),
        ({"batch_size": 2.5}, "batch_size must be an integer"),
        ({"amp": "fp8"}, "amp='fp8' is not one of none, bf16, fp16"),
        ({"device": "tpu"}, "device='tpu'"),
        ({"channels_last": "yes"}, "channels_last must be true or false"),
        ({"stop_after": 3, "epochs": 2}, "stop_after=3 clashes with epochs=2"),
        ({"resume": True, "force": True}, "resume and force clash"),
        ({"warmup_epochs": 5.0, "epochs": 2}, "warmup_epochs=5.0 clashes"),
        ({"model_kwargs": [1, 2]}, "model_kwargs must be a mapping"),
    ],
)
def test_invalid_values_raise_config_error_naming_the_field(fields, needle):
    with pytest.raises(ConfigError) as info:
        TrainConfig(**fields)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_keys_are_rejected_with_a_suggestion():
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict({"epoch": 3, "bogus": 1})
    msg = str(info.value)
    assert "'bogus'" in msg and "'epoch' (did you mean 'epochs'?)" in msg
    with pytest.raises(ConfigError, match="unknown key"):
        TrainConfig().replace(learning_rate=0.1)


def test_from_dict_reads_dashes_as_underscores_and_round_trips():
    c = TrainConfig.from_dict({"batch-size": 64, "model_kwargs": {"depth": 2}, "model": "vit_tiny"})
    assert c.batch_size == 64 and c.model_kwargs == {"depth": 2}
    assert TrainConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_json_and_yaml_files_load_and_flags_override_them(tmp_path):
    j = tmp_path / "run.json"
    j.write_text(json.dumps({"epochs": 5, "recipe": "srste", "seed": 3}))
    c = config_from_sources(j, {"seed": 7})
    assert (c.epochs, c.recipe, c.seed) == (5, "srste", 7)
    y = tmp_path / "run.yaml"
    y.write_text("epochs: 4\nrecipe: fst\nir-alpha: 0.03\nmodel_kwargs:\n  depth: 2\n")
    c = config_from_sources(y, {"recipe": "fst"})
    assert (c.epochs, c.ir_alpha, c.model_kwargs) == (4, 0.03, {"depth": 2})
    (tmp_path / "empty.yaml").write_text("")
    assert config_from_sources(tmp_path / "empty.yaml") == TrainConfig()


@pytest.mark.parametrize(
    "name, text, needle",
    [
        ("bad.json", "{epochs: 3", "is not valid JSON"),
        ("bad.yaml", "epochs: [3\n", "is not valid YAML at line"),
        ("list.json", "[1, 2]", "must hold a mapping"),
        ("run.toml", "epochs = 3", "must end in .json, .yaml or .yml"),
        ("unknown.json", '{"epochz": 3}', "unknown key(s) in config file"),
    ],
)
def test_malformed_config_files_are_one_line_config_errors(tmp_path, name, text, needle):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        config_from_sources(path)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_missing_config_file_and_yaml_without_pyyaml(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "nope.json")
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 3\n")
    import builtins

    real_import = builtins.__import__

    def no_yaml(name, *args, **kwargs):
        if name == "yaml":
            raise ImportError("no yaml")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_yaml)
    extra = r"needs PyYAML, the yaml extra: pip install 'fullsparse\[yaml\]'"
    with pytest.raises(ConfigError, match=extra):
        load_config_file(path)
