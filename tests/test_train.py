"""fullsparse.train.train end to end on synthetic data: every model family, the run folder,
metrics, non-finite handling, AMP / channels-last / compile, progress bar and plot."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from fullsparse import RECIPES
from fullsparse.errors import ConfigError, UserError
from fullsparse.train import NonFiniteLossError, TrainConfig, load_checkpoint, train
from fullsparse.train import trainer as trainer_mod
from fullsparse.train.common import lr_factor, param_groups
from fullsparse.train.progress import ProgressBar
from tinyruns import record_linear_dtypes, tiny_classify

VIT_SMALL = {"depth": 1, "embed_dim": 32, "num_heads": 2}


def tiny(tmp_path, name="run", **kw) -> TrainConfig:
    """A run that takes about a second: 8x8 synthetic images, a few steps per epoch."""
    return tiny_classify(tmp_path, name, **kw)


SUMMARY_KEYS = {
    "recipe",
    "model",
    "dataset",
    "seed",
    "epochs",
    "best_top1",
    "final_top1",
    "seconds_per_epoch",
    "config",
}
METRIC_KEYS = {
    "epoch",
    "train_loss",
    "train_acc",
    "test_top1",
    "test_top5",
    "lr",
    "epoch_seconds",
    "images_per_second",
}


@pytest.mark.parametrize(
    "model, kwargs, image_size",
    [("resnet20", {}, 8), ("resnet18", {}, 16), ("vit_tiny", VIT_SMALL, 8)],
    ids=["resnet20", "resnet18", "vit_tiny"],
)
def test_one_epoch_per_model_family_writes_a_complete_run_folder(
    tmp_path, model, kwargs, image_size
):
    config = tiny(tmp_path, model=model, model_kwargs=kwargs, image_size=image_size, recipe="fst")
    summary = train(config)
    run = tmp_path / "run"
    for name in ("config.json", "train.log", "metrics.jsonl", "last.pt", "best.pt", "summary.json"):
        assert (run / name).is_file(), name
    assert set(summary) >= SUMMARY_KEYS
    assert summary == json.loads((run / "summary.json").read_text())
    assert summary["config"] == json.loads((run / "config.json").read_text())
    assert (summary["model"], summary["recipe"], summary["epochs_done"]) == (model, "fst", 1)
    assert summary["sparse_layers"] > 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and set(lines[0]) >= METRIC_KEYS
    assert math.isfinite(lines[0]["train_loss"]) and 0 <= lines[0]["test_top1"] <= 100
    assert lines[0]["test_top1"] <= lines[0]["test_top5"]
    assert summary["final_top1"] == lines[0]["test_top1"]
    assert "recipe 'fst' on " in (run / "train.log").read_text()


def test_two_epochs_of_dense_and_fst_learn_on_synthetic_data(tmp_path):
    for recipe in ("dense", "fst"):
        summary = train(
            tiny(tmp_path, recipe, recipe=recipe, epochs=3, synthetic_train=256, lr=0.2)
        )
        lines = [
            json.loads(x) for x in (tmp_path / recipe / "metrics.jsonl").read_text().splitlines()
        ]
        assert [m["epoch"] for m in lines] == [1, 2, 3]
        assert lines[-1]["train_loss"] < lines[0]["train_loss"], recipe
        assert summary["best_top1"] == max(m["test_top1"] for m in lines)
        assert lines[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine down to 0


def test_lr_schedule_warms_up_linearly_then_follows_a_cosine_to_zero():
    total, warm = 100, 10
    assert [lr_factor(s, total, warm) for s in range(3)] == [0.1, 0.2, 0.3]
    assert lr_factor(9, total, warm) == 1.0 and lr_factor(10, total, warm) == 1.0
    assert lr_factor(55, total, warm) == pytest.approx(0.5)
    assert lr_factor(100, total, warm) == pytest.approx(0.0)
    assert lr_factor(0, total, 0) == 1.0


def test_no_wd_bn_bias_puts_one_dimensional_parameters_in_a_group_without_decay():
    from fullsparse.models import build_model

    model = build_model("resnet20", 10, in_channels=3, image_size=8)
    groups = param_groups(model, TrainConfig(no_wd_bn_bias=True))
    assert [g["weight_decay"] for g in groups] == [7e-5, 0.0]
    assert all(p.ndim > 1 for p in groups[0]["params"])
    assert all(p.ndim == 1 for p in groups[1]["params"]) and groups[1]["params"]
    assert len(param_groups(model, TrainConfig())) == 1


def test_existing_run_folder_is_refused_without_resume_or_force(tmp_path):
    train(tiny(tmp_path))
    run = tmp_path / "run"
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(UserError, match="already holds a run.*--resume.*--force"):
        train(tiny(tmp_path, seed=1))
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    summary = train(tiny(tmp_path, seed=1, force=True))
    assert summary["seed"] == 1
    assert json.loads((run / "config.json").read_text())["seed"] == 1


def test_batch_larger_than_the_dataset_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError) as info:
        train(tiny(tmp_path, batch_size=128))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()


def _poison(monkeypatch, layer: str, at_call: int):
    """Make ``layer`` output NaN from its ``at_call``-th training forward on."""
    real = trainer_mod.build_model

    def build(identity):
        model, report = real(identity)
        calls = {"n": 0}

        def hook(module, inputs, output):
            if module.training and torch.is_grad_enabled():
                calls["n"] += 1
                if calls["n"] >= at_call:
                    return output * float("nan")
            return output

        model.get_submodule(layer).register_forward_hook(hook)
        return model, report

    monkeypatch.setattr(trainer_mod, "build_model", build)


def test_nan_loss_stops_naming_step_and_layer_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    config = tiny(tmp_path, epochs=2, stop_after=1)
    train(config)
    last = tmp_path / "run" / "last.pt"
    before = last.read_bytes()
    # 4 steps per epoch: the resumed run's 2nd step (global step 6) is the first bad one.
    _poison(monkeypatch, "layer2.0.conv1", at_call=2)
    with pytest.raises(NonFiniteLossError) as info:
        train(config.replace(stop_after=None, resume=True))
    msg = str(info.value)
    assert "\n" not in msg
    assert "epoch 2 step 2/4 (global step 6)" in msg
    assert "first non-finite activation: output of layer2.0.conv1 (SparseConv2d)" in msg
    assert "untouched" in msg and "--skip-nonfinite" in msg
    assert last.read_bytes() == before
    assert load_checkpoint(last)["epoch"] == 1


def test_skip_nonfinite_skips_the_bad_steps_and_counts_them(tmp_path, monkeypatch):
    real = trainer_mod.build_model
    bad_steps = {2, 3}

    def build(identity):
        model, report = real(identity)
        calls = {"n": 0}

        def hook(module, inputs, output):
            if module.training and torch.is_grad_enabled():
                calls["n"] += 1
                if calls["n"] in bad_steps:
                    return output * float("inf")
            return output

        model.get_submodule("layer1.0.conv1").register_forward_hook(hook)
        return model, report

    monkeypatch.setattr(trainer_mod, "build_model", build)
    summary = train(tiny(tmp_path, skip_nonfinite=True))
    assert summary["skipped_steps"] == 2
    weights = load_checkpoint(tmp_path / "run" / "last.pt")["model"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert "step skipped" in (tmp_path / "run" / "train.log").read_text()


@pytest.mark.parametrize("recipe", RECIPES)
def test_bf16_autocast_and_channels_last_work_with_every_recipe(tmp_path, recipe):
    extra = {}
    if recipe == "asp":  # asp fine-tunes a trained dense run
        train(tiny(tmp_path, "init", recipe="dense", synthetic_train=32))
        extra = {"init_from": str(tmp_path / "init")}
    fp32 = train(tiny(tmp_path, "fp32", recipe=recipe, synthetic_train=32, **extra))
    mixed = train(
        tiny(
            tmp_path, "bf16", recipe=recipe, synthetic_train=32, amp="bf16", channels_last=True,
            **extra,
        )
    )  # fmt: skip
    assert math.isfinite(mixed["final_train_loss"])
    # bf16 autocast really ran: the loss moved a little, not a lot.
    assert mixed["final_train_loss"] != fp32["final_train_loss"]
    assert mixed["final_train_loss"] == pytest.approx(fp32["final_train_loss"], rel=0.05)


def test_vit_runs_under_bf16_autocast(tmp_path, monkeypatch):
    dtypes = record_linear_dtypes(monkeypatch)
    summary = train(tiny(tmp_path, model="vit_tiny", model_kwargs=VIT_SMALL, amp="bf16"))
    assert math.isfinite(summary["final_train_loss"])
    # --amp bf16 really ran: every Linear (attention, MLP, head) computed in bfloat16.
    assert len(dtypes) >= 4 and all(d == {torch.bfloat16} for d in dtypes.values()), dtypes


@pytest.mark.parametrize("recipe_name", ["fst", "srste", "fst_mvue"])
def test_fp16_refuses_the_in_backward_decay_that_loss_scaling_would_shrink(tmp_path, recipe_name):
    from fullsparse.train.common import check_capabilities

    cuda = torch.device("cuda")  # the check runs before anything touches the device
    config = tiny(tmp_path, amp="fp16", recipe=recipe_name)
    with pytest.raises(ConfigError, match="use --decay-kind masked_grad"):
        check_capabilities(config, cuda)
    for fix in (dict(decay_kind="masked_grad"), dict(decay=0.0)):
        check_capabilities(tiny(tmp_path, amp="fp16", recipe=recipe_name, **fix), cuda)
    check_capabilities(tiny(tmp_path, amp="fp16", recipe="tsm"), cuda)  # no decay


def test_fp16_and_cuda_are_refused_clearly_on_a_cpu_machine(tmp_path):
    with pytest.raises(ConfigError, match="--amp fp16 needs CUDA"):
        train(tiny(tmp_path, amp="fp16", device="cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            train(tiny(tmp_path, device="cuda"))
    assert not (tmp_path / "run").exists()


def test_a_flag_that_breaks_the_first_step_is_refused_before_the_run_starts(tmp_path, monkeypatch):
    real = trainer_mod.build_model

    def build(identity):
        model, report = real(identity)

        def hook(module, inputs, output):
            if torch.is_autocast_enabled("cpu"):
                raise RuntimeError("no bf16 kernel for this layer")
            return output

        model.get_submodule("layer1.0.conv1").register_forward_hook(hook)
        return model, report

    monkeypatch.setattr(trainer_mod, "build_model", build)
    with pytest.raises(UserError) as info:
        train(tiny(tmp_path, amp="bf16"))
    msg = str(info.value)
    assert "--amp bf16 does not work with model resnet20 and recipe fst" in msg
    assert "no bf16 kernel" in msg and "\n" not in msg
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_compile_trains_fst(tmp_path):  # minutes on a 2-core CPU: TorchInductor compiles C++
    compiled = train(tiny(tmp_path, "compiled", compile=True, synthetic_train=32))
    eager = train(tiny(tmp_path, "eager", synthetic_train=32))
    # Same seed and data: Inductor may fuse and round differently, nothing more.
    assert compiled["final_train_loss"] == pytest.approx(eager["final_train_loss"], rel=1e-3)
    a = load_checkpoint(tmp_path / "compiled" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "eager" / "last.pt")["model"]
    assert a.keys() == b.keys()
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-3, msg=key)


def test_progress_bar_writes_a_line_every_ten_percent_on_a_pipe():
    stream = io.StringIO()
    bar = ProgressBar(20, "epoch 1/1", stream=stream)
    for _ in range(20):
        bar.update(8, 0.5, 4)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10
    assert lines[-1].startswith("epoch 1/1 [########################] 20/20 loss 0.5000 acc 50.00%")
    assert lines[-1].endswith("img/s")


def test_progress_bar_redraws_in_place_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    bar = ProgressBar(3, "e", stream=stream, min_interval=0.0)
    for _ in range(3):
        bar.update(1, 1.0, 1)
    bar.close()
    text = stream.getvalue()
    assert text.count("\r") == 4 and text.endswith("\n") and text.count("\n") == 1


def test_curves_png_is_drawn_with_matplotlib_or_skipped_with_a_note(tmp_path):
    train(tiny(tmp_path, plot=True))
    png = tmp_path / "run" / "curves.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not png.exists()
        assert "matplotlib is not installed" in (tmp_path / "run" / "train.log").read_text()
    else:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
