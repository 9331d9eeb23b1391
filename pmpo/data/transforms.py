"""Image preprocessing for training and evaluation, as CoOp/CoCoOp/MaPLe do it.

Comparable numbers need the same augmentation and, above all, the same test-time resize and
crop as the published baselines (DESIGN.md section 3).
"""

from __future__ import annotations

from typing import Sequence

from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

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


def build_transform(
    image_size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    train: bool = False,
    min_crop_scale: float = 0.08,
) -> T.Compose:
    """Train: RandomResizedCrop(scale ``min_crop_scale``-1, bicubic; CoOp's 0.08 by default) +
    horizontal flip. Test: resize the shorter side to ``image_size`` (bicubic) + center crop.
    Both end in ToTensor + Normalize, giving a float tensor of shape (3, image_size, image_size)."""
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if train:
        spatial = [
            T.RandomResizedCrop(image_size, scale=(min_crop_scale, 1.0), interpolation=InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
        ]
    else:
        spatial = [
            T.Resize(image_size, interpolation=InterpolationMode.BICUBIC),
            T.CenterCrop(image_size),
        ]
    return T.Compose([ToRGB(), *spatial, T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))])
