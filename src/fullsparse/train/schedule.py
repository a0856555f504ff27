"""Schedules over a run (dense warm-up, dense finish) and the run's FLOP account.

:class:`RunSchedule` is a step callback of the :class:`~fullsparse.train.trainer.Trainer`,
so it works the same for every task. Which phase a step is in is a function of the step
alone::

    steps [0, dense_warmup_steps)            "warmup": every GEMM dense
    steps [finish_start, total_steps)        "finish": dense_finish_mode
    the others                               "sparse": the recipe

with ``finish_start = total_steps − floor(dense_finish · total_steps)`` (warm-up wins where
the two overlap). At a phase boundary every sparse module's frozen config is swapped for
the phase's (:func:`phase_config`); parameters and the optimizer are untouched, so a
resumed run (whose first callback puts the modules into the step's phase) continues bit
for bit. The mask-update interval is the config's ``mask_interval`` (the modules cache the
mask; :mod:`fullsparse.sparse_state`).

The FLOP account (:func:`flop_account`): the fraction of the three GEMMs' dense FLOPs that
ran sparse, per GEMM role and in total, over the steps run. A GEMM counts as sparse when
one of its operands is 2:4 along the GEMM's reduction axis (:data:`REDUCTION_AXIS`), read
from :data:`fullsparse.config.SPARSE_ALONG`: a new operand only needs its entry there.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fullsparse.config import SPARSE_ALONG, SparsityConfig
from fullsparse.errors import ConfigError
from fullsparse.sampling import AdaptiveState
from fullsparse.sparse_state import sparse_modules
from fullsparse.train.protocol import TrainerView

__all__ = [
    "DENSE_FINISH_MODES",
    "ROLES",
    "REDUCTION_AXIS",
    "FULLY_SPARSE_TOTAL",
    "ROLE_SPARSE",
    "check_schedule_fields",
    "phase_of",
    "BACKWARD_FIELDS",
    "phase_config",
    "LayerFlops",
    "PAIRED",
    "gemm_is_sparse",
    "flop_account",
    "grad_weight_shares",
    "RunSchedule",
    "mean_account",
    "fraction_text",
]

#: ``backward``: the forward keeps its 2:4 weight (the model stays 2:4); grad_input and
#: grad_weight run dense (the exact gradient of the 2:4 forward, as ``srste``).
#: ``all``: the three GEMMs run dense (the model ends dense).
DENSE_FINISH_MODES = ("backward", "all")
#: The three GEMMs of a layer.
ROLES = ("output", "grad_input", "grad_weight")
#: The axis each GEMM reduces over: a sparse tensor core runs a GEMM at 2:4 when one
#: operand is 2:4 along it (K = Ci·kh·kw or d_in; Co = output channels; T = tokens or
#: N·Ho·Wo positions; information restoration's F(X) halves the T reduction).
REDUCTION_AXIS = {"output": "K", "grad_input": "Co", "grad_weight": "T"}
#: A run is fully sparse when its total fraction is at least this ...
FULLY_SPARSE_TOTAL = 0.9
#: ... and each role's fraction is at least this (most of that role's FLOPs ran sparse).
ROLE_SPARSE = 0.5


def check_schedule_fields(dense_warmup_steps: int, dense_finish: float, mode: str) -> None:
    """One ConfigError line for a schedule that cannot be (the minimums are TrainConfig's)."""
    if not dense_finish < 1.0:
        raise ConfigError(f"dense_finish must be a fraction of the run below 1, got {dense_finish}")
    if mode not in DENSE_FINISH_MODES:
        raise ConfigError(
            f"dense_finish_mode={mode!r} is not one of {', '.join(DENSE_FINISH_MODES)}"
        )


def phase_of(step: int, total: int, warmup_steps: int, finish: float) -> str:
    """``"warmup"``, ``"sparse"`` or ``"finish"``: the phase of ``step`` (from 0) of ``total``."""
    if step < warmup_steps:
        return "warmup"
    if step >= total - math.floor(finish * total + 1e-9):
        return "finish"
    return "sparse"


#: The fields that set the backward GEMMs' operands: a ``backward`` dense finish resets
#: them to their (dense) defaults, with grad_input on the forward operand.
BACKWARD_FIELDS = ("grad_input_dy", "grad_weight_mode", "ir_alpha", "grad_input_source")
BACKWARD_FIELDS += ("grad_weight_mode_linear", "ir_alpha_linear")  # per layer kind
BACKWARD_FIELDS += ("variance_budget", "variance_interval")  # the sampled weight gradient
BACKWARD_FIELDS += ("sample_group", "sample_share", "conv_sample_unit")
#: Fields that are not operands: a dense phase keeps them.
KEPT_FIELDS = ("name", "tsm_interval", "mask_interval")


def phase_config(base: SparsityConfig, phase: str, mode: str) -> SparsityConfig:
    """The config a module with ``base`` runs in ``phase`` (``mode``: the finish's).

    Dense is every operand field at its default (the defaults are the dense layer), so a
    field added to :class:`SparsityConfig` is dense in a dense phase without a change here.
    """
    if phase == "sparse":
        return base
    defaults = {f.name: f.default for f in dataclasses.fields(SparsityConfig)}
    if phase == "finish" and mode == "backward" and base.output_weight != "dense":
        backward = {k: defaults[k] for k in BACKWARD_FIELDS}
        return base.replace(grad_input_weight="forward", **backward)
    dense = {k: v for k, v in defaults.items() if k not in KEPT_FIELDS}
    return base.replace(**dense)


@dataclass(frozen=True)
class LayerFlops:
    """One GEMM layer's dense FLOPs per training step (its forward's shapes)."""

    name: str
    #: FLOPs of one of its GEMMs (all three are the same product size)
    flops: int
    #: the config it runs (None: a plain dense layer)
    config: SparsityConfig | None
    #: whether its grad_input GEMM runs (not when its input needs no gradient)
    grad_input: bool = True
    #: whether its input has a token / position axis to pair (conv: always; linear: a
    #: ``[..., T, d]`` input); without one, information restoration runs dense
    token_axis: bool = True


#: Operands that pair adjacent tokens: on a layer without a token axis they run dense.
PAIRED = ("IR(", "F(")


def gemm_is_sparse(config: SparsityConfig | None, role: str, token_axis: bool = True) -> bool:
    """Whether ``role``'s GEMM runs at 2:4 (or halved) under ``config``."""
    if config is None:
        return False
    ops = config.operands
    operands = {
        "output": (ops.output_weight,),
        "grad_input": (ops.grad_input_weight, ops.grad_input_dy),
        "grad_weight": (ops.grad_weight_dy, ops.grad_weight_input),
    }[role]
    if not token_axis:
        operands = tuple(op for op in operands if not op.startswith(PAIRED))
    axis = REDUCTION_AXIS[role]
    return any(axis in SPARSE_ALONG.get(op, "").split(",") for op in operands)


def flop_account(
    layers: list[LayerFlops],
    phase_steps: dict[str, int],
    mode: str,
    grad_weight_share: dict[str, float] | None = None,
) -> dict[str, Any]:
    """``{"output", "grad_input", "grad_weight", "total": fraction, "fully_sparse": bool}``
    over ``phase_steps`` (steps run in each phase).

    ``grad_weight_share``: for layers whose weight gradient is a product over a sampled
    share r of its tokens / columns (:mod:`fullsparse.sampling`), the share of its sparse-phase
    grad_weight FLOPs that counts as sparse, ``2·(1 − r)`` (2 of 4 kept: all of it, 3 of 4:
    half, all: none) — a 2:4 operand halves a product's FLOPs, as keeping half the units does.
    """
    shares = grad_weight_share or {}
    dense = dict.fromkeys(ROLES, 0.0)
    sparse = dict.fromkeys(ROLES, 0.0)
    for phase, steps in phase_steps.items():
        for layer in layers:
            config = None if layer.config is None else phase_config(layer.config, phase, mode)
            for role in ROLES:
                if role == "grad_input" and not layer.grad_input:
                    continue
                dense[role] += steps * layer.flops
                ran_sparse: float = gemm_is_sparse(config, role, layer.token_axis)
                if ran_sparse and role == "grad_weight" and layer.name in shares:
                    ran_sparse = shares[layer.name]
                sparse[role] += steps * layer.flops * ran_sparse
    account: dict[str, Any] = {
        role: sparse[role] / dense[role] if dense[role] else 0.0 for role in ROLES
    }
    total = sum(dense.values())
    account["total"] = sum(sparse.values()) / total if total else 0.0
    account["fully_sparse"] = account["total"] >= FULLY_SPARSE_TOTAL and all(
        account[role] >= ROLE_SPARSE for role in ROLES
    )
    return account


def _of_kind(config: SparsityConfig | None, kind: str) -> SparsityConfig | None:
    """The config a layer of ``kind`` runs (per-kind fields folded in), or None."""
    return None if config is None else config.for_kind(kind)


def _gemm_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every module of ``model`` that runs a GEMM: Conv2d, Linear, and the sparse ones."""
    sparse = dict(sparse_modules(model))
    found = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    return {**found, **sparse}


class RunSchedule:
    """The phases of a run, applied as a step callback; and the FLOP account."""

    def __init__(self, warmup_steps: int, finish: float, mode: str) -> None:
        self.warmup_steps, self.finish, self.mode = warmup_steps, finish, mode
        self.base: dict[str, SparsityConfig] = {}
        self.phase = "sparse"
        self.layers: list[LayerFlops] | None = None
        self._hooks: list[Any] = []
        self._measured: dict[str, tuple[int, bool, bool]] = {}
        self._kinds: dict[str, str] = {}  # conv | linear: a recipe may differ per kind

    def __call__(self, step: int, total: int, trainer: TrainerView) -> None:
        model = trainer.raw_model
        if not self.base:
            self.base = {n: m.config for n, m in sparse_modules(model)}  # type: ignore[misc]
        if self.layers is None:
            self._measure(model)
        phase = phase_of(step, total, self.warmup_steps, self.finish)
        if phase == self.phase:
            return
        for name, module in sparse_modules(model):
            module.config = phase_config(self.base[name], phase, self.mode)
        what = {
            "warmup": "dense warm-up (every GEMM dense)",
            "sparse": "the recipe's sparse GEMMs",
            "finish": f"dense finish ({self.mode})",
        }[phase]
        trainer.log.info(f"schedule: step {step} of {total}: {what}")
        self.phase = phase

    # -- FLOP account ----------------------------------------------------------------------
    def _measure(self, model: nn.Module) -> None:
        """Hook every GEMM layer for the first step's forward; at the next step, read it."""
        if self._hooks:
            self._measure_done()
            return
        for name, module in _gemm_layers(model).items():
            self._hooks.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Any:
        def record(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            if not (module.training and torch.is_grad_enabled()):
                return  # an evaluation forward, not a training step's
            x = args[0]
            conv = isinstance(module, nn.Conv2d)
            if conv:  # Co·(Ci/g·kh·kw) per output position
                flops = 2 * module.weight.numel() * (output.numel() // output.shape[1])
            else:  # d_out·d_in per token
                flops = 2 * module.weight.numel() * (x.numel() // x.shape[-1])
            before, needs_dx, tokens = self._measured.get(name, (0, False, True))
            tokens = tokens and (conv or x.ndim >= 3)
            self._measured[name] = (before + flops, needs_dx or x.requires_grad, tokens)
            self._kinds[name] = "conv" if conv else "linear"

        return record

    def _measure_done(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.layers = [
            LayerFlops(n, flops, _of_kind(self.base.get(n), self._kinds[n]), needs_dx, tokens)
            for n, (flops, needs_dx, tokens) in self._measured.items()
        ]

    def phase_steps(self, steps_run: int, total: int) -> dict[str, int]:
        """How many of the first ``steps_run`` steps (of ``total``) ran in each phase."""
        warm = min(self.warmup_steps, steps_run)
        start = max(total - math.floor(self.finish * total + 1e-9), self.warmup_steps)
        finish = max(0, steps_run - start)
        return {"warmup": warm, "sparse": steps_run - warm - finish, "finish": finish}

    def step_fraction(self) -> float | None:
        """The fraction of one step's GEMM FLOPs that runs sparse in the current phase
        (None before a training step's shapes were seen)."""
        if self.layers is None and self._hooks:
            self._measure_done()
        if not self.layers:
            return None
        return float(flop_account(self.layers, {self.phase: 1}, self.mode)["total"])

    def account(
        self, steps_run: int, total: int, model: nn.Module | None = None
    ) -> dict[str, Any] | None:
        """The FLOP account over the first ``steps_run`` steps of ``total`` (None when no
        step ran in this process, so no shapes were seen). ``model``: where the sampled
        weight gradients' kept shares are read (:func:`grad_weight_shares`)."""
        if self.layers is None and self._hooks:
            self._measure_done()
        if not self.layers:
            return None
        shares = grad_weight_shares(model) if model is not None else None
        return flop_account(self.layers, self.phase_steps(steps_run, total), self.mode, shares)


def grad_weight_shares(model: nn.Module) -> dict[str, float]:
    """``{layer name: sparse share of its grad_weight FLOPs}`` for every sparse layer whose
    sampled weight gradient has run (``2·(1 − kept share)``, clamped to [0, 1])."""
    shares = {}
    for name, module in sparse_modules(model):
        state = getattr(module, "gw_state", None)
        kept = None if state is None else AdaptiveState.kept_share(state)
        if kept is not None:
            shares[name] = min(1.0, max(0.0, 2.0 * (1.0 - kept)))
    return shares


# --------------------------------------------------------------------------- tables
def mean_account(summaries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The mean FLOP account of runs' summaries (seeds of one variant); None if none has
    one. ``fully_sparse`` holds when it holds for every run."""
    accounts = [s["sparse_gemm_fraction"] for s in summaries if s.get("sparse_gemm_fraction")]
    if not accounts:
        return None
    mean: dict[str, Any] = {
        key: sum(a[key] for a in accounts) / len(accounts) for key in (*ROLES, "total")
    }
    mean["fully_sparse"] = all(a["fully_sparse"] for a in accounts)
    return mean


def fraction_text(account: dict[str, Any] | None) -> str:
    """A table cell: the total sparse fraction, and whether the run is fully sparse."""
    if not account:
        return "-"
    return f"{account['total']:.2f}" + (" (fully sparse)" if account["fully_sparse"] else "")
