"""The named recipes: the spec's recipe table (``docs/spec.md``, "Recipes") written as data,
and :func:`recipe`, the frozen :class:`~fullsparse.config.SparsityConfig` of a name with
overrides.
"""

from __future__ import annotations

from typing import Any

from fullsparse.config import DEFAULT_DECAY, SparsityConfig, _check_fields, _new_names

__all__ = [
    "RECIPES",
    "RECIPE_PINNED",
    "RECIPE_TABLE",
    "COMPARE_RECIPES",
    "recipe",
    "resolve_config",
    "applicable_overrides",
]

_COMMON_FST = dict(output_weight="2:4", grad_input_weight="2:4_co", decay=DEFAULT_DECAY)

#: The spec's recipe table. Keys are API; values are SparsityConfig fields.
RECIPE_TABLE: dict[str, dict[str, Any]] = {
    "dense": dict(),
    "srste": dict(output_weight="2:4", grad_input_weight="forward", decay=DEFAULT_DECAY),
    "tsm": dict(output_weight="transposable", grad_input_weight="forward"),
    "fst2": dict(_COMMON_FST),
    "fst_noir": dict(_COMMON_FST, grad_weight_mode="ir", ir_alpha=0.0),
    # α = 1 (Eq. 10) is kept by measurement (docs/results.md, ResNet-20 / Fashion-MNIST,
    # 15 epochs, seed 0): α = 0 / 0.03 / 0.25 / 1 ended at 84.16 / 81.66 / 83.72 / 84.26 %
    # top-1; α = 1 is best or tied, 0.03 (the authors' code) is worst. For transformers
    # (token pairs) α = 1 is clearly worse (ViT, byte-level GPT): use fst2 or fst_noir there.
    "fst": dict(_COMMON_FST, grad_weight_mode="ir", ir_alpha=1.0),
    "wg": dict(_COMMON_FST, grad_weight_mode="2:4_grad_output"),
    "wx": dict(_COMMON_FST, grad_weight_mode="2:4_input"),
    "gg": dict(
        output_weight="2:4",
        grad_input_weight="forward",
        grad_input_dy="2:4_co",
        grad_weight_mode="2:4_grad_output",
        decay=DEFAULT_DECAY,
    ),
    "gx": dict(
        output_weight="2:4",
        grad_input_weight="forward",
        grad_input_dy="2:4_co",
        grad_weight_mode="2:4_input",
        decay=DEFAULT_DECAY,
    ),
    # baselines: ASP's fine-tuning GEMMs (the forward mask is fixed by the trainer,
    # fullsparse.train.asp); meProp keeps the top-k of each dY row in both backward products
    "asp": dict(output_weight="2:4", grad_input_weight="forward"),
    "meprop": dict(grad_input_dy="topk", grad_weight_mode="topk_grad_output"),
    # fst's forward and grad_input masks with the unbiased random 2:4 (MVUE) weight
    # gradient: fully sparse; docs/results/quality.md measures it on the three tasks
    "fst_mvue": dict(_COMMON_FST, grad_weight_mode="mvue"),
    # fst's forward and grad_input masks with an unbiased weight gradient over a sample of
    # the tokens / columns (fullsparse.sampling): a smaller dense product on any hardware
    "fst_rand": dict(_COMMON_FST, grad_weight_mode="rand_half"),
    "fst_is": dict(_COMMON_FST, grad_weight_mode="is_half"),
    "fst_adaptive": dict(_COMMON_FST, grad_weight_mode="is_adaptive"),
    # fst_is over the whole batch: one sampling group per call keeping 0.59 of the units
    # (the largest share that keeps the GPT's FLOPs 0.9 sparse, its output head being
    # dense), convolutions sampling whole samples (one full-width product). The quality
    # study's candidate: docs/results/frontier.md
    "fst_is_batch": dict(
        _COMMON_FST,
        grad_weight_mode="is_half",
        sample_group=0,
        sample_share=0.59,
        conv_sample_unit="sample",
    ),
}

