"""Sparsity configurations: what each of a layer's three GEMMs uses.

A :class:`SparsityConfig` is a frozen description; the autograd functions in
:mod:`fullsparse.functional` read it and never ask which recipe they are running. The named
recipes (``RECIPE_TABLE``, ``recipe(...)``) are in :mod:`fullsparse.recipes` and can still be
imported from here.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the named recipes, defined in fullsparse.recipes (see __getattr__)
    from fullsparse.recipes import (  # noqa: F401
        COMPARE_RECIPES,
        RECIPE_PINNED,
        RECIPE_TABLE,
        RECIPES,
        recipe,
        resolve_config,
    )

__all__ = [
    "OUTPUT_WEIGHT",
    "GRAD_INPUT_WEIGHT",
    "GRAD_INPUT_DY",
    "GRAD_WEIGHT_MODE",
    "GRAD_INPUT_SOURCE",
    "CONV_LAYOUT",
    "DECAY_KIND",
    "LAYER_KINDS",
    "OPERAND_TABLE",
    "SPARSE_ALONG",
    "MEPROP_KEEP",
    "GemmOperands",
    "gemm_operands",
    "OLD_FIELD_NAMES",
    "upgrade_config_dict",
    "SparsityConfig",
]

#: Weight operand of the ``output`` GEMM (Eq. 1):
#: ``dense`` = W; ``2:4`` = S_K(W); ``transposable`` = TSM mask (2:4 along K and Co at once);
#: ``soft_2:4`` = β·soft_K(W), S-STE's soft threshold with a fixed per-tensor scale β.
OUTPUT_WEIGHT = ("dense", "2:4", "transposable", "soft_2:4")
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
#: ``mvue`` = MVUE_T(dY)·Xᵀ, the minimum-variance unbiased random 2:4 sparsification of dY
#: along the token / spatial axis (:func:`fullsparse.estimators.mvue_2to4`);
#: ``topk_grad_output`` = TopK(dY)·Xᵀ (meProp);
#: ``rand_half`` / ``is_half`` / ``is_adaptive`` = unbiased reduced-size products over a
#: sample of the tokens (Linear) or output columns (conv), the same for every channel
#: (:mod:`fullsparse.sampling`): every second unit from a random phase ×2; 2 of every 4
#: importance-sampled ×1/p; 2, 3 or 4 of every 4, chosen per layer against a variance budget.
GRAD_WEIGHT_MODE = ("dense", "ir", "2:4_grad_output", "2:4_input", "mvue", "topk_grad_output")
GRAD_WEIGHT_MODE += ("rand_half", "is_half", "is_adaptive")
#: Layer kinds a config can set apart (:meth:`SparsityConfig.for_kind`).
LAYER_KINDS = ("conv", "linear")
#: Which weight the separate backward mask S_Co is taken from.
GRAD_INPUT_SOURCE = ("dense", "pruned")
#: How a conv weight ``[Co, Ci, kh, kw]`` is cut into groups of 4 for S_K:
#: ``im2col`` = 4 consecutive entries of the flattened ``Ci·kh·kw`` row (the paper's
#: ``W2 = W.reshape(Co, K)``); ``channel`` = 4 consecutive input channels at each kernel tap
#: ``(co, kh, kw)`` (the layout ASP and TensorRT's sparse convolutions need). Linear layers
#: and 1×1 convs are the same under both.
CONV_LAYOUT = ("im2col", "channel")
#: The units ``is_half`` / ``is_adaptive`` sample in a convolution's weight gradient:
#: ``block`` = one sample's even or odd output columns (two strided half-width products per
#: call); ``sample`` = a whole sample (one full-width product over the kept samples: fewer
#: copies and one call, but half as many units per batch).
CONV_SAMPLE_UNIT = ("block", "sample")
# ---- decay and forward variants (S-STE forward, masked decay) --------------------------
#: Where the decay λ·(W − W_out)-style term enters the step: ``srste`` = added to the weight
#: gradient inside each backward (Eq. 6, SR-STE and the paper); ``masked_grad`` = 2by4's
#: masked decay, added once per optimizer step to the accumulated, unscaled and clipped
#: gradient, just before the optimizer (:func:`fullsparse.nn.masked_grad_decay_`). Under
#: fp16 loss scaling use ``masked_grad``: a GradScaler multiplies every backward gradient by
#: its scale S but not the ``srste`` term added inside backward, so unscaling divides that
#: decay by S (``fullsparse train --amp fp16`` refuses the combination).
DECAY_KIND = ("srste", "masked_grad")

# Defaults below carry their reason; the study issue may move them, with evidence.
#: SR-STE's λ (Zhou et al. 2021), used by the paper (§5.1) and its public code.
DEFAULT_DECAY = 2e-4
#: TSM's default recomputation interval in training steps (Hubara et al. 2021).
DEFAULT_TSM_INTERVAL = 40
#: ``is_adaptive``: the largest ratio of sampling variance to minibatch noise a layer may
#: add (``V_s(k) / V_b``, :class:`fullsparse.sampling.AdaptiveState`), and how often (in
#: calls of the layer's backward) it measures both. docs/results/quality.md measures them.
DEFAULT_VARIANCE_BUDGET = 0.2
DEFAULT_VARIANCE_INTERVAL = 50
#: is_half / is_adaptive: units per sampling group, and the share is_half keeps.
DEFAULT_SAMPLE_GROUP = 4
DEFAULT_SAMPLE_SHARE = 0.5

# --- meProp (Sun et al. 2017): unstructured top-k of the output gradient.
#: Fraction of each dY row that TopK(dY) keeps: per output position (conv: each (n, h, w);
#: linear: each token) the ``round(MEPROP_KEEP · C_out)`` largest-|value| channels
#: (``fullsparse.estimators.topk_rows``; docs/spec-notes.md, "meProp").
MEPROP_KEEP = 0.5


#: The combinations SparsityConfig refuses: (is it broken?, the one-line reason why).
_CLASHES: tuple[tuple[Callable[[SparsityConfig], bool], Callable[[SparsityConfig], str]], ...] = (
    (
        lambda c: c.ir_alpha != 0.0 and c.grad_weight_mode != "ir",
        lambda c: (
            f"ir_alpha={c.ir_alpha} clashes with grad_weight_mode={c.grad_weight_mode!r}"
            ": information restoration only exists for grad_weight_mode='ir'"
        ),
    ),
    (
        lambda c: c.decay != 0.0 and c.output_weight == "dense",
        lambda c: (
            f"decay={c.decay} clashes with output_weight='dense': the SR-STE decay "
            "λ·(W − S(W)) is zero without a sparse forward weight"
        ),
    ),
    (
        lambda c: c.decay_kind != "srste" and (c.decay == 0.0 or c.output_weight == "dense"),
        lambda c: (
            f"decay_kind={c.decay_kind!r} clashes with decay={c.decay} and "
            f"output_weight={c.output_weight!r}: the masked decay needs decay > 0 and a "
            "sparse forward weight (otherwise it adds nothing)"
        ),
    ),
    (
        lambda c: c.output_weight == "transposable" and c.grad_input_weight != "forward",
        lambda c: (
            f"output_weight='transposable' clashes with grad_input_weight="
            f"{c.grad_input_weight!r}: a transposable mask exists to be reused by "
            "grad_input (use grad_input_weight='forward')"
        ),
    ),
    (
        lambda c: c.grad_input_source == "pruned" and c.grad_input_weight != "2:4_co",
        lambda c: (
            f"grad_input_source='pruned' clashes with grad_input_weight="
            f"{c.grad_input_weight!r}: the source only matters for the separate backward "
            "mask (grad_input_weight='2:4_co')"
        ),
    ),
    (
        lambda c: c.grad_input_source == "pruned" and c.output_weight != "2:4",
        lambda c: (
            f"grad_input_source='pruned' clashes with output_weight={c.output_weight!r}: "
            "'pruned' means S_Co(S_K(W)) and needs output_weight='2:4'"
        ),
    ),
    (
        lambda c: c.conv_layout != "im2col" and c.output_weight != "2:4",
        lambda c: (
            f"conv_layout={c.conv_layout!r} clashes with output_weight="
            f"{c.output_weight!r}: the layout only changes the magnitude mask S_K of "
            "output_weight='2:4'"
        ),
    ),
    (
        lambda c: (
            (c.variance_budget, c.variance_interval)
            != (DEFAULT_VARIANCE_BUDGET, DEFAULT_VARIANCE_INTERVAL)
            and "is_adaptive" not in (c.grad_weight_mode, c._linear_mode)
        ),
        lambda c: (
            f"variance_budget={c.variance_budget} / variance_interval={c.variance_interval} "
            f"clash with grad_weight_mode={c.grad_weight_mode!r}: they only steer "
            "grad_weight_mode='is_adaptive'"
        ),
    ),
    (
        lambda c: (
            c.sample_group != DEFAULT_SAMPLE_GROUP
            and not {"is_half", "is_adaptive"} & {c.grad_weight_mode, c._linear_mode}
        ),
        lambda c: (
            f"sample_group={c.sample_group} clashes with grad_weight_mode="
            f"{c.grad_weight_mode!r}: it only groups the units of 'is_half' and 'is_adaptive'"
        ),
    ),
    (
        lambda c: (
            c.sample_share != DEFAULT_SAMPLE_SHARE
            and "is_half" not in (c.grad_weight_mode, c._linear_mode)
        ),
        lambda c: (
            f"sample_share={c.sample_share} clashes with grad_weight_mode="
            f"{c.grad_weight_mode!r}: only 'is_half' keeps a fixed share"
        ),
    ),
    (
        lambda c: (
            c.conv_sample_unit != "block" and c.grad_weight_mode not in ("is_half", "is_adaptive")
        ),
        lambda c: (
            f"conv_sample_unit={c.conv_sample_unit!r} clashes with grad_weight_mode="
            f"{c.grad_weight_mode!r}: it only sets the units a convolution's 'is_half' and "
            "'is_adaptive' sample"
        ),
    ),
    (
        lambda c: c.ir_alpha_linear and c._linear_mode != "ir",
        lambda c: (
            f"ir_alpha_linear={c.ir_alpha_linear} clashes with the Linear layers' "
            f"grad_weight mode {c._linear_mode!r}: information restoration only "
            "exists for mode 'ir'"
        ),
    ),
)


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
    #: Grouping of a conv weight's S_K, one of :data:`CONV_LAYOUT`. It exists so a trained
    #: conv is 2:4 for the inference stack it is exported to. Default 'im2col' (the
    #: paper's), kept by measurement (docs/export.md, ResNet-20 on Fashion-MNIST, fst, 15
    #: epochs, 2 seeds): 84.25 ± 0.13 % vs 'channel' 84.17 ± 0.75 % final top-1, no
    #: difference beyond the seed spread.
    conv_layout: str = "im2col"
    # ---- decay and forward variants
    #: Where the decay λ enters the step, one of :data:`DECAY_KIND`: 'srste' (Eq. 6, in each
    #: backward) or 'masked_grad' (2by4: once per optimizer step, after clipping).
    decay_kind: str = "srste"
    # -- per layer kind: Linear layers' weight gradient (None = as for convolutions) -------
    #: ``grad_weight_mode`` of Linear layers (token GEMMs), one of :data:`GRAD_WEIGHT_MODE`;
    #: None = :attr:`grad_weight_mode`. ``grad_weight_mode`` / ``ir_alpha`` then hold for
    #: convolutions.
    grad_weight_mode_linear: str | None = None
    #: ``ir_alpha`` of Linear layers; None = :attr:`ir_alpha` when the Linear mode is 'ir'
    #: (0 otherwise). 0 with mode 'ir' is the fixed mask without cross-token restoration.
    ir_alpha_linear: float | None = None
    # -- mask-update interval (schedules) --------------------------------------------------
    #: Training steps between recomputations of the magnitude weight masks S_K (forward) and
    #: S_Co (grad_input); in between, a sparse module reuses its cached masks. 1 = every
    #: step (the masks follow the weight exactly). The TSM mask keeps ``tsm_interval``.
    mask_interval: int = 1
    # -- is_adaptive: the variance budget -------------------------------------------------
    #: Largest ratio of sampling variance to minibatch noise (``V_s(k) / V_b``) a layer
    #: with grad_weight_mode='is_adaptive' may add; it keeps the fewest units of every 4
    #: (2, 3 or all) within it. Only with 'is_adaptive'.
    variance_budget: float = DEFAULT_VARIANCE_BUDGET
    #: Backward calls between two measurements of ``V_s`` and ``V_b`` (each one an exact
    #: weight gradient, computed as two half-batch products). Only with 'is_adaptive'.
    variance_interval: int = DEFAULT_VARIANCE_INTERVAL
    # -- is_half / is_adaptive: the sampling groups ----------------------------------------
    #: Units (tokens of a Linear layer, column blocks of a convolution) per sampling group
    #: of 'is_half' and 'is_adaptive': the keep probabilities are water-filled, and the kept
    #: units drawn, within each group. A multiple of 4, or 0: all of a call's units in one
    #: group (the whole batch, whatever its size); larger groups let the probabilities
    #: follow the scores further (a lower variance at the same share).
    sample_group: int = DEFAULT_SAMPLE_GROUP
    #: Share of every group 'is_half' keeps (the nearest whole number of units). Only with
    #: 'is_half'; 'is_adaptive' chooses 2, 3 or 4 quarters itself.
    sample_share: float = DEFAULT_SAMPLE_SHARE
    #: What a convolution's 'is_half' / 'is_adaptive' sample: ``block`` (a sample's even or
    #: odd output columns) or ``sample`` (whole samples: one full-width product).
    conv_sample_unit: str = "block"

    def __post_init__(self) -> None:
        choices = {
            "output_weight": OUTPUT_WEIGHT,
            "grad_input_weight": GRAD_INPUT_WEIGHT,
            "grad_input_dy": GRAD_INPUT_DY,
            "grad_weight_mode": GRAD_WEIGHT_MODE,
            "grad_input_source": GRAD_INPUT_SOURCE,
            "conv_layout": CONV_LAYOUT,
            "decay_kind": DECAY_KIND,
            "conv_sample_unit": CONV_SAMPLE_UNIT,
        }
        for field, allowed in choices.items():
            value = getattr(self, field)
            if value not in allowed:
                raise ValueError(f"SparsityConfig.{field}={value!r} is not one of {allowed}")
        if self.grad_weight_mode_linear not in (None, *GRAD_WEIGHT_MODE):
            raise ValueError(
                f"SparsityConfig.grad_weight_mode_linear={self.grad_weight_mode_linear!r} is "
                f"not one of {GRAD_WEIGHT_MODE} (or None)"
            )
        for field in ("ir_alpha", "decay", "ir_alpha_linear"):
            value = getattr(self, field)
            if value is None and field == "ir_alpha_linear":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"SparsityConfig.{field} must be a number, got {value!r}")
            if not (value >= 0.0 and value != float("inf")):
                raise ValueError(f"SparsityConfig.{field} must be finite and >= 0, got {value}")
        budget = self.variance_budget
        if (
            isinstance(budget, bool)
            or not isinstance(budget, (int, float))
            or not (0.0 < budget < float("inf"))
        ):
            raise ValueError(
                f"SparsityConfig.variance_budget must be a finite number > 0, got {budget!r}"
            )
        for field in ("tsm_interval", "mask_interval", "variance_interval"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SparsityConfig.{field} must be an integer >= 1, got {value!r}")
        group = self.sample_group
        if isinstance(group, bool) or not isinstance(group, int) or group < 0 or group % 4:
            raise ValueError(
                "SparsityConfig.sample_group must be 0 (the whole call) or a multiple of 4, "
                f"got {group!r}"
            )
        share = self.sample_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise ValueError(
                f"SparsityConfig.sample_share must be a number in (0, 1], got {share!r}"
            )
        for broken, reason in _CLASHES:
            if broken(self):
                raise ValueError(reason(self))
        # read once here (not fields: equality, hashing and to_dict are the fields')
        object.__setattr__(self, "_operands", gemm_operands(self))
        object.__setattr__(self, "_linear", self._linear_config())
        conv = self
        if self.per_kind:
            conv = dataclasses.replace(self, grad_weight_mode_linear=None, ir_alpha_linear=None)
        object.__setattr__(self, "_conv", conv)

    # -- per layer kind ---------------------------------------------------------------------
    @property
    def _linear_mode(self) -> str:
        return self.grad_weight_mode_linear or self.grad_weight_mode

    @property
    def per_kind(self) -> bool:
        """True when Linear layers get another weight-gradient estimator than convolutions."""
        return self.grad_weight_mode_linear is not None or self.ir_alpha_linear is not None

    def _linear_config(self) -> SparsityConfig:
        if not self.per_kind:
            return self
        mode = self._linear_mode
        alpha = self.ir_alpha_linear
        if alpha is None:
            alpha = self.ir_alpha if mode == "ir" else 0.0
        return dataclasses.replace(
            self,
            grad_weight_mode=mode,
            ir_alpha=alpha,
            grad_weight_mode_linear=None,
            ir_alpha_linear=None,
        )

    def for_kind(self, kind: str) -> SparsityConfig:
        """The config one layer of ``kind`` (``conv`` or ``linear``) runs: the per-kind
        fields folded into ``grad_weight_mode`` / ``ir_alpha``. ``self`` when they are unset.
        """
        if kind == "linear":
            return self._linear  # type: ignore[attr-defined, no-any-return]
        if kind != "conv":
            raise ValueError(f"layer kind {kind!r} is not one of {LAYER_KINDS}")
        return self._conv  # type: ignore[attr-defined, no-any-return]

    def operands_for(self, kind: str) -> GemmOperands:
        """The operands of a ``kind`` layer's three GEMMs (:data:`OPERAND_TABLE`)."""
        return self.for_kind(kind).operands

    @property
    def is_dense(self) -> bool:
        """True when every GEMM of every layer kind is dense (the module behaves exactly like
        its torch twin)."""
        return all(
            ops.output_weight == "W"
            and ops.grad_input_weight == "W"
            and ops.grad_input_dy == "dY"
            and (ops.grad_weight_dy, ops.grad_weight_input) == ("dY", "X")
            for ops in (self.operands, self.operands_for("linear"))
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
    ("output_weight", "soft_2:4"): {"output.weight": "β·soft_K(W)"},
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
    ("grad_weight_mode", "mvue"): {"grad_weight.dy": "MVUE_T(dY)", "grad_weight.input": "X"},
    ("grad_weight_mode", "topk_grad_output"): {
        "grad_weight.dy": "TopK(dY)",
        "grad_weight.input": "X",
    },
    # sampled units: the same tokens / columns of dY and X, survivors divided by p
    ("grad_weight_mode", "rand_half"): {
        "grad_weight.dy": "2·H_T(dY)",
        "grad_weight.input": "H_T(X)",
    },
    ("grad_weight_mode", "is_half"): {
        "grad_weight.dy": "IS_T(dY)/p",
        "grad_weight.input": "IS_T(X)",
    },
    ("grad_weight_mode", "is_adaptive"): {
        "grad_weight.dy": "ISk_T(dY)/p",
        "grad_weight.input": "ISk_T(X)",
    },
}

