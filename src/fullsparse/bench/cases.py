"""The shapes the suites time: ResNet-18 conv layers (CPU ``layers`` suite) and the GPU
suite's Linear / conv layers. Plain data; nothing here times anything."""

from __future__ import annotations

from dataclasses import dataclass

from fullsparse.geometry import conv_output_size

__all__ = [
    "ConvShape",
    "RESNET18_SHAPES",
    "resnet18_shapes",
    "LinearCase",
    "ConvCase",
    "suite_cases",
    "LARGE_LINEAR_GROUPS",
]


def conv_out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output side of a square conv (dilation 1)."""
    return conv_output_size(size, kernel, stride, padding)


@dataclass(frozen=True)
class ConvShape:
    """One conv layer at one input size: ``[batch, cin, size, size]`` → ``cout``; square
    input, padding ``kernel // 2``, dilation 1."""

    name: str
    cin: int
    cout: int
    kernel: int
    stride: int
    size: int  # input height = width
    batch: int

    @property
    def padding(self) -> int:
        return self.kernel // 2

    @property
    def out_size(self) -> int:
        return conv_out_size(self.size, self.kernel, self.stride, self.padding)

    @property
    def gemm_flops(self) -> int:
        """FLOPs of one dense GEMM role (2·Co·K·N·Ho·Wo, K = Ci·k·k)."""
        return 2 * self.cout * self.cin * self.kernel**2 * self.batch * self.out_size**2


#: Which input size's ResNet-18 shapes ``bench layers --inputs`` times.
INPUT_SETS = ("cifar", "imagenet", "all")


def resnet18_shapes(cifar_batch: int = 128, imagenet_batch: int = 16) -> list[ConvShape]:
    """The distinct conv shapes of ResNet-18 on CIFAR (32×32, 3×3 stem, no max-pool) and on
    ImageNet (224×224, 7×7 stride-2 stem + max-pool), one per stage (3×3 and the stride-2
    entry conv) — the paper's model at both input sizes."""
    c, i = cifar_batch, imagenet_batch
    return [
        ConvShape("cifar.stem 3x3 3-64 @32", 3, 64, 3, 1, 32, c),
        ConvShape("cifar.layer1 3x3 64-64 @32", 64, 64, 3, 1, 32, c),
        ConvShape("cifar.layer2.0 3x3/2 64-128 @32", 64, 128, 3, 2, 32, c),
        ConvShape("cifar.layer2 3x3 128-128 @16", 128, 128, 3, 1, 16, c),
        ConvShape("cifar.layer3 3x3 256-256 @8", 256, 256, 3, 1, 8, c),
        ConvShape("cifar.layer4 3x3 512-512 @4", 512, 512, 3, 1, 4, c),
        ConvShape("imagenet.stem 7x7/2 3-64 @224", 3, 64, 7, 2, 224, i),
        ConvShape("imagenet.layer1 3x3 64-64 @56", 64, 64, 3, 1, 56, i),
        ConvShape("imagenet.layer2 3x3 128-128 @28", 128, 128, 3, 1, 28, i),
        ConvShape("imagenet.layer3 3x3 256-256 @14", 256, 256, 3, 1, 14, i),
        ConvShape("imagenet.layer4 3x3 512-512 @7", 512, 512, 3, 1, 7, i),
    ]


RESNET18_SHAPES = resnet18_shapes()


@dataclass(frozen=True)
class LinearCase:
    """A Linear layer ``[batch, tokens, d_in] → [batch, tokens, d_out]``."""

    name: str
    group: str
    d_in: int
    d_out: int
    batch: int
    tokens: int

    @property
    def gemm_flops(self) -> int:
        return 2 * self.batch * self.tokens * self.d_in * self.d_out


@dataclass(frozen=True)
class ConvCase(ConvShape):
    """A GPU-suite conv (channels-last) and the report group it belongs to."""

    group: str = ""


def _case(name: str, group: str, *geometry: int) -> ConvCase:
    """``ConvCase(name, cin, cout, kernel, stride, size, batch, group=group)``."""
    return ConvCase(name, *geometry, group=group)


def suite_cases(
    quick: bool = False, dry_run: bool = False, vit_batch: int = 64, conv_batch: int = 64
) -> tuple[list[LinearCase], list[ConvCase]]:
    """The layer shapes: ViT-B/L Linear at 197 tokens × ``vit_batch``, a GPT-style MLP at
    8192 tokens, ResNet-50 1×1 and 3×3 convs at ``conv_batch``. ``quick`` keeps the
    largest of each family; ``dry_run`` shrinks everything for a CPU check."""
    if dry_run:
        linears = [
            LinearCase("tiny fc1 32->64", "tiny", 32, 64, 2, 8),
            LinearCase("tiny fc2 64->32", "tiny", 64, 32, 2, 8),
        ]
        convs = [
            _case("tiny 1x1 16->32 @6", "tiny 1x1", 16, 32, 1, 1, 6, 2),
            _case("tiny 3x3 16->16 @6", "tiny 3x3", 16, 16, 3, 1, 6, 2),
        ]
        return linears, convs
    t = 197
    b = vit_batch
    linears = [
        LinearCase(f"{vit} {layer} {d_in}->{d_out}", vit, d_in, d_out, b, t)
        for vit, d in (("ViT-B", 768), ("ViT-L", 1024))
        for layer, d_in, d_out in (
            ("qkv", d, 3 * d),
            ("proj", d, d),
            ("fc1", d, 4 * d),
            ("fc2", 4 * d, d),
        )  # fmt: skip
    ]
    linears += [
        LinearCase("GPT MLP up 4096->16384 @8k", "GPT", 4096, 16384, 4, 2048),
        LinearCase("GPT MLP down 16384->4096 @8k", "GPT", 16384, 4096, 4, 2048),
    ]
    n = conv_batch
    stages = ((64, 56), (128, 28), (256, 14), (512, 7))  # ResNet-50 bottleneck width, side
    convs = [
        _case(f"R50 1x1 {cin}->{cout} @{size}", "R50 1x1", cin, cout, 1, 1, size, n)
        for w, size in stages
        for cin, cout in ((w, 4 * w), (4 * w, w))
    ]
    convs += [_case(f"R50 3x3 {w}->{w} @{size}", "R50 3x3", w, w, 3, 1, size, n)
              for w, size in stages]  # fmt: skip
    if quick:
        keep = {
            "ViT-B fc1 768->3072",
            "ViT-B fc2 3072->768",
            "ViT-L fc1 1024->4096",
            "ViT-L fc2 4096->1024",
            "GPT MLP up 4096->16384 @8k",
            "GPT MLP down 16384->4096 @8k",
            "R50 1x1 256->64 @56",
            "R50 1x1 1024->256 @14",
            "R50 3x3 64->64 @56",
            "R50 3x3 256->256 @14",
        }
        linears = [c for c in linears if c.name in keep]
        convs = [c for c in convs if c.name in keep]
    return linears, convs


#: The Linear shapes the 1.5× target is judged on.
LARGE_LINEAR_GROUPS = ("ViT-L", "GPT")
