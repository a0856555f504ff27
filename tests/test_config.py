"""Recipes and SparsityConfig validation."""

from __future__ import annotations

import dataclasses

import pytest

import fullsparse
from fullsparse.config import (
    GRAD_INPUT_DY,
    GRAD_INPUT_SOURCE,
    GRAD_INPUT_WEIGHT,
    GRAD_WEIGHT_MODE,
    OLD_FIELD_NAMES,
    OPERAND_TABLE,
    OUTPUT_WEIGHT,
    RECIPE_TABLE,
    SPARSE_ALONG,
    GemmOperands,
    SparsityConfig,
    recipe,
    resolve_config,
    upgrade_config_dict,
)
from fullsparse.train.checkpoint import check_identity


def test_recipes_are_the_spec_table_in_order():
    assert fullsparse.RECIPES == (
        "dense",
        "srste",
        "tsm",
        "fst2",
        "fst_noir",
        "fst",
        "wg",
        "wx",
        "gg",
        "gx",
        "asp",
        "meprop",
        "fst_mvue",
        "fst_rand",
        "fst_is",
        "fst_adaptive",
        "fst_is_batch",
    )


_GI, _GW = "grad_input_weight", "grad_weight_mode"


@pytest.mark.parametrize(
    "name,fields",
    [
        ("dense", {"output_weight": "dense", _GI: "dense", _GW: "dense", "decay": 0.0}),
        ("srste", {"output_weight": "2:4", _GI: "forward", _GW: "dense", "decay": 2e-4}),
        ("tsm", {"output_weight": "transposable", _GI: "forward", "tsm_interval": 40}),
        ("fst2", {"output_weight": "2:4", _GI: "2:4_co", _GW: "dense", "decay": 2e-4}),
        ("fst_noir", {_GI: "2:4_co", _GW: "ir", "ir_alpha": 0.0}),
        ("fst", {_GI: "2:4_co", _GW: "ir", "ir_alpha": 1.0, "decay": 2e-4}),
        ("wg", {_GI: "2:4_co", _GW: "2:4_grad_output"}),
        ("wx", {_GI: "2:4_co", _GW: "2:4_input"}),
        ("gg", {_GI: "forward", "grad_input_dy": "2:4_co", _GW: "2:4_grad_output"}),
        ("gx", {_GI: "forward", "grad_input_dy": "2:4_co", _GW: "2:4_input"}),
        ("meprop", {_GI: "dense", "grad_input_dy": "topk", _GW: "topk_grad_output"}),
        ("fst_is_batch", {_GI: "2:4_co", _GW: "is_half", "sample_group": 0,
                          "sample_share": 0.59, "conv_sample_unit": "sample"}),
    ],
)  # fmt: skip
def test_recipe_fields_follow_the_spec(name, fields):
    cfg = recipe(name)
    assert cfg.name == name
    for key, value in fields.items():
        assert getattr(cfg, key) == value, key


def test_config_is_frozen_and_overridable():
    cfg = recipe("fst", ir_alpha=0.03, grad_input_source="pruned")
    assert (cfg.ir_alpha, cfg.grad_input_source) == (0.03, "pruned")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.ir_alpha = 1.0  # type: ignore[misc]
    assert cfg.replace(ir_alpha=0.25).ir_alpha == 0.25
    assert resolve_config("fst") == recipe("fst")
    assert resolve_config(cfg) is cfg


