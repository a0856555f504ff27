"""The MVUE weight gradient and the per-layer-kind weight-gradient choice, against the float64
reference (``reference.py``): a fixed draw, the exact expectation, and the config API."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fullsparse import SparsityConfig, estimators, recipe
from fullsparse.config import upgrade_config_dict
from fullsparse.estimators import mvue_keep_probabilities
from fullsparse.functional import sparse_linear
from fullsparse.masks import is_2to4
from fullsparse.operands import mvue_spatial_conv, mvue_tokens
from reference import draw_mvue_uniforms, ref_conv, ref_linear, ref_mask_rows, ref_mvue_rows
from test_functional import (
    TOL64,
    _assert_all_close,
    _make_conv,
    _make_linear,
    _run_conv,
    _run_linear,
)

MVUE = recipe("fst2", grad_weight_mode="mvue")


# --------------------------------------------------------------------------- a fixed draw
@pytest.mark.parametrize("case", ["3x3_s2_odd_wo", "groups2", "first_conv_1ch_K9", "1x1_bias"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_mvue_matches_reference_for_a_fixed_draw(case, channels_last):
    x, weight, bias, gy, geo = _make_conv(case)
    torch.manual_seed(3)
    got = _run_conv(x, weight, bias, gy, geo, MVUE, channels_last=channels_last)
    torch.manual_seed(3)
    _assert_all_close(got, ref_conv(x, weight, bias, gy, geo, "fst_mvue"), **TOL64)


@pytest.mark.parametrize("case", ["tokens_odd_T7", "tokens_even_T6_dout10", "2d_input", "4d_input"])
def test_linear_mvue_matches_reference_for_a_fixed_draw(case):
    x, w, b, gy = _make_linear(case)
    torch.manual_seed(5)
    got = _run_linear(x, w, b, gy, MVUE)
    torch.manual_seed(5)
    _assert_all_close(got, ref_linear(x, w, b, gy, "fst_mvue"), **TOL64)


def test_mvue_draws_differ_and_are_2to4_along_tokens():
    x, weight, bias, gy, geo = _make_conv("3x3_s1_p1")
    torch.manual_seed(0)
    first = _run_conv(x, weight, bias, gy, geo, MVUE)[2]
    second = _run_conv(x, weight, bias, gy, geo, MVUE)[2]
    assert not torch.equal(first, second)  # a random estimator: the generator advanced
    dy = torch.randn(3, 8, 5, 6, dtype=torch.float64)
    rows = mvue_spatial_conv(dy).transpose(0, 1).reshape(8, -1)
    assert is_2to4(rows, dim=1)
    assert is_2to4(mvue_tokens(dy.reshape(-1, 6)), dim=0)


# --------------------------------------------------------------------------- expectation
def _exact_mean(run, rows: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    """E over the draw of ``run()``: every group gets the same u, so integrating over that one
    u integrates each group over its own (the result is linear in each group's output)."""
    p = mvue_keep_probabilities(rows, dim=1)
    p = torch.nn.functional.pad(p, (0, (-p.shape[1]) % 4)).reshape(-1, 4)
    cum = p.cumsum(-1).flatten().tolist()
    breaks = {0.0, 1.0, *(c for c in cum if 0 < c < 1), *(c - 1 for c in cum if 1 < c < 2)}
    breaks = sorted(breaks)
    total = None
    for lo, hi in zip(breaks, breaks[1:], strict=False):
        mid = (lo + hi) / 2
        monkeypatch.setattr(
            estimators,
            "mvue_uniforms",
            lambda key, pre, post, groups, mid=mid: torch.full((pre, groups, post), mid),
        )
        part = (hi - lo) * run()
        total = part if total is None else total + part
    assert total is not None
    return total


def test_conv_mvue_weight_gradient_is_exactly_unbiased(monkeypatch):
    x, weight, _, gy, geo = _make_conv("3x3_s2_odd_wo")
    config = SparsityConfig(grad_weight_mode="mvue")  # only the weight gradient is random
    rows = gy.transpose(0, 1).reshape(gy.shape[1], -1)

    def run() -> torch.Tensor:
        return _run_conv(x, weight, None, gy, geo, config)[2]

    dense = _run_conv(x, weight, None, gy, geo, "dense")[2]
    torch.testing.assert_close(_exact_mean(run, rows, monkeypatch), dense, **TOL64)


def test_linear_mvue_weight_gradient_is_exactly_unbiased(monkeypatch):
    x, w, _, gy = _make_linear("tokens_odd_T7")
    config = SparsityConfig(grad_weight_mode="mvue")
    rows = gy.reshape(-1, gy.shape[-1]).t()

    def run() -> torch.Tensor:
        return _run_linear(x, w, None, gy, config)[2]

    dense = gy.reshape(-1, gy.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
    torch.testing.assert_close(_exact_mean(run, rows, monkeypatch), dense, **TOL64)


def test_mvue_monte_carlo_mean_approaches_dense():
    x, w, _, gy = _make_linear("tokens_even_T6_dout10")
    config = SparsityConfig(grad_weight_mode="mvue")
    torch.manual_seed(0)
    draws = torch.stack([_run_linear(x, w, None, gy, config)[2] for _ in range(4000)])
    dense = gy.reshape(-1, 10).t() @ x.reshape(-1, 16)
    err = (draws.mean(0) - dense).abs().max() / draws.std(0).max()
    assert err < 5 / 4000**0.5  # within five standard errors


# --------------------------------------------------------------------------- per layer kind
def test_per_kind_ir_on_convs_and_mvue_on_linears():
    config = recipe("fst", grad_weight_mode_linear="mvue")
    assert (config.grad_weight_mode, config.ir_alpha) == ("ir", 1.0)
    assert config.operands_for("conv").grad_weight_dy == "IR(dY)"
    assert config.operands_for("linear").grad_weight_dy == "MVUE_T(dY)"
    assert config.for_kind("linear").ir_alpha == 0.0
    x, weight, bias, gy, geo = _make_conv("3x3_s1_p1")
    _assert_all_close(
        _run_conv(x, weight, bias, gy, geo, config),
        ref_conv(x, weight, bias, gy, geo, "fst"),
        **TOL64,
    )
    xl, wl, bl, gl = _make_linear("tokens_odd_T7")
    torch.manual_seed(1)
    got = _run_linear(xl, wl, bl, gl, config)
    torch.manual_seed(1)
    _assert_all_close(got, ref_linear(xl, wl, bl, gl, "fst_mvue"), **TOL64)


def test_per_kind_fixed_mask_without_restoration_on_linears():
    config = recipe("fst", ir_alpha_linear=0.0)
    assert config.for_kind("linear") == recipe("fst_noir").replace(name="fst")
    x, weight, bias, gy, geo = _make_conv("3x3_s2_odd_wo")
    _assert_all_close(
        _run_conv(x, weight, bias, gy, geo, config),
        ref_conv(x, weight, bias, gy, geo, "fst"),
        **TOL64,
    )
    xl, wl, bl, gl = _make_linear("tokens_odd_T7")
    _assert_all_close(
        _run_linear(xl, wl, bl, gl, config), ref_linear(xl, wl, bl, gl, "fst_noir"), **TOL64
    )


def test_config_without_per_kind_fields_is_its_own_layer_config():
    config = recipe("fst")
    assert config.for_kind("conv") is config and config.for_kind("linear") is config
    assert not config.per_kind
    assert not SparsityConfig(grad_weight_mode_linear="mvue").is_dense
    with pytest.raises(ValueError, match="layer kind"):
        config.for_kind("attention")


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        (dict(grad_weight_mode_linear="random"), "grad_weight_mode_linear"),
        (dict(grad_weight_mode_linear="mvue", ir_alpha_linear=1.0), "ir_alpha_linear"),
        (dict(ir_alpha_linear=-1.0), "ir_alpha_linear"),
        (dict(grad_weight_mode="mvue", ir_alpha=1.0), "ir_alpha"),
    ],
)
def test_bad_per_kind_fields_are_refused(fields, needle):
    with pytest.raises(ValueError, match=needle):
        SparsityConfig(output_weight="2:4", **fields)


