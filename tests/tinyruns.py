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
