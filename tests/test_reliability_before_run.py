"""Everything checkable without decoding pixels is refused before the run folder is
written: annotation files (categories, image ids, boxes per image, box ranges, JSON
memory, VOC markup), every image's header and size, and the packages a run needs."""

from __future__ import annotations

import importlib
import json
import sys
import tracemalloc
from pathlib import Path

import pytest
from PIL import Image

from fullsparse.data import build_datasets
from fullsparse.data.detection import build_detection_datasets
from fullsparse.errors import UserError
from fullsparse.limits import check_json_memory, json_memory_estimate
from test_reliability_hostile_files import _coco, _coco_data, _imagefolder, _png, _voc
from test_reliability_limits import one_line_error


def _refused(data_root: Path, dataset: str, needle: str) -> str:
    with pytest.raises(UserError) as info:
        build_detection_datasets(dataset, data_root)
    message = str(info.value)
    assert needle in message and "\n" not in message, message
    return message


# ------------------------------------------------------------------ COCO


def test_a_category_id_missing_from_categories_is_refused_not_dropped(tmp_path):
    root = _coco(tmp_path / "coco", _coco_data(ann={"category_id": 9}))
    line = _refused(root, "coco", "annotations[0].category_id 9 is not among the categories (1)")
    assert "instances_train2017.json" in line


def test_a_validation_category_unknown_to_training_is_refused(tmp_path):
    root = _coco(tmp_path / "coco", _coco_data())
    val = root / "annotations" / "instances_val2017.json"
    data = _coco_data(ann={"category_id": 2}, categories=[{"id": 2, "name": "other"}])
    val.write_text(json.dumps(data))
    _refused(root, "coco", "category_id 2 is not among the training categories (1)")


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"ann": {"image_id": 5}}, "annotations[0].image_id 5 is not the id of an entry"),
        ({"categories": [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]},
         "'categories' has the id 1 more than once"),
        ({"ann": {"bbox": [1, 1, -3, 2]}}, "has a negative width or height"),
        ({"ann": {"bbox": [-1e300, 0, 1e300, 5]}}, "lies more than one image side outside"),
        ({"ann": {"bbox": [0, 0, 25, 5]}}, "box 0 [0.0, 0.0, 25.0, 5.0] lies more than one"),
    ],
    ids=["unknown-image", "duplicate-category", "negative-size", "1e300", "past-2W"],
)  # fmt: skip
def test_malformed_coco_references_and_boxes_are_one_line(tmp_path, changes, needle):
    _refused(_coco(tmp_path / "coco", _coco_data(**changes)), "coco", needle)


def test_a_box_within_one_image_side_is_still_clipped(tmp_path):
    root = _coco(tmp_path / "coco", _coco_data(ann={"bbox": [-6, 2, 30, 5]}))  # 12x10 image
    _, target = build_detection_datasets("coco", root).train[0]
    assert target["boxes"].tolist() == [[0.0, 2.0, 12.0, 7.0]]


def test_boxes_per_image_are_limited(tmp_path, monkeypatch):
    ann = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 0}
    root = _coco(tmp_path / "coco", _coco_data(annotations=[ann] * 6))
    assert len(build_detection_datasets("coco", root).train.annotations[1]) == 6
    monkeypatch.setenv("FULLSPARSE_MAX_BOXES_PER_IMAGE", "5")
    _refused(root, "coco", "image 1 has the number of boxes is 6, over the limit 5")


def test_json_of_empty_lists_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    def no_parse(*args, **kwargs):
        raise AssertionError("the file was parsed")

    raw = b'{"images": [], "categories": [], "annotations": [' + b"[]," * 1_000_000 + b"[]]}"
    root = _coco(tmp_path / "coco", raw)
    annotations_module = importlib.import_module("fullsparse.data.annotations")
    monkeypatch.setattr(annotations_module.json, "loads", no_parse)
    line = _refused(root, "coco", "FULLSPARSE_MAX_JSON_EXPANSION")
    assert "times its size (3,000," in line
    check_json_memory(b"[" + b"[]," * 100_000 + b"[]]", "small")  # under 64 MiB: any ratio