@pytest.mark.parametrize(
    "name,overrides,fields",
    [
        ("dense", dict(ir_alpha=0.5), ("ir_alpha", "grad_weight_mode")),
        ("fst2", dict(ir_alpha=1.0), ("ir_alpha", "grad_weight_mode")),
        ("dense", dict(decay=1e-4), ("decay", "output_weight")),
        ("srste", dict(grad_input_source="pruned"), ("grad_input_source", "grad_input_weight")),
        ("tsm", dict(grad_input_weight="2:4_co"), ("output_weight", "grad_input_weight")),
    ],
)
def test_inconsistent_overrides_name_the_clashing_fields(name, overrides, fields):
    with pytest.raises(ValueError) as err:
        recipe(name, **overrides)
    for field in fields:
        assert field in str(err.value)


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (dict(ir_alpha=-1.0), "ir_alpha"),
        (dict(ir_alpha=float("nan")), "ir_alpha"),
        (dict(decay="big"), "decay"),
        (dict(tsm_interval=0), "tsm_interval"),
        (dict(grad_weight_mode="fancy"), "grad_weight_mode"),
        (dict(grad_input_source="latent"), "grad_input_source"),
        (dict(no_such_field=1), "no_such_field"),
    ],
)
def test_bad_values_are_rejected(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        recipe("fst", **overrides)


def test_unknown_recipe_lists_the_choices():
    with pytest.raises(ValueError, match="unknown recipe 'fts'.*fst"):
        recipe("fts")
    with pytest.raises(TypeError):
        resolve_config(3)  # type: ignore[arg-type]


def test_every_table_entry_builds_and_dense_is_dense():
    for name in RECIPE_TABLE:
        assert isinstance(recipe(name), SparsityConfig)
    assert recipe("dense").is_dense and not recipe("fst").is_dense


def test_fst_noir_refuses_an_ir_alpha_that_would_make_it_another_recipe():
    assert recipe("fst_noir", ir_alpha=0.0).ir_alpha == 0.0
    with pytest.raises(ValueError, match=r"fst_noir is defined by ir_alpha=0.0.*recipe 'fst'"):
        recipe("fst_noir", ir_alpha=0.03)
    assert recipe("fst", ir_alpha=0.0).ir_alpha == 0.0  # fst itself takes any α


OLD_NAMES = {
    "output": ("output_weight", "2:4"),
    "grad_input": ("grad_input_weight", "forward"),
    "grad_input_grad_output": ("grad_input_dy", "2:4_co"),
    "grad_weight": ("grad_weight_mode", "2:4_grad_output"),
}


def test_every_old_field_name_is_listed():
    assert {old: new for old, (new, _) in OLD_NAMES.items()} == OLD_FIELD_NAMES


@pytest.mark.parametrize("old", list(OLD_NAMES))
def test_old_field_names_still_load_with_a_one_line_deprecation(old):
    new, value = OLD_NAMES[old]
    want = recipe("gg").replace(**{new: value})
    with pytest.warns(DeprecationWarning, match=f"{old} -> {new}") as caught:
        built = SparsityConfig(**{**recipe("gg").to_dict(), "name": "gg", new: value})
        assert built == want
        from_recipe = recipe("gg", **{old: value})
        replaced = recipe("gg").replace(**{old: value})
    assert from_recipe == want and replaced == want
    assert all("\n" not in str(w.message) for w in caught)
    # a config saved with the old names (YAML, checkpoints) loads to the same config
    saved = want.to_dict()
    saved[old] = saved.pop(new)
    with pytest.warns(DeprecationWarning, match=old):
        assert SparsityConfig(**saved) == want
    assert upgrade_config_dict(saved) == want.to_dict()
    # and a checkpoint saved with them still belongs to the run
    check_identity("old.pt", {"sparsity": saved}, {"sparsity": want.to_dict()})
    with pytest.warns(DeprecationWarning, match=f"{old} is renamed {new}"):
        assert getattr(want, old) == value


def test_old_and_new_name_together_is_refused():
    with pytest.raises(ValueError, match="old name of 'output_weight'"):
        recipe("fst", output="2:4", output_weight="2:4")


def test_operand_table_gives_each_recipe_its_spec_row():
    rows = {name: recipe(name).operands for name in fullsparse.RECIPES}
    assert rows["fst"] == GemmOperands("S_K(W)", "S_Co(W)", "dY", "IR(dY)", "F(X)", True)
    assert rows["srste"] == GemmOperands("S_K(W)", "S_K(W)", "dY", "dY", "X", True)
    assert rows["tsm"] == GemmOperands("TSM(W)", "TSM(W)", "dY", "dY", "X", False)
    assert rows["gx"] == GemmOperands("S_K(W)", "S_K(W)", "S_Co(dY)", "dY", "S_T(X)", True)
    assert rows["dense"] == GemmOperands("W", "W", "dY", "dY", "X", False)
    assert rows["meprop"] == GemmOperands("W", "W", "TopK(dY)", "TopK(dY)", "X", False)
    pruned_config = recipe("fst2", grad_input_source="pruned")
    assert pruned_config.operands.grad_input_weight == "S_Co(S_K(W))"
    # every value of every role field has a row, and every symbol a 2:4 axis
    choices = {
        "output_weight": OUTPUT_WEIGHT,
        "grad_input_weight": GRAD_INPUT_WEIGHT,
        "grad_input_dy": GRAD_INPUT_DY,
        "grad_weight_mode": GRAD_WEIGHT_MODE,
        "grad_input_source": GRAD_INPUT_SOURCE,
    }
    assert set(OPERAND_TABLE) == {(f, v) for f, values in choices.items() for v in values}
    for config in [recipe(n) for n in fullsparse.RECIPES] + [pruned_config]:
        for symbol in dataclasses.astuple(config.operands)[:5]:
            assert symbol in SPARSE_ALONG, symbol


def test_the_named_recipes_are_importable_from_config_as_before():
    """The recipe table lives in fullsparse.recipes; the old import path still gives the
    same objects, and an unknown name is still an AttributeError."""
    import fullsparse.config as config
    import fullsparse.recipes as recipes

    for name in ("COMPARE_RECIPES", "RECIPE_PINNED", "RECIPE_TABLE", "RECIPES", "recipe",
                 "resolve_config"):  # fmt: skip
        assert getattr(config, name) is getattr(recipes, name)
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        config.no_such_name  # noqa: B018
