"""Any torchvision classification model by name (``tv:<name>``), random weights only.

torchvision is optional: it is imported here, when such a name is asked for, never at
``import fullsparse``. Weights are never downloaded (``weights=None``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fullsparse.errors import UserError

__all__ = ["build_torchvision_model", "replace_first_conv_", "AUX_CLASSIFIER_MODELS"]

#: torchvision classifiers with auxiliary classifiers (built without them by default).
AUX_CLASSIFIER_MODELS = ("googlenet", "inception_v3")


def _import_torchvision_models() -> Any:
    try:
        import torchvision.models as tvm
    except ImportError as exc:  # also catches a torchvision built for another torch
        raise UserError(
            f"tv: models need torchvision ({exc}); install it with pip install 'fullsparse[vision]'"
        ) from exc
    return tvm


def replace_first_conv_(model: nn.Module, in_channels: int) -> str | None:
    """Give ``model``'s first ``nn.Conv2d`` ``in_channels`` inputs, in place.

    "First" is the first Conv2d in ``named_modules()`` order, which is the stem of every
    torchvision classifier. The new conv keeps out_channels, kernel, stride, padding,
    dilation, groups, bias and padding mode, and is freshly initialised (the models here
    have random weights anyway). Returns the replaced module's name, or ``None`` when the
    conv already had ``in_channels`` inputs.

    Raises:
        UserError: no Conv2d, or ``in_channels`` not divisible by the conv's groups.
    """
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d):
            continue
        if module.in_channels == in_channels:
            return None
        if in_channels % module.groups != 0:
            raise UserError(
                f"cannot give {name} ({module}) {in_channels} input channels: "
                f"in_channels must be divisible by its groups={module.groups}"
            )
        new = nn.Conv2d(
            in_channels,
            module.out_channels,
            module.kernel_size,  # type: ignore[arg-type]
            stride=module.stride,  # type: ignore[arg-type]
            padding=module.padding,  # type: ignore[arg-type]
            dilation=module.dilation,  # type: ignore[arg-type]
            groups=module.groups,
            bias=module.bias is not None,
            padding_mode=module.padding_mode,
            device=module.weight.device,
            dtype=module.weight.dtype,
        )
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        return name
    raise UserError(f"{type(model).__name__} has no nn.Conv2d to adapt to {in_channels} channels")


def build_torchvision_model(
    name: str, num_classes: int, in_channels: int = 3, image_size: int = 32, **kwargs: Any
) -> nn.Module:
    """Build torchvision's classification model ``name`` with random weights.

    ``num_classes`` goes to the constructor. If ``in_channels != 3`` the first Conv2d is
    replaced by :func:`replace_first_conv_`. ``image_size`` is passed only to torchvision's
    ViTs (``vit_*``), whose position embedding fixes the input size; the other models are
    size-agnostic. ``googlenet`` and ``inception_v3`` are built with ``aux_logits=False``
    (one output, which is what the training loop trains) unless ``kwargs`` say otherwise.
    Extra ``kwargs`` go to the constructor.

    Raises:
        UserError: torchvision missing, an unknown name, or a model whose head as
            ``sparsify_`` finds it (the last ``nn.Linear``; the last ``nn.Conv2d`` in a model
            with no Linear, such as SqueezeNet) does not have ``num_classes`` outputs: the
            sparsifier keeps exactly that layer dense, so such a model would be sparsified
            wrongly.
    """
    tvm = _import_torchvision_models()
    available = sorted(tvm.list_models(module=tvm))
    if name not in available:
        raise UserError(
            f"unknown torchvision classification model {name!r}; choose one of: "
            + ", ".join(available)
        )
    if name.startswith("vit_"):
        kwargs.setdefault("image_size", image_size)
    if name in AUX_CLASSIFIER_MODELS:
        # In train mode these return (logits, aux logits...): the training loop trains one
        # output, so the auxiliary classifiers are left out unless asked for.
        kwargs.setdefault("aux_logits", False)
    model = tvm.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if in_channels != 3:
        replace_first_conv_(model, in_channels)
    from fullsparse.nn import head_name

    head = head_name(model)
    module = model.get_submodule(head) if head is not None else None
    width = getattr(module, "out_features", getattr(module, "out_channels", None))
    if width != num_classes:
        raise UserError(
            f"torchvision model {name!r}: its head (the last Linear, or the last Conv2d when "
            f"it has no Linear) is {head!r} with {width} outputs, not {num_classes}, so "
            "fullsparse would keep the wrong layer dense"
        )
    return model
