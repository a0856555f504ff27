"""Decay and forward variants: S-STE's soft-threshold forward (``output_weight='soft_2:4'``)
and 2by4's masked decay (``decay_kind='masked_grad'``), each against an explicit float64
formula (``tests/reference.py``), plus the fixed per-layer β and its checkpoint round trip."""

from __future__ import annotations

import pytest
import torch

from fullsparse import SparseConv2d, SparseLinear, recipe
from fullsparse.errors import ConfigError
from fullsparse.functional import sparse_conv2d, sparse_linear
from fullsparse.masks import is_2to4
from fullsparse.nn import load_sparse_state_, masked_grad_decay_, sparse_state_dict
from fullsparse.operands import mask_k, soft_scale, soft_threshold_k
from fullsparse.train import TrainConfig, load_checkpoint, train
from reference import (
    Geo,
    ref_conv,
    ref_linear,
    ref_mask_rows,
    ref_soft_scale,
    ref_soft_threshold_rows,
)
from tinyruns import tiny_classify

SOFT_FST2 = recipe("fst2", output_weight="soft_2:4", decay=0.0)
SOFT_SRSTE = recipe("srste", output_weight="soft_2:4", decay=0.0)
REF_NAME = {id(SOFT_FST2): "fst2_soft", id(SOFT_SRSTE): "srste_soft"}

# (input shape, weight shape, stride, padding, groups); K = 27 needs zero padding
CONV = {
    "3x3": ((2, 8, 6, 7), (8, 8, 3, 3), 1, 1, 1),
    "first_conv_k27": ((2, 3, 7, 7), (16, 3, 3, 3), 2, 1, 1),
    "groups2": ((2, 8, 5, 6), (8, 4, 3, 3), 1, 1, 2),
}


def _grads(fn, x, w, b, gy):
    x, w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True) if b is not None else None
    y = fn(x, w, b)
    y.backward(gy)
    return y.detach(), x.grad, w.grad, (b.grad if b is not None else None)


