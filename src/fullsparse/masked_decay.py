"""2by4's masked decay (Hu et al., ICML 2024): ``W.grad += λ·(W ⊙ ¬m)`` once per optimizer
step, with ``m`` each sparse layer's forward mask (``decay_kind='masked_grad'``;
``docs/spec-notes.md``).

:func:`masked_grad_decay_` adds it to a model's gradients (call it just before
``optimizer.step()``, after unscaling and clipping: the ``Trainer`` does);
:func:`masked_decay_on_step` makes an optimizer (or every optimizer, for a framework's own
loop such as the Hugging Face ``Trainer``) call it just before each step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from fullsparse.operands import SOFT, add_deferred_decay
from fullsparse.sharding import laid_out_as
from fullsparse.sparse_state import OptimizerHook, sparse_modules

__all__ = ["masked_grad_decay_", "masked_decay_on_step", "MaskedDecayHook"]


def masked_grad_decay_(model: nn.Module) -> int:
    """2by4's masked decay (Hu et al., ICML 2024), in place on the gradients: for every sparse
    layer with ``decay_kind='masked_grad'``, ``W.grad += λ·(W ⊙ ¬m)`` with ``m`` the layer's
    forward mask (:meth:`forward_weight_mask`: S_K(W), the cached TSM or ``mask_interval``
    mask the step's forward used, a fixed mask, or S_K's positions of a ``soft_2:4`` operand).

    Call it once per optimizer step, after the backward passes (and gradient accumulation),
    the loss-scale unscaling and the clipping, just before ``optimizer.step()``: the decay is
    then independent of the loss scale, of the number of accumulated backward passes, and
    outside the clipped norm. Returns the number of layers it changed.
    """
    changed = 0
    for _, module in sparse_modules(model):
        config = module.config  # type: ignore[attr-defined]
        grad = module.weight.grad  # type: ignore[union-attr]
        if config.decay_kind != "masked_grad" or grad is None:
            continue
        module_masked_decay_(module, grad)
        changed += 1
    return changed


def module_masked_decay_(module: nn.Module, grad: Tensor) -> Tensor:
    """``grad += λ·(W ⊙ ¬m)`` in place for one sparse layer (``grad`` in the weight
    Parameter's layout, returned as the module's GEMM-layout view of it; ``m``: its forward mask,
    :meth:`forward_weight_mask`). Where ``m`` is S_K of the weight as it stands (masks every
    step, no fixed mask, the ``im2col`` grouping) this is SR-STE's decay term of that
    forward, ``λ·(W − W·S_K(W))``, added in one pass over W
    (:func:`~fullsparse.operands.add_deferred_decay`: the native kernel where it applies);
    elsewhere the mask is made, or taken from the cache, and the term added."""
    config = module.config  # type: ignore[attr-defined]
    weight = module._gemm_weight()  # type: ignore[operator]
    grad = module._gemm_layout(grad)  # type: ignore[operator]
    one_pass = (
        config.operands.output_weight in ("S_K(W)", SOFT)
        and (config.conv_layout == "im2col" or weight.ndim == 2)
        and module._cached_mask_rule() is None  # type: ignore[operator]
        and getattr(module, "fixed_mask", None) is None
        and grad.dtype == weight.dtype
    )
    with torch.no_grad():
        if one_pass:
            return add_deferred_decay(grad, weight, config.decay)
        mask = module.forward_weight_mask()  # type: ignore[operator]
        assert mask is not None  # SparsityConfig refuses masked_grad with a dense forward
        return add_masked_decay_(grad, weight.detach(), laid_out_as(mask, weight), config.decay)


def add_masked_decay_(grad: Tensor, weight: Tensor, mask: Tensor, decay: float) -> Tensor:
    """``grad += λ·(W ⊙ ¬m)`` in place, all four in one layout (a module's GEMM layout:
    :func:`module_masked_decay_` passes a gradient through the module's view of it)."""
    return grad.add_((weight * ~mask).mul_(decay).to(grad.dtype))


class MaskedDecayHook(OptimizerHook):
    """What :func:`masked_decay_on_step` returns: :meth:`remove` (or the end of a ``with``
    block) takes the hook off."""


def masked_decay_on_step(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> MaskedDecayHook:
    """Add 2by4's masked decay of ``model``'s sparse layers just before every ``step()`` of
    ``optimizer`` — or, with ``optimizer=None``, of any optimizer holding one of their
    weights (a global hook: it also sees the optimizer a framework builds later, such as the
    Hugging Face ``Trainer``'s). A step's pre-hook runs after the framework's gradient
    clipping and, under a GradScaler, after its unscaling: the order 2by4 prescribes. Use it
    where you do not call :func:`masked_grad_decay_` yourself; never both (the decay would
    be added twice). Layers without ``decay_kind='masked_grad'`` are left alone."""
    weights = {id(m.weight) for _, m in sparse_modules(model)}

    def decay(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if optimizer is None:
            held = {id(p) for group in opt.param_groups for p in group["params"]}
            if not weights & held:
                return
        masked_grad_decay_(model)

    if optimizer is None:
        return MaskedDecayHook(register_optimizer_step_pre_hook(decay))
    return MaskedDecayHook(optimizer.register_step_pre_hook(decay))
