"""Sparsity configurations: what each of a layer's three GEMMs uses, and the named recipes.

A :class:`SparsityConfig` is a frozen description; the autograd functions in
:mod:`fullsparse.functional` read it and never ask which recipe they are running. The table
:data:`RECIPE_TABLE` is the spec's recipe table (``fst-spec.md``, "Recipes") written as data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = [
    "OUTPUT_WEIGHT",
    "GRAD_INPUT_WEIGHT",
    "GRAD_INPUT_GRAD_OUTPUT",
    "GRAD_WEIGHT",
    "GRAD_INPUT_SOURCE",
    "CONV_LAYOUT",
    "SparsityConfig",
    "RECIPES",
    "RECIPE_PINNED",
    "RECIPE_TABLE",
    "recipe",
    "resolve_config",
]

#: Weight operand of the ``output`` GEMM (Eq. 1):
#: ``dense`` = W; ``2:4`` = S_K(W); ``transposable`` = TSM mask (2:4 along K and Co at once).
OUTPUT_WEIGHT = ("dense", "2:4", "transposable")
#: Weight operand of the ``grad_input`` GEMM (Eq. 2):
#: ``dense`` = W; ``forward`` = the forward operand itself (the exact gradient of Eq. 1);
#: ``2:4_co`` = S_Co(W_src), a separate mask along the output channels (FST §5.2).
GRAD_INPUT_WEIGHT = ("dense", "forward", "2:4_co")
#: grad_output operand of the ``grad_input`` GEMM: ``dense`` = dY, ``2:4_co`` = S_Co(dY)
#: (the GG/GX saliency rows of Table 1).
GRAD_INPUT_GRAD_OUTPUT = ("dense", "2:4_co")
#: The ``grad_weight`` GEMM (Eq. 3): ``dense`` = dY·Xᵀ; ``ir`` = fixed mask F on Xᵀ with
#: information restoration of strength ``ir_alpha`` (Eq. 7-10, computed as a half-size
#: strided product); ``2:4_grad_output`` = S_T(dY)·Xᵀ (WG); ``2:4_input`` = dY·S_T(Xᵀ) (WX).
GRAD_WEIGHT = ("dense", "ir", "2:4_grad_output", "2:4_input")
#: Which weight the separate backward mask S_Co is taken from.
GRAD_INPUT_SOURCE = ("dense", "pruned")
#: How a conv weight ``[Co, Ci, kh, kw]`` is cut into groups of 4 for S_K:
#: ``im2col`` = 4 consecutive entries of the flattened ``Ci·kh·kw`` row (the paper's
#: ``W2 = W.reshape(Co, K)``); ``channel`` = 4 consecutive input channels at each kernel tap
#: ``(co, kh, kw)`` (the layout ASP and TensorRT's sparse convolutions need). Linear layers
#: and 1×1 convs are the same under both.
CONV_LAYOUT = ("im2col", "channel")

# Defaults below carry their reason; the study issue may move them, with evidence.
#: SR-STE's λ (Zhou et al. 2021), used by the paper (§5.1) and its public code.
DEFAULT_DECAY = 2e-4
#: TSM's default recomputation interval in training steps (Hubara et al. 2021).
DEFAULT_TSM_INTERVAL = 40


@dataclass(frozen=True)
class SparsityConfig:
    """What each GEMM of a sparse layer uses. Build one with :func:`recipe`.

    Fields are validated in ``__post_init__``; a combination that would silently do
    something other than what it says raises ``ValueError`` naming the clashing fields.
    """

    #: Recipe name this config came from (a label; behaviour is fixed by the fields below).
    name: str = "custom"
    #: Weight operand of Eq. 1, one of :data:`OUTPUT_WEIGHT`.
    output: str = "dense"
    #: Weight operand of Eq. 2, one of :data:`GRAD_INPUT_WEIGHT`.
    grad_input: str = "dense"
    #: grad_output operand of Eq. 2, one of :data:`GRAD_INPUT_GRAD_OUTPUT`.
    grad_input_grad_output: str = "dense"
    #: How Eq. 3 is computed, one of :data:`GRAD_WEIGHT`.
    grad_weight: str = "dense"
    #: Information-restoration strength α: dY_ir[j] = dY[2j] + α·dY[2j+1]. 1.0 is the
    #: paper's Eq. 10; 0.0 is the fixed mask alone (Table 5 row 4). Only with grad_weight='ir'.
    ir_alpha: float = 0.0
    #: SR-STE decay λ: the gradient reaching W gets + λ·(W − S(W)) (Eq. 6). Needs a sparse
    #: forward weight (otherwise W − S(W) is 0 and the field would silently do nothing).
    decay: float = 0.0
    #: Source of the separate backward mask S_Co: 'dense' = latent W (the paper's wording),
    #: 'pruned' = S_K(W) (the authors' code and Bi-Mask: backward weight ⊂ forward weight).
    #: Default 'dense', decided by measurement (docs/results.md, ResNet-20 on Fashion-MNIST,
    #: 15 epochs, fst seed 0): dense 84.26 % vs pruned 82.84 % final top-1, a gap about
    #: four times the seed spread of that study (±0.3-0.4).
    grad_input_source: str = "dense"
    #: Training steps between recomputations of the transposable (TSM) mask.
    tsm_interval: int = DEFAULT_TSM_INTERVAL
    #: Grouping of a conv weight's S_K, one of :data:`CONV_LAYOUT`. It exists so a trained
    #: conv is 2:4 for the inference stack it is exported to. Default 'im2col' (the
    #: paper's), kept by measurement (docs/export.md, ResNet-20 on Fashion-MNIST, fst, 15
    #: epochs, 2 seeds): 84.25 ± 0.13 % vs 'channel' 84.17 ± 0.75 % final top-1, no
    #: difference beyond the seed spread.
    conv_layout: str = "im2col"

    def __post_init__(self) -> None:
        choices = {
            "output": OUTPUT_WEIGHT,
            "grad_input": GRAD_INPUT_WEIGHT,
            "grad_input_grad_output": GRAD_INPUT_GRAD_OUTPUT,
            "grad_weight": GRAD_WEIGHT,
            "grad_input_source": GRAD_INPUT_SOURCE,
            "conv_layout": CONV_LAYOUT,
        }
        for field, allowed in choices.items():
            value = getattr(self, field)
            if value not in allowed:
                raise ValueError(f"SparsityConfig.{field}={value!r} is not one of {allowed}")
        for field in ("ir_alpha", "decay"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"SparsityConfig.{field} must be a number, got {value!r}")
            if not (value >= 0.0 and value != float("inf")):
                raise ValueError(f"SparsityConfig.{field} must be finite and >= 0, got {value}")
        if (
            isinstance(self.tsm_interval, bool)
            or not isinstance(self.tsm_interval, int)
            or (self.tsm_interval < 1)
        ):
            raise ValueError(
                f"SparsityConfig.tsm_interval must be an integer >= 1, got {self.tsm_interval!r}"
            )
        if self.ir_alpha != 0.0 and self.grad_weight != "ir":
            raise ValueError(
                f"ir_alpha={self.ir_alpha} clashes with grad_weight={self.grad_weight!r}: "
                "information restoration only exists for grad_weight='ir'"
            )
        if self.decay != 0.0 and self.output == "dense":
            raise ValueError(
                f"decay={self.decay} clashes with output='dense': the SR-STE decay "
                "λ·(W − S(W)) is zero without a sparse forward weight"
            )
        if self.output == "transposable" and self.grad_input != "forward":
            raise ValueError(
                f"output='transposable' clashes with grad_input={self.grad_input!r}: a "
                "transposable mask exists to be reused by grad_input (use grad_input='forward')"
            )
        if self.grad_input_source == "pruned" and self.grad_input != "2:4_co":
            raise ValueError(
                f"grad_input_source='pruned' clashes with grad_input={self.grad_input!r}: the "
                "source only matters for the separate backward mask (grad_input='2:4_co')"
            )
        if self.grad_input_source == "pruned" and self.output != "2:4":
            raise ValueError(
                f"grad_input_source='pruned' clashes with output={self.output!r}: 'pruned' "
                "means S_Co(S_K(W)) and needs output='2:4'"
            )
        if self.conv_layout != "im2col" and self.output != "2:4":
            raise ValueError(
                f"conv_layout={self.conv_layout!r} clashes with output={self.output!r}: the "
                "layout only changes the magnitude mask S_K of output='2:4'"
            )

    @property
    def is_dense(self) -> bool:
        """True when every GEMM is dense (the module behaves exactly like its torch twin)."""
        return (
            self.output == "dense"
            and self.grad_input in ("dense", "forward")
            and self.grad_input_grad_output == "dense"
            and self.grad_weight == "dense"
        )

    @property
    def uses_transposable_mask(self) -> bool:
        return self.output == "transposable"

    def replace(self, **overrides: Any) -> SparsityConfig:
        """A copy with ``overrides`` applied (validated again)."""
        _check_fields(overrides)
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_COMMON_FST = dict(output="2:4", grad_input="2:4_co", decay=DEFAULT_DECAY)

#: The spec's recipe table. Keys are API; values are SparsityConfig fields.
RECIPE_TABLE: dict[str, dict[str, Any]] = {
    "dense": dict(),
    "srste": dict(output="2:4", grad_input="forward", decay=DEFAULT_DECAY),
    "tsm": dict(output="transposable", grad_input="forward"),
    "fst2": dict(_COMMON_FST),
    "fst_noir": dict(_COMMON_FST, grad_weight="ir", ir_alpha=0.0),
    # α = 1 (Eq. 10) is kept by measurement (docs/results.md, ResNet-20 / Fashion-MNIST,
    # 15 epochs, seed 0): α = 0 / 0.03 / 0.25 / 1 ended at 84.16 / 81.66 / 83.72 / 84.26 %
    # top-1; α = 1 is best or tied, 0.03 (the authors' code) is worst. For transformers
    # (token pairs) α = 1 is clearly worse (ViT, byte-level GPT): use fst2 or fst_noir there.
    "fst": dict(_COMMON_FST, grad_weight="ir", ir_alpha=1.0),
    "wg": dict(_COMMON_FST, grad_weight="2:4_grad_output"),
    "wx": dict(_COMMON_FST, grad_weight="2:4_input"),
    "gg": dict(
        output="2:4",
        grad_input="forward",
        grad_input_grad_output="2:4_co",
        grad_weight="2:4_grad_output",
        decay=DEFAULT_DECAY,
    ),
    "gx": dict(
        output="2:4",
        grad_input="forward",
        grad_input_grad_output="2:4_co",
        grad_weight="2:4_input",
        decay=DEFAULT_DECAY,
    ),
}

#: Recipe names, in the order of the spec's table.
RECIPES: tuple[str, ...] = tuple(RECIPE_TABLE)

#: Fields whose value *is* the recipe: ``fst_noir`` is ``fst`` with α = 0, so an
#: ``ir_alpha`` override would silently turn it into ``fst`` with that α. :func:`recipe`
#: refuses such an override (``compare``/``study`` then keep the recipe's value, with a note).
RECIPE_PINNED: dict[str, dict[str, Any]] = {"fst_noir": {"ir_alpha": 0.0}}

_FIELDS = {f.name for f in dataclasses.fields(SparsityConfig)} - {"name"}


def _check_fields(overrides: dict[str, Any]) -> None:
    unknown = sorted(set(overrides) - _FIELDS - {"name"})
    if unknown:
        raise ValueError(
            f"unknown SparsityConfig field(s) {unknown}; valid fields: {sorted(_FIELDS)}"
        )


def recipe(name: str, **overrides: Any) -> SparsityConfig:
    """The frozen config of recipe ``name`` (one of :data:`RECIPES`) with ``overrides``.

    >>> recipe("fst", ir_alpha=0.03).ir_alpha
    0.03
    """
    if not isinstance(name, str) or name not in RECIPE_TABLE:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    _check_fields(overrides)
    for key, pinned in RECIPE_PINNED.get(name, {}).items():
        if key in overrides and overrides[key] != pinned:
            raise ValueError(
                f"{name} is defined by {key}={pinned}; {key}={overrides[key]} would make it "
                f"another recipe (for information restoration of strength {overrides[key]}, "
                f"use recipe 'fst' with {key}={overrides[key]})"
            )
    fields = dict(RECIPE_TABLE[name])
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
