"""What every analysis starts from: a model (random init or a checkpoint) and real images.

Shared by ``fullsparse analyze similarity|neighbors|fidelity|overhead``. The images are the
first ``n`` of the dataset's *test* split (no augmentation, so a rerun sees the same
pixels); the white-noise twin of a batch is uniform noise in pixel space, normalised with
the dataset's mean/std, so it lives in the same value range as the natural images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fullsparse.errors import UserError

__all__ = ["AnalysisInputs", "load_inputs", "white_noise", "resolve_device"]


@dataclass
class AnalysisInputs:
    """A model in eval mode plus ``images [N, C, H, W]`` (normalised) and ``labels [N]``."""

    model: nn.Module
    images: Tensor
    labels: Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    #: JSON-ready description of where the model and images came from.
    source: dict[str, Any] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when present), ``cpu`` or ``cuda`` — the same rule as training."""
    from fullsparse.train.common import resolve_device as train_device

    return train_device(name)


def _first(dataset: Any, n: int) -> tuple[Tensor, Tensor]:
    n = min(n, len(dataset))
    batch = getattr(dataset, "batch", None)
    if callable(batch):  # in-memory sets index a whole batch at once
        return batch(torch.arange(n))
    xs, ys = zip(*(dataset[i] for i in range(n)), strict=True)
    return torch.stack(xs), torch.as_tensor(ys, dtype=torch.int64)


def load_inputs(
    *,
    checkpoint: str | None = None,
    model: str = "resnet20",
    dataset: str = "fashion-mnist",
    data_dir: str | None = None,
    image_size: int | None = None,
    images: int = 256,
    seed: int = 0,
    split: str = "test",
) -> AnalysisInputs:
    """The model to analyse and ``images`` real images of its dataset.

    With ``checkpoint`` (a run's ``last.pt``/``best.pt``) the model, dataset and image size
    are the checkpoint's — the trained sparse model, as it computes its forward — and
    ``model``/``dataset``/``image_size`` are ignored. Without it, ``model`` is built at
    random init (``torch.manual_seed(seed)``) for ``dataset``'s channels, classes and size.

    Raises:
        UserError: unknown model/dataset, missing data, unreadable checkpoint.
    """
    from fullsparse.data import build_datasets

    if images < 1:
        raise UserError(f"--images must be >= 1, got {images}")
    if split not in ("train", "test"):
        raise UserError(f"split must be 'train' or 'test', got {split!r}")
    if checkpoint is not None:
        from fullsparse.train.inference import load_trained_model

        net, state = load_trained_model(checkpoint, "cpu")
        identity = state["identity"]
        config = state.get("config", {})
        dataset = identity["dataset"]
        image_size = identity["image_size"]
        data_dir = data_dir if data_dir is not None else config.get("data_dir")
        source: dict[str, Any] = {
            "checkpoint": str(checkpoint),
            "model": identity["model"],
            "recipe": identity["recipe"],
            "epoch": int(state["epoch"]),
            "best_top1": state.get("best_top1"),
        }
    else:
        net = None
        source = {"checkpoint": None, "model": model, "init": f"random (seed {seed})"}
    bundle = build_datasets(dataset, data_dir, image_size=image_size, seed=seed)
    if net is None:
        from fullsparse.models import build_model

        torch.manual_seed(seed)
        net = build_model(
            model, bundle.num_classes, in_channels=bundle.in_channels, image_size=bundle.image_size
        )
    net.eval()
    x, y = _first(bundle.train if split == "train" else bundle.test, images)
    source.update(
        dataset=bundle.name, split=split, images=int(x.shape[0]), image_size=bundle.image_size
    )
    return AnalysisInputs(net, x, y, tuple(bundle.mean), tuple(bundle.std), source)


def white_noise(
    like: Tensor, mean: tuple[float, ...], std: tuple[float, ...], seed: int = 0
) -> Tensor:
    """Uniform white noise in pixel space ``[0, 1)``, normalised like the dataset's images.

    Same shape as ``like`` ``[N, C, H, W]``; every pixel independent (no spatial similarity
    at all, the paper's Fig. 4(b) control).
    """
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(like.shape, generator=g)
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return ((noise - m) / s).to(like.dtype)
