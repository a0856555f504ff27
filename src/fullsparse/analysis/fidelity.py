"""Gradient fidelity: how far each recipe's backward is from the exact one, layer by layer.

Beyond the paper, and the quantitative reason behind its Table 1: on real batches, with the
same weights, the model is run once with plain dense layers (the reference) and once per
recipe, and each layer's two backward products are compared:

- ``grad_input`` — the gradient the layer sends to its input, ``dX = W_giᵀ · dY_gi``
  (Eq. 2) — captured on a private copy of the layer's input, so it is this layer's product
  alone, not summed with a shortcut's;
- ``grad_weight`` — the weight gradient ``dW`` (Eq. 3), from ``weight.grad``.

Two modes separate a layer's own error from what it inherits:

- ``local`` — only that layer uses the recipe, every other layer is dense: the error the
  layer's own approximations make (its ``dY`` is then exact up to the forward change);
- ``accumulated`` — the whole model uses the recipe (the layers :func:`~fullsparse.nn.sparsify_`
  selects): errors of later layers reach earlier ones through ``dY``, so the error grows
  with backward depth. Sparsifying ``dY`` itself (GG/GX) compounds it layer after layer.

Metrics (float64): cosine similarity ``⟨g, g_ref⟩ / (‖g‖‖g_ref‖)`` and relative error
``‖g − g_ref‖ / ‖g_ref‖``, averaged over batches. Identical tensors give cosine exactly 1
and error 0.

References: ``dense`` (default) compares with the plain dense model — the total effect of a
recipe, forward pruning included; ``forward`` compares with the exact gradient of the
recipe's *own* sparse forward (same mask, exact backward), isolating the backward
approximations. The SR-STE decay ``λ·(W − S(W))`` (Eq. 6) is a regulariser added to the
weight gradient, not part of Eq. 3; it is left out unless ``include_decay``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fullsparse.config import SparsityConfig
from fullsparse.nn import densify_, sparsify_
from fullsparse.recipes import RECIPES, recipe

__all__ = [
    "MODES",
    "REFERENCES",
    "ROLES",
    "compare_tensors",
    "exact_twin",
    "capture_grads",
    "LayerFidelity",
    "FidelityResult",
    "grad_fidelity",
    "format_fidelity",
]

MODES = ("local", "accumulated")
REFERENCES = ("dense", "forward")
ROLES = ("grad_input", "grad_weight")


def compare_tensors(g: Tensor, ref: Tensor) -> tuple[float, float]:
    """``(cosine, relative error)`` of ``g`` against ``ref`` in float64.

    Equal tensors give exactly ``(1.0, 0.0)``; a zero tensor has cosine NaN (undefined).
    """
    if g.shape != ref.shape:
        raise ValueError(f"cannot compare shapes {tuple(g.shape)} and {tuple(ref.shape)}")
    if torch.equal(g, ref):
        return 1.0, 0.0
    a, b = g.detach().double().flatten(), ref.detach().double().flatten()
    na, nb = a.norm(), b.norm()
    cos = float((a @ b) / (na * nb)) if na > 0 and nb > 0 else math.nan
    err = float((a - b).norm() / nb) if nb > 0 else math.inf
    return (max(-1.0, min(1.0, cos)) if not math.isnan(cos) else cos), err


def exact_twin(config: SparsityConfig) -> SparsityConfig:
    """The config with ``config``'s forward and the exact gradient of that forward.

    Same ``output_weight`` operand (and TSM interval), ``grad_input_weight = forward`` (the
    transpose of the forward weight), dense ``dY``, dense ``grad_weight``, no decay.
    """
    return SparsityConfig(
        name=f"{config.name}-exact",
        output_weight=config.output_weight,
        grad_input_weight="forward",
        tsm_interval=config.tsm_interval,
    )


def capture_grads(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    layers: Sequence[str],
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> dict[str, dict[str, Tensor]]:
    """One forward + backward of ``model`` on ``(x, y)``; per layer its ``grad_input`` and
    ``grad_weight``.

    A forward pre-hook hands each layer a clone of its input with ``retain_grad``: the
    clone's gradient is exactly this layer's ``dX`` (Eq. 2), while the gradient still flows
    on to the original tensor (so upstream layers see the full gradient). The model's mode
    is left as is (train mode for training gradients: batch-statistics BatchNorm).
    """
    loss_fn = loss_fn or F.cross_entropy
    inputs: dict[str, Tensor] = {}

    def hook_for(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            inp = args[0]
            clone = inp.clone() if inp.requires_grad else inp.detach().clone().requires_grad_()
            clone.retain_grad()
            inputs[name] = clone
            return (clone, *args[1:])

        return hook

    modules = {name: model.get_submodule(name) for name in layers}
    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in modules.items()]
    model.zero_grad(set_to_none=True)
    try:
        with torch.enable_grad():
            loss = loss_fn(model(x), y)
            loss.backward()
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, module in modules.items():
        if name not in inputs:
            raise ValueError(f"layer {name} was not called in the forward pass")
        grad_in = inputs[name].grad
        grad_w = module.weight.grad  # type: ignore[union-attr]
        if grad_in is None or grad_w is None:
            raise ValueError(f"layer {name} got no gradient (is it used by the loss?)")
        out[name] = {"grad_input": grad_in.detach().clone(), "grad_weight": grad_w.detach().clone()}
    model.zero_grad(set_to_none=True)
    return out


@dataclass
class LayerFidelity:
    """One (recipe, mode, layer) row: cosines and relative errors, averaged over batches."""

    recipe: str
    mode: str
    layer: str
    #: Position of the layer in forward-call order (0 = first; backward reaches it last).
    depth: int
    grad_input_cos: float
    grad_input_err: float
    grad_weight_cos: float
    grad_weight_err: float


@dataclass
class FidelityResult:
    reference: str
    include_decay: bool
    layers: list[str] = field(default_factory=list)
    rows: list[LayerFidelity] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def select(self, recipe: str, mode: str) -> list[LayerFidelity]:
        return sorted(
            (r for r in self.rows if r.recipe == recipe and r.mode == mode), key=lambda r: r.depth
        )

    @property
    def recipes(self) -> list[str]:
        return list(dict.fromkeys(r.recipe for r in self.rows))

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "include_decay": self.include_decay,
            "layers": self.layers,
            "settings": self.settings,
            "rows": [asdict(r) for r in self.rows],
        }


def _forward_order(model: nn.Module, x: Tensor, names: Sequence[str]) -> list[str]:
    order: list[str] = []
    handles = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda m, a, n=n: order.append(n) if n not in order else None
        )
        for n in names
    ]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    return order + [n for n in names if n not in order]


def grad_fidelity(
    model: nn.Module,
    batches: Sequence[tuple[Tensor, Tensor]],
    recipes: Sequence[str | SparsityConfig] = RECIPES,
    *,
    modes: Sequence[str] = MODES,
    reference: str = "dense",
    include_decay: bool = False,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> FidelityResult:
    """Per layer, cosine and relative error of each recipe's gradients vs the reference.

    Args:
        model: the weights to use (random init or trained; sparse layers are densified on
            a copy first — the latent weights are what every recipe starts from). Left
            untouched.
        batches: real ``(x [B, C, H, W], y [B])`` batches; metrics are averaged over them.
        recipes: names or configs.
        modes: ``local`` and/or ``accumulated`` (see the module docstring).
        reference: ``dense`` (plain dense model) or ``forward`` (exact gradient of the
            recipe's own sparse forward).
        include_decay: keep the SR-STE decay term in ``grad_weight``.
        seed: ``torch.manual_seed`` before every pass (identical randomness in each).
        progress: called with a line per (recipe, mode).

    Returns:
        A :class:`FidelityResult` with a row per (recipe, mode, layer). ``accumulated`` rows
        cover every Conv2d/Linear (the head included, which stays dense); ``local`` rows the
        layers the recipe sparsifies.
    """
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if reference not in REFERENCES:
        raise ValueError(f"unknown reference {reference!r}; choose from {', '.join(REFERENCES)}")
    if not batches:
        raise ValueError("grad_fidelity needs at least one batch")
    configs = [recipe(r) if isinstance(r, str) else r for r in recipes]
    if not include_decay:
        configs = [c.replace(decay=0.0) for c in configs]
    base = copy.deepcopy(model)
    densify_(base)
    base.train()
    device = next((p.device for p in base.parameters()), torch.device("cpu"))
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    all_layers = [n for n, m in base.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    all_layers = _forward_order(base, batches[0][0], all_layers)
    selectable = sparsify_(copy.deepcopy(base), "dense").sparse_names
    sparse_layers = [n for n in all_layers if n in selectable]
    result = FidelityResult(reference=reference, include_decay=include_decay, layers=all_layers)

    def grads(config: SparsityConfig | None, only: str | None) -> list[dict]:
        """Per batch, the captured grads with ``config`` on ``only`` (or the default
        selection when None); config None = the plain dense model."""
        m = copy.deepcopy(base)
        if config is not None:
            sparsify_(m, config, (lambda n, _m: n == only) if only is not None else None)
        layers = [only] if only is not None else all_layers
        out = []
        for x, y in batches:
            torch.manual_seed(seed)
            out.append(capture_grads(m, x, y, layers))
        return out

    dense_ref = grads(None, None) if reference == "dense" else None
    # Recipes sharing a forward share its exact twin: compute each twin's grads once.
    twin_cache: dict[tuple[SparsityConfig, str | None], list[dict]] = {}

    def exact_ref(config: SparsityConfig, only: str | None) -> list[dict]:
        twin = exact_twin(config)
        key = (dataclasses.replace(twin, name="exact"), only)
        if key not in twin_cache:
            twin_cache[key] = grads(twin, only)
        return twin_cache[key]

    for config in configs:
        for mode in modes:
            if progress:
                progress(f"{config.name}: {mode}")
            targets = [None] if mode == "accumulated" else sparse_layers
            for only in targets:
                got = grads(config, only)
                ref = dense_ref if dense_ref is not None else exact_ref(config, only)
                for name in [only] if only is not None else all_layers:
                    metrics = {}
                    for role in ROLES:
                        pairs = [
                            compare_tensors(g[name][role], r[name][role])
                            for g, r in zip(got, ref, strict=True)
                        ]
                        metrics[f"{role}_cos"] = sum(p[0] for p in pairs) / len(pairs)
                        metrics[f"{role}_err"] = sum(p[1] for p in pairs) / len(pairs)
                    result.rows.append(
                        LayerFidelity(
                            recipe=config.name,
                            mode=mode,
                            layer=name,
                            depth=all_layers.index(name),
                            **metrics,
                        )
                    )
    result.settings = {
        "batches": len(batches),
        "batch_size": int(batches[0][0].shape[0]),
        "modes": list(modes),
        "recipes": [c.name for c in configs],
        "sparse_layers": sparse_layers,
        "loss": "cross_entropy (no label smoothing), train-mode BatchNorm",
    }
    return result


def _fmt(v: float, digits: int = 4) -> str:
    return "nan" if math.isnan(v) else f"{v:.{digits}f}"


def format_fidelity(result: FidelityResult) -> str:
    """Markdown: a summary per recipe, then per-layer cosine matrices (layers × recipes)."""
    recipes = result.recipes
    modes = [m for m in MODES if any(r.mode == m for r in result.rows)]
    lines = [
        "Summary: mean over layers (and, for `accumulated`, the first layer — where the "
        "backward ends and errors have accumulated most).",
        "",
    ]
    head = ["recipe"]
    for mode in modes:
        head += [f"{mode} grad_input cos", f"{mode} grad_weight cos", f"{mode} grad_weight err"]
    if "accumulated" in modes:
        head += ["first layer grad_weight cos"]
    lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name in recipes:
        cells = [name]
        for mode in modes:
            rows = [
                r
                for r in result.select(name, mode)
                if r.layer in result.settings.get("sparse_layers", result.layers)
            ]
            for key in ("grad_input_cos", "grad_weight_cos", "grad_weight_err"):
                vals = [getattr(r, key) for r in rows if not math.isnan(getattr(r, key))]
                cells.append(_fmt(sum(vals) / len(vals)) if vals else "-")
        if "accumulated" in modes:
            rows = result.select(name, "accumulated")
            cells.append(_fmt(rows[0].grad_weight_cos) if rows else "-")
        lines.append("| " + " | ".join(cells) + " |")
    for mode in modes:
        for role in ROLES:
            lines += ["", f"**{mode}, {role}: cosine to the reference, per layer**", ""]
            lines += ["| # | layer | " + " | ".join(recipes) + " |"]
            lines += ["|---:|---|" + "---:|" * len(recipes)]
            table = {(r.recipe, r.layer): r for r in result.rows if r.mode == mode}
            for depth, layer in enumerate(result.layers):
                if not any((rc, layer) in table for rc in recipes):
                    continue
                cells = [
                    _fmt(getattr(table[(rc, layer)], f"{role}_cos"))
                    if (rc, layer) in table
                    else "-"
                    for rc in recipes
                ]
                lines.append(f"| {depth} | {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