# --------------------------------------------------------------------------- soft threshold
@pytest.mark.parametrize("shape", [(8, 16), (16, 3, 3, 3), (12, 9)])
def test_soft_threshold_and_scale_equal_the_float64_formula(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    w2 = w.reshape(shape[0], -1)
    got = soft_threshold_k(w).reshape(shape[0], -1)
    torch.testing.assert_close(got, ref_soft_threshold_rows(w2), rtol=0, atol=1e-15)
    assert is_2to4(got, dim=1)
    assert soft_scale(w).dtype == torch.float64
    assert soft_scale(w.float()).dtype == soft_scale(w.bfloat16()).dtype == torch.float32
    assert soft_scale(w).item() == pytest.approx(ref_soft_scale(w2), rel=1e-6)
    assert soft_scale(w).item() > 1.0  # the shrunk weights are scaled back up


def test_soft_threshold_pins_a_hand_computed_group():
    w = torch.tensor([[0.5, -3.0, 1.0, 2.0, 0.0, 0.0, -1.0, 1.0]])
    # group 1: t = 1.0 -> [0, -2, 0, 1]; group 2: t = 0 (two zeros) -> itself
    want = torch.tensor([[0.0, -2.0, 0.0, 1.0, 0.0, 0.0, -1.0, 1.0]])
    assert torch.equal(soft_threshold_k(w), want)


def test_soft_threshold_is_continuous_where_the_hard_mask_flips():
    eps = 1e-6
    a = torch.tensor([[1.0, 0.5 + eps, 0.5 - eps, 0.1]], dtype=torch.float64)
    b = torch.tensor([[1.0, 0.5 - eps, 0.5 + eps, 0.1]], dtype=torch.float64)
    hard = (a * ref_mask_rows(a) - b * ref_mask_rows(b)).abs().max()
    soft = (soft_threshold_k(a) - soft_threshold_k(b)).abs().max()
    assert hard > 0.49 and soft < 1e-5


# --------------------------------------------------------------------------- soft forward
@pytest.mark.parametrize("config", [SOFT_FST2, SOFT_SRSTE], ids=["fst2_soft", "srste_soft"])
@pytest.mark.parametrize("case", list(CONV))
@pytest.mark.parametrize("fixed", [False, True], ids=["beta_of_w", "fixed_beta"])
def test_soft_forward_conv_equals_float64_formula(config, case, fixed):
    xs, ws, stride, padding, groups = CONV[case]
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(xs, generator=gen, dtype=torch.float64)
    w = torch.randn(ws, generator=gen, dtype=torch.float64)
    b = torch.randn(ws[0], generator=gen, dtype=torch.float64)
    beta = 1.7 if fixed else None
    scale = torch.tensor(beta, dtype=torch.float64) if fixed else None

    def fn(x, w, b):
        return sparse_conv2d(x, w, b, stride, padding, 1, groups, config=config, soft_scale=scale)

    with torch.no_grad():
        y0 = fn(x, w, b)
    gy = torch.randn(y0.shape, generator=gen, dtype=torch.float64)
    got = _grads(fn, x, w, b, gy)
    geo = Geo(stride=(stride, stride), padding=(padding, padding), groups=groups)
    want = ref_conv(x, w, b, gy, geo, REF_NAME[id(config)], beta=beta)
    for name, a, e in zip(
        ("output", "grad_input", "grad_weight", "grad_bias"), got, want, strict=True
    ):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("config", [SOFT_FST2, SOFT_SRSTE], ids=["fst2_soft", "srste_soft"])
@pytest.mark.parametrize("xs", [(6, 16), (2, 5, 16)])
def test_soft_forward_linear_equals_float64_formula(config, xs):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(xs, generator=gen, dtype=torch.float64)
    w = torch.randn(12, 16, generator=gen, dtype=torch.float64)
    b = torch.randn(12, generator=gen, dtype=torch.float64)
    gy = torch.randn(*xs[:-1], 12, generator=gen, dtype=torch.float64)
    scale = torch.tensor(0.8, dtype=torch.float64)

    def fn(x, w, b):
        return sparse_linear(x, w, b, config=config, soft_scale=scale)

    got = _grads(fn, x, w, b, gy)
    want = ref_linear(x, w, b, gy, REF_NAME[id(config)], beta=0.8)
    for name, a, e in zip(
        ("output", "grad_input", "grad_weight", "grad_bias"), got, want, strict=True
    ):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=name)


def test_soft_forward_weight_gradient_is_straight_through():
    """dL/dW is dL/dW_out: neither β nor the threshold's Jacobian enters the weight gradient."""
    x = torch.randn(4, 16, dtype=torch.float64)
    w = torch.randn(8, 16, dtype=torch.float64, requires_grad=True)
    sparse_linear(x, w, config=SOFT_FST2, soft_scale=torch.tensor(3.0)).sum().backward()
    torch.testing.assert_close(w.grad, torch.ones(4, 8, dtype=torch.float64).t() @ x)


# --------------------------------------------------------------------------- fixed β, resume
def test_the_layer_scale_is_fixed_at_the_first_training_step_and_kept():
    torch.manual_seed(0)
    layer = SparseLinear(16, 8, config=SOFT_FST2)
    x = torch.randn(3, 16)
    with torch.no_grad():
        layer.eval()(x)  # evaluation before training computes β but does not keep it
    assert layer.soft_scale is None
    layer.train()
    initial = soft_scale(layer.weight)
    layer(x).sum().backward()
    assert torch.equal(layer.soft_scale, initial)
    with torch.no_grad():
        layer.weight.mul_(0.3).add_(0.1)
    layer(x)
    assert torch.equal(layer.soft_scale, initial)  # not recomputed from the new weights
    want = soft_threshold_k(layer.weight.detach()) * initial
    assert torch.equal(layer.pruned_weight(), want)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_the_layer_scale_round_trips_through_the_sparse_state(kind):
    torch.manual_seed(1)

    def make():
        if kind == "linear":
            return torch.nn.Sequential(SparseLinear(16, 8, config=SOFT_FST2)), torch.randn(3, 16)
        conv = SparseConv2d(3, 8, 3, padding=1, config=SOFT_FST2)
        return torch.nn.Sequential(conv), torch.randn(2, 3, 6, 6)

    model, x = make()
    model(x).sum().backward()
    with torch.no_grad():
        model[0].weight.add_(0.5 * model[0].weight.grad)  # the weights move; β stays
    state, sparse = model.state_dict(), sparse_state_dict(model)
    assert "0.soft_scale" not in state and "0.soft_scale" in sparse  # non-persistent buffer
    fresh, _ = make()
    fresh.load_state_dict(state)
    load_sparse_state_(fresh, sparse)
    assert torch.equal(fresh[0].soft_scale, model[0].soft_scale)
    assert torch.equal(fresh(x), model(x))
    dropped, _ = make()
    dropped.load_state_dict(state)
    load_sparse_state_(dropped, {})
    assert dropped[0].soft_scale is None and not torch.equal(dropped(x), model(x))


