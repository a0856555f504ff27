"""Sparsity configurations: what each of a layer's three GEMMs uses, and the named recipes.

A :class:`SparsityConfig` is a frozen description; the autograd functions in
:mod:`fullsparse.functional` read it and never ask which recipe they are running. The table
:data:`RECIPE_TABLE` is the spec's recipe table (``fst-spec.md``, "Recipes") written as data.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

__all__ = [
    "OUTPUT_WEIGHT",
    "GRAD_INPUT_WEIGHT",
    "GRAD_INPUT_DY",
    "GRAD_WEIGHT_MODE",
    "GRAD_INPUT_SOURCE",
    "OPERAND_TABLE",
    "SPARSE_ALONG",
    "MEPROP_KEEP",
    "GemmOperands",
    "gemm_operands",
    "OLD_FIELD_NAMES",
    "upgrade_config_dict",
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
#: (the GG/GX saliency rows of Table 1), ``topk`` = TopK(dY) (meProp, see below).
GRAD_INPUT_DY = ("dense", "2:4_co", "topk")
#: The ``grad_weight`` GEMM (Eq. 3): ``dense`` = dY·Xᵀ; ``ir`` = fixed mask F on Xᵀ with
#: information restoration of strength ``ir_alpha`` (Eq. 7-10, computed as a half-size
#: strided product); ``2:4_grad_output`` = S_T(dY)·Xᵀ (WG); ``2:4_input`` = dY·S_T(Xᵀ) (WX);
#: ``topk_grad_output`` = TopK(dY)·Xᵀ (meProp).
GRAD_WEIGHT_MODE = ("dense", "ir", "2:4_grad_output", "2:4_input", "topk_grad_output")
#: Which weight the separate backward mask S_Co is taken from.
GRAD_INPUT_SOURCE = ("dense", "pruned")

# Defaults below carry their reason; the study issue may move them, with evidence.
#: SR-STE's λ (Zhou et al. 2021), used by the paper (§5.1) and its public code.
DEFAULT_DECAY = 2e-4
#: TSM's default recomputation interval in training steps (Hubara et al. 2021).
DEFAULT_TSM_INTERVAL = 40

# --- meProp (Sun et al. 2017): unstructured top-k of the output gradient.
#: Fraction of each dY row that TopK(dY) keeps: per output position (conv: each (n, h, w);
#: linear: each token) the ``round(MEPROP_KEEP · C_out)`` largest-|value| channels
#: (``fullsparse.estimators.topk_rows``; docs/spec-notes.md, "meProp").
MEPROP_KEEP = 0.5


@dataclass(frozen=True)
class SparsityConfig:
    """What each GEMM of a sparse layer uses. Build one with :func:`recipe`.

    Fields are validated in ``__post_init__``; a combination that would silently do
    something other than what it says raises ``ValueError`` naming the clashing fields.
    """

    #: Recipe name this config came from (a label; behaviour is fixed by the fields below).
    name: str = "custom"
    #: Weight operand of the ``output`` GEMM (Eq. 1), one of :data:`OUTPUT_WEIGHT`.
    output_weight: str = "dense"
    #: Weight operand of the ``grad_input`` GEMM (Eq. 2), one of :data:`GRAD_INPUT_WEIGHT`.
    grad_input_weight: str = "dense"
    #: grad_output (dY) operand of the ``grad_input`` GEMM, one of :data:`GRAD_INPUT_DY`.
    grad_input_dy: str = "dense"
    #: Operands of the ``grad_weight`` GEMM (Eq. 3), one of :data:`GRAD_WEIGHT_MODE`.
    grad_weight_mode: str = "dense"
    #: Information-restoration strength α: dY_ir[j] = dY[2j] + α·dY[2j+1]. 1.0 is the
    #: paper's Eq. 10; 0.0 is the fixed mask alone (Table 5 row 4). Only with
    #: grad_weight_mode='ir'.
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

    def __post_init__(self) -> None:
        choices = {
            "output_weight": OUTPUT_WEIGHT,
            "grad_input_weight": GRAD_INPUT_WEIGHT,
            "grad_input_dy": GRAD_INPUT_DY,
            "grad_weight_mode": GRAD_WEIGHT_MODE,
            "grad_input_source": GRAD_INPUT_SOURCE,
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
        if self.ir_alpha != 0.0 and self.grad_weight_mode != "ir":
            raise ValueError(
                f"ir_alpha={self.ir_alpha} clashes with grad_weight_mode={self.grad_weight_mode!r}"
                ": information restoration only exists for grad_weight_mode='ir'"
            )
        if self.decay != 0.0 and self.output_weight == "dense":
            raise ValueError(
                f"decay={self.decay} clashes with output_weight='dense': the SR-STE decay "
                "λ·(W − S(W)) is zero without a sparse forward weight"
            )
        if self.output_weight == "transposable" and self.grad_input_weight != "forward":
            raise ValueError(
                f"output_weight='transposable' clashes with grad_input_weight="
                f"{self.grad_input_weight!r}: a transposable mask exists to be reused by "
                "grad_input (use grad_input_weight='forward')"
            )
        if self.grad_input_source == "pruned" and self.grad_input_weight != "2:4_co":
            raise ValueError(
                f"grad_input_source='pruned' clashes with grad_input_weight="
                f"{self.grad_input_weight!r}: the source only matters for the separate backward "
                "mask (grad_input_weight='2:4_co')"
            )
        if self.grad_input_source == "pruned" and self.output_weight != "2:4":
            raise ValueError(
                f"grad_input_source='pruned' clashes with output_weight={self.output_weight!r}: "
                "'pruned' means S_Co(S_K(W)) and needs output_weight='2:4'"
            )
        # read once here (not a field: equality, hashing and to_dict are the fields')
        object.__setattr__(self, "_operands", gemm_operands(self))

    @property
    def is_dense(self) -> bool:
        """True when every GEMM is dense (the module behaves exactly like its torch twin)."""
        ops = self.operands
        return (
            ops.output_weight == "W"
            and ops.grad_input_weight == "W"
            and ops.grad_input_dy == "dY"
            and (ops.grad_weight_dy, ops.grad_weight_input) == ("dY", "X")
        )

    @property
    def uses_transposable_mask(self) -> bool:
        return self.output_weight == "transposable"

    @property
    def operands(self) -> GemmOperands:
        """The operand of each of the three GEMMs, read from :data:`OPERAND_TABLE`."""
        return self._operands  # type: ignore[attr-defined, no-any-return]

    def replace(self, **overrides: Any) -> SparsityConfig:
        """A copy with ``overrides`` applied (validated again; old field names accepted)."""
        overrides = _new_names(overrides, "SparsityConfig.replace")
        _check_fields(overrides)
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- one table
#: What each config value means, GEMM by GEMM: the operands it sets. The three GEMMs are
#:
#: - ``output``      (Eq. 1) ``y  = W_out · X``
#: - ``grad_input``  (Eq. 2) ``dX = W_giᵀ · dY_gi``
#: - ``grad_weight`` (Eq. 3) ``dW = dY_gw · X_gwᵀ``  (+ λ·(W − W_out), Eq. 6)
#:
#: Keys are (field, value); values map "gemm.operand" to the operand's symbol. ``forward``
#: and ``2:4_co`` of ``grad_input_weight`` resolve through the output weight and
#: ``grad_input_source`` (:func:`gemm_operands`). The autograd functions, the kernel dispatch
#: and the benchmarks read operands from here and nowhere else.
OPERAND_TABLE: dict[tuple[str, str], dict[str, str]] = {
    ("output_weight", "dense"): {"output.weight": "W"},
    ("output_weight", "2:4"): {"output.weight": "S_K(W)"},
    ("output_weight", "transposable"): {"output.weight": "TSM(W)"},
    ("grad_input_weight", "dense"): {"grad_input.weight": "W"},
    ("grad_input_weight", "forward"): {"grad_input.weight": "<output.weight>"},
    ("grad_input_weight", "2:4_co"): {"grad_input.weight": "S_Co(<W_src>)"},
    ("grad_input_source", "dense"): {"W_src": "W"},
    ("grad_input_source", "pruned"): {"W_src": "S_K(W)"},
    ("grad_input_dy", "dense"): {"grad_input.dy": "dY"},
    ("grad_input_dy", "2:4_co"): {"grad_input.dy": "S_Co(dY)"},
    ("grad_input_dy", "topk"): {"grad_input.dy": "TopK(dY)"},
    ("grad_weight_mode", "dense"): {"grad_weight.dy": "dY", "grad_weight.input": "X"},
    ("grad_weight_mode", "ir"): {"grad_weight.dy": "IR(dY)", "grad_weight.input": "F(X)"},
    ("grad_weight_mode", "2:4_grad_output"): {
        "grad_weight.dy": "S_T(dY)",
        "grad_weight.input": "X",
    },
    ("grad_weight_mode", "2:4_input"): {"grad_weight.dy": "dY", "grad_weight.input": "S_T(X)"},
    ("grad_weight_mode", "topk_grad_output"): {
        "grad_weight.dy": "TopK(dY)",
        "grad_weight.input": "X",
    },
}

#: The axis along which each operand symbol is 2:4 ("" = dense): what a sparse tensor core
#: needs is a weight that is 2:4 along its GEMM's reduction axis (K for ``output``, Co for
#: ``grad_input``).
SPARSE_ALONG: dict[str, str] = {
    "W": "",
    "S_K(W)": "K",
    "TSM(W)": "K,Co",
    "S_Co(W)": "Co",
    "S_Co(S_K(W))": "Co",
    "dY": "",
    "S_Co(dY)": "Co",
    "TopK(dY)": "",  # unstructured: no tensor-core format, kept as a dense operand
    "IR(dY)": "",
    "S_T(dY)": "T",
    "X": "",
    "F(X)": "T",
    "S_T(X)": "T",
}


@dataclass(frozen=True)
class GemmOperands:
    """The operands of a layer's three GEMMs as symbols (keys of :data:`SPARSE_ALONG`)."""

    output_weight: str
    grad_input_weight: str
    grad_input_dy: str
    grad_weight_dy: str
    grad_weight_input: str
    #: the SR-STE decay λ·(W − W_out) is added to grad_weight
    decay: bool


