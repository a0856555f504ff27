"""Object detectors from torchvision, random weights only, and which of their layers a
detector keeps dense.

``build_detection_model(name, num_classes, image_size)`` builds one of
:data:`DETECTION_MODELS`:

* ``fasterrcnn_resnet50_fpn``, ``retinanet_resnet50_fpn``, ``ssd300_vgg16``: torchvision's
  builders with ``weights=None, weights_backbone=None`` (nothing is downloaded; with no
  pretrained weights torchvision uses plain, trainable BatchNorm and trains every layer).
  ``image_size`` sets the detector's own resize: ``min_size = max_size = image_size`` for
  the first two, a fixed ``image_size`` square for SSD (which needs at least
  :data:`SSD_MIN_SIZE` pixels: its last extra layers are unpadded 3×3 convolutions).
* ``fcos_tiny``: the CPU-sized detector of the docs and tests: torchvision's FCOS head
  (anchor-free, GroupNorm towers) with 2 convolutions per tower, on a 5-stage ResNet-style
  backbone of widths 16–128 and a 64-channel FPN over strides 8, 16, 32 (0.90M
  parameters for 3 classes; 128-pixel images by default). Why this one: it runs a training
  step on a 2-core CPU in well under a second at 96–128 pixels, all its layers are plain
  convolutions that 2:4 applies to, and its head is RetinaNet's layout (conv towers, then
  class/box convs) with GroupNorm, which trains from random weights without tuning.

Inputs and outputs are torchvision's: ``model(images, targets)`` in train mode returns a
dict of losses, ``model(images)`` in eval mode a list of ``{"boxes", "scores", "labels"}``;
``images`` is a list of float ``[3, H, W]`` in [0, 1], labels are 1..num_classes-1.

torchvision is imported only when a model is built, never at ``import fullsparse``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from torch import Tensor, nn

from fullsparse.errors import UserError

__all__ = [
    "DETECTION_MODELS",
    "PREDICTION_LAYER_SUFFIXES",
    "SSD_MIN_SIZE",
    "VISION_HINT",
    "build_detection_model",
    "detection_filter",
    "import_torchvision",
]

DETECTION_MODELS: tuple[str, ...] = (
    "fcos_tiny",
    "fasterrcnn_resnet50_fpn",
    "retinanet_resnet50_fpn",
    "ssd300_vgg16",
)
#: Below this side SSD300's feature maps shrink to nothing before its last extra layer.
SSD_MIN_SIZE = 268
VISION_HINT = (
    "pip install 'fullsparse[vision]' (tested pair: torch==2.14.1 torchvision==0.29.1; "
    "torchvision must be built for the installed torch)"
)
#: The last layer of each detection head — class logits, box deltas, centerness — plays
#: the role of a classifier's head, which fullsparse keeps dense (see detection_filter).
PREDICTION_LAYER_SUFFIXES = ("cls_logits", "bbox_pred", "bbox_reg", "cls_score", "bbox_ctrness")


def import_torchvision() -> Any:
    """``torchvision`` itself, or a UserError that says how to install it."""
    try:
        import torchvision
        import torchvision.models.detection  # noqa: F401  (fails on a torch mismatch)
    except (ImportError, RuntimeError, OSError) as exc:
        raise UserError(f"detection models need torchvision ({exc}); {VISION_HINT}") from None
    return torchvision


def detection_filter(name: str, module: nn.Module) -> bool | str:
    """The sparsify_ filter of detectors: every Conv2d/Linear is sparse except the layers
    that produce the detector's outputs, which stay dense with a reason.

    Those are the final class-logit, box-delta and centerness layers of every head (names
    ending in :data:`PREDICTION_LAYER_SUFFIXES`), and SSD's per-level predictor convs
    (``head.*_head.module_list.i``: SSD's heads are nothing but prediction layers) — the
    detection counterpart of the classifier head that ``sparsify_`` keeps dense by default.
    Returns True (sparse) or the reason to stay dense (sparsify_ puts it in its report).
    """
    last = name.rpartition(".")[2]
    if last in PREDICTION_LAYER_SUFFIXES:
        return "detection prediction layer (class/box output), kept dense like a classifier head"
    if ".module_list." in name and "_head" in name:
        return "SSD prediction layer (class/box output per feature map), kept dense like a head"
    return True


# ---------------------------------------------------------------------------------------
# fcos_tiny: a small residual backbone with an FPN


class _Block(nn.Module):
    """A ResNet basic block that halves the resolution: two 3×3 convs + a 1×1 shortcut."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=2, bias=False)
        self.bn_shortcut = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.bn_shortcut(self.shortcut(x)))


