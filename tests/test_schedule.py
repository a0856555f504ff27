"""Schedules over a run (dense warm-up, dense finish, mask-update interval) and the FLOP
account; the GEMMs of a dense-finish step are checked against the float64 reference."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fullsparse import SparseConv2d, SparseLinear, recipe, sparsify_
from fullsparse.cli import main
from fullsparse.errors import ConfigError
from fullsparse.train import TrainConfig, train
from fullsparse.train.schedule import RunSchedule, phase_config, phase_of
from reference import Geo, ref_conv, ref_linear, ref_mask_cols, ref_mask_rows
from tinyruns import tiny_classify

TOL64 = dict(rtol=1e-10, atol=1e-10)


def test_phase_of_each_step():
    # 10 steps, 2 dense warm-up steps, the last 30 % (3 steps) dense
    phases = [phase_of(s, 10, 2, 0.3) for s in range(10)]
    assert phases == ["warmup"] * 2 + ["sparse"] * 5 + ["finish"] * 3
    assert [phase_of(s, 100, 0, 0.29) for s in (70, 71)] == ["sparse", "finish"]  # 29 steps
    assert {phase_of(s, 7, 0, 0.0) for s in range(7)} == {"sparse"}


def test_schedule_fields_are_checked():
    with pytest.raises(ConfigError, match="dense_finish must be a fraction"):
        TrainConfig(dense_finish=1.0)
    with pytest.raises(ConfigError, match="dense_finish_mode='forward' is not one of"):
        TrainConfig(dense_finish_mode="forward")
    with pytest.raises(ConfigError, match="mask_interval must be an integer >= 1"):
        TrainConfig(mask_interval=0)


def test_the_switches_happen_at_exactly_their_steps_without_touching_the_optimizer(tmp_path):
    seen = []

    def record(step: int, total: int, trainer) -> None:
        conv = trainer.raw_model.layer1[0].conv1
        params = [id(p) for group in trainer.optimizer.param_groups for p in group["params"]]
        seen.append((step, conv.config, id(trainer.optimizer), params, id(conv.weight)))

    config = tiny_classify(tmp_path, epochs=2, dense_warmup_steps=2, dense_finish=0.25)
    summary = train(config, step_callbacks=[record])  # 8 steps: 0-1 warm-up, 6-7 finish
    fst = recipe("fst")
    want = [phase_config(fst, p, "backward") for p in ["warmup"] * 2 + ["sparse"] * 4]
    want += [phase_config(fst, "finish", "backward")] * 2
    assert [s[1] for s in seen] == want
    assert want[0].is_dense and want[2] == fst
    assert (want[6].output_weight, want[6].grad_input_weight) == ("2:4", "forward")
    assert (want[6].grad_weight_mode, want[6].decay) == ("dense", fst.decay)
    assert len({(s[2], tuple(s[3]), s[4]) for s in seen}) == 1  # same optimizer, same params
    log = (tmp_path / "run" / "train.log").read_text()
    for line in (
        "schedule: step 0 of 8: dense warm-up",
        "schedule: step 2 of 8: the recipe's sparse GEMMs",
        "schedule: step 6 of 8: dense finish (backward)",
    ):
        assert line in log
    assert summary["schedule_steps"] == {"warmup": 2, "sparse": 4, "finish": 2}
    account = summary["sparse_gemm_fraction"]  # output sparse 6 of 8 steps, grad_weight 4
    assert account["output"] / account["grad_weight"] == pytest.approx(6 / 4)


def _conv_and_grads(module: nn.Module, x: torch.Tensor, gy: torch.Tensor):
    x = x.clone().requires_grad_(True)
    y = module(x)
    y.backward(gy)
    return y, x.grad, module.weight.grad, module.bias.grad


@pytest.mark.parametrize("mode, ref_name", [("backward", "srste"), ("all", "dense")])
def test_dense_finish_gemms_match_the_float64_reference(mode, ref_name):
    """fst's dense finish: 'backward' is S_K(W) forward with the exact (dense-GEMM) gradient
    of it plus SR-STE decay — the reference's srste row; 'all' is the dense layer."""
    torch.manual_seed(0)
    geo = Geo((1, 1), (1, 1), (1, 1), 1)
    conv = SparseConv2d(8, 8, 3, padding=1, config="fst").double()
    conv.config = phase_config(recipe("fst"), "finish", mode)
    x, gy = torch.randn(2, 8, 6, 6, dtype=torch.float64), torch.randn(2, 8, 6, 6).double()
    got = _conv_and_grads(conv, x, gy)
    want = ref_conv(x, conv.weight.detach(), conv.bias.detach(), gy, geo, ref_name)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL64)
    if mode == "backward":  # the forward still is 2:4 along K: the model stays 2:4
        w2 = conv.pruned_weight().reshape(8, -1)
        assert torch.equal(w2 != 0, ref_mask_rows(conv.weight.detach().reshape(8, -1)) != 0)
    lin = SparseLinear(16, 8, config="fst").double()
    lin.config = phase_config(recipe("fst"), "finish", mode)
    x, gy = torch.randn(2, 6, 16, dtype=torch.float64), torch.randn(2, 6, 8).double()
    got = _conv_and_grads(lin, x, gy)
    want = ref_linear(x, lin.weight.detach(), lin.bias.detach(), gy, ref_name)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL64)