def gemm_operands(config: SparsityConfig) -> GemmOperands:
    """Read ``config``'s operands from :data:`OPERAND_TABLE`."""
    row: dict[str, str] = {}
    for field in ("output_weight", "grad_input_source", "grad_input_weight", "grad_input_dy"):
        row.update(OPERAND_TABLE[(field, getattr(config, field))])
    row.update(OPERAND_TABLE[("grad_weight_mode", config.grad_weight_mode)])
    gi = row["grad_input.weight"]
    gi = gi.replace("<output.weight>", row["output.weight"]).replace("<W_src>", row["W_src"])
    return GemmOperands(
        output_weight=row["output.weight"],
        grad_input_weight=gi,
        grad_input_dy=row["grad_input.dy"],
        grad_weight_dy=row["grad_weight.dy"],
        grad_weight_input=row["grad_weight.input"],
        decay=bool(config.decay) and row["output.weight"] != "W",
    )


# --------------------------------------------------------------------------- old names
#: Field names before they said what they are: still accepted by :class:`SparsityConfig`,
#: :func:`recipe`, :meth:`SparsityConfig.replace` and in saved configs (YAML, checkpoints),
#: with a one-line DeprecationWarning; readable as attributes too.
OLD_FIELD_NAMES: dict[str, str] = {
    "output": "output_weight",
    "grad_input": "grad_input_weight",
    "grad_input_grad_output": "grad_input_dy",
    "grad_weight": "grad_weight_mode",
}


