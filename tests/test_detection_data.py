"""Detection pieces that need no torchvision: the generated shapes set, COCO/VOC folder
parsing, the collate and flip, the ``task='detection'`` config checks, the detection
sparsify filter, and the install hint when torchvision is missing. (The detectors
themselves are tested in ``test_detection.py``, marked ``vision``.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image  # the dev extra has Pillow
from torch import nn

from fullsparse.cli import main
from fullsparse.data.detection import (
    SHAPE_CLASSES,
    VOC_CLASSES,
    CocoDetectionFolder,
    SyntheticDetection,
    _shape_mask,
    build_detection_datasets,
    detection_collate,
    epoch_flips,
    hflip,
    training_target,
)
from fullsparse.errors import ConfigError, DataNotFoundError, UserError
from fullsparse.models.detection import build_detection_model, detection_filter
from fullsparse.nn import sparsify_
from fullsparse.train import TrainConfig

# ------------------------------------------------------------------------- synthetic set


def test_synthetic_detection_is_deterministic_per_seed_split_and_index():
    a = SyntheticDetection(8, 64, 3, seed=1)
    b = SyntheticDetection(20, 64, 3, seed=1)  # size does not change image i
    image, target = a[5]
    image2, target2 = b[5]
    assert torch.equal(image, image2) and torch.equal(target["boxes"], target2["boxes"])
    other_seed = SyntheticDetection(8, 64, 3, seed=2)[5][0]
    test_split = SyntheticDetection(8, 64, 3, seed=1, split=1)[5][0]
    assert not torch.equal(image, other_seed) and not torch.equal(image, test_split)


def test_synthetic_detection_images_and_targets_have_the_detector_format():
    ds = SyntheticDetection(40, 96, 5, seed=0, max_objects=4)
    counts = torch.zeros(6, dtype=torch.int64)
    for i in range(len(ds)):
        image, t = ds[i]
        assert image.shape == (3, 96, 96) and image.dtype == torch.float32
        assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
        boxes, labels = t["boxes"], t["labels"]
        assert 1 <= len(labels) <= 4 and boxes.shape == (len(labels), 4)
        assert labels.dtype == torch.int64 and int(labels.min()) >= 1 and int(labels.max()) <= 5
        assert (boxes[:, 2] > boxes[:, 0] + 4).all() and (boxes[:, 3] > boxes[:, 1] + 4).all()
        assert (boxes >= 0).all() and (boxes <= 96).all()
        assert torch.equal(boxes, boxes.round())  # pixel edges
        assert t["iscrowd"].tolist() == [0] * len(labels) and t["image_id"] == i
        # boxes never overlap (shapes are placed apart, so every box is fully visible)
        for j in range(len(boxes)):
            for k in range(j + 1, len(boxes)):
                bj, bk = boxes[j], boxes[k]
                assert bj[2] <= bk[0] or bk[2] <= bj[0] or bj[3] <= bk[1] or bk[3] <= bj[1]
        counts += torch.bincount(labels, minlength=6)
    assert (counts[1:] > 0).all()  # every class shows up


def test_synthetic_detection_boxes_are_tight_around_the_drawn_shape():
    # Each box is the bounding box of its mask's pixel centres: redraw with the same
    # generator-free mask function and compare.
    box = (10.3, 20.7, 50.2, 44.9)
    for kind in SHAPE_CLASSES:
        mask = _shape_mask(kind, box, 64)
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        assert int(cols[0]) >= 10 and int(cols[-1]) < 51 and 20 <= int(rows[0]) < 22
        assert int(rows[-1]) < 45
    ring = _shape_mask("ring", (0, 0, 40, 40), 40)
    assert not ring[20, 20] and ring[20, 1]  # a hole in the middle
    tri = _shape_mask("triangle", (0, 0, 40, 40), 40)
    assert tri[39].sum() > 35 and tri[1].sum() <= 3  # wide base, narrow apex


def test_synthetic_detection_rejects_bad_sizes_with_one_line():
    with pytest.raises(UserError, match="1...5 classes"):
        SyntheticDetection(4, 64, 6)
    with pytest.raises(UserError, match="image_size >= 16"):
        SyntheticDetection(4, 8, 3)


def test_flip_collate_and_training_target():
    image = torch.arange(2 * 3 * 10, dtype=torch.float32).reshape(2, 3, 10)[:1].expand(3, 3, 10)
    target = {"boxes": torch.tensor([[1.0, 0.0, 4.0, 2.0]]), "labels": torch.tensor([2]),
              "iscrowd": torch.tensor([0]), "image_id": 7}  # fmt: skip
    flipped, ft = hflip(image, target)
    assert ft["boxes"].tolist() == [[6.0, 0.0, 9.0, 2.0]] and ft["image_id"] == 7
    assert torch.equal(flipped[..., 0], image[..., -1])
    again, at = hflip(flipped, ft)
    assert torch.equal(again, image) and torch.equal(at["boxes"], target["boxes"])
    images, targets = detection_collate([(image, target), (flipped, ft)])
    assert len(images) == 2 and targets[1] is ft
    crowd = {**target, "boxes": torch.tensor([[0.0, 0, 1, 1], [2, 2, 3, 3]]),
             "labels": torch.tensor([1, 2]), "iscrowd": torch.tensor([1, 0])}  # fmt: skip
    kept = training_target(crowd)
    assert set(kept) == {"boxes", "labels"} and kept["labels"].tolist() == [2]
    assert torch.equal(epoch_flips(0, 3, 50), epoch_flips(0, 3, 50))
    assert not torch.equal(epoch_flips(0, 3, 50), epoch_flips(0, 4, 50))


# ------------------------------------------------------------------------- COCO / VOC


def _png(path: Path, w: int, h: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), (10, 200, 30)).save(path)


def _coco(root: Path) -> Path:
    for split in ("train2017", "val2017"):
        _png(root / split / "a.png", 40, 30)
        _png(root / split / "b.png", 20, 20)
    categories = [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}]
    anns = [
        {"id": 1, "image_id": 11, "category_id": 7, "bbox": [5, 6, 10, 4], "iscrowd": 0},
        {"id": 2, "image_id": 11, "category_id": 3, "bbox": [0, 0, 40, 30], "iscrowd": 1},
        {"id": 3, "image_id": 11, "category_id": 3, "bbox": [3, 3, 0, 5], "iscrowd": 0},
        {"id": 4, "image_id": 12, "category_id": 3, "bbox": [15, 15, 10, 10]},  # clipped
    ]
    images = [{"id": 12, "file_name": "b.png"}, {"id": 11, "file_name": "a.png"}]
    (root / "annotations").mkdir(parents=True)
    for split in ("train2017", "val2017"):
        data = {"images": images, "annotations": anns, "categories": categories}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


def test_coco_folder_maps_categories_converts_boxes_and_keeps_crowds(tmp_path):
    bundle = build_detection_datasets("coco", _coco(tmp_path / "coco"))
    assert bundle.num_classes == 3 and bundle.class_names == ("cat", "dog")  # id order 3, 7
    ds = bundle.train
    assert isinstance(ds, CocoDetectionFolder) and len(ds) == 2 and len(bundle.test) == 2
    image, t = ds[0]  # image id 11 (images sorted by id)
    assert image.shape == (3, 30, 40) and abs(float(image[1, 0, 0]) - 200 / 255) < 1e-6
    assert t["image_id"] == 11
    assert t["boxes"].tolist() == [[5.0, 6.0, 15.0, 10.0], [0.0, 0.0, 40.0, 30.0]]  # w=0 gone
    assert t["labels"].tolist() == [2, 1] and t["iscrowd"].tolist() == [0, 1]
    _, t12 = ds[1]
    assert t12["boxes"].tolist() == [[15.0, 15.0, 20.0, 20.0]]  # clipped to the 20x20 image


def test_coco_and_voc_missing_folders_say_what_was_expected(tmp_path):
    with pytest.raises(DataNotFoundError, match="instances_train2017.json"):
        build_detection_datasets("coco", tmp_path)
    with pytest.raises(DataNotFoundError, match="JPEGImages/, Annotations/"):
        build_detection_datasets("voc", tmp_path)
    with pytest.raises(DataNotFoundError, match="does not exist"):
        build_detection_datasets("voc", tmp_path / "nowhere")
    with pytest.raises(UserError, match="unknown detection dataset"):
        build_detection_datasets("kitti", tmp_path)


def _voc_xml(name: str, objects: list[tuple[str, tuple[int, ...], int]]) -> str:
    body = "".join(
        f"<object><name>{cls}</name><difficult>{diff}</difficult><bndbox><xmin>{b[0]}</xmin>"
        f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for cls, b, diff in objects
    )
    return f"<annotation><filename>{name}.jpg</filename>{body}</annotation>"


def _voc(root: Path, classes=("dog", "person")) -> Path:
    voc = root / "VOCdevkit" / "VOC2007"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    for i, image_id in enumerate(("000001", "000002")):
        _png(voc / "JPEGImages" / f"{image_id}.jpg", 50, 40)
        objects = [(classes[0], (1, 1, 10, 20), 0), (classes[1], (20, 5, 50, 40), i)]
        (voc / "Annotations" / f"{image_id}.xml").write_text(_voc_xml(image_id, objects))
    (voc / "ImageSets" / "Main" / "trainval.txt").write_text("000001\n000002\n")
    (voc / "ImageSets" / "Main" / "test.txt").write_text("000002\n")
    return root


def test_voc_folder_reads_zero_based_boxes_and_marks_difficult_objects(tmp_path):
    bundle = build_detection_datasets("voc", _voc(tmp_path))
    assert bundle.class_names == VOC_CLASSES and bundle.num_classes == 21
    assert len(bundle.train) == 2 and len(bundle.test) == 1
    image, t = bundle.test[0]
    assert image.shape == (3, 40, 50)
    assert t["boxes"].tolist() == [[0.0, 0.0, 10.0, 20.0], [19.0, 4.0, 50.0, 40.0]]
    assert t["labels"].tolist() == [VOC_CLASSES.index("dog") + 1, VOC_CLASSES.index("person") + 1]
    assert t["iscrowd"].tolist() == [0, 1]  # difficult -> ignored by evaluation


def test_voc_folder_with_other_class_names_uses_them_sorted(tmp_path):
    bundle = build_detection_datasets("voc", _voc(tmp_path, classes=("zebra", "apple")))
    assert bundle.class_names == ("apple", "zebra") and bundle.num_classes == 3
    assert bundle.train[0][1]["labels"].tolist() == [2, 1]


# ------------------------------------------------------------------------- config


def test_detection_config_defaults():
    c = TrainConfig(task="detection")
    assert (c.model, c.dataset, c.image_size, c.synthetic_classes) == (
        "fcos_tiny", "synthetic-det", 128, 3,
    )  # fmt: skip
    assert (c.optimizer, c.peak_lr, c.weight_decay, c.grad_clip) == ("adamw", 3e-3, 0.05, 10.0)
    assert c.no_wd_bn_bias is True and c.label_smoothing == 0.0 and c.steps_per_epoch is None
    assert TrainConfig(task="detection", dataset="coco", data_dir="/x").image_size is None
    assert TrainConfig.from_dict(c.to_dict()) == c
    # the classify and lm defaults are what they were
    assert TrainConfig().synthetic_classes == 10 and TrainConfig(task="lm").synthetic_classes == 10


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({"task": "detection", "model": "resnet20"}, "task='detection' clashes with model="),
        ({"task": "detection", "dataset": "cifar10"}, "clashes with dataset='cifar10'"),
        ({"model": "fcos_tiny"}, "model='fcos_tiny' is for object detection"),
        ({"dataset": "voc"}, "dataset='voc' is for object detection"),
        ({"task": "lm", "model": "ssd300_vgg16"}, "not a known model"),
        ({"task": "detection", "synthetic_classes": 6}, "5 shape classes at most"),
        ({"task": "detection", "steps_per_epoch": 3}, "steps_per_epoch=3 clashes"),
        ({"task": "detection", "label_smoothing": 0.1}, "label_smoothing=0.1 clashes"),
        ({"task": "detection", "data_dir": "/x"}, "'synthetic-det' clashes with data_dir"),
        ({"task": "detection", "amp": "bf16"}, "amp clash(es) with task='detection'"),
        ({"task": "detection", "compile": True}, "compile clash(es)"),
        (
            {"task": "detection", "model": "ssd300_vgg16", "image_size": 200},
            "needs >= 268 pixels",
        ),
        ({"synthetic_classes": 1}, "synthetic_classes must be >= 2 for task='classify'"),
    ],
)
def test_detection_clashes_are_one_line_config_errors(fields, needle):
    with pytest.raises(ConfigError) as info:
        TrainConfig(**fields)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_cli_rejects_a_classifier_for_detection_with_exit_2(capsys):
    assert main(["train", "--task", "detection", "--model", "resnet20"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "clashes with model='resnet20'" in err[0]


# ------------------------------------------------------------------------- sparsify


class _ToyDetector(nn.Module):
    """Names like a torchvision detector's: a stem, an FPN conv, head towers, outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.fpn = nn.Conv2d(8, 8, 1)
        self.cls_tower = nn.Conv2d(8, 8, 3, padding=1)
        self.cls_logits = nn.Conv2d(8, 3, 3, padding=1)
        self.ssd = nn.Module()
        self.ssd.regression_head = nn.Module()
        self.ssd.regression_head.module_list = nn.ModuleList([nn.Conv2d(8, 16, 3)])
        self.rpn_like = nn.Conv2d(8, 3, 1)
        self.depthwise = nn.Conv2d(8, 8, 3, groups=8)