def _step(layer: SparseLinear, x: torch.Tensor, gy: torch.Tensor):
    layer.weight.grad = None
    xr = x.clone().requires_grad_(True)
    layer(xr).backward(gy)
    return xr.grad, layer.weight.grad.clone()


def test_mask_interval_reuses_the_masks_until_the_next_recomputation():
    torch.manual_seed(1)
    layer = SparseLinear(16, 8, config=recipe("fst", mask_interval=3)).double()
    x, gy = torch.randn(4, 16, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    masks = []
    for step in range(4):
        w = layer.weight.detach().clone()
        if step % 3 == 0:
            recomputed_from = w
        dx, dw = _step(layer, x, gy)
        # the cached masks are those of the weight at the last recomputation (float64 ref)
        assert torch.equal(layer.tsm_mask, ref_mask_rows(recomputed_from) != 0)
        assert torch.equal(layer.gi_mask, ref_mask_cols(recomputed_from) != 0)
        # ... and the step used them on today's W: forward S_K, grad_input S_Co(W)
        w_out = w * layer.tsm_mask
        torch.testing.assert_close(dx, gy @ (w * layer.gi_mask), **TOL64)
        torch.testing.assert_close(dw, gy.t() @ x + 2e-4 * (w - w_out), **TOL64)
        masks.append(layer.tsm_mask.clone())
        with torch.no_grad():  # a new weight whose fresh masks differ from the cached ones
            layer.weight.copy_(torch.randn_like(layer.weight))
    assert torch.equal(masks[0], masks[2]) and not torch.equal(masks[0], masks[3])


def test_mask_interval_one_is_todays_step_and_n_equals_it_on_recomputation_steps():
    torch.manual_seed(2)
    x, gy = torch.randn(2, 6, 16), torch.randn(2, 6, 8)
    every = SparseLinear(16, 8, config="fst")
    cached = SparseLinear(16, 8, config=recipe("fst", mask_interval=5))
    cached.load_state_dict(every.state_dict())
    assert recipe("fst", mask_interval=1) == recipe("fst")
    a, b = _step(every, x, gy), _step(cached, x, gy)
    assert every.tsm_mask is None and every.gi_mask is None  # nothing cached at 1
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))  # bit for bit


