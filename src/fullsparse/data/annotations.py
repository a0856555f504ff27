"""Validated reading of detection annotation files (COCO json, VOC ids and fields).

Every field a dataset later uses is checked here, when the dataset is built, so that a
malformed file is one line naming the file, the field and the rule — not a traceback in a
DataLoader worker halfway through an epoch. Paths taken from the files (COCO
``file_name``, VOC ids and ``<filename>``) must stay inside their dataset folder.
"""

from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any
from xml.parsers import expat

from fullsparse.errors import UserError
from fullsparse.limits import check_json_memory, escape, exceeded, limit, read_capped

__all__ = [
    "read_coco",
    "read_voc_xml",
    "check_boxes",
    "check_box_count",
    "inside",
    "voc_id",
    "voc_flag",
]


def _show(value: Any) -> str:
    return escape(repr(value), 40)


def inside(folder: Path, relative: Any, where: str) -> Path:
    """``folder / relative`` for a relative path that cannot leave ``folder`` (no absolute
    path, no ``..`` component, no backslash or drive tricks); checked lexically, so
    symlinked image folders still work."""
    if not isinstance(relative, str) or not relative or "\x00" in relative:
        raise UserError(f"{where} must be a non-empty file name, got {_show(relative)}")
    parts = PurePosixPath(relative.replace("\\", "/")).parts
    if relative.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
        raise UserError(
            f"{where} = {_show(relative)} leaves the dataset folder (only relative paths "
            "without '..' are allowed)"
        )
    return folder.joinpath(*parts)


_VOC_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def voc_id(value: str, where: str) -> str:
    """A VOC image id: letters, digits, ``_ . -`` (no path separators, no ``..``)."""
    if not _VOC_ID.fullmatch(value) or ".." in value:
        raise UserError(
            f"{where}: image id {_show(value)} is not a plain name (letters, digits, _ . -)"
        )
    return value


def voc_flag(text: str | None, field: str, where: str) -> int:
    """A VOC 0/1 field (``difficult``, ``truncated``); missing or empty is 0."""
    value = (text or "0").strip() or "0"
    if value not in ("0", "1"):
        raise UserError(f"{where}: <{field}> must be 0 or 1, got {_show(value)}")
    return int(value)


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{where} must be an integer, got {_show(value)}")
    return value


