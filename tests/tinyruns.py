"""Small training configs shared by the training tests: runs of about a second.

Imported by test modules as ``from tinyruns import ...`` (pytest puts tests/ on sys.path,
as for ``reference``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fullsparse.train import TrainConfig

#: Test runs print nothing and draw nothing.
QUIET: dict[str, Any] = dict(progress=False, quiet=True, plot=False)
#: ResNet-20 on 8x8 synthetic images: 64 of them in batches of 16 are 4 steps per epoch.
CLASSIFY: dict[str, Any] = dict(
    model="resnet20",
    dataset="synthetic",
    synthetic_train=64,
    synthetic_test=32,
    image_size=8,
    batch_size=16,
)


def quiet_config(out: Path | str, **fields: Any) -> TrainConfig:
    """A quiet TrainConfig writing its run folder to ``out``."""
    return TrainConfig(out=str(out), **{**QUIET, **fields})


def tiny_classify(tmp_path: Path, name: str = "run", **fields: Any) -> TrainConfig:
    """ResNet-20 on tiny synthetic images, one epoch of 4 steps unless ``fields`` says
    otherwise; the run folder is ``tmp_path / name``."""
    return quiet_config(tmp_path / name, **{**CLASSIFY, "epochs": 1, **fields})


def record_linear_dtypes(monkeypatch: Any) -> dict[str, set[Any]]:
    """Record, per ``nn.Linear`` (sparse ones included), the dtypes of its outputs in the
    training forwards of the next run: what autocast really did, whatever the loss says.
    Hooks the trainer's one seam, ``fullsparse.train.trainer.build_model``."""
    import torch
    from torch import nn

    from fullsparse.train import trainer

    real = trainer.build_model
    seen: dict[str, set[Any]] = {}

    def build(identity: Any) -> Any:
        model, report = real(identity)
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):

                def hook(module: Any, inputs: Any, output: Any, name: str = name) -> None:
                    if module.training and torch.is_grad_enabled():
                        seen.setdefault(name, set()).add(output.dtype)

                module.register_forward_hook(hook)
        return model, report

    monkeypatch.setattr(trainer, "build_model", build)
    return seen
