"""The geometry of a 2-D convolution, and the one output-size formula.

A bottom-layer module (it imports only torch): the kernels, the autograd functions, the
benchmarks and the analysis tools all read a conv's stride, padding, dilation and groups
from :class:`ConvGeometry` and its output size from :func:`conv_output_size`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["ConvGeometry", "conv_output_size", "pair"]


def conv_output_size(
    size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1
) -> int:
    """Output length of a convolution along one axis (PyTorch's ``Conv2d`` formula):
    ``⌊(size + 2·padding − dilation·(kernel − 1) − 1) / stride⌋ + 1``; below 1 when the
    dilated kernel does not fit in the padded input."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def pair(v: Any, name: str) -> tuple[int, int]:
    """``v`` (an int, or a 1- or 2-sequence of ints) as a pair; ``name`` is for the error."""
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if (
        isinstance(v, (tuple, list))
        and len(v) == 2
        and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
    ):
        return (int(v[0]), int(v[1]))
    if isinstance(v, (tuple, list)) and len(v) == 1 and isinstance(v[0], int):
        return (int(v[0]), int(v[0]))
    raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")


@dataclass(frozen=True)
class ConvGeometry:
    """Stride, padding, dilation and groups of a 2-D convolution, normalised to pairs."""

    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    @classmethod
    def make(
        cls,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
    ) -> ConvGeometry:
        """A validated geometry from ints or pairs (``nn.Conv2d``'s argument forms)."""
        geo = cls(
            pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation"), groups
        )
        if min(geo.stride) < 1 or min(geo.dilation) < 1 or min(geo.padding) < 0:
            raise ValueError(
                f"conv needs stride >= 1, dilation >= 1 and padding >= 0, got stride="
                f"{geo.stride}, padding={geo.padding}, dilation={geo.dilation}"
            )
        if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
            raise ValueError(f"groups must be a positive int, got {groups!r}")
        return geo

    def output_size(self, hw: tuple[int, ...], khw: tuple[int, ...]) -> tuple[int, int]:
        """``(Ho, Wo)`` for an input of spatial size ``hw`` and a kernel of size ``khw``."""
        return (
            conv_output_size(hw[0], khw[0], self.stride[0], self.padding[0], self.dilation[0]),
            conv_output_size(hw[1], khw[1], self.stride[1], self.padding[1], self.dilation[1]),
        )

    def with_stride(self, stride: tuple[int, int]) -> ConvGeometry:
        """The same geometry with another stride (the half-size FST weight gradient)."""
        return ConvGeometry(stride, self.padding, self.dilation, self.groups)