def _list_of_dicts(data: dict[str, Any], key: str, path: Path, required: bool) -> list[Any]:
    value = data.get(key, None if required else [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise UserError(f"{path}: '{key}' must be a list of objects, got {_show(value)}")
    return value


def _bbox(value: Any, where: str) -> list[float]:
    ok = isinstance(value, list) and len(value) == 4
    ok = ok and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
    )
    if not ok:
        raise UserError(f"{where} must be a list of 4 finite numbers [x, y, w, h], got "
                        f"{_show(value)}")  # fmt: skip
    return [float(v) for v in value]


def check_box_count(counts: Counter[Any], where: str) -> None:
    """Refuse an image with more boxes than the ``boxes_per_image`` limit (``counts``:
    image id -> boxes)."""
    if not counts:
        return
    image, most = counts.most_common(1)[0]
    if most > limit("boxes_per_image"):
        raise UserError(
            f"{where}: image {_show(image)} has "
            f"{exceeded('the number of boxes', most, 'boxes_per_image')}"
        )


def check_boxes(boxes: list[list[float]], width: int, height: int, where: str) -> None:
    """Refuse a box ``[x0, y0, x1, y1]`` (pixels) whose corners lie more than one image
    side outside the ``width`` x ``height`` image, or whose x1 < x0 or y1 < y0. Boxes
    within that range are clipped to the image later (a box drawn a little past the edge
    is common); beyond it the numbers are not a box of this image."""
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        if x1 < x0 or y1 < y0:
            raise UserError(f"{where}: box {i} {_show([x0, y0, x1, y1])} has a negative size")
        if (
            min(x0, x1) < -width
            or max(x0, x1) > 2 * width
            or min(y0, y1) < -height
            or max(y0, y1) > 2 * height
        ):
            raise UserError(
                f"{where}: box {i} {_show([x0, y0, x1, y1])} lies more than one image side "
                f"outside the {width}x{height} image"
            )


def _refuse_declaration(*args: Any) -> None:
    raise ValueError("it declares a DOCTYPE or entities, which VOC annotations never do")


def read_voc_xml(path: Path) -> ET.Element:
    """The root element of VOC annotation ``path``, within the ``annotation_bytes`` limit.

    A document type declaration, an entity declaration (internal ones expand, "billion
    laughs"; external ones point at other files) or malformed markup is refused with one
    line naming the file: an expat pass with handlers that raise comes first, then
    ElementTree builds the tree from the same bytes."""
    raw = read_capped(path, limit("annotation_bytes"), "VOC annotation", "annotation_bytes")
    check = expat.ParserCreate()
    check.StartDoctypeDeclHandler = _refuse_declaration
    check.EntityDeclHandler = _refuse_declaration
    check.ExternalEntityRefHandler = _refuse_declaration
    try:
        check.Parse(raw, True)
        return ET.fromstring(raw)
    except ValueError as exc:
        raise UserError(f"VOC annotation {path}: {exc}") from None
    except (expat.ExpatError, ET.ParseError) as exc:
        raise UserError(f"VOC annotation {path} is not well-formed XML: {exc}") from None


def read_coco(
    path: Path, image_dir: Path
) -> tuple[list[tuple[int, str]], list[dict[str, Any]], list[dict[str, Any]]]:
    """``(categories [(id, name)] sorted by id, images [{id, file_name, path}] sorted by id,
    annotations [{image_id, category_id, bbox [x, y, w, h], iscrowd}])`` of a COCO
    instances file, every field checked (UserError naming the file, field and rule)."""
    raw = read_capped(path, limit("annotation_bytes"), "COCO file", "annotation_bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); a COCO file is JSON"
        ) from None
    check_json_memory(raw, f"COCO file {path}")
    try:
        data = json.loads(text)
    except RecursionError:
        raise UserError(f"{path}: JSON nested too deeply for a COCO file") from None
    except ValueError as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None
    del raw, text
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object, got {type(data).__name__}")
    categories = []
    for i, c in enumerate(_list_of_dicts(data, "categories", path, required=True)):
        name = c.get("name")
        if not isinstance(name, str):
            raise UserError(f"{path}: categories[{i}].name must be a string, got {_show(name)}")
        categories.append((_int(c.get("id"), f"{path}: categories[{i}].id"), name))
    images = []
    for i, im in enumerate(_list_of_dicts(data, "images", path, required=True)):
        where = f"{path}: images[{i}]"
        image_id = _int(im.get("id"), f"{where}.id")
        file = inside(image_dir, im.get("file_name"), f"{where}.file_name")
        images.append({"id": image_id, "file_name": im["file_name"], "path": file})
    annotations = []
    for i, a in enumerate(_list_of_dicts(data, "annotations", path, required=False)):
        where = f"{path}: annotations[{i}]"
        crowd = a.get("iscrowd", 0)
        if crowd not in (0, 1) or isinstance(crowd, float):
            raise UserError(f"{where}.iscrowd must be 0 or 1, got {_show(crowd)}")
        annotations.append(
            {
                "image_id": _int(a.get("image_id"), f"{where}.image_id"),
                "category_id": _int(a.get("category_id"), f"{where}.category_id"),
                "bbox": _bbox(a.get("bbox"), f"{where}.bbox"),
                "iscrowd": int(crowd),
            }
        )
    for what, ids in (("categories", [c[0] for c in categories]),
                      ("images", [im["id"] for im in images])):  # fmt: skip
        twice = [i for i, n in Counter(ids).items() if n > 1]
        if twice:
            raise UserError(f"{path}: '{what}' has the id {twice[0]} more than once")
    for i, a in enumerate(annotations):
        if a["bbox"][2] < 0 or a["bbox"][3] < 0:
            raise UserError(
                f"{path}: annotations[{i}].bbox {_show(a['bbox'])} has a negative width or height"
            )
    check_box_count(Counter(a["image_id"] for a in annotations), f"COCO file {path}")
    return sorted(categories), sorted(images, key=lambda im: im["id"]), annotations