def _new_names(fields: dict[str, Any], where: str) -> dict[str, Any]:
    """``fields`` with old names replaced by new ones (warning once per call)."""
    old = [k for k in fields if k in OLD_FIELD_NAMES]
    if not old:
        return fields
    for key in old:
        if OLD_FIELD_NAMES[key] in fields:
            raise ValueError(
                f"{where}: {key!r} is the old name of {OLD_FIELD_NAMES[key]!r}; give one of them"
            )
    renames = ", ".join(f"{k} -> {OLD_FIELD_NAMES[k]}" for k in old)
    warnings.warn(
        f"{where}: old SparsityConfig field name(s), renamed: {renames}",
        DeprecationWarning,
        stacklevel=3,
    )
    return {OLD_FIELD_NAMES.get(k, k): v for k, v in fields.items()}


def upgrade_config_dict(fields: dict[str, Any]) -> dict[str, Any]:
    """A saved ``SparsityConfig.to_dict()`` (old or new field names) with the new names,
    silently: for comparing a checkpoint's config with a run's."""
    return {OLD_FIELD_NAMES.get(k, k): v for k, v in fields.items()}


_dataclass_init = SparsityConfig.__init__


def _init_accepting_old_names(self: SparsityConfig, *args: Any, **fields: Any) -> None:
    _dataclass_init(self, *args, **_new_names(fields, "SparsityConfig"))


SparsityConfig.__init__ = _init_accepting_old_names  # type: ignore[method-assign]


def _old_name_property(old: str, new: str) -> property:
    def get(self: SparsityConfig) -> Any:
        warnings.warn(f"SparsityConfig.{old} is renamed {new}", DeprecationWarning, stacklevel=2)
        return getattr(self, new)

    return property(get, doc=f"Old name of :attr:`{new}` (deprecated).")


for _old, _new in OLD_FIELD_NAMES.items():
    setattr(SparsityConfig, _old, _old_name_property(_old, _new))


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
    overrides = _new_names(overrides, "recipe")
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