def test_overriding_the_mode_drops_the_recipe_alpha():
    assert recipe("fst", grad_weight_mode="mvue").ir_alpha == 0.0
    assert recipe("fst", grad_weight_mode="ir").ir_alpha == 1.0
    with pytest.raises(ValueError, match="ir_alpha"):
        recipe("fst", grad_weight_mode="mvue", ir_alpha=0.5)


def test_saved_configs_from_before_the_per_kind_fields_compare_equal():
    saved = recipe("fst").to_dict()
    for key in ("grad_weight_mode_linear", "ir_alpha_linear"):
        del saved[key]
    assert upgrade_config_dict(saved) == recipe("fst").to_dict()


def test_dense_mode_linear_keeps_conv_sparse_weight_gradient():
    config = recipe("wg", grad_weight_mode_linear="dense")
    xl, wl, bl, gl = _make_linear("tokens_odd_T7")
    got = _run_linear(xl, wl, bl, gl, config)[2]
    want = gl.reshape(-1, 8).t() @ xl.reshape(-1, 12) + 2e-4 * (wl - wl * ref_mask_rows(wl))
    torch.testing.assert_close(got, want, **TOL64)
    x, weight, bias, gy, geo = _make_conv("1x1_bias")
    _assert_all_close(
        _run_conv(x, weight, bias, gy, geo, config),
        ref_conv(x, weight, bias, gy, geo, "wg"),
        **TOL64,
    )