class TinyFPNBackbone(nn.Module):
    """Stem (stride 2) + 4 halving blocks; an FPN over the last three (strides 8, 16, 32).

    ``forward(images [N, 3, H, W]) -> OrderedDict("0": P3, "1": P4, "2": P5)``, each
    ``[N, fpn_channels, H/s, W/s]``; ``out_channels`` is what torchvision's heads read.
    """

    def __init__(
        self, widths: tuple[int, ...] = (16, 32, 64, 128, 128), fpn_channels: int = 64
    ) -> None:
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork

        if len(widths) != 5:
            raise ValueError(f"widths must have 5 entries (stem + 4 blocks), got {widths}")
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        self.blocks = nn.ModuleList(_Block(widths[i], widths[i + 1]) for i in range(4))
        self.fpn = FeaturePyramidNetwork(list(widths[2:]), fpn_channels)
        self.out_channels = fpn_channels
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m not in self.fpn.modules():
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        x = self.stem(x)
        features = OrderedDict()
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i >= 1:  # strides 8, 16, 32
                features[str(i - 1)] = x
        return self.fpn(features)


def _fcos_tiny(
    num_classes: int,
    image_size: int | None,
    widths: tuple[int, ...] = (16, 32, 64, 128, 128),
    fpn_channels: int = 64,
    num_convs: int = 2,
    score_thresh: float = 0.05,
    **kwargs: Any,
) -> nn.Module:
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.fcos import FCOSHead

    size = 128 if image_size is None else image_size
    backbone = TinyFPNBackbone(tuple(widths), fpn_channels)
    # FCOS reads an "anchor" per location only for its centre and size: size = stride, the
    # convention of torchvision's fcos_resnet50_fpn (objects go to levels by their extent).
    anchors = AnchorGenerator(sizes=((8,), (16,), (32,)), aspect_ratios=((1.0,),) * 3)
    head = FCOSHead(fpn_channels, 1, num_classes, num_convs=num_convs)
    return FCOS(
        backbone,
        num_classes,
        min_size=size,
        max_size=size,
        anchor_generator=anchors,
        head=head,
        score_thresh=score_thresh,
        **kwargs,
    )


def _fixed_size_ssd_(model: nn.Module, size: int) -> None:
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    old = model.transform
    model.transform = GeneralizedRCNNTransform(
        size, size, old.image_mean, old.image_std, size_divisible=1, fixed_size=(size, size)
    )


def build_detection_model(
    name: str, num_classes: int, image_size: int | None = None, **kwargs: Any
) -> nn.Module:
    """A randomly initialised detector (nothing is downloaded).

    Args:
        name: one of :data:`DETECTION_MODELS`.
        num_classes: classes *including* the background (torchvision's convention; labels
            are 1..num_classes-1).
        image_size: the detector's input side (see the module docstring); None: the
            model's default (800/1333 for Faster R-CNN and RetinaNet, 300 for SSD, 128 for
            fcos_tiny).
        **kwargs: passed to torchvision's builder (e.g. ``box_detections_per_img``); for
            fcos_tiny also ``widths``, ``fpn_channels``, ``num_convs``.

    Raises:
        UserError: torchvision missing, an unknown name, bad sizes, or an option the
            builder rejects.
    """
    if name not in DETECTION_MODELS:
        raise UserError(
            f"unknown detection model {name!r}; choose one of: {', '.join(DETECTION_MODELS)}"
        )
    if num_classes < 2:
        raise UserError(f"num_classes counts the background and must be >= 2, got {num_classes}")
    if image_size is not None and image_size < 32:
        raise UserError(f"image_size must be >= 32 for a detector, got {image_size}")
    if name == "ssd300_vgg16" and image_size is not None and image_size < SSD_MIN_SIZE:
        raise UserError(
            f"ssd300_vgg16 needs image_size >= {SSD_MIN_SIZE} (its last extra layers are "
            f"unpadded 3x3 convolutions), got {image_size}"
        )
    import_torchvision()
    from torchvision.models import detection as tvd

    try:
        if name == "fcos_tiny":
            return _fcos_tiny(num_classes, image_size, **kwargs)
        builder = getattr(tvd, name)
        no_download = {"weights": None, "weights_backbone": None}
        if name == "ssd300_vgg16":
            model = builder(**no_download, num_classes=num_classes, **kwargs)
            if image_size is not None:
                _fixed_size_ssd_(model, image_size)
            return model
        if image_size is not None:
            kwargs = {"min_size": image_size, "max_size": image_size, **kwargs}
        return builder(**no_download, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError) as exc:
        raise UserError(f"detection model {name!r}: {exc}") from None