def _run(tmp_path, name, **kw):
    fields = dict(synthetic_train=96, epochs=2, deterministic=True, recipe="fst2")
    fields.update(output_weight="soft_2:4", decay_kind="masked_grad")
    return tiny_classify(tmp_path, name, **{**fields, **kw})


def test_a_soft_forward_run_with_masked_decay_resumes_bit_for_bit(tmp_path, monkeypatch):
    base = _run(tmp_path, "a")
    straight = train(base)
    train(base.replace(out=str(tmp_path / "b"), stop_after=1))
    resumed = train(base.replace(out=str(tmp_path / "b"), resume=True))
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert any(k.endswith("soft_scale") for k in a["sparse_state"])
    for key in a["sparse_state"]:
        assert torch.equal(a["sparse_state"][key], b["sparse_state"][key]), key
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert resumed["final_train_loss"] == straight["final_train_loss"]
    # without the saved β the resumed run would refit it to epoch 1's weights and differ
    import fullsparse.nn

    train(base.replace(out=str(tmp_path / "c"), stop_after=1))
    monkeypatch.setattr(fullsparse.nn, "load_sparse_state_", lambda model, state: None)
    train(base.replace(out=str(tmp_path / "c"), resume=True))
    c = load_checkpoint(tmp_path / "c" / "last.pt")["model"]
    assert any(not torch.equal(a["model"][k], c[k]) for k in c)


# --------------------------------------------------------------------------- masked decay
def test_masked_decay_config_is_validated():
    assert recipe("srste").decay_kind == "srste"
    with pytest.raises(ValueError, match="decay_kind='masked_grad' clashes with decay=0"):
        recipe("tsm", decay_kind="masked_grad")
    with pytest.raises(ValueError, match="output_weight='dense'"):
        recipe("dense", decay_kind="masked_grad", decay=0.0)
    with pytest.raises(ValueError, match="decay_kind"):
        recipe("fst", decay_kind="weights")
    with pytest.raises(ConfigError, match="masked_grad"):
        TrainConfig(recipe="dense", decay_kind="masked_grad")
    assert not recipe("fst", decay_kind="masked_grad").operands.decay  # not in the backward


