"""Recipes and SparsityConfig validation."""

from __future__ import annotations

import dataclasses

import pytest

import fullsparse
from fullsparse.config import RECIPE_TABLE, SparsityConfig, recipe, resolve_config


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
    )


@pytest.mark.parametrize(
    "name,fields",
    [
        ("dense", dict(output="dense", grad_input="dense", grad_weight="dense", decay=0.0)),
        ("srste", dict(output="2:4", grad_input="forward", grad_weight="dense", decay=2e-4)),
        ("tsm", dict(output="transposable", grad_input="forward", decay=0.0, tsm_interval=40)),
        ("fst2", dict(output="2:4", grad_input="2:4_co", grad_weight="dense", decay=2e-4)),
        ("fst_noir", dict(grad_input="2:4_co", grad_weight="ir", ir_alpha=0.0)),
        ("fst", dict(grad_input="2:4_co", grad_weight="ir", ir_alpha=1.0, decay=2e-4)),
        ("wg", dict(grad_input="2:4_co", grad_weight="2:4_grad_output")),
        ("wx", dict(grad_input="2:4_co", grad_weight="2:4_input")),
        (
            "gg",
            dict(
                grad_input="forward", grad_input_grad_output="2:4_co", grad_weight="2:4_grad_output"
            ),
        ),
        (
            "gx",
            dict(grad_input="forward", grad_input_grad_output="2:4_co", grad_weight="2:4_input"),
        ),
    ],
)
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
        ("dense", dict(ir_alpha=0.5), ("ir_alpha", "grad_weight")),
        ("fst2", dict(ir_alpha=1.0), ("ir_alpha", "grad_weight")),
        ("dense", dict(decay=1e-4), ("decay", "output")),
        ("srste", dict(grad_input_source="pruned"), ("grad_input_source", "grad_input")),
        ("tsm", dict(grad_input="2:4_co"), ("output", "grad_input")),
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
        (dict(grad_weight="fancy"), "grad_weight"),
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