#: The axis along which each operand symbol is 2:4 ("" = dense): what a sparse tensor core
#: needs is a weight that is 2:4 along its GEMM's reduction axis (K for ``output``, Co for
#: ``grad_input``).
SPARSE_ALONG: dict[str, str] = {
    "W": "",
    "S_K(W)": "K",
    "TSM(W)": "K,Co",
    "β·soft_K(W)": "K",
    "S_Co(W)": "Co",
    "S_Co(S_K(W))": "Co",
    "dY": "",
    "S_Co(dY)": "Co",
    "TopK(dY)": "",  # unstructured: no tensor-core format, kept as a dense operand
    "IR(dY)": "",
    "S_T(dY)": "T",
    "MVUE_T(dY)": "T",
    "X": "",
    "F(X)": "T",
    "S_T(X)": "T",
    # a product over a sample of the T units: halved (k of 4 kept: see the FLOP account)
    "2·H_T(dY)": "T",
    "H_T(X)": "T",
    "IS_T(dY)/p": "T",
    "IS_T(X)": "T",
    "ISk_T(dY)/p": "T",
    "ISk_T(X)": "T",
}


@dataclass(frozen=True)
class GemmOperands:
    """The operands of a layer's three GEMMs as symbols (keys of :data:`SPARSE_ALONG`)."""

    output_weight: str
    grad_input_weight: str
    grad_input_dy: str
    grad_weight_dy: str
    grad_weight_input: str
    #: the SR-STE decay λ·(W − W_out) is added to grad_weight (in the backward, Eq. 6)
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
        decay=bool(config.decay) and row["output.weight"] != "W" and config.decay_kind == "srste",
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
    silently, and the defaults of fields added since it was saved: for comparing a
    checkpoint's config with a run's."""
    renamed = {OLD_FIELD_NAMES.get(k, k): v for k, v in fields.items()}
    added = {f.name: f.default for f in dataclasses.fields(SparsityConfig)}
    return {**{k: v for k, v in added.items() if k not in renamed}, **renamed}


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


_FIELDS = {f.name for f in dataclasses.fields(SparsityConfig)} - {"name"}


def _check_fields(overrides: dict[str, Any]) -> None:
    unknown = sorted(set(overrides) - _FIELDS - {"name"})
    if unknown:
        raise ValueError(
            f"unknown SparsityConfig field(s) {unknown}; valid fields: {sorted(_FIELDS)}"
        )


#: Names that moved to :mod:`fullsparse.recipes` and are still importable from here.
_RECIPE_NAMES = ("COMPARE_RECIPES", "RECIPE_PINNED", "RECIPE_TABLE", "RECIPES", "recipe",
                 "resolve_config")  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _RECIPE_NAMES:
        from fullsparse import recipes

        return getattr(recipes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
