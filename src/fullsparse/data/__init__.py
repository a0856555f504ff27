"""Datasets and loaders: Fashion-MNIST, CIFAR-10/100, ImageNet-layout folders, synthetic.

``build_datasets(name, data_dir)`` returns a :class:`DatasetBundle` (train/test datasets
plus what a model needs to know: classes, channels, image size, normalisation);
``make_loader(dataset, batch_size, train=...)`` batches one of them, seeded and sharded
(contract in :mod:`fullsparse.data.loader`).

Datasets yield ``(float32 [C, H, W] normalised, int label)``. The small-image sets are held
in memory as uint8 and their train augmentation is applied by the loader, batched:

================  =============================  ============================================
dataset           mean / std (per channel)        train augmentation (in make_loader)
================  =============================  ============================================
fashion-mnist     0.2860 / 0.3530                 random crop 28, zero padding 2; h-flip ½
cifar10           .4914 .4822 .4465 / .2470 ...   random crop 32, zero padding 4; h-flip ½
cifar100          .5071 .4865 .4409 / .2673 ...   random crop 32, zero padding 4; h-flip ½
imagefolder       ImageNet .485 .456 .406 / ...   random-resized-crop + h-flip (in dataset)
synthetic         train-set statistics            none (a smoke test should learn fast)
================  =============================  ============================================

Fashion-MNIST is flipped too: a mirrored shirt, shoe or bag is still a shirt, shoe or bag,
so the flip is a label-preserving regulariser, as in the usual recipes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from fullsparse.data import cifar, fashion_mnist
from fullsparse.data.idx import read_idx, write_idx
from fullsparse.data.imagefolder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFolderDataset,
    find_imagefolder,
)
from fullsparse.data.loader import Loader, make_loader
from fullsparse.data.safe_pickle import safe_load
from fullsparse.data.synthetic import make_synthetic
from fullsparse.data.tensor import Augmentation, TensorImageDataset
from fullsparse.errors import UserError

__all__ = [
    "DATASETS",
    "DatasetBundle",
    "build_datasets",
    "make_loader",
    "Loader",
    "Augmentation",
    "TensorImageDataset",
    "ImageFolderDataset",
    "read_idx",
    "write_idx",
    "safe_load",
]

DATASETS: tuple[str, ...] = ("fashion-mnist", "cifar10", "cifar100", "imagefolder", "synthetic")

#: Train augmentation of the in-memory sets (padding in pixels of the native size).
FASHION_MNIST_AUGMENTATION = Augmentation(crop_padding=2, horizontal_flip=True)
CIFAR_AUGMENTATION = Augmentation(crop_padding=4, horizontal_flip=True)


@dataclass(frozen=True)
class DatasetBundle:
    """A dataset's two splits and the facts a model and a run record need.

    ``train``/``test`` yield ``(float32 [in_channels, image_size, image_size], int)``,
    normalised with ``mean``/``std`` (per channel, in [0, 1] pixel units).
    """

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def summary(self) -> dict[str, Any]:
        """JSON-ready description (for a run's resolved config)."""
        aug = getattr(self.train, "augmentation", None)
        if isinstance(self.train, ImageFolderDataset):
            augmentation = "random_resized_crop+hflip"
        elif aug is None or aug.is_identity:
            augmentation = "none"
        else:
            augmentation = f"crop_pad{aug.crop_padding}" + ("+hflip" if aug.horizontal_flip else "")
        return {
            "name": self.name,
            "train_size": len(self.train),  # type: ignore[arg-type]
            "test_size": len(self.test),  # type: ignore[arg-type]
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "train_augmentation": augmentation,
        }


def _resize(images: Tensor, size: int) -> Tensor:
    """uint8 ``[N, C, h, w]`` -> uint8 ``[N, C, size, size]``, bilinear (antialiased)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = [
        F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True)
        .round_()
        .clamp_(0, 255)
        .to(torch.uint8)
        for chunk in images.split(4096)  # bounded float32 memory
    ]
    return torch.cat(out)


def _in_memory(
    name: str,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    num_classes: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    augmentation: Augmentation | None,
    image_size: int | None,
) -> DatasetBundle:
    native = train[0].shape[-1]
    size = native if image_size is None else image_size
    if size < 1:
        raise UserError(f"image_size must be >= 1, got {size}")
    if size != native and augmentation is not None and augmentation.crop_padding:
        # Keep the shift a constant fraction of the image when resizing.
        pad = max(1, round(augmentation.crop_padding * size / native))
        augmentation = Augmentation(pad, augmentation.horizontal_flip)
    train_x, test_x = _resize(train[0], size), _resize(test[0], size)
    return DatasetBundle(
        name=name,
        train=TensorImageDataset(train_x, train[1], mean, std, augmentation),
        test=TensorImageDataset(test_x, test[1], mean, std, None),
        num_classes=num_classes,
        in_channels=train_x.shape[1],
        image_size=size,
        mean=mean,
        std=std,
    )


def build_datasets(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    image_size: int | None = None,
    synthetic_train: int = 512,
    synthetic_test: int = 256,
    synthetic_classes: int = 10,
    seed: int = 0,
) -> DatasetBundle:
    """Load dataset ``name`` (one of :data:`DATASETS`).

    Args:
        name: ``fashion-mnist`` (28×28×1, 10 classes), ``cifar10``/``cifar100`` (32×32×3),
            ``imagefolder`` (``data_dir/train|val/<class>/*``, RGB), ``synthetic``.
        data_dir: where the files are (see each loader's search order; Fashion-MNIST and
            CIFAR also look under ``$FULLSPARSE_DATA``, Fashion-MNIST also in
            ``/usr/share/datasets/fashion-mnist`` from Debian's ``dataset-fashion-mnist``).
        image_size: output side. Default: native (28 / 32), 224 for imagefolder, 32 for
            synthetic. For Fashion-MNIST/CIFAR a different size resizes all images once at
            load (bilinear, antialiased).
        synthetic_train, synthetic_test, synthetic_classes: sizes of the synthetic set.
        seed: seed of the synthetic set (the other sets are files and need none).

    Raises:
        UserError: unknown name (lists the choices), corrupt or untrusted files.
        DataNotFoundError: files not found (one line: where we looked, how to get them).
    """
    key = name.lower().replace("_", "-")
    key = {"fmnist": "fashion-mnist", "cifar-10": "cifar10", "cifar-100": "cifar100"}.get(key, key)
    if key == "fashion-mnist":
        train, test = fashion_mnist.load_fashion_mnist(data_dir)
        return _in_memory(
            key,
            train,
            test,
            fashion_mnist.NUM_CLASSES,
            fashion_mnist.MEAN,
            fashion_mnist.STD,
            FASHION_MNIST_AUGMENTATION,
            image_size,
        )
    if key in ("cifar10", "cifar100"):
        spec = cifar.CIFAR10 if key == "cifar10" else cifar.CIFAR100
        train, test = cifar.load_cifar(spec, data_dir)
        return _in_memory(
            key,
            train,
            test,
            spec.num_classes,
            spec.mean,
            spec.std,
            CIFAR_AUGMENTATION,
            image_size,
        )
    if key == "synthetic":
        size = 32 if image_size is None else image_size
        try:
            train, test = make_synthetic(
                synthetic_train, synthetic_test, synthetic_classes, size, channels=3, seed=seed
            )
        except ValueError as exc:
            raise UserError(str(exc)) from exc
        pixels = train[0].to(torch.float32).div_(255.0).transpose(0, 1).reshape(3, -1)
        mean = tuple(round(v, 4) for v in pixels.mean(1).tolist())
        std = tuple(round(max(v, 1e-3), 4) for v in pixels.std(1).tolist())
        return _in_memory(key, train, test, synthetic_classes, mean, std, None, size)
    if key == "imagefolder":
        size = 224 if image_size is None else image_size
        train_ds = ImageFolderDataset(find_imagefolder(data_dir, "train"), size, train=True)
        test_ds = ImageFolderDataset(
            find_imagefolder(data_dir, "val"), size, train=False, classes=train_ds.classes
        )
        return DatasetBundle(
            name=key,
            train=train_ds,
            test=test_ds,
            num_classes=len(train_ds.classes),
            in_channels=3,
            image_size=size,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
        )
    raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