def _coco_like(images: int) -> bytes:
    """The shape of a real instances file, written compactly as COCO's are: image records
    with URLs, annotations with a polygon of 30 float pairs, a float area and bbox, and
    one crowd annotation in 10 with an uncompressed RLE of 200 short ints."""
    recs = [{"license": 1, "file_name": f"{i:012d}.jpg", "height": 480, "width": 640,
             "coco_url": f"http://images.cocodataset.org/train2017/{i:012d}.jpg",
             "date_captured": "2013-11-14 11:18:45", "id": i} for i in range(images)]  # fmt: skip
    polygon = [[round(100 + 3.17 * k, 2) for k in range(60)]]
    rle = {"counts": [(37 * k) % 400 for k in range(200)], "size": [480, 640]}
    anns = [{"segmentation": rle if i % 10 == 0 else polygon, "area": 2765.1486500000005,
             "iscrowd": int(i % 10 == 0), "image_id": i % images,
             "bbox": [199.84, 200.46, 77.71, 70.88], "category_id": 58, "id": i}
            for i in range(images * 7)]  # fmt: skip
    cats = [{"supercategory": "x", "id": i, "name": f"c{i}"} for i in range(80)]
    data = {"images": recs, "annotations": anns, "categories": cats}
    return json.dumps(data, separators=(",", ":")).encode()


_SHAPES = {
    "coco-like": lambda: _coco_like(300),
    "empty lists": lambda: b"[" + b"[]," * 50_000 + b"[]]",
    "empty objects": lambda: b"[" + b"{}," * 50_000 + b"{}]",
    "objects of a list": lambda: b"[" + b'{"a":[]},' * 50_000 + b"{}]",
    "short strings": lambda: b"[" + b'"ab",' * 50_000 + b'""]',
    "escaped emoji": lambda: b"[" + b'"\\ud83d\\ude00",' * 50_000 + b'""]',
    "floats": lambda: b"[" + b"1.5," * 50_000 + b"0]",
    "dict entries": lambda: b"{" + b",".join(b'"k%d":0' % i for i in range(50_000)) + b"}",
}


@pytest.mark.parametrize("name", list(_SHAPES))
def test_the_json_memory_estimate_bounds_what_parsing_takes(name):
    raw = _SHAPES[name]()
    tracemalloc.start()
    json.loads(raw)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    estimate = json_memory_estimate(raw)
    assert peak <= estimate, (name, peak, estimate)
    if name == "coco-like":  # a real file's shape passes the limit of 16 with room
        assert peak < 8 * len(raw) and estimate < 12 * len(raw), (peak, estimate, len(raw))
        check_json_memory(raw, "coco-like")


# ------------------------------------------------------------------ VOC markup

_BILLION_LAUGHS = (
    '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY l "lol">'
    + "".join(f'<!ENTITY l{i} "{("&l;" if i == 1 else f"&l{i - 1};") * 10}">' for i in range(1, 10))
    + "]><annotation><filename>a.jpg</filename><object><name>&l9;</name></object></annotation>"
)


@pytest.mark.parametrize(
    "xml, needle",
    [
        (_BILLION_LAUGHS, "declares a DOCTYPE or entities"),
        ('<?xml version="1.0"?><!DOCTYPE a [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
         "<annotation><filename>&e;</filename></annotation>", "declares a DOCTYPE"),
        ("<annotation><filename>a.jpg</filename><object>", "is not well-formed XML"),
        ("<annotation><filename>a.jpg</filename></annotation><x/>", "is not well-formed XML"),
        ("\xff\xfe<annotation/>", "is not well-formed XML"),
    ],
    ids=["entity-expansion", "external-entity", "unclosed", "two-roots", "bad-bytes"],
)  # fmt: skip
def test_voc_xml_with_entities_or_malformed_markup_is_refused_not_skipped(tmp_path, xml, needle):
    root = _voc(tmp_path / "voc")
    (root / "Annotations" / "a.xml").write_bytes(xml.encode("latin-1"))
    line = _refused(root, "voc", needle)
    assert "a.xml" in line