def test_a_resume_across_the_schedule_is_bit_exact(tmp_path):
    args = [
        "--model",
        "resnet20",
        "--dataset",
        "synthetic",
        "--synthetic-train",
        "64",
        "--synthetic-test",
        "32",
        "--image-size",
        "8",
        "--batch-size",
        "16",
        "--epochs",
        "2",
        "--deterministic",
        "--threads",
        "1",
        "--no-progress",
        "--quiet",
        "--no-plot",
        "--dense-warmup-steps",
        "1",
        "--dense-finish",
        "0.25",
        "--mask-interval",
        "3",
    ]  # fmt: skip  8 steps: 0 dense, 1-5 sparse (masks at 1, 3, 5), 6-7 dense backward
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", *args, "--out", str(straight)]) == 0
    assert main(["train", *args, "--out", str(split), "--stop-after", "1"]) == 0
    halfway = torch.load(split / "last.pt", weights_only=True)["sparse_state"]
    assert any(k.endswith("gi_mask") for k in halfway)  # the cached S_Co masks are saved
    assert main(["train", "--resume", "--out", str(split)]) == 0
    a = torch.load(straight / "last.pt", weights_only=True)
    b = torch.load(split / "last.pt", weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["sparse_state"].keys() == b["sparse_state"].keys()
    for key in a["sparse_state"]:
        assert torch.equal(a["sparse_state"][key], b["sparse_state"][key]), key
    sa = json.loads((straight / "summary.json").read_text())
    sb = json.loads((split / "summary.json").read_text())
    assert sa["sparse_gemm_fraction"] == sb["sparse_gemm_fraction"]
    assert sa["final_top1"] == sb["final_top1"]


# --------------------------------------------------------------------------- FLOP account
class _Tiny(nn.Module):
    """conv 4->8 (3x3, pad 1) on 6x6, a Linear 288->16, a Linear head 16->10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.body = nn.Linear(288, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).flatten(1).unsqueeze(1).expand(-1, 4, -1)  # 4 tokens per image
        return self.head(self.body(h))


#: FLOPs of one GEMM per step at batch 2: conv 2·Co·K·N·Ho·Wo, linear 2·d_out·d_in·tokens
CONV, BODY, HEAD = 2 * 8 * 36 * 2 * 36, 2 * 16 * 288 * 8, 2 * 10 * 16 * 8


def _account(recipe_name, total: int, **schedule) -> dict:
    model = _Tiny()
    sparsify_(model, recipe_name)  # the head is the classifier: kept dense
    s = RunSchedule(
        schedule.get("warmup", 0), schedule.get("finish", 0.0), schedule.get("mode", "backward")
    )
    trainer = SimpleNamespace(raw_model=model, log=SimpleNamespace(info=lambda *a, **k: None))
    x = torch.randn(2, 4, 6, 6)  # the input needs no gradient: the conv's grad_input is not run
    for step in range(total):
        s(step, total, trainer)
        model(x).sum().backward()
    return s.account(total, total)


def test_flop_account_hand_computed():
    everything = CONV + BODY + HEAD
    fst = _account("fst", 4)
    assert fst["output"] == pytest.approx((CONV + BODY) / everything)
    assert fst["grad_input"] == pytest.approx(BODY / (BODY + HEAD))
    assert fst["grad_weight"] == pytest.approx((CONV + BODY) / everything)
    denom = 2 * everything + BODY + HEAD
    assert fst["total"] == pytest.approx((3 * (CONV + BODY) - CONV) / denom)
    assert fst["fully_sparse"] is (fst["total"] >= 0.9)
    assert _account("dense", 2) == dict(
        output=0.0, grad_input=0.0, grad_weight=0.0, total=0.0, fully_sparse=False
    )
    srste = _account("srste", 2)  # S_K(W) is 2:4 along K, not along grad_input's Co
    assert (srste["grad_input"], srste["grad_weight"]) == (0.0, 0.0)
    assert srste["output"] == pytest.approx(fst["output"])
    assert _account("fst2", 2)["grad_weight"] == 0.0
    # a dense finish of 1 step in 4 ('backward'): the forward stays sparse
    finish = _account("fst", 4, finish=0.25)
    assert finish["output"] == pytest.approx(fst["output"])
    assert finish["grad_weight"] == pytest.approx(fst["grad_weight"] * 3 / 4)
    assert finish["grad_input"] == pytest.approx(fst["grad_input"] * 3 / 4)
    warm = _account("fst", 4, warmup=1, finish=0.25, mode="all")  # 2 of 4 steps sparse
    for role in ("output", "grad_input", "grad_weight", "total"):
        assert warm[role] == pytest.approx(fst[role] / 2)


def test_flop_account_reads_each_layer_kinds_weight_gradient():
    from fullsparse import recipe

    # fst2 with the MVUE weight gradient on Linear layers only: the conv's dY·Xᵀ stays
    # dense, the body's is 2:4 along the tokens, the head is dense
    mixed = _account(recipe("fst2", grad_weight_mode_linear="mvue"), 2)
    assert mixed["grad_weight"] == pytest.approx(BODY / (CONV + BODY + HEAD))
    assert _account(recipe("fst2"), 2)["grad_weight"] == 0.0


def test_information_restoration_without_a_token_axis_counts_dense():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    sparsify_(model, "fst")  # the last Linear is the head: dense
    s = RunSchedule(0, 0.0, "backward")
    trainer = SimpleNamespace(raw_model=model, log=SimpleNamespace(info=lambda *a, **k: None))
    s(0, 1, trainer)
    model(torch.randn(4, 8)).sum().backward()  # [B, d]: IR pairs no tokens: dense
    assert s.account(1, 1)["grad_weight"] == 0.0


def _corpus(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(30):
        (folder / f"mod{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * 12)
    return str(folder)


@pytest.mark.parametrize("task", ["lm", pytest.param("detection", marks=pytest.mark.vision)])
def test_the_schedule_runs_for_every_task(tmp_path, task):
    if task == "lm":
        fields = dict(
            task="lm", data_dir=_corpus(tmp_path / "corpus"), batch_size=8, steps_per_epoch=4,
            test_subset=16,
            model_kwargs={"context": 16, "depth": 1, "embed_dim": 32, "num_heads": 2},
        )  # fmt: skip
    else:
        fields = dict(
            task="detection", image_size=64, synthetic_train=16, synthetic_test=8, batch_size=4
        )
    config = TrainConfig(
        out=str(tmp_path / "run"),
        epochs=1,
        dense_warmup_steps=1,
        dense_finish=0.25,
        mask_interval=2,
        progress=False,
        quiet=True,
        plot=False,
        **fields,
    )  # fmt: skip  4 steps: 0 dense, 1-2 sparse, 3 dense backward
    summary = train(config)
    assert summary["schedule_steps"] == {"warmup": 1, "sparse": 2, "finish": 1}
    account = summary["sparse_gemm_fraction"]
    assert 0 < account["grad_weight"] < account["output"] <= 0.75
    log = (tmp_path / "run" / "train.log").read_text()
    assert "schedule: step 3 of 4: dense finish (backward)" in log


def test_a_mid_epoch_resume_across_the_schedule_is_bit_exact(tmp_path, monkeypatch):
    from fullsparse.train import load_checkpoint
    from fullsparse.train.guard import StepGuard

    # 6 steps: 0 dense, 1-3 sparse (masks at 1 and 3), 4-5 dense backward; last.pt every 2
    base = tiny_classify(
        tmp_path, synthetic_train=96, deterministic=True, threads=1, dense_warmup_steps=1,
        dense_finish=0.34, mask_interval=2, checkpoint_every=2,
    )  # fmt: skip
    train(base.replace(out=str(tmp_path / "a")))
    real, calls = StepGuard.step, {"n": 0}

    def step(self):
        calls["n"] += 1
        if calls["n"] == 4:  # killed in step 3: last.pt holds the run after step 2
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(StepGuard, "step", step)
    with pytest.raises(KeyboardInterrupt):
        train(base.replace(out=str(tmp_path / "b")))
    monkeypatch.undo()
    saved = load_checkpoint(tmp_path / "b" / "last.pt")
    assert saved["step"] == 2 and any(k.endswith("gi_mask") for k in saved["sparse_state"])
    train(base.replace(out=str(tmp_path / "b"), resume=True))
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["sparse_state"]:
        assert torch.equal(a["sparse_state"][key], b["sparse_state"][key]), key


def test_a_checkpoint_saved_before_mask_interval_existed_still_matches():
    from fullsparse.config import upgrade_config_dict

    old = recipe("fst").to_dict()
    del old["mask_interval"]
    assert upgrade_config_dict(old) == recipe("fst").to_dict()
    assert upgrade_config_dict(old) != recipe("fst", mask_interval=4).to_dict()
