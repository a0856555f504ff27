"""Residual networks: CIFAR-style ResNet-20/32/56 and ImageNet-style ResNet-18/50.

Two families, both written here so that importing :mod:`fullsparse` needs only torch:

* :class:`CifarResNet` — He et al. 2016 ("Deep Residual Learning", §4.2): a 3×3 stem with 16
  channels, three stages of 16/32/64 channels with ``n = (depth - 2) / 6`` basic blocks each,
  global average pooling and a linear head. Depth 20/32/56 gives n = 3/5/9.
* :class:`ResNet` — the ImageNet architecture with *exactly* the module names, shapes and
  ``state_dict`` keys of torchvision's ``resnet18`` / ``resnet50`` (v1.5: the stride of a
  Bottleneck sits on its 3×3 conv), so published widths/strides apply and torchvision
  checkpoints load with ``load_state_dict``.

Invariant the sparsifier relies on: every Conv2d/Linear is called through its module's
``forward`` and the classifier ``fc`` is the last ``nn.Linear`` in ``named_modules()`` order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "CifarBasicBlock",
    "CifarResNet",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet18",
    "resnet50",
]


def _init_conv_bn(module: nn.Module) -> None:
    """torchvision's ResNet init: He-normal (fan_out) convs, BatchNorm γ = 1 and β = 0.

    fan_out keeps the variance of the *backward* signal constant through the ReLU stack; the
    Linear head keeps PyTorch's default init, as torchvision does.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _check_sizes(num_classes: int, in_channels: int) -> None:
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")


class _TwoConvBlock(nn.Module):
    """The body both basic blocks share: 3×3 conv-BN-ReLU (carrying the stride), 3×3 conv-BN.

    Registers ``conv1, bn1, relu, conv2, bn2`` in that order (torchvision's names).
    """

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)

    def _body(self, x: Tensor) -> Tensor:
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))


# --------------------------------------------------------------------------------------
# CIFAR-style ResNet (He et al. 2016, §4.2)
# --------------------------------------------------------------------------------------


class CifarBasicBlock(_TwoConvBlock):
    """Two 3×3 conv-BN layers plus a shortcut: ``relu(bn2(conv2(relu(bn1(conv1 x)))) + s(x))``.

    ``s`` is the identity when the shape is unchanged, otherwise a 1×1 conv (stride 2) + BN
    projection — the paper's option B. The paper's CIFAR nets use option A (zero-padded
    identity, no parameters); we use B because a parameter-free channel pad has no Conv2d
    for the sparsifier to see and is the more common choice in modern reimplementations.
    It adds 2,752 parameters to ResNet-20 (272,474 instead of ~270k).

    Shapes: ``[N, in_planes, H, W] -> [N, planes, H/stride, W/stride]``.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__(in_planes, planes, stride)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self._body(x) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32×32 inputs (He et al. 2016, §4.2), with projection shortcuts.

    Layout: 3×3 conv(in_channels→16) + BN + ReLU; stage1 (16 ch, n blocks, stride 1);
    stage2 (32 ch, stride 2 in its first block); stage3 (64 ch, stride 2); global average
    pool; ``fc`` Linear(64 → num_classes). Shortcuts that change shape are 1×1 conv + BN
    (see :class:`CifarBasicBlock`). Any input size works (the pool is adaptive); 28×28
    Fashion-MNIST gives 28 → 14 → 7 feature maps.

    Args:
        depth: 6n + 2 (20, 32, 56, 110, ...).
        num_classes: width of the head.
        in_channels: channels of the input image (1 for Fashion-MNIST); only the stem changes.

    Shapes: ``[N, in_channels, H, W] -> [N, num_classes]``.
    """

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        _check_sizes(num_classes, in_channels)
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(
                f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 56), got {depth}"
            )
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        in_planes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(CifarBasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)
        _init_conv_bn(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # [N, 16, H, W]
        x = self.layer3(self.layer2(self.layer1(x)))  # [N, 64, H/4, W/4]
        x = torch.flatten(self.avgpool(x), 1)  # [N, 64]
        return self.fc(x)


def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """CIFAR ResNet-20 (n = 3), 272,474 parameters for 10 classes."""
    return CifarResNet(20, num_classes, in_channels)


def resnet32(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """CIFAR ResNet-32 (n = 5)."""
    return CifarResNet(32, num_classes, in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """CIFAR ResNet-56 (n = 9)."""
    return CifarResNet(56, num_classes, in_channels)


# --------------------------------------------------------------------------------------
# ImageNet-style ResNet (torchvision-compatible names and shapes)
# --------------------------------------------------------------------------------------


class BasicBlock(_TwoConvBlock):
    """ResNet-18/34 block: 3×3 conv-BN-ReLU, 3×3 conv-BN, add ``downsample(x)``, ReLU.

    Shapes: ``[N, inplanes, H, W] -> [N, planes, H/stride, W/stride]``.
    """

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__(inplanes, planes, stride)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self._body(x) + identity)


class Bottleneck(nn.Module):
    """ResNet-50/101/152 block (v1.5): 1×1 reduce, 3×3 (carries the stride), 1×1 expand ×4.

    Putting the stride on the 3×3 conv rather than the first 1×1 (v1 of the paper) is what
    torchvision and the FST paper's ResNet-50 numbers use.

    Shapes: ``[N, inplanes, H, W] -> [N, 4·planes, H/stride, W/stride]``.
    """

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ImageNet ResNet (He et al. 2016, Table 1) with torchvision's module names.

    conv1 7×7/2 (64) → bn1 → relu → maxpool 3×3/2 → layer1 (64, /1) → layer2 (128, /2) →
    layer3 (256, /2) → layer4 (512, /2) → avgpool (adaptive 1×1) → fc. A block whose input
    and output shapes differ gets ``downsample = Sequential(1×1 conv /stride, BN)``, named
    ``downsample.0`` / ``downsample.1`` like torchvision.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
        num_classes: width of ``fc``.
        in_channels: input channels; only ``conv1`` changes (same 7×7/2, padding 3).

    Shapes: ``[N, in_channels, H, W] -> [N, num_classes]``; H = W = 224 is the design point,
    32×32 works (the maps shrink to 1×1 in layer4).
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        num_classes: int = 1000,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        _check_sizes(num_classes, in_channels)
        if len(layers) != 4:
            raise ValueError(f"ResNet needs blocks for 4 stages, got layers={tuple(layers)}")
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0], stride=1)
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        _init_conv_bn(self)

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int
    ) -> nn.Sequential:
        downsample = None
        out_planes = planes * block.expansion
        if stride != 1 or self.inplanes != out_planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, out_planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )
        layers: list[nn.Module] = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = out_planes
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # [N, 64, H/4, W/4]
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # [N, 512·e, H/32, W/32]
        x = torch.flatten(self.avgpool(x), 1)  # [N, 512·e]
        return self.fc(x)


def resnet18(num_classes: int = 1000, in_channels: int = 3) -> ResNet:
    """ResNet-18: BasicBlock × (2, 2, 2, 2); 11,689,512 parameters at 1000 classes."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_channels)


def resnet50(num_classes: int = 1000, in_channels: int = 3) -> ResNet:
    """ResNet-50 (v1.5): Bottleneck × (3, 4, 6, 3); 25,557,032 parameters at 1000 classes."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, in_channels)
