"""``--task lm``: the byte-level GPT trained, resumed, compared, evaluated and exported.

Runs use a 1-layer GPT of width 32 over 16-byte windows on corpus folders written by the
tests (one run reads the real standard library with tiny caps), so each takes about a second.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from fullsparse.cli import main
from fullsparse.errors import ConfigError, UserError
from fullsparse.models import build_lm_model
from fullsparse.train import NonFiniteLossError, TrainConfig, load_checkpoint, train
from fullsparse.train import trainer as trainer_mod
from fullsparse.train.common import build_optimizer
from fullsparse.train.guard import clip_gradients
from fullsparse.train.lm import loss_metrics, validation_windows
from tinyruns import quiet_config, record_linear_dtypes, tiny_classify

GPT_SMALL = {"context": 16, "depth": 1, "embed_dim": 32, "num_heads": 2}
CLI_GPT = json.dumps(GPT_SMALL)


def _corpus(folder: Path, text_of=None, files: int = 30) -> Path:
    """``files`` small Python-like files; about 10 % land in validation (CRC of the path)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        text = text_of(i) if text_of else f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * 12
        (folder / f"mod{i}.py").write_text(text)
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _corpus(tmp_path_factory.mktemp("lm") / "corpus")


def tiny_lm(tmp_path, corpus, name="run", **kw) -> TrainConfig:
    fields = dict(
        task="lm",
        data_dir=str(corpus),
        model_kwargs=GPT_SMALL,
        batch_size=8,
        steps_per_epoch=6,
        epochs=1,
        test_subset=32,
    )
    return quiet_config(tmp_path / name, **{**fields, **kw})


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------- config


def test_lm_defaults_are_adamw_clipping_and_warmup_and_classify_defaults_are_unchanged():
    lm = TrainConfig(task="lm", epochs=5)
    assert (lm.model, lm.dataset, lm.optimizer) == ("gpt_tiny", "pystdlib", "adamw")
    assert lm.peak_lr == 3e-3 and lm.grad_clip == 1.0 and lm.steps_per_epoch == 200
    assert lm.warmup_epochs == pytest.approx(0.5) and lm.label_smoothing == 0.0
    assert lm.weight_decay == 0.1 and lm.no_wd_bn_bias is True
    assert TrainConfig(task="lm", data_dir="/somewhere").dataset == "text"
    c = TrainConfig()
    assert (c.task, c.optimizer, c.grad_clip, c.steps_per_epoch) == ("classify", "sgd", 0.0, None)
    assert (c.warmup_epochs, c.label_smoothing, c.weight_decay) == (0.0, 0.1, 7e-5)
    assert c.no_wd_bn_bias is False
    # the resolved values are what config.json records, and they read back equal
    assert TrainConfig.from_dict(lm.to_dict()) == lm


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({"task": "lm", "model": "resnet20"}, "model='resnet20' (an image classifier)"),
        ({"task": "lm", "model": "gpt_huge"}, "model='gpt_huge' (not a known model)"),
        ({"model": "gpt_tiny"}, "model='gpt_tiny' is a language model: it needs task='lm'"),
        ({"task": "lm", "dataset": "cifar10"}, "task='lm' clashes with dataset='cifar10'"),
        ({"dataset": "pystdlib"}, "dataset='pystdlib' is a text corpus"),
        ({"task": "lm", "dataset": "text"}, "dataset='text' needs data_dir"),
        ({"task": "lm", "dataset": "pystdlib", "data_dir": "/x"}, "clashes with data_dir"),
        ({"task": "translate"}, "task='translate' is not one of classify, lm"),
        ({"optimizer": "adam"}, "optimizer='adam' is not one of sgd, adamw"),
        ({"steps_per_epoch": 10}, "steps_per_epoch=10 clashes with task='classify'"),
        ({"task": "lm", "steps_per_epoch": 0}, "steps_per_epoch must be an integer >= 1"),
        ({"task": "lm", "grad_clip": -1.0}, "grad_clip must be a finite number >= 0"),
    ],
)
def test_task_clashes_are_one_line_config_errors(fields, needle):
    with pytest.raises(ConfigError) as info:
        TrainConfig(**fields)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_validation_windows_are_the_first_non_overlapping_windows():
    stream = torch.arange(50, dtype=torch.uint8)
    w = validation_windows(stream, 8)
    assert w.shape == (6, 9) and w.dtype == torch.int64  # (50 - 1) // 8 windows of 8 + 1
    assert w[:, 0].tolist() == [0, 8, 16, 24, 32, 40] and w[-1, -1] == 48
    assert validation_windows(stream, 8, limit=2).shape == (2, 9)
    with pytest.raises(UserError, match="shorter than one window of context"):
        validation_windows(stream[:8], 8)
    m = loss_metrics(math.log(4.0))
    assert m["perplexity"] == pytest.approx(4.0) and m["bits_per_byte"] == pytest.approx(2.0)


