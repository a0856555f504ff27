"""ASP (Mishra et al. 2021): prune a trained dense model once to 2:4, then fine-tune with
the mask fixed.

Recipe ``asp`` runs like this on the :class:`~fullsparse.train.trainer.Trainer`:

1. ``--init-from PATH`` (a run folder or a checkpoint of the same model and data) gives the
   starting weights: the model's weights, BatchNorm statistics and biases, not its
   optimiser, schedule or epoch count (fine-tuning starts a fresh schedule).
2. Every sparse layer is pruned once by magnitude to 2:4 along K of ``W2`` (S_K, the same
   grouping as the forward mask of every other recipe). The mask is stored in the layer
   (``fixed_mask``, saved with the TSM state in checkpoints, so a resume continues with the
   same mask) and the pruned weights are set to exactly zero.
3. Fine-tuning: the forward uses ``W ⊙ mask`` (the layer's forward mask is the fixed one;
   the recipe's GEMMs are srste's without decay). Two optimiser hooks keep the pruned
   weights exactly zero whatever the optimiser does: before each step the gradient of a
   pruned weight is zeroed (so SGD momentum, weight decay and Adam moments of those entries
   stay zero), and after each step the weight is multiplied by its mask again.

Cost: a from-scratch recipe's budget is its own epochs; ASP's is the dense pre-training
plus the fine-tuning. :func:`pretraining_cost` reads the init run's ``summary.json`` so
``summary.json`` of the ASP run carries both (``pretraining`` and ``total_epochs`` /
``total_train_seconds``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fullsparse.checkpoint_guard import state_dict_mismatch
from fullsparse.errors import CheckpointError, ConfigError
from fullsparse.operands import mask_k
from fullsparse.sharding import laid_out_as, whole
from fullsparse.sparse_state import sparse_modules
from fullsparse.train.fsdp import load_model_state_
from fullsparse.train.protocol import TrainerView

__all__ = ["ASP_RECIPE", "init_checkpoint", "prune_once_", "keep_pruned_zero", "pretraining_cost"]

#: The recipe name that turns this training mode on.
ASP_RECIPE = "asp"


def init_checkpoint(init_from: str) -> Path:
    """The checkpoint ``--init-from`` names: the file itself, or ``last.pt`` of a run folder."""
    path = Path(init_from)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise CheckpointError(f"--init-from {init_from}: no checkpoint at {path}")
    return path


def load_init_weights_(model: nn.Module, init_from: str) -> None:
    """Load the model weights of ``init_from`` into ``model`` (in place)."""
    from fullsparse.train import checkpoint as ckpt

    path = init_checkpoint(init_from)
    state = ckpt.load_checkpoint(path)
    mismatch = state_dict_mismatch(model, state["model"])
    if mismatch:
        raise CheckpointError(f"--init-from {path}: its weights do not fit this model: {mismatch}")
    try:
        load_model_state_(model, state["model"])  # sharded under --fsdp: each rank its shard
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"--init-from {path}: its weights do not fit this model ({first})"
        ) from None


def prune_once_(model: nn.Module) -> dict[str, Tensor]:
    """Set every sparse layer's fixed mask to S_K of its current weight and zero the pruned
    weights; returns ``{layer name: mask}`` (masks in the GEMM layout, bool)."""
    masks = {}
    with torch.no_grad():
        for name, module in sparse_modules(model):
            weight = module._gemm_weight()  # type: ignore[operator]
            mask = mask_k(whole(weight.detach()))  # a sharded weight: of the whole weight
            module.fixed_mask = mask  # type: ignore[assignment]
            weight.mul_(laid_out_as(mask, weight))
            masks[name] = mask
    return masks


def _parameter_masks(model: nn.Module) -> list[tuple[nn.Parameter, Tensor]]:
    """(weight Parameter, its fixed mask in the Parameter's own layout) per sparse layer.

    The mask is stored in the GEMM layout; a layer whose Parameter has another layout (Hugging
    Face ``Conv1D``) exposes the GEMM layout as a view, so the mask is carried back through
    that view: mark the kept entries through it on a zeroed copy of the weight.
    """
    pairs = []
    with torch.no_grad():
        for _, module in sparse_modules(model):
            mask = getattr(module, "fixed_mask", None)
            if mask is None:
                continue
            weight: nn.Parameter = module.weight  # type: ignore[assignment]
            saved = weight.detach().clone()
            weight.zero_()
            gemm = module._gemm_weight()  # type: ignore[operator]
            gemm.masked_fill_(laid_out_as(mask, gemm), 1.0)
            param_mask = weight.detach() != 0
            weight.copy_(saved)
            pairs.append((weight, param_mask))
    return pairs


def keep_pruned_zero(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[Any]:
    """Hooks on ``optimizer`` that keep each sparse layer's pruned weights exactly zero:
    gradients masked before every step, weights masked after it. Returns the hook handles."""
    pairs = _parameter_masks(model)

    def mask_gradients(*_: Any) -> None:
        for weight, mask in pairs:
            if weight.grad is not None:
                weight.grad.mul_(mask)

    def mask_weights(*_: Any) -> None:
        with torch.no_grad():
            for weight, mask in pairs:
                weight.mul_(mask)

    return [
        optimizer.register_step_pre_hook(mask_gradients),
        optimizer.register_step_post_hook(mask_weights),
    ]


def pretraining_cost(init_from: str) -> dict[str, Any]:
    """What the dense pre-training cost, from the ``summary.json`` next to the init checkpoint
    (empty values when that run left no summary: a bare checkpoint file)."""
    path = init_checkpoint(init_from)
    summary_path = path.parent / "summary.json"
    cost: dict[str, Any] = {"init_from": str(path)}
    if not summary_path.is_file():
        return {**cost, "summary": None, "epochs": None, "train_seconds": None}
    summary = json.loads(summary_path.read_text())
    seconds = summary.get("epoch_seconds") or []
    cost.update(
        summary=str(summary_path),
        recipe=summary.get("recipe"),
        epochs=summary.get("epochs_done"),
        train_seconds=float(sum(seconds)),
        seconds_per_epoch=summary.get("seconds_per_epoch"),
        final_top1=summary.get("final_top1"),
    )
    for key in ("flops", "train_flops"):  # a FLOP account, where the init run recorded one
        if key in summary:
            cost[key] = summary[key]
    return cost


def check_config(config: Any) -> None:
    """``--init-from`` belongs to recipe asp, and asp needs it."""
    if config.recipe == ASP_RECIPE and not config.init_from:
        raise ConfigError(
            "recipe asp prunes a trained dense model: give --init-from RUN_FOLDER_OR_CHECKPOINT"
        )
    if config.init_from and config.recipe != ASP_RECIPE:
        raise ConfigError(f"--init-from is for recipe asp, not {config.recipe}")


def start(trainer: TrainerView) -> None:
    """Set ASP up on a trainer whose model and optimiser exist: a new run loads the init
    weights and prunes; a resumed run already has its fixed masks from the checkpoint. Both
    then get the optimiser hooks."""
    if trainer.config.recipe != ASP_RECIPE:
        return
    if trainer.saved is None:
        load_init_weights_(trainer.raw_model, trainer.config.init_from)
        prune_once_(trainer.raw_model)
    trainer.asp_hooks = keep_pruned_zero(trainer.raw_model, trainer.optimizer)


def summary_extra(trainer: TrainerView) -> dict[str, Any]:
    """ASP's part of ``summary.json``: the pre-training cost and the totals over both phases."""
    if trainer.config.recipe != ASP_RECIPE:
        return {}
    pre = pretraining_cost(trainer.config.init_from)
    own = [h["epoch_seconds"] for h in trainer.state.history]
    pre_epochs, pre_seconds = pre.get("epochs") or 0, pre.get("train_seconds") or 0.0
    return {
        "pretraining": pre,
        "total_epochs": pre_epochs + len(own),
        "total_train_seconds": pre_seconds + float(sum(own)),
    }
