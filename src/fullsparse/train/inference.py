"""Using a trained checkpoint: evaluate it, or export its 2:4-pruned weights.

The checkpoint's ``identity`` (model, sizes, recipe fields) rebuilds the exact sparse model,
so neither needs the original command line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fullsparse.checkpoint_guard import state_dict_mismatch
from fullsparse.errors import CheckpointError, UserError
from fullsparse.train import checkpoint as ckpt
from fullsparse.train.config import TrainConfig

__all__ = [
    "load_trained_model",
    "evaluate_checkpoint",
    "export_checkpoint",
    "ExportReport",
    "ExportRow",
]


def load_trained_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    *,
    state: dict[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """The sparse model of checkpoint ``path`` (eval mode, on ``device``) and the checkpoint.

    ``state``: the checkpoint already loaded from ``path`` (it is then not read again).
    """
    from fullsparse.nn import load_sparse_state_
    from fullsparse.train.tasks import build_sparse_model

    if state is None:
        state = ckpt.load_checkpoint(path)
    identity = state["identity"]
    try:
        model, _ = build_sparse_model(identity)
    except UserError as exc:
        raise CheckpointError(
            f"checkpoint {path}: its identity does not build a model: {exc}"
        ) from None
    mismatch = state_dict_mismatch(model, state["model"])
    if mismatch:
        raise CheckpointError(
            f"checkpoint {path}: its weights do not fit its model "
            f"{identity.get('model')!r}: {mismatch}"
        )
    try:
        model.load_state_dict(state["model"])
        load_sparse_state_(model, state["sparse_state"])
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise CheckpointError(
            f"checkpoint {path} does not rebuild its model {identity.get('model')!r}: "
            f"{type(exc).__name__}: {first}"
        ) from None
    model.to(device)
    model.eval()
    return model, state


def evaluate_checkpoint(
    path: str | Path,
    *,
    data_dir: str | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    amp: str = "none",
    allow_nonfinite: bool = False,
) -> dict[str, Any]:
    """Top-1/top-5 of checkpoint ``path`` on its dataset's test split — or, for a language
    model, validation loss, perplexity and bits per byte on the run's fixed validation
    windows (``"task": "lm"`` in the result); for a detector, mAP, mAP@0.5 and mAP@0.75
    (``"task": "detection"``).

    ``data_dir`` overrides the folder stored in the checkpoint's config (data moved).
    The checkpoint is read once; one with NaN/Inf weights is refused unless
    ``allow_nonfinite`` (its numbers would be meaningless).
    """
    from fullsparse.data import make_loader
    from fullsparse.train.classify import build_data, evaluate
    from fullsparse.train.common import resolve_device, subset

    state = ckpt.load_checkpoint(path, allow_nonfinite=allow_nonfinite)
    saved = dict(state["config"])
    for key in ("resume", "force"):
        saved[key] = False
    changes: dict[str, Any] = {}
    if data_dir is not None:
        changes["data_dir"] = data_dir
    if batch_size is not None:
        changes["batch_size"] = batch_size
    try:
        config = TrainConfig.from_dict(saved, source=f"checkpoint {path}").replace(
            device=device, amp=amp, **changes
        )
    except UserError as exc:
        raise CheckpointError(f"checkpoint {path} holds an unusable config: {exc}") from None
    dev = resolve_device(config.device)
    if config.amp == "fp16" and dev.type != "cuda":
        raise UserError("--amp fp16 needs CUDA; on CPU use --amp bf16")
    if config.task == "lm":
        return _evaluate_lm_checkpoint(path, state, config, dev)
    if config.task == "detection":
        return _evaluate_detection_checkpoint(path, state, config, dev)
    bundle = build_data(config)
    _check_matches_data(path, state["identity"], bundle)
    model, _ = load_trained_model(path, dev, state=state)
    test_set = subset(bundle.test, config.test_subset, config.seed, random_pick=False)
    loader = make_loader(test_set, config.batch_size, train=False, seed=config.seed)
    result = evaluate(model, loader, dev, amp=config.amp)
    return {
        **_what_was_evaluated(path, state, None),
        "top1": result["top1"],
        "top5": result["top5"],
        "loss": result["loss"],
        "images": result["count"],
    }


def _check_matches_data(path: str | Path, identity: dict[str, Any], bundle: Any) -> None:
    """A checkpoint whose identity disagrees with the data its own config names (a forged
    or hand-edited file) is refused before a batch reaches the model."""
    diffs = [
        f"{key} {identity.get(key)!r} != {getattr(bundle, key)!r}"
        for key in ("in_channels", "num_classes")
        if identity.get(key) != getattr(bundle, key)
    ]
    if diffs:
        raise CheckpointError(
            f"checkpoint {path}: its identity does not match the data of its config "
            f"({bundle.name}): {'; '.join(diffs)}"
        )


def _evaluate_lm_checkpoint(
    path: str | Path, state: dict[str, Any], config: TrainConfig, device: torch.device
) -> dict[str, Any]:
    from fullsparse.train.lm import build_corpus, evaluate_lm, validation_windows

    corpus = build_corpus(config)
    model, _ = load_trained_model(path, device, state=state)
    windows = validation_windows(corpus.val, int(model.context), config.test_subset)
    result = evaluate_lm(model, windows, config.batch_size, device, amp=config.amp)
    return {
        **_what_was_evaluated(path, state, "lm"),
        "loss": result["loss"],
        "perplexity": result["perplexity"],
        "bits_per_byte": result["bits_per_byte"],
        "accuracy": result["accuracy"],
        "tokens": result["tokens"],
    }


def _evaluate_detection_checkpoint(
    path: str | Path, state: dict[str, Any], config: TrainConfig, device: torch.device
) -> dict[str, Any]:
    from fullsparse.train.common import subset
    from fullsparse.train.detection import build_detection_data, evaluate_detection

    bundle = build_detection_data(config)
    model, _ = load_trained_model(path, device, state=state)
    test_set = subset(bundle.test, config.test_subset, config.seed, random_pick=False)
    result = evaluate_detection(model, test_set, config.batch_size, device)
    return {**_what_was_evaluated(path, state, "detection"), **result}


def _what_was_evaluated(
    path: str | Path, state: dict[str, Any], task: str | None
) -> dict[str, Any]:
    """The head of an ``eval`` result: the checkpoint, its task, model, data and epoch."""
    identity = state["identity"]
    head = {"checkpoint": str(path), "task": task}
    if task is None:  # classify results have always been written without a task key
        del head["task"]
    names = ("model", "dataset", "recipe")
    return {**head, **{k: identity[k] for k in names}, "epoch": int(state["epoch"])}


@dataclass
class ExportRow:
    name: str
    shape: tuple[int, ...]
    #: Fraction of zero weights.
    sparsity: float
    #: Whether the layer's weight was pruned (a sparse layer with a sparse forward).
    pruned: bool
    #: 2:4 along K in the export's conv layout — None for layers that are not pruned.
    is_2to4: bool | None


@dataclass
class ExportReport:
    out: Path
    meta_path: Path
    recipe: str
    rows: list[ExportRow] = field(default_factory=list)
    #: How conv weights are grouped for 2:4 (``fullsparse.config.CONV_LAYOUT``).
    layout: str = "im2col"

    @property
    def pruned_layers(self) -> list[ExportRow]:
        return [r for r in self.rows if r.pruned]

    def __str__(self) -> str:
        head = ("layer", "weight shape", "zeros", f"2:4 along K ({self.layout})")
        body = [
            (
                r.name,
                "x".join(map(str, r.shape)),
                f"{100 * r.sparsity:.1f}%",
                "-" if r.is_2to4 is None else ("yes" if r.is_2to4 else "NO"),
            )
            for r in self.rows
        ]
        widths = [max(len(c) for c in col) for col in zip(head, *body, strict=False)]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in (head, *body)
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        n = len(self.pruned_layers)
        lines.append(
            f"{n} of {len(self.rows)} layers pruned 2:4 (recipe {self.recipe!r}), all verified"
            if n
            else f"no layer is pruned (recipe {self.recipe!r} has a dense forward)"
        )
        return "\n".join(lines)


#: File formats of ``fullsparse export``: a torch state_dict, or safetensors (the
#: ``export`` extra), which inference stacks load without unpickling anything.
EXPORT_FORMATS = ("pt", "safetensors")


def export_checkpoint(
    path: str | Path,
    out: str | Path,
    *,
    force: bool = False,
    layout: str | None = None,
    fmt: str = "pt",
) -> ExportReport:
    """Write checkpoint ``path``'s inference weights to ``out`` as a plain state_dict.

    Every sparse layer's weight is its pruned forward weight (``S_K(W)`` or the TSM mask),
    verified 2:4 along K in ``layout`` (``im2col``: groups of 4 along ``Ci·kh·kw``;
    ``channel``: 4 input channels at each kernel tap, as ASP/TensorRT read a conv). The
    layout is the one the run trained with; ``layout`` names the one the caller needs and is
    refused when it differs (re-pruning a trained model would change it). ``fmt`` is ``pt``
    (``torch.save``) or ``safetensors`` (needs the ``safetensors`` package). The file loads
    with ``load_state_dict`` into the *dense* model ``fullsparse.models.build_model(...)``
    whose arguments are written beside it as ``<out>.json``. Refuses to overwrite ``out``
    unless ``force``.
    """
    from fullsparse.config import CONV_LAYOUT
    from fullsparse.functional import is_2to4_k
    from fullsparse.nn import pruned_state_dict, sparse_modules

    if fmt not in EXPORT_FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose {' or '.join(EXPORT_FORMATS)}")
    if layout is not None and layout not in CONV_LAYOUT:
        raise UserError(f"unknown conv layout {layout!r}; choose {' or '.join(CONV_LAYOUT)}")
    save_file = _safetensors_writer() if fmt == "safetensors" else None
    out = Path(out)
    meta_path = out.with_name(out.name + ".json")
    for target in (out, meta_path):  # the weights and their build arguments go together
        if target.exists() and not force:
            raise UserError(f"{target} already exists; pass --force to overwrite it")
    if out.exists() and out.is_dir():
        raise UserError(f"{out} is a folder; give a file name for the exported weights")
    model, state = load_trained_model(path, "cpu")
    identity = state["identity"]
    trained = identity["sparsity"].get("conv_layout", "im2col")
    layout = layout or trained
    pruned = {
        name: module
        for name, module in sparse_modules(model)
        if module.config.output_weight != "dense"  # type: ignore[union-attr]
    }
    if layout != trained and any(
        isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1) for m in pruned.values()
    ):
        raise UserError(
            f"{path} was trained with conv_layout={trained!r}: its k x k conv weights are 2:4 "
            f"in that layout, not in {layout!r}; train with --conv-layout {layout} to export it"
        )
    weights = pruned_state_dict(model)
    report = ExportReport(out=out, meta_path=meta_path, recipe=identity["recipe"], layout=layout)
    bad = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        w = weights[f"{name}.weight"]
        ok = is_2to4_k(w, layout) if name in pruned else None
        if ok is False:
            bad.append(name)
        sparsity = float((w == 0).sum()) / w.numel()
        report.rows.append(ExportRow(name, tuple(w.shape), sparsity, name in pruned, ok))
    if bad:
        raise UserError(
            f"export verification failed: weights of {', '.join(bad)} are not 2:4 along K "
            f"in the {layout!r} layout; "
            "nothing was written"
        )
    if identity.get("task") == "detection":
        sizes = {
            "task": "detection",
            "num_classes": identity["num_classes"],
            "image_size": identity["image_size"],
        }
        load_with = (
            "fullsparse.models.detection.build_detection_model(model, num_classes, "
            "image_size, **model_kwargs).load_state_dict(torch.load(path, weights_only=True))"
        )
    elif identity.get("task") == "lm":
        sizes = {"task": "lm", "vocab_size": identity["vocab_size"]}
        load_with = (
            "fullsparse.models.build_lm_model(model, vocab_size, **model_kwargs)"
            ".load_state_dict(torch.load(path, weights_only=True))"
        )
    else:
        sizes = {
            "num_classes": identity["num_classes"],
            "in_channels": identity["in_channels"],
            "image_size": identity["image_size"],
        }
        load_with = (
            "fullsparse.models.build_model(model, num_classes, in_channels, "
            "image_size, **model_kwargs).load_state_dict(torch.load(path, weights_only=True))"
        )
    meta = {
        "format": "fullsparse-export",
        "model": identity["model"],
        **sizes,
        "model_kwargs": identity["model_kwargs"],
        "dataset": identity["dataset"],
        "recipe": identity["recipe"],
        "sparsity": identity["sparsity"],
        "epoch": int(state["epoch"]),
        "mean": state.get("mean"),
        "std": state.get("std"),
        "conv_layout": layout,
        "file_format": fmt,
        "source_checkpoint": str(path),
        "load_with": load_with,
    }
    if save_file is not None:
        meta["load_with"] = load_with.replace(
            "torch.load(path, weights_only=True)", "safetensors.torch.load_file(path)"
        )
        tmp = out.with_name(out.name + ".tmp")
        # contiguous, unshared tensors: safetensors refuses views that share storage
        save_file({k: v.contiguous().clone() for k, v in weights.items()}, str(tmp))
        tmp.replace(out)
    else:
        ckpt.atomic_torch_save(out, weights)
    ckpt.atomic_write_bytes(meta_path, (json.dumps(meta, indent=2) + "\n").encode())
    return report


def _safetensors_writer() -> Any:
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise UserError(
            "--format safetensors needs the safetensors package: pip install 'fullsparse[export]'"
        ) from None
    return save_file
