"""Image preprocessing for training and evaluation, as CoOp/CoCoOp/MaPLe do it.

Comparable numbers need the same augmentation and, above all, the same test-time resize and
crop as the published baselines (DESIGN.md section 3).

The random training transforms draw from a ``torch.Generator`` passed with each image
(:class:`Augment`), not from torch's global generator: the engine seeds one per image, so an
augmentation is reproducible without reseeding -- or temporarily replacing -- the process's
global random state, which other threads (the app's) share. Given a generator seeded like the
global one, they draw exactly what torchvision's transforms draw, so the crops are torchvision's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

# open_clip's OPENAI_DATASET_MEAN / OPENAI_DATASET_STD, copied so importing the data package does
# not import open_clip (a test checks they stay equal).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


class ToRGB:
    """Convert any PIL mode (L, LA, RGBA, P, CMYK, ...) to RGB, since CLIP expects 3 channels.

    A class rather than a lambda so the transform pickles into DataLoader worker processes.
    Palette images with transparency go through RGBA first, which avoids PIL's warning.
    """

    def __call__(self, image: Image.Image) -> Image.Image:
        if image.mode == "RGB":
            return image
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        return image.convert("RGB")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SeededRandomResizedCrop(T.RandomResizedCrop):
    """torchvision's RandomResizedCrop, its random numbers drawn from ``generator`` when given.

    The draws (area fraction, log aspect ratio, then top and left) are torchvision's, in its
    order, so a generator seeded with ``s`` crops what ``torch.manual_seed(s)`` would have.
    """

    def forward(self, img: Any, generator: torch.Generator | None = None) -> Any:
        if generator is None:
            return super().forward(img)
        i, j, h, w = self.params_from(img, generator)
        return F.resized_crop(img, i, j, h, w, self.size, self.interpolation, antialias=self.antialias)

    def params_from(self, img: Any, generator: torch.Generator) -> tuple[int, int, int, int]:
        _, height, width = F.get_dimensions(img)
        area = height * width
        scale, ratio = self.scale, self.ratio
        log_ratio = torch.log(torch.tensor(ratio))
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
            aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                i = torch.randint(0, height - h + 1, size=(1,), generator=generator).item()
                j = torch.randint(0, width - w + 1, size=(1,), generator=generator).item()
                return i, j, h, w
        return self._central_crop(width, height)

    def _central_crop(self, width: int, height: int) -> tuple[int, int, int, int]:
        """torchvision's central crop after ten misses."""
        in_ratio = float(width) / float(height)
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h, w = height, int(round(height * max(self.ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w


class SeededRandomHorizontalFlip(T.RandomHorizontalFlip):
    """torchvision's RandomHorizontalFlip, its coin drawn from ``generator`` when given."""

    def forward(self, img: Any, generator: torch.Generator | None = None) -> Any:
        if generator is None:
            return super().forward(img)
        return F.hflip(img) if torch.rand(1, generator=generator) < self.p else img


SEEDED = (SeededRandomResizedCrop, SeededRandomHorizontalFlip)


class Augment(T.Compose):
    """A Compose whose random steps take the ``generator`` given with the image (see module doc).

    ``augment(image)`` alone behaves like ``T.Compose`` (global generator), so it stays a drop-in
    transform for :class:`pmpo.data.loader.ImageDataset` and user code.
    """

    takes_generator = True

    def __call__(self, img: Any, generator: torch.Generator | None = None) -> Any:
        for t in self.transforms:
            img = t(img, generator=generator) if isinstance(t, SEEDED) else t(img)
        return img


def build_transform(
    image_size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    train: bool = False,
    min_crop_scale: float = 0.08,
) -> T.Compose:
    """Train: RandomResizedCrop(scale ``min_crop_scale``-1, bicubic; CoOp's 0.08 by default) +
    horizontal flip, as an :class:`Augment` that accepts a generator. Test: resize the shorter
    side to ``image_size`` (bicubic) + center crop.
    Both end in ToTensor + Normalize, giving a float tensor of shape (3, image_size, image_size)."""
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    tail = [T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))]
    if train:
        return Augment([
            ToRGB(),
            SeededRandomResizedCrop(image_size, scale=(min_crop_scale, 1.0), interpolation=InterpolationMode.BICUBIC),
            SeededRandomHorizontalFlip(),
            *tail,
        ])
    return T.Compose([ToRGB(), T.Resize(image_size, interpolation=InterpolationMode.BICUBIC), T.CenterCrop(image_size), *tail])
