"""Any timm classification model by name (``timm:<name>``), random weights only.

timm is optional (the ``timm`` extra; it needs torchvision): it is imported here, when such
a name is asked for, never at ``import fullsparse``. Weights are never downloaded
(``pretrained=False``).
"""

from __future__ import annotations

import difflib
from typing import Any

from torch import nn

from fullsparse.errors import UserError

__all__ = ["build_timm_model"]


def _import_timm() -> Any:
    try:
        import timm
    except ImportError as exc:  # also a timm whose torchvision does not match torch
        raise UserError(
            f"timm: models need timm ({exc}); install it with pip install 'fullsparse[timm]'"
        ) from exc
    return timm


def build_timm_model(
    name: str, num_classes: int, in_channels: int = 3, image_size: int = 32, **kwargs: Any
) -> nn.Module:
    """Build timm's model ``name`` with random weights.

    ``num_classes`` and ``in_channels`` go to ``timm.create_model`` (``num_classes``,
    ``in_chans``). ``image_size`` is passed (as ``img_size``) only to models whose input size
    is fixed by their architecture (ViTs and the like: timm's ``fixed_input_size``); the
    others take any size. Extra ``kwargs`` go to ``timm.create_model``.

    Raises:
        UserError: timm missing, an unknown name (the message offers close names), an option
            the model rejects, or a model whose classifier is not its last ``nn.Linear`` (the
            sparsifier keeps exactly that layer dense, so such a model would be sparsified
            wrongly).
    """
    timm = _import_timm()
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise UserError(f"unknown timm model {name!r} (see timm.list_models()){hint}")
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is not None and cfg.fixed_input_size:
        kwargs.setdefault("img_size", image_size)
    try:
        model = timm.create_model(
            name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs
        )
    except (TypeError, ValueError, AssertionError) as exc:  # options or sizes it rejects
        raise UserError(f"timm model {name!r}: {exc}") from exc
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not linears or linears[-1] is not head:
        raise UserError(
            f"timm model {name!r}: its classifier is not its last nn.Linear, which fullsparse "
            "needs to keep the head dense"
        )
    return model
