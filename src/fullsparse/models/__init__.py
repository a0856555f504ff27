"""The model zoo: CIFAR ResNets, torchvision-compatible ImageNet ResNets, ViT-Ti, and a
byte-level GPT for language modelling.

``build_model(name, num_classes, in_channels, image_size)`` builds the classifiers; names
are in :data:`MODELS`, plus ``tv:<name>`` for any torchvision classifier and ``timm:<name>``
for any timm classifier (optional extras).
``build_lm_model(name, vocab_size, **kwargs)`` builds the language models of
:data:`LM_MODELS` (``tokens [B, T]`` -> ``logits [B, T, vocab]``).

Invariant every model here keeps, because the sparsifier relies on it: each Conv2d/Linear
is called through its module's ``forward`` (so swapping the module for a subclass works),
and the classifier head is the *last* ``nn.Linear`` in ``model.named_modules()`` order
(the last ``nn.Conv2d`` in a model without any Linear).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fullsparse.errors import UserError
from fullsparse.limits import exceeded, limit
from fullsparse.models.gpt import GPT, gpt_tiny
from fullsparse.models.resnet import (
    CifarResNet,
    ResNet,
    resnet18,
    resnet20,
    resnet32,
    resnet50,
    resnet56,
)
from fullsparse.models.vit import VisionTransformer, default_patch_size, vit_tiny

__all__ = [
    "MODELS",
    "LM_MODELS",
    "build_model",
    "build_lm_model",
    "head_name",
    "GPT",
    "gpt_tiny",
    "CifarResNet",
    "ResNet",
    "VisionTransformer",
    "default_patch_size",
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet18",
    "resnet50",
    "vit_tiny",
]

#: Prefix that routes a name to torchvision (``tv:resnet34``, ``tv:mobilenet_v3_small``).
TORCHVISION_PREFIX = "tv:"
#: Prefix that routes a name to timm (``timm:resnet50``, ``timm:vit_small_patch16_224``).
TIMM_PREFIX = "timm:"


def _resnet(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    # ResNets are fully convolutional with an adaptive pool: image_size does not shape them.
    def build(num_classes: int, in_channels: int, image_size: int, **kwargs: Any) -> nn.Module:
        return fn(num_classes=num_classes, in_channels=in_channels, **kwargs)

    return build


def _vit_tiny(num_classes: int, in_channels: int, image_size: int, **kwargs: Any) -> nn.Module:
    return vit_tiny(num_classes, in_channels, image_size, **kwargs)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": _resnet(resnet20),
    "resnet32": _resnet(resnet32),
    "resnet56": _resnet(resnet56),
    "resnet18": _resnet(resnet18),
    "resnet50": _resnet(resnet50),
    "vit_tiny": _vit_tiny,
}

#: Names :func:`build_model` accepts (besides ``tv:<torchvision name>``, ``timm:<timm name>``).
MODELS: tuple[str, ...] = ("resnet20", "resnet32", "resnet56", "resnet18", "resnet50", "vit_tiny")
assert set(MODELS) == set(_BUILDERS)

_LM_BUILDERS: dict[str, Callable[..., nn.Module]] = {"gpt_tiny": gpt_tiny}
#: Names :func:`build_lm_model` accepts (``fullsparse train --task lm``).
LM_MODELS: tuple[str, ...] = ("gpt_tiny",)
assert set(LM_MODELS) == set(_LM_BUILDERS)


def build_model(
    name: str, num_classes: int, in_channels: int = 3, image_size: int = 32, **kwargs: Any
) -> nn.Module:
    """Build a randomly initialised classifier.

    Args:
        name: one of :data:`MODELS`, or ``tv:<name>`` for a torchvision classification model
            (needs ``pip install 'fullsparse[vision]'``; first Conv2d replaced when
            ``in_channels != 3``, see :func:`fullsparse.models.tv.build_torchvision_model`),
            or ``timm:<name>`` for a timm model (needs ``pip install 'fullsparse[timm]'``; see
            :func:`fullsparse.models.timm_models.build_timm_model`).
        num_classes: width of the classifier head.
        in_channels: image channels (1 for Fashion-MNIST); adapts the stem conv.
        image_size: input side; shapes ViTs (patch size, position embedding), ignored by
            the ResNets.
        **kwargs: model-specific options, e.g. ``depth``, ``embed_dim``, ``num_heads``,
            ``patch_size`` for ``vit_tiny``.

    Returns:
        ``nn.Module`` mapping ``[N, in_channels, image_size, image_size]`` to
        ``[N, num_classes]``.

    Raises:
        UserError: unknown name (the message lists the choices), non-positive sizes,
            an option the model does not take, or an incompatible image size.
    """
    if num_classes < 1 or in_channels < 1 or image_size < 1:
        raise UserError(
            f"model sizes must be >= 1: num_classes={num_classes}, in_channels={in_channels}, "
            f"image_size={image_size}"
        )
    if name.startswith(TORCHVISION_PREFIX):
        from fullsparse.models.tv import build_torchvision_model

        return build_torchvision_model(
            name[len(TORCHVISION_PREFIX) :], num_classes, in_channels, image_size, **kwargs
        )
    if name.startswith(TIMM_PREFIX):
        from fullsparse.models.timm_models import build_timm_model

        return build_timm_model(
            name[len(TIMM_PREFIX) :], num_classes, in_channels, image_size, **kwargs
        )
    builder = _BUILDERS.get(name)
    if name in _LM_BUILDERS:
        raise UserError(f"{name!r} is a language model: build it with build_lm_model")
    if builder is None:
        raise UserError(
            f"unknown model {name!r}; choose one of: {', '.join(MODELS)}, "
            f"tv:<torchvision model name> or timm:<timm model name>"
        )
    return _build_within_limits(name, builder, num_classes, in_channels, image_size, **kwargs)


def build_lm_model(name: str, vocab_size: int = 256, **kwargs: Any) -> nn.Module:
    """Build a randomly initialised causal language model.

    Args:
        name: one of :data:`LM_MODELS`.
        vocab_size: token vocabulary (256 for bytes).
        **kwargs: model options, e.g. ``context``, ``depth``, ``embed_dim``, ``num_heads``,
            ``mlp_ratio`` for ``gpt_tiny``.

    Returns:
        ``nn.Module`` mapping ``tokens [B, T]`` (int64, ``T <= context``) to
        ``logits [B, T, vocab_size]``; it has a ``context`` attribute.

    Raises:
        UserError: unknown name (the message lists the choices), or an option or size the
            model rejects.
    """
    builder = _LM_BUILDERS.get(name)
    if builder is None:
        raise UserError(f"unknown language model {name!r}; choose one of: {', '.join(LM_MODELS)}")
    return _build_within_limits(name, builder, vocab_size=vocab_size, **kwargs)


def _build_within_limits(
    name: str, builder: Callable[..., nn.Module], *args: Any, **kwargs: Any
) -> nn.Module:
    """``builder(*args, **kwargs)`` after checking its options against
    :data:`fullsparse.limits.LIMITS`: each number in ``kwargs`` at most ``model_size``
    (``depth`` at most ``model_depth``), and the model, first built on the meta device (which
    allocates nothing), at most ``model_elements`` parameters and buffer entries. The
    positional sizes (classes, channels, image side) have limits of their own where they
    are read from files."""
    for key, value in kwargs.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if not math.isfinite(value):
            raise UserError(f"model {name!r}: {key} must be a finite number, got {value!r}")
        bound = "model_depth" if key == "depth" else "model_size"
        if abs(value) > limit(bound):
            raise UserError(f"model {name!r}: {exceeded(key, value, bound)}")
    try:
        with torch.device("meta"):
            probe = builder(*args, **kwargs)
        elements = sum(t.numel() for t in (*probe.parameters(), *probe.buffers()))
        if elements > limit("model_elements"):
            what = f"model {name!r}: the number of its parameter and buffer entries"
            raise UserError(exceeded(what, elements, "model_elements"))
        return builder(*args, **kwargs)
    except (TypeError, ValueError) as exc:  # an option it does not take, or a bad size
        raise UserError(f"model {name!r}: {exc}") from exc


def head_name(model: nn.Module) -> str:
    """Name of the classifier head, the layer ``sparsify_`` keeps dense by default: the last
    ``nn.Linear`` in ``named_modules()`` order, or the last ``nn.Conv2d`` in a model with
    no Linear (SqueezeNet).

    Raises:
        UserError: the model has neither.
    """
    from fullsparse.nn import head_name as sparsify_head

    name = sparsify_head(model)
    if name is None:
        raise UserError(f"{type(model).__name__} has no nn.Linear or nn.Conv2d, so no head")
    return name
