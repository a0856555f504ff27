"""ImageNet-layout folders of image files, decoded with PIL, augmented without torchvision.

Layout: ``root/train/<class>/<image>`` and ``root/val/<class>/<image>``; classes are the
sorted sub-folder names of ``train`` (``val`` may hold a subset of them). A ``train`` class
folder without images is an error (it would become a class that no example teaches);
an empty ``val`` class folder is fine. Files with the
extensions in :data:`IMAGE_EXTENSIONS` (any case) are used, searched recursively inside
each class folder; images are converted to RGB.

Transforms (the standard ImageNet recipe, He et al. / torchvision's reference scripts):

* train: random-resized-crop to ``size`` (area 8–100 % of the image, aspect ratio 3/4–4/3,
  bilinear) then a horizontal flip with probability ½;
* eval: resize the shorter side to ``round(size·256/224)`` (bilinear) then center-crop
  ``size``.

Random numbers come from a ``torch.Generator``: ``dataset[(i, seed)]`` is deterministic
(what :func:`fullsparse.data.make_loader` uses, so DataLoader workers and ranks agree);
``dataset[i]`` draws from torch's global RNG, like torchvision datasets.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from fullsparse.errors import DataNotFoundError, UserError
from fullsparse.limits import LIMITS, exceeded, limit

__all__ = [
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFolderDataset",
    "random_resized_crop_box",
    "center_crop_box",
    "find_imagefolder",
    "open_rgb",
    "image_header_size",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
#: ImageNet per-channel statistics in [0, 1], the usual normalisation for this layout.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _import_pil() -> Any:
    try:
        from PIL import Image
    except ImportError as exc:
        raise UserError(
            "the imagefolder, coco and voc datasets decode images with Pillow: pip install pillow "
            "(or pip install 'fullsparse[vision]')"
        ) from exc
    return Image


def open_rgb(path: Path, what: str) -> Any:
    """Decode ``path`` to a PIL RGB image, refusing (UserError naming ``what`` and the file)
    one whose header promises more pixels than the ``image_pixels`` limit — checked before
    the pixels are decoded — and any file Pillow cannot decode (truncated, corrupt)."""
    Image = _import_pil()
    cap = limit("image_pixels")
    try:
        with warnings.catch_warnings():
            # Pillow warns from 89.5 Mpx; the image_pixels limit is the rule here, and a
            # raw two-line warning would break the one-line output.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            width, height = img.size
            if width * height > cap:
                raise UserError(
                    f"{what}: {path}: {width}x{height} "
                    f"{exceeded('pixels', width * height, 'image_pixels')}"
                )
            return img.convert("RGB")
    except UserError:
        raise
    except Image.DecompressionBombError:
        raise UserError(
            f"{what}: {path}: Pillow refuses it as a decompression bomb; if the image is "
            f"real, raise {LIMITS['image_pixels'].env('image_pixels')}"
        ) from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for a bad file
        raise UserError(f"{what}: cannot decode {path}: {exc}") from None


def image_header_size(path: Path, what: str) -> tuple[int, int]:
    """``(width, height)`` from the header of image file ``path``, without decoding its
    pixels: a file Pillow cannot identify, or one over the ``image_pixels`` limit, is
    refused (UserError naming ``what`` and the file). Datasets call it for every image when
    they are built, so such a file stops the run before its folder is written."""
    Image = _import_pil()
    cap = limit("image_pixels")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
    except Image.DecompressionBombError:
        raise UserError(
            f"{what}: {path}: Pillow refuses it as a decompression bomb; if the image is "
            f"real, raise {LIMITS['image_pixels'].env('image_pixels')}"
        ) from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for a bad file
        raise UserError(f"{what}: cannot read the image header of {path}: {exc}") from None
    if width * height > cap:
        raise UserError(
            f"{what}: {path}: {width}x{height} {exceeded('pixels', width * height, 'image_pixels')}"
        )
    if width < 1 or height < 1:
        raise UserError(f"{what}: {path}: the image is {width}x{height}")
    return width, height


def random_resized_crop_box(
    height: int,
    width: int,
    generator: torch.Generator | None,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """Crop box ``(top, left, h, w)`` of the random-resized-crop (Szegedy et al. 2015).

    Up to 10 tries: pick an area fraction uniformly in ``scale`` and a log-uniform aspect
    ratio in ``ratio``; accept if the box fits and place it uniformly. Otherwise fall back
    to the largest centered box whose aspect ratio lies in ``ratio``.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u = torch.rand(2, generator=generator).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[1])
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def center_crop_box(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """``(top, left, size, size)`` centered; requires ``size <= height, width``."""
    return round((height - size) / 2), round((width - size) / 2), size, size


def _to_tensor(img: Any) -> Tensor:
    """PIL RGB image -> uint8 ``[3, H, W]``."""
    w, h = img.size
    return (
        torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(h, w, 3).permute(2, 0, 1)
    )


def find_imagefolder(root: str | os.PathLike[str] | None, split: str) -> Path:
    """``root/split``, which must exist. Raises DataNotFoundError naming the path."""
    if root is None:
        raise DataNotFoundError(
            "imagefolder needs --data-dir pointing at a folder with train/<class>/ and "
            "val/<class>/ sub-folders of images (the ImageNet layout)"
        )
    path = Path(root) / split
    if not path.is_dir():
        raise DataNotFoundError(
            f"imagefolder: {path} not found; --data-dir must hold train/<class>/ and "
            f"val/<class>/ sub-folders of images (the ImageNet layout)"
        )
    return path


class ImageFolderDataset(Dataset):
    """Images under ``root/<class>/`` as ``(float32 [3, size, size] normalised, label int)``.

    Args:
        root: the split folder (e.g. ``.../train``).
        image_size: output side.
        train: random-resized-crop + flip if True, resize + center-crop otherwise.
        classes: class names defining label order; default the sorted sub-folders of root.
        mean, std: normalisation (ImageNet statistics by default).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        image_size: int = 224,
        *,
        train: bool,
        classes: list[str] | None = None,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        self.root = Path(root)
        if image_size < 1:
            raise UserError(f"imagefolder image_size must be >= 1, got {image_size}")
        found = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        defines_classes = classes is None
        if classes is None:
            classes = found
        missing = sorted(set(found) - set(classes))
        if missing:
            raise UserError(
                f"imagefolder: {self.root} has class folders {missing} that the train split "
                f"does not have"
            )
        if not classes:
            raise UserError(f"imagefolder: {self.root} has no class sub-folders")
        self.classes = list(classes)
        self.samples: list[tuple[Path, int]] = []
        for label, name in enumerate(self.classes):
            folder = self.root / name
            if not folder.is_dir():
                continue
            files = sorted(
                p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
            )
            if not files and defines_classes:
                # A class no example teaches would still get an output and a label.
                raise UserError(
                    f"imagefolder: class folder {folder} holds no images "
                    f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder"
                )
            for file in files:
                image_header_size(file, "imagefolder")  # header and size, before the run starts
            self.samples += [(p, label) for p in files]
        if not self.samples:
            raise UserError(
                f"imagefolder: no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}/<class>/"
            )
        self.image_size = image_size
        self.train = train
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self._mean = torch.tensor(self.mean)[:, None, None]
        self._std = torch.tensor(self.std)[:, None, None]

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, path: Path) -> Any:
        return open_rgb(path, "imagefolder")

    def transform(self, img: Any, generator: torch.Generator | None) -> Tensor:
        """PIL image -> normalised float32 ``[3, size, size]`` (train or eval recipe)."""
        Image = _import_pil()
        size = self.image_size
        width, height = img.size
        if self.train:
            top, left, h, w = random_resized_crop_box(height, width, generator)
            img = img.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
            if bool(torch.rand(1, generator=generator) < 0.5):
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            short = round(size * 256 / 224)
            if width <= height:
                new_w, new_h = short, max(short, round(height * short / width))
            else:
                new_w, new_h = max(short, round(width * short / height)), short
            img = img.resize((new_w, new_h), Image.BILINEAR)
            top, left, h, w = center_crop_box(new_h, new_w, size)
            img = img.crop((left, top, left + w, top + h))
        x = _to_tensor(img).to(torch.float32) / 255.0
        return (x - self._mean) / self._std

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[Tensor, int]:
        # (index, seed): deterministic augmentation, used by make_loader.
        if isinstance(index, tuple):
            index, seed = index
            generator: torch.Generator | None = torch.Generator().manual_seed(int(seed))
        else:
            generator = None
        path, label = self.samples[index]
        return self.transform(self._load(path), generator), label