#: Recipe names, in the order of the spec's table.
RECIPES: tuple[str, ...] = tuple(RECIPE_TABLE)
#: What ``fullsparse compare`` trains by default: the dense baseline, the paper's recipe and
#: the recipe the README recommends for dense quality (the fully sparse recipe within the
#: quality study's goals on every task over all its seeds, with 2by4's masked decay on the
#: transformers: docs/results/quality.md).
COMPARE_RECIPES: tuple[str, ...] = ("dense", "fst", "fst_mvue")

#: Fields whose value *is* the recipe: ``fst_noir`` is ``fst`` with α = 0, so an
#: ``ir_alpha`` override would silently turn it into ``fst`` with that α. :func:`recipe`
#: refuses such an override (``compare``/``study`` then keep the recipe's value, with a note).
RECIPE_PINNED: dict[str, dict[str, Any]] = {
    "fst_noir": {"ir_alpha": 0.0},
    # decay and forward variants: an output_weight override would make dense sparse and TSM
    # something else (the soft forward is for the S_K recipes)
    "dense": {"output_weight": "dense"},
    "tsm": {"output_weight": "transposable"},
}
#: What to use instead, per pinned field (the message of a refused override).
_PINNED_HINT = {
    "ir_alpha": "for information restoration of strength {v}, use recipe 'fst' with ir_alpha={v}",
    "output_weight": "for output_weight={v}, use a recipe with an S_K forward, e.g. 'fst2'",
}


def recipe(name: str, **overrides: Any) -> SparsityConfig:
    """The frozen config of recipe ``name`` (one of :data:`RECIPES`) with ``overrides``.

    >>> recipe("fst", ir_alpha=0.03).ir_alpha
    0.03

    Overriding ``grad_weight_mode`` with another mode than ``ir`` drops the recipe's
    ``ir_alpha`` (it belonged to the replaced mode): ``recipe("fst", grad_weight_mode="mvue")``.
    """
    if not isinstance(name, str) or name not in RECIPE_TABLE:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    overrides = _new_names(overrides, "recipe")
    _check_fields(overrides)
    for key, pinned in RECIPE_PINNED.get(name, {}).items():
        if key in overrides and overrides[key] != pinned:
            raise ValueError(
                f"{name} is defined by {key}={pinned}; {key}={overrides[key]} would make it "
                f"another recipe ({_PINNED_HINT[key].format(v=overrides[key])})"
            )
    fields = dict(RECIPE_TABLE[name])
    if overrides.get("grad_weight_mode", "ir") != "ir" and "ir_alpha" not in overrides:
        fields.pop("ir_alpha", None)  # the recipe's α belongs to the mode it replaces
    fields.update(overrides)
    fields.setdefault("name", name)
    return SparsityConfig(**fields)


def resolve_config(config_or_name: SparsityConfig | str) -> SparsityConfig:
    """Accept a config or a recipe name (the form every public entry point takes)."""
    if isinstance(config_or_name, SparsityConfig):
        return config_or_name
    if isinstance(config_or_name, str):
        return recipe(config_or_name)
    raise TypeError(
        f"expected a SparsityConfig or a recipe name, got {type(config_or_name).__name__}"
    )


def applicable_overrides(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The part of ``overrides`` (SparsityConfig fields) recipe ``name`` takes, together: each
    is kept if the recipe is valid with it and those kept so far, and the others are tried
    again once more are kept (a field valid only beside another: ``decay_kind='masked_grad'``
    on ``tsm``, whose own decay is 0, with ``decay`` given). What ``compare`` and ``study``
    give each recipe of a comparison (the rest: "does not apply, kept its default")."""
    kept: dict[str, Any] = {}
    pending = dict(overrides)
    while pending:
        took = False
        for key, value in list(pending.items()):
            try:
                recipe(name, **kept, **{key: value})
            except ValueError:
                continue
            kept[key] = pending.pop(key)
            took = True
        if not took:
            break
    return kept
