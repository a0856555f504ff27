"""The training tasks by name, and the one function that builds any task's sparse model
from a checkpoint identity (used by training, ``eval`` and ``export``)."""

from __future__ import annotations

from typing import Any

from torch import nn

from fullsparse.train.classify import ClassifyTask, build_classifier
from fullsparse.train.detection import DetectionTask, build_sparse_detector
from fullsparse.train.lm import LMTask
from fullsparse.train.task import Task

__all__ = ["TASKS", "Task", "build_sparse_model"]

#: ``TrainConfig.task`` -> its plug-in.
TASKS: dict[str, type[Task]] = {
    "classify": ClassifyTask,
    "lm": LMTask,
    "detection": DetectionTask,
}


def build_sparse_model(identity: dict[str, Any]) -> tuple[nn.Module, Any]:
    """Build the model an identity describes and sparsify it; returns (model, report)."""
    from fullsparse.config import SparsityConfig
    from fullsparse.models import build_lm_model
    from fullsparse.nn import sparsify_

    task = identity.get("task", "classify")
    if task == "detection":
        return build_sparse_detector(identity)
    if task == "lm":
        model = build_lm_model(
            identity["model"], identity["vocab_size"], **identity["model_kwargs"]
        )
    else:
        model = build_classifier(identity)
    keep_dense = identity.get("keep_dense", ())
    report = sparsify_(model, SparsityConfig(**identity["sparsity"]), keep_dense=keep_dense)
    return model, report
