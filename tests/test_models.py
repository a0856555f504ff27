"""The model zoo: shapes, exact parameter counts, torchvision-compatible keys, invariants."""

from __future__ import annotations

import math
import re
import sys
import types

import pytest
import torch
from torch import nn

from fullsparse import sparsify_
from fullsparse.errors import UserError
from fullsparse.models import MODELS, build_lm_model, build_model, default_patch_size, head_name
from fullsparse.models.tv import replace_first_conv_

pytestmark = pytest.mark.usefixtures("one_thread")


# Shrunk ViT for CPU tests: same code path, 2 blocks of width 48.
SMALL_VIT = {"depth": 2, "embed_dim": 48, "num_heads": 3}


def small_kwargs(name: str) -> dict:
    return dict(SMALL_VIT) if name == "vit_tiny" else {}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_models_names_are_the_documented_tuple() -> None:
    assert MODELS == ("resnet20", "resnet32", "resnet56", "resnet18", "resnet50", "vit_tiny")


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize(("in_channels", "image_size"), [(3, 32), (1, 32), (1, 28)])
def test_output_shape_for_every_model(name: str, in_channels: int, image_size: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, 7, in_channels, image_size, **small_kwargs(name))
    out = model(torch.randn(2, in_channels, image_size, image_size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------- CIFAR ResNets


def cifar_resnet_param_formula(depth: int, num_classes: int, in_channels: int = 3) -> int:
    """Parameters of ResNet-(6n+2) with 1x1-conv+BN projections, counted by hand."""
    n = (depth - 2) // 6
    total = in_channels * 16 * 9 + 2 * 16  # stem conv + BN
    in_planes = 16
    for planes in (16, 32, 64):
        for i in range(n):
            total += in_planes * planes * 9 + planes * planes * 9 + 2 * 2 * planes
            if i == 0 and in_planes != planes:
                total += in_planes * planes + 2 * planes  # projection conv + BN
            in_planes = planes
    return total + 64 * num_classes + num_classes


def test_resnet20_has_272474_parameters() -> None:
    model = build_model("resnet20", 10)
    assert n_params(model) == 272_474 == cifar_resnet_param_formula(20, 10)
    # He et al. report 0.27M for option-A shortcuts (no parameters); the model's two
    # projection shortcuts (1x1 conv + BN, 16->32 and 32->64) hold the difference.
    projections = [m for name, m in model.named_modules() if name.endswith(".shortcut")]
    assert sum(n_params(m) for m in projections) == 2_752 == (16 * 32 + 64) + (32 * 64 + 128)
    assert n_params(model) - 2_752 == 269_722


@pytest.mark.parametrize(("name", "depth", "blocks"), [("resnet32", 32, 5), ("resnet56", 56, 9)])
def test_cifar_resnet_depths(name: str, depth: int, blocks: int) -> None:
    model = build_model(name, 100, in_channels=1)
    assert n_params(model) == cifar_resnet_param_formula(depth, 100, in_channels=1)
    assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [blocks] * 3
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 2 * 3 * blocks + 2  # stem, blocks, two projections
    assert model.conv1.weight.shape == (16, 1, 3, 3)
    assert [m.out_channels for m in (model.layer1[0].conv1, model.layer2[0].conv1)] == [16, 32]
    assert model.layer3[0].conv1.stride == (2, 2)


def test_cifar_resnet_feature_map_sizes() -> None:
    model = build_model("resnet20", 10).eval()
    shapes = {}
    for name in ("layer1", "layer2", "layer3"):
        getattr(model, name).register_forward_hook(
            lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape))
        )
    model(torch.randn(1, 3, 32, 32))
    assert shapes == {"layer1": (1, 16, 32, 32), "layer2": (1, 32, 16, 16), "layer3": (1, 64, 8, 8)}


# ---------------------------------------------------------------- ImageNet ResNets


