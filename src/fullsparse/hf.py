"""Hugging Face ``transformers`` layers: :class:`SparseConv1D`, the sparse twin of ``Conv1D``.

GPT-2 and its family (OpenAI GPT, ImageGPT, Decision Transformer, CLVP) build their
projections from ``transformers.pytorch_utils.Conv1D``: a Linear layer ``y = x · W + b``
whose weight Parameter is stored transposed, ``[d_in, d_out]``. :func:`fullsparse.sparsify_`
replaces it with :class:`SparseConv1D`, which keeps that Parameter (same object, same
layout, same ``state_dict`` key, so ``save_pretrained`` / ``from_pretrained`` see the
model they know) and runs :func:`fullsparse.functional.sparse_linear` on its transposed
view ``[d_out, d_in]``. Every mask is computed in that Linear layout, so a ``Conv1D`` gets
exactly the 2:4 masks of the ``nn.Linear`` it equals; the cached TSM mask
(``tsm_mask``) is stored in that layout too. :func:`fullsparse.densify_` gives back a
``Conv1D``.

Needs the ``hf`` extra (``pip install 'fullsparse[hf]'``); ``import fullsparse`` never
imports this module on its own.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from fullsparse.config import SparsityConfig
from fullsparse.nn import linear_forward
from fullsparse.sparse_state import _SparseMixin

try:
    from transformers.pytorch_utils import Conv1D
except ImportError as exc:  # also a transformers built against another torch
    raise ImportError(
        f"fullsparse.hf needs transformers ({exc}); install it with pip install 'fullsparse[hf]'"
    ) from exc

__all__ = ["Conv1D", "SparseConv1D"]


class SparseConv1D(_SparseMixin, Conv1D):
    """Hugging Face ``Conv1D`` whose forward, grad_input and grad_weight follow a
    SparsityConfig.

    ``weight`` is ``[nx, nf]`` = ``[d_in, d_out]`` as in ``Conv1D``; the GEMMs read its
    transpose ``[d_out, d_in]``, the weight of the equal ``nn.Linear(nx, nf)``.
    Input ``[..., T, d_in]`` → output ``[..., T, d_out]`` (tokens on dim -2, which the FST
    weight gradient pairs).
    """

    _dense_cls = Conv1D
    _dense_name = "a transformers Conv1D"

    def __init__(
        self,
        nf: int,
        nx: int,
        *,
        config: SparsityConfig | str = "fst",
        backend: str = "auto",
        device: torch.device | str | None = None,
    ) -> None:
        # Conv1D takes no device argument; on "meta" its random init costs nothing.
        with torch.device(device) if device is not None else contextlib.nullcontext():
            super().__init__(nf, nx, config=config, backend=backend)

    @classmethod
    def _dense_args(cls, module: nn.Module) -> tuple[Any, ...]:
        return (module.nf, module.nx)

    def _gemm_layout(self, t: Tensor) -> Tensor:
        return t.t()  # [d_in, d_out] -> [d_out, d_in], a view

    @classmethod
    def _gemm_weight_of(cls, dense: nn.Module) -> Tensor:
        return dense.weight.t()  # type: ignore[operator]

    def pruned_weight(self) -> Tensor:
        """The forward GEMM's weight operand, detached, in the Parameter's layout
        ``[d_in, d_out]`` (what ``Conv1D.load_state_dict`` takes)."""
        return super().pruned_weight().t()

    def forward(self, input: Tensor) -> Tensor:
        return linear_forward(self, input, self.weight.t())

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}, {self._sparse_repr()}"

    # Conv1D's own __repr__ ignores extra_repr; nn.Module's shows it.
    __repr__ = nn.Module.__repr__