@pytest.mark.parametrize("name", ["srste", "fst", "tsm"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_masked_decay_adds_lambda_w_on_pruned_entries_once_per_step(name, kind):
    lam = 1e-2
    config = recipe(name, decay=lam, decay_kind="masked_grad")
    torch.manual_seed(2)
    if kind == "linear":
        layer = SparseLinear(16, 8, config=config).double()
        x = torch.randn(2, 6, 16, dtype=torch.float64)
    else:
        layer = SparseConv2d(8, 8, 3, padding=1, config=config).double()
        x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    model = torch.nn.Sequential(layer)
    gy = torch.randn(layer(x).shape, dtype=torch.float64)
    for _ in range(2):  # two accumulated backward passes, one optimizer step
        model(x).backward(gy)
    before = layer.weight.grad.clone()
    w = layer.weight.detach()
    w2 = w.reshape(w.shape[0], -1)
    keep = layer.tsm_mask.reshape(w2.shape) if name == "tsm" else ref_mask_rows(w2)
    # the backward alone has no decay: twice the plain gradient (float64 im2col reference)
    if kind == "linear":
        plain = ref_linear(x, w, layer.bias.detach(), gy, _ref(name))[2]
    else:
        geo = Geo(stride=(1, 1), padding=(1, 1), groups=1)
        plain = ref_conv(x, w, layer.bias.detach(), gy, geo, _ref(name))[2]
    torch.testing.assert_close(before, 2 * plain, rtol=1e-10, atol=1e-10)
    assert masked_grad_decay_(model) == 1
    want = 2 * plain + lam * (w2 * ~keep).reshape(w.shape)
    torch.testing.assert_close(layer.weight.grad, want, rtol=1e-12, atol=1e-12)


def _ref(name):
    """The reference row of ``name`` without its SR-STE decay (masked_grad moves it out)."""
    return {"srste": "srste_nodecay", "fst": "fst_nodecay", "tsm": "tsm"}[name]


def test_srste_decay_kind_leaves_the_existing_recipes_bit_for_bit():
    x = torch.randn(2, 8, 6, 6)
    w = torch.randn(8, 8, 3, 3)
    gy = torch.randn(2, 8, 6, 6)
    for name in ("srste", "fst", "fst2", "gg"):
        default, explicit = recipe(name), recipe(name, decay_kind="srste")
        assert default == explicit
        got = [
            _grads(lambda x, w, b, c=c: sparse_conv2d(x, w, b, padding=1, config=c), x, w, None, gy)
            for c in (default, explicit)
        ]
        for a, b in zip(got[0][:3], got[1][:3], strict=True):
            assert torch.equal(a, b)
        assert masked_grad_decay_(torch.nn.Sequential(SparseLinear(4, 4, config=default))) == 0


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_masked_decay_equals_srste_decay_in_a_plain_step(kind):
    """One fp32 backward, no clipping: the two decay kinds give the same gradient."""
    torch.manual_seed(4)
    grads = []
    for decay_kind in ("srste", "masked_grad"):
        config = recipe("fst", decay=1e-2, decay_kind=decay_kind)
        torch.manual_seed(4)
        if kind == "linear":
            layer, x = SparseLinear(16, 8, config=config), torch.randn(2, 6, 16)
        else:
            layer, x = SparseConv2d(8, 8, 3, padding=1, config=config), torch.randn(2, 8, 5, 5)
        model = torch.nn.Sequential(layer)
        model(x).square().sum().backward()
        masked_grad_decay_(model)
        grads.append(layer.weight.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_masked_decay_uses_the_mask_the_forward_used(kind):
    """Under ``mask_interval > 1`` the forward applies the cached S_K mask; the masked decay
    of that step decays what that mask pruned (as SR-STE's decay in the backward does), not
    S_K of the weight as it stands."""
    lam = 1e-2
    grads = []
    for decay_kind in ("srste", "masked_grad"):
        config = recipe("fst", decay=lam, decay_kind=decay_kind, mask_interval=4)
        torch.manual_seed(5)
        if kind == "linear":
            layer, x = SparseLinear(16, 8, config=config).double(), torch.randn(2, 6, 16)
        else:
            layer, x = (
                SparseConv2d(8, 8, 3, padding=1, config=config).double(),
                torch.randn(2, 8, 5, 5),
            )
        model, x = torch.nn.Sequential(layer), x.double()
        model(x).sum().backward()  # step 1 computes and caches the mask
        cached = layer.tsm_mask.clone()
        with torch.no_grad():  # a weight whose own S_K differs from the cached mask
            layer.weight.copy_(layer.weight.flip(1))
        assert not torch.equal(mask_k(layer.weight.detach()), cached)
        layer.weight.grad = None
        model(x).square().sum().backward()  # step 2: the cached mask, not recomputed
        assert torch.equal(layer.tsm_mask, cached)
        if decay_kind == "masked_grad":
            plain = layer.weight.grad.clone()
            assert masked_grad_decay_(model) == 1
            w = layer.weight.detach()
            torch.testing.assert_close(
                layer.weight.grad - plain, lam * w * ~cached, rtol=0, atol=1e-15
            )
        grads.append(layer.weight.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("name", "kind", "layout"),
    [("fst", "linear", "im2col"), ("fst_mvue", "conv", "im2col"), ("srste", "conv", "channel")],
)
def test_masked_decay_in_one_pass_equals_the_mask_and_the_term(name, kind, layout, monkeypatch):
    """Masks every step: the term comes from W in one pass (SR-STE's decay term of S_K(W));
    it equals λ·(W ⊙ ¬S_K(W)) with S_K in the config's grouping, float32, bit for bit."""
    import fullsparse.masked_decay as state

    lam = 6e-5
    config = recipe(name, decay=lam, decay_kind="masked_grad", conv_layout=layout)
    torch.manual_seed(7)
    if kind == "linear":
        layer = SparseLinear(64, 32, config=config)
    else:
        layer = SparseConv2d(12, 16, 3, padding=1, config=config)
    grad = torch.randn_like(layer.weight)
    want = grad + lam * (layer.weight.detach() * ~mask_k(layer.weight.detach(), layout))
    one_pass = []
    real = state.add_deferred_decay
    monkeypatch.setattr(state, "add_deferred_decay", lambda *a: one_pass.append(1) or real(*a))
    got = state.module_masked_decay_(layer, grad.clone())
    assert torch.equal(got, want)
    assert one_pass == ([] if layout == "channel" else [1])  # the grouping the kernel knows


def test_the_trainer_applies_the_masked_decay_once_per_optimizer_step(tmp_path, monkeypatch):
    import fullsparse.train.guard as guard

    calls = []
    real = guard.masked_grad_decay_
    monkeypatch.setattr(guard, "masked_grad_decay_", lambda m: calls.append(real(m)))
    train(tiny_classify(tmp_path, "plain", recipe="fst"))
    assert calls == []
    train(tiny_classify(tmp_path, "masked", recipe="fst", decay_kind="masked_grad"))
    assert len(calls) == 4 and all(n > 0 for n in calls)  # 4 steps, every sparse layer


def test_compare_gives_the_soft_forward_to_the_s_k_recipes_only(tmp_path):
    from fullsparse.train.compare import recipe_configs

    base = TrainConfig(output_weight="soft_2:4", decay=0.0)
    configs, notes = recipe_configs(base, ("dense", "tsm", "fst2"), tmp_path)
    got = {c.recipe: c.sparsity() for c in configs}
    assert got["dense"].output_weight == "dense"
    assert got["tsm"].output_weight == "transposable"
    assert got["fst2"].output_weight == "soft_2:4" and got["fst2"].decay == 0.0
    assert "output_weight=soft_2:4 does not apply to dense (kept its default)" in notes


def test_compare_gives_the_masked_decay_with_its_lambda_to_every_recipe_taking_both(tmp_path):
    """decay_kind=masked_grad is valid for tsm (own decay 0) only beside the decay given: the
    two go together, not one of them alone (tsm would then train with SR-STE's decay)."""
    from fullsparse.train.compare import recipe_configs

    base = TrainConfig(decay_kind="masked_grad", decay=6e-5)
    configs, notes = recipe_configs(base, ("dense", "tsm", "fst_mvue"), tmp_path)
    got = {c.recipe: c.sparsity() for c in configs}
    for name in ("tsm", "fst_mvue"):
        assert (got[name].decay_kind, got[name].decay) == ("masked_grad", 6e-5), name
    assert (got["dense"].decay_kind, got["dense"].decay) == ("srste", 0.0)
    assert notes == [
        "decay=6e-05 does not apply to dense (kept its default)",
        "decay_kind=masked_grad does not apply to dense (kept its default)",
    ]


def test_export_writes_the_soft_forward_weights_with_the_saved_scale(tmp_path):
    from fullsparse.train.inference import export_checkpoint

    train(tiny_classify(tmp_path, "run", recipe="fst2", output_weight="soft_2:4", decay=0.0))
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    export_checkpoint(tmp_path / "run" / "last.pt", tmp_path / "w.pt")
    exported = torch.load(tmp_path / "w.pt", weights_only=True)
    name = next(k[: -len(".soft_scale")] for k in state["sparse_state"] if "soft_scale" in k)
    w = state["model"][f"{name}.weight"]
    beta = state["sparse_state"][f"{name}.soft_scale"]
    assert torch.equal(exported[f"{name}.weight"], soft_threshold_k(w) * beta)
    assert not torch.equal(beta, soft_scale(w))  # β is the initial weights', not the final