def test_voc_boxes_far_outside_the_image_are_refused(tmp_path):
    root = _voc(tmp_path / "voc")
    xml = (
        (root / "Annotations" / "a.xml").read_text().replace("<xmax>5</xmax>", "<xmax>1e300</xmax>")
    )
    (root / "Annotations" / "a.xml").write_text(xml)
    _refused(root, "voc", "lies more than one image side outside the 12x10 image")


# ------------------------------------------------------------------ images and packages


def test_an_undecodable_image_header_is_refused_when_the_dataset_is_built(tmp_path):
    root = _coco(tmp_path / "coco", _coco_data())
    (root / "val2017" / "a.png").write_bytes(b"not an image at all")
    _refused(root, "coco", "cannot read the image header of")
    voc = _voc(tmp_path / "voc")
    (voc / "JPEGImages" / "a.jpg").write_bytes(b"\xff\xd8\xff")
    _refused(voc, "voc", "cannot read the image header of")


_TRAIN = ["train", "--dataset", "imagefolder", "--image-size", "8", "--batch-size", "2",
          "--epochs", "1", "--no-progress", "--no-plot", "--quiet"]  # fmt: skip


def test_imagefolder_header_problems_stop_the_cli_before_the_run_folder(tmp_path, capsys):
    root = _imagefolder(tmp_path / "imgs")
    (root / "val" / "a" / "1.jpg").write_bytes(b"\xff\xd8\xff\xe0junk")
    out = tmp_path / "run"
    line = one_line_error(capsys, [*_TRAIN, "--data-dir", str(root), "--out", str(out)],
                          "cannot read the image header of")  # fmt: skip
    assert "val/a/1.jpg" in line and not out.exists()


def test_coco_problems_stop_the_cli_before_the_run_folder(tmp_path, capsys, monkeypatch):
    from fullsparse.train import detection as detection_task

    monkeypatch.setattr(detection_task, "_mean_average_precision", lambda: None)  # no extra
    root = _coco(tmp_path / "coco", _coco_data(ann={"category_id": 9}))
    out = tmp_path / "run"
    argv = ["train", "--task", "detection", "--dataset", "coco", "--data-dir", str(root),
            "--out", str(out), "--no-progress", "--quiet"]  # fmt: skip
    one_line_error(capsys, argv, "category_id 9 is not among the categories")
    assert not out.exists()


def test_a_missing_pillow_stops_the_run_before_its_folder(tmp_path, capsys, monkeypatch):
    root = _imagefolder(tmp_path / "imgs")
    coco = _coco(tmp_path / "coco", _coco_data())
    monkeypatch.setitem(sys.modules, "PIL", None)
    _refused(coco, "coco", "decode images with Pillow: pip install pillow")
    out = tmp_path / "run"
    one_line_error(capsys, [*_TRAIN, "--data-dir", str(root), "--out", str(out)],
                   "pip install pillow")  # fmt: skip
    assert not out.exists()


def test_imagefolder_checks_every_header_but_decodes_none(tmp_path, monkeypatch):
    root = _imagefolder(tmp_path / "imgs", n=3)
    decoded = []
    real = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(1) or real(self))
    bundle = build_datasets("imagefolder", root, image_size=8)
    assert (len(bundle.train), decoded) == (6, [])
    _png(root / "train" / "a" / "big.png", 30, 30)
    monkeypatch.setenv("FULLSPARSE_MAX_IMAGE_PIXELS", "500")
    with pytest.raises(UserError, match="big.png: 30x30 pixels is 900, over the limit 500"):
        build_datasets("imagefolder", root, image_size=8)