def test_detection_filter_keeps_prediction_layers_dense_with_a_reason_in_the_report():
    model = _ToyDetector()
    report = sparsify_(model, "fst", detection_filter)
    rows = {r.name: r for r in report}
    assert rows["stem"].sparse and "K=27 zero-padded to 28" in rows["stem"].reason
    assert rows["fpn"].sparse and rows["cls_tower"].sparse
    assert not rows["cls_logits"].sparse
    assert "prediction layer" in rows["cls_logits"].reason
    assert not rows["ssd.regression_head.module_list.0"].sparse
    assert "SSD prediction layer" in rows["ssd.regression_head.module_list.0"].reason
    # Co = 3 is padded for the S_Co mask of grad_input, and the report says so
    assert rows["rpn_like"].sparse and "Co=3 zero-padded to 4" in rows["rpn_like"].reason
    assert not rows["depthwise"].sparse and "grouped conv" in rows["depthwise"].reason
    # a filter returning False still gets the generic reason; "" counts as no reason
    report = sparsify_(_ToyDetector(), "fst", lambda n, m: False if n == "stem" else "")
    assert report["stem"].reason == "excluded by filter_fn"
    assert report["fpn"].reason == "excluded by filter_fn" and not report["fpn"].sparse


def test_building_a_detector_without_torchvision_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision -> ImportError
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    monkeypatch.setitem(sys.modules, "torchvision.models.detection", None)
    with pytest.raises(UserError) as info:
        build_detection_model("fcos_tiny", 4)
    assert "pip install 'fullsparse[vision]'" in str(info.value)
    assert "torchvision==0.29.1" in str(info.value)
    with pytest.raises(UserError, match="unknown detection model 'yolo'"):
        build_detection_model("yolo", 4)


def test_detection_training_without_the_vision_extra_is_one_line_and_writes_nothing(
    tmp_path, monkeypatch, capsys
):
    for name in ("torchvision", "torchvision.models", "torchvision.models.detection",
                 "torchmetrics", "torchmetrics.detection"):  # fmt: skip
        monkeypatch.setitem(sys.modules, name, None)
    out = tmp_path / "run"
    code = main(["train", "--task", "detection", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pip install 'fullsparse[vision]'" in err[0]
    assert not out.exists()
