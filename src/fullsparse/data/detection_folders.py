"""COCO- and VOC-format detection folders, read and checked when the dataset is built.

Everything that can be checked without decoding pixels is checked in the constructors,
so that a bad file stops ``fullsparse train`` before its run folder is written: the
annotation file (fields, categories, image ids, boxes per image, boxes within one image
side of their image), and the header and size of every image. An image that still fails
to decode mid-run ends the run with one line naming the file. Imported by
:mod:`fullsparse.data.detection`, which re-exports these names.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from fullsparse.data.annotations import (
    check_box_count,
    check_boxes,
    inside,
    read_coco,
    read_voc_xml,
    voc_flag,
    voc_id,
)
from fullsparse.data.imagefolder import image_header_size, open_rgb
from fullsparse.errors import DataNotFoundError, UserError

__all__ = [
    "VOC_CLASSES",
    "CocoDetectionFolder",
    "VocDetectionFolder",
    "find_coco_split",
    "find_voc_root",
    "voc_class_names",
]

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip


def _target(boxes: Tensor, labels: Tensor, image_id: int, iscrowd: Tensor | None = None) -> dict:
    boxes = boxes.reshape(-1, 4).to(torch.float32)
    labels = labels.reshape(-1).to(torch.int64)
    if iscrowd is None:
        iscrowd = torch.zeros_like(labels)
    return {"boxes": boxes, "labels": labels, "iscrowd": iscrowd.to(torch.int64),
            "image_id": int(image_id)}  # fmt: skip


# ---------------------------------------------------------------------------------------
# Image files


def _load_rgb(path: Path) -> Tensor:
    """float32 ``[3, H, W]`` in [0, 1], decoded by Pillow (no torchvision), within the
    ``image_pixels`` limit."""
    rgb = open_rgb(path, "detection image")
    width, height = rgb.size
    data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    return data.view(height, width, 3).permute(2, 0, 1).float().div_(255.0)


def _clean_boxes(boxes: Tensor, width: float, height: float) -> Tensor:
    """Clip to the image; returns the mask of boxes with positive width and height."""
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


class CocoDetectionFolder(Dataset):
    """A COCO instances file and its image folder (boxes ``[x, y, w, h]`` -> xyxy).

    Category ids map to labels 1..K in increasing id order (``categories`` of another split
    can be passed so that train and test agree). Annotations with zero-area boxes are
    dropped; ``iscrowd`` is kept (evaluation ignores crowd regions, training drops them).
    Images without annotations stay (a detector learns "nothing here" from them).
    """

    def __init__(
        self,
        image_dir: str | os.PathLike[str],
        annotation_file: str | os.PathLike[str],
        categories: Sequence[tuple[int, str]] | None = None,
    ) -> None:
        self.image_dir = Path(image_dir)
        found, self.images, annotations = read_coco(Path(annotation_file), self.image_dir)
        self.categories = list(categories) if categories is not None else found
        self.label_of = {cid: i + 1 for i, (cid, _) in enumerate(self.categories)}
        per_image: dict[int, list[dict[str, Any]]] = {im["id"]: [] for im in self.images}
        where = f"COCO file {annotation_file}"
        for i, ann in enumerate(annotations):
            if ann["image_id"] not in per_image:
                raise UserError(
                    f"{where}: annotations[{i}].image_id {ann['image_id']} is not the id of "
                    "an entry of 'images'"
                )
            if ann["category_id"] not in self.label_of:
                known = ", ".join(str(c) for c, _ in self.categories[:10])
                more = ", ..." if len(self.categories) > 10 else ""
                raise UserError(
                    f"{where}: annotations[{i}].category_id {ann['category_id']} is not "
                    f"among the {'training ' if categories is not None else ''}categories "
                    f"({known}{more})"
                )
            per_image[ann["image_id"]].append(ann)
        self.annotations = per_image
        for info in self.images:  # headers only, before a run folder is written
            width, height = image_header_size(info["path"], "detection image")
            anns = per_image[info["id"]]
            xyxy = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
            where_image = f"{where}: image {info['id']} ({info['file_name']})"
            check_boxes(xyxy, width, height, where_image)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(name for _, name in self.categories)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        info = self.images[index]
        image = _load_rgb(info["path"])  # checked by read_coco: inside image_dir
        anns = self.annotations[info["id"]]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # [x, y, w, h] -> [x0, y0, x1, y1]
        labels = torch.tensor([self.label_of[a["category_id"]] for a in anns])
        crowd = torch.tensor([a["iscrowd"] for a in anns], dtype=torch.int64)
        keep = _clean_boxes(boxes, image.shape[-1], image.shape[-2])
        return image, _target(boxes[keep], labels[keep], info["id"], crowd[keep])


class VocDetectionFolder(Dataset):
    """A Pascal VOC folder: the images of ``ImageSets/Main/<split>.txt``.

    Box corners in the XML are 1-based pixel indices; they become 0-based pixel edges
    (``xmin - 1``, ``ymin - 1``, ``xmax``, ``ymax``). "Difficult" objects are marked
    ``iscrowd`` (ignored by evaluation, as VOC's own protocol does). Unknown class names
    raise, naming the file.
    """

    def __init__(
        self, root: str | os.PathLike[str], split: str, classes: Sequence[str] = VOC_CLASSES
    ) -> None:
        self.root = Path(root)
        listing = self.root / "ImageSets" / "Main" / f"{split}.txt"
        try:
            ids = listing.read_text(encoding="utf-8").split()
        except OSError as exc:
            raise DataNotFoundError(f"VOC split file {listing} is missing: {exc}") from None
        self.ids = [voc_id(i, str(listing)) for i in ids]
        self.classes = tuple(classes)
        self.label_of = {name: i + 1 for i, name in enumerate(self.classes)}
        # Every annotation and image header, before a run folder is written.
        self.entries = [self._parse(index) for index in range(len(self.ids))]
        for index, (path, boxes, _, _) in enumerate(self.entries):
            width, height = image_header_size(path, "detection image")
            xml_path = self.root / "Annotations" / f"{self.ids[index]}.xml"
            check_boxes(boxes.tolist(), width, height, f"VOC annotation {xml_path}")

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.classes

    def __len__(self) -> int:
        return len(self.ids)

    def parse(self, index: int) -> tuple[Path, Tensor, Tensor, Tensor]:
        """``(image path, boxes [N, 4], labels [N], difficult [N])`` of image ``index``."""
        path, boxes, labels, difficult = self.entries[index]
        return path, boxes.clone(), labels.clone(), difficult.clone()

    def _parse(self, index: int) -> tuple[Path, Tensor, Tensor, Tensor]:
        xml_path = self.root / "Annotations" / f"{self.ids[index]}.xml"
        tree = read_voc_xml(xml_path)
        filename = (tree.findtext("filename") or "").strip() or f"{self.ids[index]}.jpg"
        boxes, labels, difficult = [], [], []
        for obj in tree.iter("object"):
            name = (obj.findtext("name") or "").strip()
            if name not in self.label_of:
                raise UserError(
                    f"{xml_path}: class {name!r} is not one of the dataset's classes "
                    f"({', '.join(self.classes)})"
                )
            bb = obj.find("bndbox")
            try:
                corners = [float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
                if not all(math.isfinite(c) for c in corners):
                    raise ValueError("non-finite corner")
            except (AttributeError, TypeError, ValueError):
                raise UserError(f"{xml_path}: an object of class {name!r} has no bndbox") from None
            boxes.append([corners[0] - 1, corners[1] - 1, corners[2], corners[3]])
            labels.append(self.label_of[name])
            difficult.append(voc_flag(obj.findtext("difficult"), "difficult", str(xml_path)))
        check_box_count(Counter({self.ids[index]: len(boxes)}), f"VOC annotation {xml_path}")
        return (
            inside(self.root / "JPEGImages", filename, f"{xml_path}: <filename>"),
            torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            torch.tensor(labels, dtype=torch.int64),
            torch.tensor(difficult, dtype=torch.int64),
        )

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        path, boxes, labels, difficult = self.parse(index)
        image = _load_rgb(path)
        keep = _clean_boxes(boxes, image.shape[-1], image.shape[-2])
        return image, _target(boxes[keep], labels[keep], index, difficult[keep])


def voc_class_names(root: Path, splits: Sequence[str]) -> set[str]:
    """The object names of the annotations of ``splits``; an unreadable or malformed
    annotation is refused here (one line naming it), not skipped."""
    names: set[str] = set()
    for split in splits:
        listing = root / "ImageSets" / "Main" / f"{split}.txt"
        try:
            ids = listing.read_text(encoding="utf-8").split()
        except (OSError, UnicodeDecodeError) as exc:
            raise DataNotFoundError(f"cannot read VOC split file {listing}: {exc}") from None
        for image_id in ids:
            voc_id(image_id, str(listing))
            tree = read_voc_xml(root / "Annotations" / f"{image_id}.xml")
            names.update((o.findtext("name") or "").strip() for o in tree.iter("object"))
    return names


# ---------------------------------------------------------------------------------------
# Finding the folders


def find_coco_split(root: Path, split: str) -> tuple[Path, Path]:
    """``(image folder, instances json)`` of split ``train`` or ``val`` under ``root``.

    Looks for ``annotations/instances_<split>*.json`` (e.g. ``instances_val2017.json``) and
    the images in ``<name>/`` or ``images/<name>/`` where ``<name>`` is what follows
    ``instances_`` (``val2017``), falling back to ``images/``.
    """
    candidates = sorted((root / "annotations").glob(f"instances_{split}*.json"))
    if not candidates:
        raise DataNotFoundError(
            f"no COCO {split} annotations under {root}: expected "
            f"{root / 'annotations' / f'instances_{split}2017.json'} (COCO layout: "
            "annotations/instances_<split>.json + <split>/ images)"
        )
    annotation = candidates[0]
    name = annotation.stem[len("instances_") :]
    for image_dir in (root / name, root / "images" / name, root / "images"):
        if image_dir.is_dir():
            return image_dir, annotation
    raise DataNotFoundError(
        f"COCO images for {annotation.name} not found: expected the folder {root / name} "
        f"or {root / 'images' / name}"
    )


def find_voc_root(root: Path) -> Path:
    """The folder holding ``JPEGImages/Annotations/ImageSets``: ``root`` itself, or one
    ``VOC<year>`` inside it or inside ``root/VOCdevkit`` (the first in sorted order)."""

    def is_voc(p: Path) -> bool:
        return all((p / d).is_dir() for d in ("JPEGImages", "Annotations", "ImageSets"))

    if is_voc(root):
        return root
    for parent in (root, root / "VOCdevkit"):
        if parent.is_dir():
            for child in sorted(parent.iterdir()):
                if child.name.startswith("VOC") and is_voc(child):
                    return child
    raise DataNotFoundError(
        f"no VOC folder under {root}: expected JPEGImages/, Annotations/ and "
        "ImageSets/Main/ in it (or in VOCdevkit/VOC2007/)"
    )
