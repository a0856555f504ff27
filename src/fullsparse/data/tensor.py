"""In-memory image datasets (uint8 tensors) and their batched, seeded augmentation.

Images are kept as uint8 ``[N, C, H, W]`` (4× less memory than float32: Fashion-MNIST's
60,000 training images are 47 MB) and turned into normalised float32 per batch. The train
augmentation (pad-and-random-crop, horizontal flip) runs on a whole batch with tensor
indexing, its random numbers given explicitly, so the loader can draw them from a seeded
``torch.Generator`` and never touch the global RNG.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["Augmentation", "TensorImageDataset", "crop_and_flip", "normalize"]


@dataclass(frozen=True)
class Augmentation:
    """Train-time augmentation of a small-image dataset.

    ``crop_padding`` p: zero-pad each side by p pixels (black, before normalisation, like
    torchvision's ``RandomCrop(size, padding=p)``) and crop back to the original size at a
    uniformly random offset in ``[0, 2p]²``. ``horizontal_flip``: mirror with probability ½.
    """

    crop_padding: int = 0
    horizontal_flip: bool = False

    def __post_init__(self) -> None:
        if self.crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {self.crop_padding}")

    @property
    def is_identity(self) -> bool:
        return self.crop_padding == 0 and not self.horizontal_flip

    def draw(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Parameters for ``n`` images: offsets ``[n, 2]`` (dy, dx) int64, flips ``[n]`` bool.

        Always draws both, in a fixed order, so the stream position after a draw does not
        depend on the settings.
        """
        offsets = torch.randint(0, 2 * self.crop_padding + 1, (n, 2), generator=generator)
        flips = torch.rand(n, generator=generator) < 0.5
        if not self.horizontal_flip:
            flips = torch.zeros_like(flips)
        return offsets, flips


def crop_and_flip(images: Tensor, padding: int, offsets: Tensor, flips: Tensor) -> Tensor:
    """Pad-and-crop then optionally mirror a batch, in one gather.

    Args:
        images: ``[B, C, H, W]`` any dtype (uint8 here: padding is 0 = black).
        padding: p, pixels of zero padding on each side.
        offsets: ``[B, 2]`` int64 crop corner (dy, dx) in the padded image, each in [0, 2p].
        flips: ``[B]`` bool, mirror horizontally after cropping.

    Returns:
        ``[B, C, H, W]``: ``out[b, c, i, j] = padded[b, c, dy_b + i, dx_b + j']`` with
        ``j' = W-1-j`` where ``flips[b]``, else ``j``.
    """
    B, C, H, W = images.shape
    if offsets.shape != (B, 2) or flips.shape != (B,):
        raise ValueError(
            f"crop_and_flip: images {tuple(images.shape)} need offsets [B, 2] and flips [B], "
            f"got {tuple(offsets.shape)} and {tuple(flips.shape)}"
        )
    padded = F.pad(images, (padding,) * 4) if padding else images
    Wp = W + 2 * padding
    cols = torch.arange(W)
    cols = torch.where(flips[:, None], W - 1 - cols, cols)  # [B, W]: flip folds into the gather
    rows = offsets[:, :1] + torch.arange(H)  # [B, H]
    cols = offsets[:, 1:] + cols  # [B, W]
    # One gather over the flattened padded plane: 3x faster than 4-tensor advanced indexing.
    flat = (rows[:, :, None] * Wp + cols[:, None, :]).reshape(B, 1, H * W).expand(B, C, H * W)
    return padded.reshape(B, C, -1).gather(2, flat).reshape(B, C, H, W)


def normalize(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 ``[..., C, H, W]`` in [0, 255] → float32 ``(x/255 - mean) / std`` per channel."""
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (images.to(torch.float32) / 255.0 - m) / s


class TensorImageDataset(Dataset):
    """A split held in memory: uint8 images ``[N, C, H, W]``, int64 labels ``[N]``.

    ``dataset[i]`` is ``(image float32 [C, H, W] normalised, label int)`` *without*
    augmentation; ``augmentation`` is applied, batched and seeded, by
    :func:`fullsparse.data.make_loader` when ``train=True`` (``None`` for test splits).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augmentation: Augmentation | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}"
            )
        if labels.shape != (images.shape[0],):
            raise ValueError(
                f"labels {tuple(labels.shape)} do not match images {tuple(images.shape)}: "
                f"need one label per image"
            )
        C = images.shape[1]
        if len(mean) != C or len(std) != C:
            raise ValueError(f"mean/std need {C} channel values, got {mean} and {std}")
        self.images = images.contiguous()
        self.labels = labels.to(torch.int64)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.augmentation = augmentation

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return normalize(self.images[index], self.mean, self.std), int(self.labels[index])

    def batch(
        self,
        indices: Tensor,
        offsets: Tensor | None = None,
        flips: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Examples ``indices`` as ``(x [B, C, H, W] float32, y [B] int64)``.

        With ``offsets``/``flips`` (from :meth:`Augmentation.draw`) the augmentation is
        applied; without them the images are returned as stored.
        """
        x = self.images[indices]
        if offsets is not None and flips is not None and self.augmentation is not None:
            x = crop_and_flip(x, self.augmentation.crop_padding, offsets, flips)
        return normalize(x, self.mean, self.std), self.labels[indices]