# ------------------------------------------------------------------------- training


def test_a_run_on_the_cpu_sparse_backend_trains_as_on_the_reference(tmp_path, corpus):
    from fullsparse.kernels import cpu_sparse

    calls = []
    kernel = cpu_sparse.spmm24
    with pytest.MonkeyPatch.context() as m:
        m.setattr(cpu_sparse, "spmm24", lambda *a, **k: calls.append(1) or kernel(*a, **k))
        fast = train(tiny_lm(tmp_path, corpus, "fast", recipe="fst_mvue", backend="cpu_sparse"))
    # six steps of four layers, three 2:4 products each; four validation batches' forwards
    assert len(calls) == 6 * 4 * 3 + 4 * 4
    slow = train(tiny_lm(tmp_path, corpus, "slow", recipe="fst_mvue"))
    # the same draws; the products' sums in another order: float32 roundings apart
    assert fast["final_val_loss"] == pytest.approx(slow["final_val_loss"], rel=1e-4)
    config = json.loads((tmp_path / "fast" / "config.json").read_text())
    assert config["backend"] == "cpu_sparse"


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"device": "cuda"}, "backend='cpu_sparse' clashes with device='cuda'"),
        ({"amp": "bf16"}, "clashes with amp='bf16' (the kernels are float32)"),
        ({"compile": True}, "clashes with compile"),
    ],
)
def test_the_cpu_sparse_backend_refuses_what_it_cannot_run(fields, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        TrainConfig(backend="cpu_sparse", **fields)


def test_lm_run_writes_a_complete_run_folder_with_lm_metrics(tmp_path, corpus):
    summary = train(tiny_lm(tmp_path, corpus, epochs=2, recipe="fst"))
    run = tmp_path / "run"
    for name in ("config.json", "train.log", "metrics.jsonl", "last.pt", "best.pt", "summary.json"):
        assert (run / name).is_file(), name
    assert summary == json.loads((run / "summary.json").read_text())
    metrics = _metrics(run)
    assert [m["epoch"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["val_perplexity"] == pytest.approx(math.exp(m["val_loss"]))
        assert m["val_bits_per_byte"] == pytest.approx(m["val_loss"] / math.log(2))
        assert m["train_tokens"] == 6 * 8 * 16 and m["tokens_per_second"] > 0
        assert m["epoch_seconds"] > 0 and m["grad_norm"] > 0 and 0 <= m["val_accuracy"] <= 100
    assert metrics[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine to 0 at the end
    assert summary["task"] == "lm" and summary["dataset"] == "text"
    assert summary["final_val_loss"] == metrics[-1]["val_loss"]
    assert summary["final_perplexity"] == metrics[-1]["val_perplexity"]
    best = min(metrics, key=lambda m: m["val_loss"])
    assert (summary["best_val_loss"], summary["best_epoch"]) == (best["val_loss"], best["epoch"])
    assert summary["validation_tokens"] == 32 * 16 and summary["context"] == 16
    assert summary["sparse_layers"] == 4  # qkv, proj, fc1, fc2; lm_head stays dense
    assert "best_top1" not in summary
    log = (run / "train.log").read_text()
    assert "recipe 'fst' on 4 of 5 layers" in log and "adamw lr 0.003" in log


def test_lm_on_the_standard_library_with_tiny_caps(tmp_path):
    config = quiet_config(
        tmp_path / "run",
        task="lm",
        model_kwargs=GPT_SMALL,
        text_train_bytes=20_000,
        text_val_bytes=2_000,
        batch_size=8,
        steps_per_epoch=4,
        epochs=1,
    )
    summary = train(config)
    assert summary["dataset"] == "pystdlib" and summary["corpus"]["name"] == "pystdlib"
    assert summary["corpus"]["train_bytes"] == 20_000 and summary["corpus"]["val_bytes"] == 2_000
    assert summary["validation_tokens"] == (2_000 - 1) // 16 * 16
    assert math.isfinite(summary["final_val_loss"])


@pytest.mark.parametrize("recipe", ["dense", "fst"])
def test_loss_falls_on_a_repetitive_corpus(tmp_path, recipe):
    folder = _corpus(tmp_path / "abc", lambda i: "abcdefghijklmnopqrstuvwxyz\n" * 40)
    summary = train(tiny_lm(tmp_path, folder, recipe=recipe, epochs=2, steps_per_epoch=40, lr=1e-2))
    first, last = _metrics(tmp_path / "run")
    # uniform over 256 bytes is ln 256 = 5.55 nats; the next letter is fully determined
    assert first["val_loss"] < 2.5
    assert summary["final_val_loss"] < 0.5 and summary["final_val_accuracy"] > 90


def test_lm_resume_equals_a_straight_run_bit_for_bit(tmp_path, corpus):
    base = tiny_lm(tmp_path, corpus, epochs=2, deterministic=True, recipe="fst")
    straight = train(base.replace(out=str(tmp_path / "a")))
    first = train(base.replace(out=str(tmp_path / "b"), stop_after=1))
    assert first["status"].startswith("stopped after epoch 1 of 2")
    resumed = train(base.replace(out=str(tmp_path / "b"), resume=True))
    ca = load_checkpoint(tmp_path / "a" / "last.pt")
    cb = load_checkpoint(tmp_path / "b" / "last.pt")
    for key in ca["model"]:
        assert torch.equal(ca["model"][key], cb["model"][key]), key
    for sa, sb in zip(
        ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values(), strict=True
    ):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert ca["identity"]["task"] == "lm" and ca["best_val_loss"] == cb["best_val_loss"]
    keys = ("epoch", "train_loss", "val_loss", "val_accuracy", "lr", "grad_norm")
    strip = [[m[k] for k in keys] for m in _metrics(tmp_path / "a")]
    assert strip == [[m[k] for k in keys] for m in _metrics(tmp_path / "b")]
    assert resumed["final_val_loss"] == straight["final_val_loss"]
    assert "resumed from" in (tmp_path / "b" / "train.log").read_text()


def test_lm_trains_under_bf16_autocast(tmp_path, corpus, monkeypatch):
    dtypes = record_linear_dtypes(monkeypatch)
    summary = train(tiny_lm(tmp_path, corpus, amp="bf16", recipe="fst"))
    assert math.isfinite(summary["final_val_loss"])
    # --amp bf16 really ran: every Linear of the GPT computed in bfloat16.
    assert len(dtypes) >= 4 and all(d == {torch.bfloat16} for d in dtypes.values()), dtypes


def test_nan_in_an_lm_layer_stops_naming_the_step_and_the_layer(tmp_path, corpus, monkeypatch):
    real = trainer_mod.build_model

    def build(identity):
        model, report = real(identity)

        def hook(module, inputs, output):
            return output * float("nan") if module.training else output

        model.get_submodule("blocks.0.fc1").register_forward_hook(hook)
        return model, report

    monkeypatch.setattr(trainer_mod, "build_model", build)
    with pytest.raises(NonFiniteLossError) as info:
        train(tiny_lm(tmp_path, corpus))
    msg = str(info.value)
    assert "epoch 1 step 1/6" in msg and "output of blocks.0.fc1 (SparseLinear)" in msg
    summary = train(tiny_lm(tmp_path, corpus, name="skip", skip_nonfinite=True))
    assert summary["skipped_steps"] == 6


def test_nan_gradient_with_a_finite_lm_loss_is_caught_before_the_step(
    tmp_path, corpus, monkeypatch
):
    real = trainer_mod.build_model

    def build(identity):
        model, report = real(identity)
        model.get_submodule("blocks.0.fc1").weight.register_hook(lambda g: g * float("nan"))
        return model, report

    monkeypatch.setattr(trainer_mod, "build_model", build)
    with pytest.raises(NonFiniteLossError) as info:
        train(tiny_lm(tmp_path, corpus))
    msg = str(info.value)
    assert "non-finite gradient at epoch 1 step 1/6" in msg and "blocks.0.fc1" in msg
    assert not (tmp_path / "run" / "last.pt").exists()


def test_adamw_and_grad_clip_also_work_for_classification(tmp_path):
    config = tiny_classify(tmp_path, optimizer="adamw", grad_clip=0.5)
    model = torch.nn.Linear(4, 4)
    assert isinstance(build_optimizer(model, config), torch.optim.AdamW)
    model(torch.ones(2, 4)).sum().mul(100).backward()
    before = clip_gradients(model, config.grad_clip)
    after = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert before > 0.5 and after == pytest.approx(0.5, rel=1e-5)
    assert clip_gradients(model, 0.0) is None
    summary = train(config)
    assert summary["config"]["optimizer"] == "adamw" and math.isfinite(summary["final_train_loss"])


# ------------------------------------------------------------------------- command line


def _lm_argv(corpus: Path) -> list[str]:
    return [
        "--task", "lm", "--data-dir", str(corpus), "--model-kwargs", CLI_GPT,
        "--batch-size", "8", "--steps-per-epoch", "4", "--epochs", "1", "--test-subset", "16",
        "--no-progress", "--no-plot",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, corpus) -> Path:
    run = tmp_path_factory.mktemp("lmcli") / "run"
    assert main(["train", *_lm_argv(corpus), "--recipe", "fst", "--quiet", "--out", str(run)]) == 0
    return run


def test_compare_lm_prints_one_table_of_loss_perplexity_and_bits(tmp_path, capsys, corpus):
    out = tmp_path / "cmp"
    argv = ["compare", *_lm_argv(corpus), "--recipes", "dense,fst2,fst", "--out", str(out)]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    table = stdout[stdout.index("recipe  ") :].splitlines()
    assert table[0].split() == ["recipe", "val", "loss", "perplexity", "bits/byte", "sparse",
                                "GEMMs", "s/epoch", "time", "vs", "dense"]  # fmt: skip
    assert [line.split()[0] for line in table[2:5]] == ["dense", "fst2", "fst"]
    assert table[2].rstrip().endswith("1.00x")
    payload = json.loads((out / "compare.json").read_text())
    assert payload["task"] == "lm"
    fractions = [r["sparse_gemm_fraction"] for r in payload["rows"]]  # dense, fst2, fst
    assert [f["grad_weight"] > 0 for f in fractions] == [False, False, True]
    assert fractions[1]["output"] == fractions[2]["output"] > 0
    for row, line in zip(payload["rows"], table[2:5], strict=True):
        summary = json.loads((out / row["recipe"] / "summary.json").read_text())
        assert row["val_loss"] == summary["final_val_loss"]
        assert row["perplexity"] == pytest.approx(math.exp(row["val_loss"]))
        assert line.split()[1:4] == [
            f"{row['val_loss']:.4f}",
            f"{row['perplexity']:.3f}",
            f"{row['bits_per_byte']:.3f}",
        ]
    md = (out / "compare.md").read_text()
    assert md.startswith("| recipe | val loss | perplexity | bits/byte |") and md.count("\n") == 5


def test_eval_of_an_lm_checkpoint_reproduces_the_final_validation_loss(lm_run, capsys):
    summary = json.loads((lm_run / "summary.json").read_text())
    assert main(["eval", "--checkpoint", str(lm_run / "last.pt"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["task"] == "lm" and result["tokens"] == 16 * 16
    assert result["loss"] == pytest.approx(summary["final_val_loss"], rel=1e-6)
    assert result["perplexity"] == pytest.approx(summary["final_perplexity"], rel=1e-6)
    assert main(["eval", "--checkpoint", str(lm_run / "last.pt")]) == 0
    line = capsys.readouterr().out
    assert line.startswith("gpt_tiny / text / fst (epoch 1): val loss ")
    assert "perplexity" in line and "bits/byte" in line


def test_export_of_an_lm_checkpoint_loads_into_the_dense_gpt(tmp_path, lm_run, capsys):
    from fullsparse.train import load_trained_model

    out = tmp_path / "gpt.pt"
    assert main(["export", "--checkpoint", str(lm_run / "last.pt"), "--out", str(out)]) == 0
    assert "4 of 5 layers pruned 2:4" in capsys.readouterr().out
    meta = json.loads(out.with_name("gpt.pt.json").read_text())
    assert meta["task"] == "lm" and "build_lm_model" in meta["load_with"]
    dense = build_lm_model(meta["model"], meta["vocab_size"], **meta["model_kwargs"])
    dense.load_state_dict(torch.load(out, weights_only=True))
    sparse, _ = load_trained_model(lm_run / "last.pt")
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(dense.eval()(tokens), sparse(tokens))


def _one_line_error(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--model", "resnet20"], "model='resnet20' (an image classifier)"),
        (["--dataset", "fashion-mnist"], "task='lm' clashes with dataset='fashion-mnist'"),
        (["--data-dir", "{tmp}/nowhere"], "does not exist"),
        (["--model-kwargs", '{"wings": 2}'], "model 'gpt_tiny'"),
        (["--model-kwargs", '{"context": 60000}'], "shorter than one window of context"),
        (["--model-kwargs", '{"context": 100000}'], "context is 100,000, over the limit 65,536"),
        (["--steps-per-epoch", "zero"], "--steps-per-epoch expects int"),
        (["--channels-last"], "--channels-last is for convolutional image models"),
        (["--resume", "{tmp}/nowhere.pt"], "nothing to resume"),
    ],
)
def test_lm_error_paths_are_one_line_and_write_nothing(tmp_path, capsys, corpus, extra, needle):
    out = tmp_path / "run"
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    _one_line_error(capsys, ["train", *_lm_argv(corpus), "--out", str(out), *extra], needle)
    assert not out.exists()


def test_language_model_with_the_classify_task_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    _one_line_error(capsys, ["train", "--model", "gpt_tiny", "--out", str(out)], "needs task='lm'")
    _one_line_error(capsys, ["train", "--dataset", "pystdlib", "--out", str(out)], "text corpus")
    _one_line_error(
        capsys, ["train", "--steps-per-epoch", "5", "--out", str(out)], "steps_per_epoch=5"
    )
    assert not out.exists()


def test_resuming_an_lm_run_as_another_recipe_is_refused(tmp_path, capsys, lm_run, corpus):
    _one_line_error(
        capsys,
        ["train", *_lm_argv(corpus), "--out", str(lm_run), "--resume", "--recipe", "dense"],
        "--recipe ('fst' in the saved run, 'dense' now) would change the run saved in",
    )


def test_a_study_of_language_models_is_refused():
    from fullsparse.analysis.study import StudySpec

    with pytest.raises(ConfigError, match="fullsparse compare --task lm"):
        StudySpec(base={"task": "lm"})


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path, corpus):
    import os
    import subprocess
    import sys

    import fullsparse

    base = tiny_lm(tmp_path, corpus, epochs=2, steps_per_epoch=4, test_subset=33, lr=1e-2)
    base = base.replace(deterministic=True, recipe="fst")  # 33 windows: ranks get 17 and 16
    single = train(base.replace(out=str(tmp_path / "one")))
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(fullsparse.__file__).resolve().parents[1])
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    for name, extra in (("two", []), ("fsdp", ["--fsdp"])):  # DDP, then FSDP2 sharding
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            "2", "-m", "fullsparse", "train", *_lm_argv(corpus), "--steps-per-epoch", "4",
            "--epochs", "2", "--test-subset", "33", "--lr", "0.01", "--recipe", "fst",
            "--deterministic", "--quiet", "--out", str(tmp_path / name), *extra,
        ]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        two = json.loads((tmp_path / name / "summary.json").read_text())
        assert (two["world_size"], single["world_size"]) == (2, 1)
        for a, b in zip(_metrics(tmp_path / "one"), _metrics(tmp_path / name), strict=True):
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
            assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
            assert b["train_tokens"] == a["train_tokens"] == 4 * 8 * 16
        w1 = load_checkpoint(tmp_path / "one" / "last.pt")["model"]
        w2 = load_checkpoint(tmp_path / name / "last.pt")["model"]
        d = GPT_SMALL["embed_dim"]
        for key in w1:
            a, b = w1[key], w2[key]
            if key.endswith("attn.qkv.bias"):
                # The key bias has exactly zero gradient (softmax ignores a shift shared by
                # all keys), so Adam turns float noise of the reduction order into lr-sized
                # steps.
                a, b = torch.cat([a[:d], a[2 * d :]]), torch.cat([b[:d], b[2 * d :]])
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=f"{name} {key}")
