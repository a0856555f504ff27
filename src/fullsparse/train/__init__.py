"""Training: ``train(TrainConfig(...))`` runs a recipe end to end; checkpoints, DDP, AMP.

    from fullsparse.train import TrainConfig, train
    summary = train(TrainConfig(model="resnet20", dataset="fashion-mnist", recipe="fst"))
    summary = train(TrainConfig(task="custom", model="mine"), task=UserTask(model, data, loss))

The command line (``fullsparse train|compare|eval|export|convert``) is a thin front end over the
functions exported here.
"""

from fullsparse.train.checkpoint import convert_checkpoint, load_checkpoint
from fullsparse.train.classify import evaluate
from fullsparse.train.compare import CompareResult, compare
from fullsparse.train.config import TrainConfig, config_from_sources, load_config_file
from fullsparse.train.custom import UserTask
from fullsparse.train.guard import NonFiniteLossError
from fullsparse.train.inference import (
    ExportReport,
    evaluate_checkpoint,
    export_checkpoint,
    load_trained_model,
)
from fullsparse.train.trainer import Trainer, train

__all__ = [
    "TrainConfig",
    "train",
    "Trainer",
    "UserTask",
    "evaluate",
    "compare",
    "CompareResult",
    "evaluate_checkpoint",
    "export_checkpoint",
    "ExportReport",
    "load_trained_model",
    "load_checkpoint",
    "convert_checkpoint",
    "config_from_sources",
    "load_config_file",
    "NonFiniteLossError",
]