def torchvision_resnet_keys(kind: str) -> set[str]:
    """state_dict keys of torchvision's resnet18 / resnet50, written from its naming scheme."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    blocks, convs = {"resnet18": ((2, 2, 2, 2), 2), "resnet50": ((3, 4, 6, 3), 3)}[kind]
    keys = {"conv1.weight", "fc.weight", "fc.bias"} | {f"bn1.{s}" for s in bn}
    for stage, count in enumerate(blocks, start=1):
        for b in range(count):
            prefix = f"layer{stage}.{b}"
            for c in range(1, convs + 1):
                keys.add(f"{prefix}.conv{c}.weight")
                keys |= {f"{prefix}.bn{c}.{s}" for s in bn}
            # torchvision: the first block of every stage gets a projection, except
            # ResNet-18's layer1 (64 -> 64, stride 1).
            if b == 0 and (kind == "resnet50" or stage > 1):
                keys.add(f"{prefix}.downsample.0.weight")
                keys |= {f"{prefix}.downsample.1.{s}" for s in bn}
    return keys


@pytest.mark.parametrize(("name", "count"), [("resnet18", 11_689_512), ("resnet50", 25_557_032)])
def test_imagenet_resnet_matches_torchvision_counts_and_keys(name: str, count: int) -> None:
    model = build_model(name, 1000)
    assert n_params(model) == count  # torchvision's published numbers
    assert set(model.state_dict()) == torchvision_resnet_keys(name)


def test_resnet18_and_50_widths_and_strides() -> None:
    r18 = build_model("resnet18", 1000)
    assert (r18.conv1.kernel_size, r18.conv1.stride, r18.conv1.padding) == ((7, 7), (2, 2), (3, 3))
    assert (r18.maxpool.kernel_size, r18.maxpool.stride) == (3, 2)
    assert r18.layer2[0].conv1.stride == (2, 2) and r18.layer2[0].conv2.stride == (1, 1)
    assert r18.layer4[1].conv2.weight.shape == (512, 512, 3, 3)
    assert r18.fc.weight.shape == (1000, 512)
    r50 = build_model("resnet50", 1000)
    block = r50.layer3[0]
    # v1.5: the stride sits on the 3x3 conv, not the first 1x1.
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)
    assert block.conv1.weight.shape == (256, 512, 1, 1)
    assert block.conv3.weight.shape == (1024, 256, 1, 1)
    assert block.downsample[0].weight.shape == (1024, 512, 1, 1)
    assert block.downsample[0].stride == (2, 2)
    assert r50.fc.weight.shape == (1000, 2048)


def test_imagenet_resnet_in_channels_changes_only_conv1() -> None:
    gray, rgb = build_model("resnet18", 10, in_channels=1), build_model("resnet18", 10)
    assert gray.conv1.weight.shape == (64, 1, 7, 7)
    assert gray.conv1.stride == (2, 2) and gray.conv1.padding == (3, 3)
    diff = {k for k, v in gray.state_dict().items() if v.shape != rgb.state_dict()[k].shape}
    assert diff == {"conv1.weight"}


def test_resnet_init_like_torchvision() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", 10)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
    # kaiming_normal fan_out: std = sqrt(2 / (out_channels * k * k)); 2.4M samples -> ~0.1 %.
    w = model.layer4[1].conv2.weight
    expected = math.sqrt(2.0 / (512 * 9))
    assert w.std().item() == pytest.approx(expected, rel=0.01)
    assert w.mean().item() == pytest.approx(0.0, abs=expected * 0.01)


# ---------------------------------------------------------------- invariants


@pytest.mark.parametrize("name", MODELS)
def test_head_is_last_linear(name: str) -> None:
    model = build_model(name, 13, **small_kwargs(name))
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    last_name, last = linears[-1]
    assert last.out_features == 13
    assert last_name == head_name(model) == ("head" if name == "vit_tiny" else "fc")
    assert sum(isinstance(m, nn.Linear) and m.out_features == 13 for _, m in linears) == 1


class _CountingConv(nn.Conv2d):
    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        return super().forward(x)


class _CountingLinear(nn.Linear):
    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        return super().forward(x)


def _swap_for_counting(model: nn.Module) -> tuple[int, int]:
    """Replace each Conv2d/Linear by a counting subclass sharing its parameters."""
    n_conv = n_lin = 0
    for name, module in list(model.named_modules()):
        if type(module) is nn.Conv2d:
            module.__class__ = _CountingConv
            n_conv += 1
        elif type(module) is nn.Linear:
            module.__class__ = _CountingLinear
            n_lin += 1
        del name
    return n_conv, n_lin


@pytest.mark.parametrize("name", MODELS)
def test_every_conv_and_linear_runs_through_its_module(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, 5, **small_kwargs(name)).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    _CountingConv.calls = _CountingLinear.calls = 0
    n_conv, n_lin = _swap_for_counting(model)
    out = model(x)
    # Each layer called exactly once per forward, through the (replaceable) module.
    assert (_CountingConv.calls, _CountingLinear.calls) == (n_conv, n_lin)
    assert n_conv + n_lin > 0
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


# ---------------------------------------------------------------- ViT


def vit_param_formula(
    dim: int, depth: int, classes: int, patch: int, tokens: int, in_channels: int = 3
) -> int:
    block = 2 * 2 * dim + (dim * 3 * dim + 3 * dim) + (dim * dim + dim)
    block += (dim * 4 * dim + 4 * dim) + (4 * dim * dim + dim)
    embed = in_channels * dim * patch * patch + dim + dim + (1 + tokens) * dim
    return embed + depth * block + 2 * dim + dim * classes + classes


def test_vit_tiny_defaults_are_vit_ti() -> None:
    model = build_model("vit_tiny", 10)
    assert len(model.blocks) == 12
    attn = model.blocks[0].attn
    assert (attn.num_heads, attn.head_dim) == (3, 64)
    assert attn.qkv.weight.shape == (576, 192) and attn.proj.weight.shape == (192, 192)
    mlp = model.blocks[0].mlp
    assert mlp.fc1.weight.shape == (768, 192) and mlp.fc2.weight.shape == (192, 768)
    assert model.patch_embed.kernel_size == model.patch_embed.stride == (4, 4)
    assert model.pos_embed.shape == (1, 65, 192) and model.cls_token.shape == (1, 1, 192)
    assert n_params(model) == vit_param_formula(192, 12, 10, 4, 64) == 5_362_762
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())


def test_vit_linears_see_3d_token_inputs() -> None:
    model = build_model("vit_tiny", 10, in_channels=1, image_size=28, **SMALL_VIT)
    seen: dict[str, tuple[int, ...]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            m.register_forward_hook(
                lambda mod, inp, out, name=name: seen.__setitem__(name, tuple(inp[0].shape))
            )
    model(torch.randn(2, 1, 28, 28))
    tokens = 1 + (28 // 4) ** 2  # cls + 7x7 patches
    body = {n: s for n, s in seen.items() if n != "head"}
    assert len(body) == 4 * 2  # qkv, proj, fc1, fc2 in each of 2 blocks
    for name, shape in body.items():
        d_in = 4 * 48 if name.endswith("fc2") else 48
        assert shape == (2, tokens, d_in), name
    assert seen["head"] == (2, 48)


@pytest.mark.parametrize(
    ("size", "patch"), [(28, 4), (32, 4), (64, 8), (96, 8), (128, 8), (224, 16), (384, 16)]
)
def test_vit_default_patch_size(size: int, patch: int) -> None:
    assert default_patch_size(size) == patch


def test_vit_at_224_uses_16px_patches_and_196_tokens() -> None:
    model = build_model("vit_tiny", 10, image_size=224, depth=1, embed_dim=12, num_heads=3)
    assert model.patch_embed.stride == (16, 16) and model.pos_embed.shape == (1, 197, 12)
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 10)


def test_vit_rejects_image_size_not_divisible_by_patch() -> None:
    with pytest.raises(UserError, match=r"image_size 30 must be divisible by its patch size 4"):
        build_model("vit_tiny", 10, image_size=30, **SMALL_VIT)
    with pytest.raises(UserError, match="patch size 8"):
        build_model("vit_tiny", 10, image_size=100, **SMALL_VIT)
    model = build_model("vit_tiny", 10, image_size=30, patch_size=5, **SMALL_VIT)
    assert model(torch.randn(1, 3, 30, 30)).shape == (1, 10)
    with pytest.raises(ValueError, match="built for 30x30"):
        model(torch.randn(1, 3, 32, 32))


# ---------------------------------------------------------------- errors


def test_unknown_model_lists_every_choice() -> None:
    with pytest.raises(UserError) as info:
        build_model("resnet19", 10)
    for name in MODELS:
        assert name in str(info.value)
    assert "tv:" in str(info.value)


def test_bad_options_are_user_errors() -> None:
    with pytest.raises(UserError, match="unexpected keyword argument 'depth'"):
        build_model("resnet20", 10, depth=3)
    with pytest.raises(UserError, match="num_classes=0"):
        build_model("resnet20", 0)
    with pytest.raises(UserError, match="not divisible by num_heads"):
        build_model("vit_tiny", 10, embed_dim=50, num_heads=3, depth=1)


@pytest.mark.parametrize(
    "build, needle",
    [
        (
            lambda: build_model("vit_tiny", 10, depth=10**8),
            "depth is 100,000,000, over the limit 1,024; raise it with FULLSPARSE_MAX_MODEL_DEPTH",
        ),
        (lambda: build_model("vit_tiny", 10, embed_dim=float("nan")), "embed_dim must be a finite"),
        (lambda: build_lm_model("gpt_tiny", context=10**7), "context is 10,000,000, over the"),
        (
            lambda: build_model("vit_tiny", 10, embed_dim=16384, num_heads=8, depth=64),
            "entries is 206,174,142,474, over the limit 10,000,000,000",
        ),
        (lambda: build_model("resnet20", 10**9), "entries is 65,000,273,413, over the limit"),
    ],
)
def test_sizes_that_would_take_minutes_or_all_memory_are_refused_at_once(build, needle) -> None:
    with pytest.raises(UserError, match=re.escape(needle)):
        build()  # refused before anything big is allocated (the meta device allocates nothing)


def test_the_model_limits_can_be_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FULLSPARSE_MAX_MODEL_DEPTH", "2")
    with pytest.raises(UserError, match="depth is 3, over the limit 2"):
        build_model("vit_tiny", 10, depth=3, embed_dim=12, num_heads=3)
    monkeypatch.setenv("FULLSPARSE_MAX_MODEL_ELEMENTS", "1_000")
    with pytest.raises(UserError, match="over the limit 1,000"):
        build_model("vit_tiny", 10, depth=1, embed_dim=12, num_heads=3)
    monkeypatch.setenv("FULLSPARSE_MAX_MODEL_ELEMENTS", "1_000_000")
    assert isinstance(build_model("vit_tiny", 10, depth=1, embed_dim=12, num_heads=3), nn.Module)


# ---------------------------------------------------------------- tv: (torchvision)


class _FakeTorchvisionNet(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 5, stride=2, padding=2, dilation=1, bias=True, padding_mode="zeros"),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.stem(x)).flatten(1))


@pytest.fixture
def fake_torchvision(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """A stand-in ``torchvision.models`` recording how the model was asked for."""
    calls: list[dict] = []
    models = types.ModuleType("torchvision.models")

    def get_model(name: str, **kwargs: object) -> nn.Module:
        calls.append({"name": name, **kwargs})
        if name == "nolinear":
            return nn.Sequential(nn.Conv2d(3, 4, 1))
        if name == "allconv":  # SqueezeNet's shape: a 1x1 conv head, no Linear
            classes = int(kwargs["num_classes"])  # type: ignore[call-overload]
            return nn.Sequential(
                nn.Conv2d(3, 8, 3),
                nn.ReLU(),
                nn.Conv2d(8, classes, 1),
                nn.Flatten(2),
            )
        return _FakeTorchvisionNet(num_classes=kwargs["num_classes"])  # type: ignore[arg-type]

    models.get_model = get_model  # type: ignore[attr-defined]
    models.list_models = lambda module=None: ["fakenet", "nolinear", "allconv", "googlenet"]  # type: ignore[attr-defined]
    package = types.ModuleType("torchvision")
    package.models = models  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    return calls


def test_tv_model_gets_random_weights_classes_and_adapted_stem(fake_torchvision: list) -> None:
    model = build_model("tv:fakenet", 7, in_channels=1)
    assert fake_torchvision == [{"name": "fakenet", "weights": None, "num_classes": 7}]
    conv = model.stem[0]
    assert conv.weight.shape == (8, 1, 5, 5)
    assert (conv.stride, conv.padding, conv.dilation, conv.groups) == ((2, 2), (2, 2), (1, 1), 1)
    assert conv.bias is not None
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 7)
    assert head_name(model) == "classifier"


def test_tv_model_without_linear_keeps_its_last_conv_dense(fake_torchvision: list) -> None:
    model = build_model("tv:allconv", 6)
    assert head_name(model) == "2"
    report = sparsify_(model, "fst")
    assert report.sparse_names == ["0"]
    assert "last Conv2d" in report["2"].reason and type(model[2]) is nn.Conv2d


def test_tv_models_with_auxiliary_classifiers_are_built_without_them(fake_torchvision):
    build_model("tv:googlenet", 5)
    build_model("tv:googlenet", 5, aux_logits=True)
    assert [c["aux_logits"] for c in fake_torchvision] == [False, True]


def test_tv_errors(fake_torchvision: list, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match="unknown torchvision classification model 'nope'.*fakenet"):
        build_model("tv:nope", 10)
    with pytest.raises(UserError, match="head .* is '0' with 4 outputs, not 10"):
        build_model("tv:nolinear", 10)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import now raises ImportError
    monkeypatch.delitem(sys.modules, "torchvision.models")
    with pytest.raises(UserError, match=r"pip install 'fullsparse\[vision\]'"):
        build_model("tv:resnet18", 10)


def test_replace_first_conv_keeps_groups_rule() -> None:
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Conv2d(8, 8, 1))
    with pytest.raises(UserError, match="divisible by its groups=2"):
        replace_first_conv_(model, 3)
    assert replace_first_conv_(model, 4) is None
    assert replace_first_conv_(model, 6) == "0" and model[0].weight.shape == (8, 3, 3, 3)


@pytest.mark.vision
def test_real_torchvision_resnet18_has_same_keys_as_ours() -> None:
    import torchvision.models as tvm

    theirs = tvm.resnet18(weights=None, num_classes=10)
    ours = build_model("resnet18", 10)
    assert {k: v.shape for k, v in theirs.state_dict().items()} == {
        k: v.shape for k, v in ours.state_dict().items()
    }
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))
    built = build_model("tv:resnet18", 10, in_channels=1)
    assert built.conv1.weight.shape == (64, 1, 7, 7)