def test_mvue_under_bf16_autocast_is_the_float64_draw_of_the_bf16_operands():
    x = torch.randn(2, 8, 16)
    w = torch.randn(8, 16, requires_grad=True)
    gy = torch.randn(2, 8, 8)
    config = SparsityConfig(grad_weight_mode="mvue")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sparse_linear(x, w, config=config)
    torch.manual_seed(2)
    y.backward(gy.bfloat16())
    assert w.grad is not None and w.grad.dtype == torch.float32
    # The expectation comes from the float64 reference (per-group water-filling by
    # bisection, the kept entries picked from the same uniforms), not from mvue_tokens.
    torch.manual_seed(2)
    dy = gy.bfloat16().double().reshape(-1, 8)  # [M = 16 tokens, d_out = 8]
    kept = ref_mvue_rows(dy.t(), draw_mvue_uniforms(8, dy.shape[0]))  # [d_out, M]
    want = (kept @ x.bfloat16().double().reshape(-1, 16)).float()
    assert int((kept != 0).sum()) == 8 * 16 // 2  # 2 of every 4 tokens per feature
    # bf16 rounds the survivors, the product and its output (2⁻⁹ each, relative): the error
    # is bounded by a few of those times Σ|dY|·|X| per entry
    xb = x.bfloat16().double().reshape(-1, 16)
    bound = (2.0**-7 * (kept.abs() @ xb.abs())).float()
    assert bool(((w.grad - want).abs() <= bound).all())
    torch.testing.assert_close(y.float(), F.linear(x, w).detach(), rtol=2e-2, atol=5e-2)


# --------------------------------------------------------------------------- run config
def test_run_config_overrides_and_layer_policy_from_yaml(tmp_path):
    from fullsparse.errors import ConfigError
    from fullsparse.train.config import TrainConfig, config_from_sources
    from fullsparse.train.config_checks import layer_policy_identity

    path = tmp_path / "run.yaml"
    path.write_text("recipe: fst\ngrad_weight_mode_linear: mvue\nkeep_dense: stem, first_linear\n")
    config = config_from_sources(path)
    assert config.sparsity() == recipe("fst", grad_weight_mode_linear="mvue")
    assert layer_policy_identity(config) == {"keep_dense": ["stem", "first_linear"]}
    assert layer_policy_identity(TrainConfig()) == {}  # old identities still match
    assert TrainConfig(recipe="fst", grad_weight_mode="mvue").sparsity().ir_alpha == 0.0
    with pytest.raises(ConfigError, match="grad_weight_mode_linear='sometimes'"):
        TrainConfig(grad_weight_mode_linear="sometimes")
    with pytest.raises(ConfigError, match="'head' is not a layer role"):
        TrainConfig(keep_dense="stem,head")
