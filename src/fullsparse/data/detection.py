"""Object-detection data: a generated shapes set, COCO- and VOC-format folders, a collate.

Every dataset here yields ``(image, target)`` in the format of torchvision's detection
models, so any of them can be fed to ``model(images, targets)``:

* ``image``: float32 ``[3, H, W]`` in [0, 1] (not normalised: the detectors normalise and
  resize inside their own transform);
* ``target``: ``{"boxes": float32 [N, 4] (x0, y0, x1, y1) in pixels, "labels": int64 [N]
  in 1..K (0 is the background), "iscrowd": int64 [N], "image_id": int}``.

``iscrowd`` marks boxes that evaluation ignores (COCO's crowd regions, VOC's "difficult"
objects); :func:`training_target` drops them for the loss. Nothing here needs torchvision;
image files are decoded with Pillow.

Datasets:

* :class:`SyntheticDetection` (``synthetic-det``): shapes (rectangle, ellipse, triangle,
  cross, ring — one class each) of random colours and sizes on textured backgrounds (a
  colour gradient, low-frequency blotches, stripes and pixel noise), 1–4 per image, never
  overlapping, with tight boxes. Image ``i`` of a split depends only on (seed, split, i).
* :class:`CocoDetectionFolder` (``coco``): ``annotations/instances_<split>.json`` and the
  images in ``<split>/`` (or ``images/<split>/``); categories map to 1..K in id order.
* :class:`VocDetectionFolder` (``voc``): ``JPEGImages/``, ``Annotations/*.xml`` and
  ``ImageSets/Main/<split>.txt``; the 20 VOC classes (or, for other class names, the sorted
  names found), 0-based pixel boxes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from fullsparse.data.detection_folders import (
    VOC_CLASSES,
    CocoDetectionFolder,
    VocDetectionFolder,
    _target,
    find_coco_split,
    find_voc_root,
    voc_class_names,
)
from fullsparse.data.seeding import derive_seed, generator
from fullsparse.errors import DataNotFoundError, UserError

__all__ = [
    "DETECTION_DATASETS",
    "SHAPE_CLASSES",
    "VOC_CLASSES",
    "DetectionBundle",
    "SyntheticDetection",
    "CocoDetectionFolder",
    "VocDetectionFolder",
    "build_detection_datasets",
    "detection_collate",
    "training_target",
    "hflip",
    "find_coco_split",
    "find_voc_root",
    "epoch_flips",
    "synthetic_detection_example",
]

DETECTION_DATASETS: tuple[str, ...] = ("synthetic-det", "coco", "voc")
#: Class ``k + 1`` of the synthetic set is ``SHAPE_CLASSES[k]``.
SHAPE_CLASSES: tuple[str, ...] = ("rectangle", "ellipse", "triangle", "cross", "ring")
#: Stream tag of the synthetic set ("DET"): keeps its draws apart from every other stream.
_STREAM = 0x444554


@dataclass(frozen=True)
class DetectionBundle:
    """Two splits and what a detector needs: ``num_classes`` counts the background (the
    torchvision convention: labels are 1..num_classes-1)."""

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    class_names: tuple[str, ...]

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "train_size": len(self.train),  # type: ignore[arg-type]
            "test_size": len(self.test),  # type: ignore[arg-type]
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
        }


def training_target(target: dict[str, Any]) -> dict[str, Tensor]:
    """``boxes``/``labels`` without the crowd/difficult boxes (what the detectors' losses
    take; torchvision rejects unknown keys in none of them, but a crowd box is no object)."""
    keep = target["iscrowd"] == 0
    return {"boxes": target["boxes"][keep], "labels": target["labels"][keep]}


def hflip(image: Tensor, target: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
    """Mirror ``image [C, H, W]`` and its boxes left-right (x -> W - x)."""
    width = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    return image.flip(-1), {**target, "boxes": boxes}


def detection_collate(
    batch: Sequence[tuple[Tensor, dict[str, Any]]],
) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """``[(image, target), ...]`` -> ``([image, ...], [target, ...])``: images of different
    sizes cannot be stacked; the detectors batch them themselves."""
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    return images, targets


# ---------------------------------------------------------------------------------------
# The synthetic set


def _texture(size: int, g: torch.Generator) -> Tensor:
    """A textured background ``[3, size, size]`` in [0, 1]: gradient + blotches + stripes."""
    c0, c1 = torch.rand(3, generator=g), torch.rand(3, generator=g)
    angle = float(torch.rand((), generator=g)) * 2 * math.pi
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    t = (math.cos(angle) * (x - 0.5) + math.sin(angle) * (y - 0.5)) + 0.5  # [H, W]
    image = c0[:, None, None] * (1 - t) + c1[:, None, None] * t
    blotches = torch.rand((1, 3, 6, 6), generator=g) - 0.5
    image = image + 0.35 * F.interpolate(blotches, size=(size, size), mode="bicubic")[0]
    freq = 4 + 12 * float(torch.rand((), generator=g))
    phi = float(torch.rand((), generator=g)) * 2 * math.pi
    stripes = torch.sin(2 * math.pi * freq * (math.sin(angle) * x - math.cos(angle) * y) + phi)
    image = image + 0.08 * stripes
    image = image + 0.05 * torch.randn((3, size, size), generator=g)
    return image.clamp_(0.0, 1.0)


def _shape_mask(kind: str, box: tuple[float, float, float, float], size: int) -> Tensor:
    """Boolean ``[size, size]``: pixel centres inside shape ``kind`` drawn in ``box``."""
    x0, y0, x1, y1 = box
    c = torch.arange(size, dtype=torch.float32) + 0.5
    y, x = torch.meshgrid(c, c, indexing="ij")
    cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    inside = (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
    u, v = (x - cx) / hw, (y - cy) / hh  # [-1, 1] across the box
    if kind == "rectangle":
        return inside
    if kind == "ellipse":
        return u * u + v * v <= 1.0
    if kind == "triangle":  # apex at the top centre, base along the bottom edge
        return inside & (u.abs() <= (v + 1.0) / 2.0)
    if kind == "cross":
        return inside & ((u.abs() <= 0.3) | (v.abs() <= 0.3))
    if kind == "ring":
        r = u * u + v * v
        return (r <= 1.0) & (r >= 0.35)
    raise ValueError(f"unknown shape {kind!r}")


def _overlaps(box: tuple[float, ...], others: list[tuple[float, ...]], gap: float) -> bool:
    x0, y0, x1, y1 = box
    return any(
        x0 < b[2] + gap and b[0] < x1 + gap and y0 < b[3] + gap and b[1] < y1 + gap for b in others
    )


def synthetic_detection_example(
    seed: int,
    split: int,
    index: int,
    image_size: int = 128,
    num_classes: int = 3,
    max_objects: int = 4,
    min_scale: float = 0.15,
    max_scale: float = 0.45,
) -> tuple[Tensor, dict[str, Any]]:
    """Image ``index`` of split ``split`` (0 train, 1 test): ``(float32 [3, S, S], target)``.

    1..``max_objects`` shapes of classes 1..``num_classes`` (``SHAPE_CLASSES``), side
    lengths ``min_scale``..``max_scale`` of the image, separated by a gap of 2 % of the
    image (a placement that fails 30 times is dropped), filled with a colour far from the
    background's mean plus a little noise. Boxes are tight around the drawn pixels
    (pixel-edge coordinates: a shape covering columns 3..9 has x0 = 3, x1 = 10).
    """
    g = torch.Generator().manual_seed(derive_seed(seed, _STREAM, split, index))
    size = image_size
    image = _texture(size, g)
    background = image.mean((1, 2))
    count = 1 + int(torch.randint(max_objects, (), generator=g))
    placed: list[tuple[float, ...]] = []
    boxes, labels = [], []
    for _ in range(count):
        label = 1 + int(torch.randint(num_classes, (), generator=g))
        for _attempt in range(30):
            r = torch.rand(4, generator=g).tolist()
            w = size * (min_scale + (max_scale - min_scale) * r[0])
            ring = SHAPE_CLASSES[label - 1] == "ring"
            h = w if ring else w * (0.6 + 0.8 * r[1])  # rings stay round
            h = min(h, size * max_scale)
            x0, y0 = (size - w) * r[2], (size - h) * r[3]
            box = (x0, y0, x0 + w, y0 + h)
            if not _overlaps(box, placed, 0.02 * size):
                break
        else:
            continue
        mask = _shape_mask(SHAPE_CLASSES[label - 1], box, size)
        rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
        if rows.numel() < 2 or cols.numel() < 2:
            continue
        colour = torch.rand(3, generator=g)
        if (colour - background).abs().mean() < 0.3:  # too close to the background: invert
            colour = (1.0 - background + 0.2 * (torch.rand(3, generator=g) - 0.5)).clamp(0, 1)
        fill = colour[:, None, None] + 0.04 * torch.randn((3, size, size), generator=g)
        image = torch.where(mask, fill.clamp(0, 1), image)
        placed.append(box)
        boxes.append([float(cols[0]), float(rows[0]), float(cols[-1]) + 1, float(rows[-1]) + 1])
        labels.append(label)
    target = _target(torch.tensor(boxes), torch.tensor(labels), index)
    return image.contiguous(), target


class SyntheticDetection(Dataset):
    """``num_images`` generated shape images (see :func:`synthetic_detection_example`).

    Generated on access (a few milliseconds per 128-pixel image), so its size costs no
    memory; ``dataset[i]`` is the same on every call, in every process.
    """

    def __init__(
        self,
        num_images: int,
        image_size: int = 128,
        num_classes: int = 3,
        seed: int = 0,
        split: int = 0,
        max_objects: int = 4,
    ) -> None:
        if num_images < 1 or image_size < 16 or not 1 <= num_classes <= len(SHAPE_CLASSES):
            raise UserError(
                f"synthetic-det needs num_images >= 1, image_size >= 16 and 1..."
                f"{len(SHAPE_CLASSES)} classes ({', '.join(SHAPE_CLASSES)}); got "
                f"{num_images}, {image_size}, {num_classes}"
            )
        if max_objects < 1:
            raise UserError(f"synthetic-det needs max_objects >= 1, got {max_objects}")
        self.num_images = num_images
        self.image_size = image_size
        self.num_classes = num_classes
        self.seed = seed
        self.split = split
        self.max_objects = max_objects

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        if not 0 <= index < self.num_images:
            raise IndexError(index)
        return synthetic_detection_example(
            self.seed, self.split, index, self.image_size, self.num_classes, self.max_objects
        )


def build_detection_datasets(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    image_size: int | None = None,
    synthetic_train: int = 512,
    synthetic_test: int = 256,
    synthetic_classes: int = 3,
    seed: int = 0,
) -> DetectionBundle:
    """The train/test splits of detection dataset ``name`` (one of :data:`DETECTION_DATASETS`).

    ``synthetic-det`` is generated (``image_size`` default 128); ``coco`` reads
    ``data_dir`` (train: ``instances_train*``, test: ``instances_val*``); ``voc`` reads
    ``data_dir`` (train: ``trainval`` or ``train``, test: ``test`` or ``val``). Files are
    read at their own size: the detector resizes them (``image_size`` sets its min/max size).

    Raises:
        UserError: unknown name or bad sizes; DataNotFoundError: missing folders/files.
    """
    if name == "synthetic-det":
        size = 128 if image_size is None else image_size
        train = SyntheticDetection(synthetic_train, size, synthetic_classes, seed, split=0)
        test = SyntheticDetection(synthetic_test, size, synthetic_classes, seed, split=1)
        names = SHAPE_CLASSES[:synthetic_classes]
        return DetectionBundle(name, train, test, synthetic_classes + 1, names)
    if name not in DETECTION_DATASETS:
        raise UserError(f"unknown detection dataset {name!r}; choose one of: "
                        f"{', '.join(DETECTION_DATASETS)}")  # fmt: skip
    if data_dir is None:
        env = os.environ.get("FULLSPARSE_DATA")
        if env is None:
            raise DataNotFoundError(
                f"dataset {name!r} needs --data-dir (the {name.upper()} folder) or $FULLSPARSE_DATA"
            )
        data_dir = Path(env) / name
    root = Path(data_dir)
    if not root.is_dir():
        raise DataNotFoundError(f"{name} folder {root} does not exist")
    if name == "coco":
        train_dir, train_json = find_coco_split(root, "train")
        test_dir, test_json = find_coco_split(root, "val")
        train_set = CocoDetectionFolder(train_dir, train_json)
        test_set = CocoDetectionFolder(test_dir, test_json, categories=train_set.categories)
        return DetectionBundle(
            name, train_set, test_set, len(train_set.categories) + 1, train_set.class_names
        )
    voc = find_voc_root(root)
    main = voc / "ImageSets" / "Main"
    train_split = "trainval" if (main / "trainval.txt").is_file() else "train"
    test_split = "test" if (main / "test.txt").is_file() else "val"
    found = voc_class_names(voc, (train_split, test_split)) - {""}
    classes = VOC_CLASSES if found <= set(VOC_CLASSES) else tuple(sorted(found))
    train_set = VocDetectionFolder(voc, train_split, classes)
    test_set = VocDetectionFolder(voc, test_split, classes)
    return DetectionBundle(name, train_set, test_set, len(classes) + 1, classes)


def epoch_flips(seed: int, epoch: int, n: int) -> Tensor:
    """Bool ``[n]``: which training images are mirrored in ``epoch`` (probability ½, fixed
    by (seed, epoch) so a resumed run flips the same images)."""
    return torch.rand(n, generator=generator(seed, _STREAM, 2, epoch)) < 0.5
