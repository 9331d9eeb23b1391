"""Reading images from disk into tensors, with errors a user can act on.

One bad file among 100k should not surface as a PIL traceback deep inside a DataLoader worker:
every failure becomes a :class:`~pmpo.errors.DatasetError` that names the file. Oversized
images are refused before they are decoded, because a "decompression bomb" (a tiny file that
expands to gigapixels) would otherwise exhaust memory.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms import functional as TF

from pmpo.data.datasets import Datum
from pmpo.errors import DatasetError

# The hard guard against decompression bombs (a tiny file that expands to gigapixels), checked
# from the header before pixel data is decoded: 178 megapixels, just under the point where PIL
# itself refuses a file, so that 50-200 MP phone photos are not refused.
MAX_IMAGE_PIXELS = 178_000_000
# Anything larger is downscaled on load (CLIP sees 224 px; the app shows a few hundred). JPEGs
# are decoded at reduced scale (draft mode), so a 48 MP photo never occupies 48 MP of memory.
DOWNSCALE_ABOVE_PIXELS = 16_000_000


def load_image(path: str, max_pixels: int = MAX_IMAGE_PIXELS,
               downscale_above: int = DOWNSCALE_ABOVE_PIXELS) -> Image.Image:
    """Open ``path`` as an RGB PIL image, fully decoded (so the file handle is closed), downscaled
    to at most ``downscale_above`` pixels (aspect kept).

    Raises DatasetError when the file is missing, unreadable, not an image, truncated or
    larger than ``max_pixels``.
    """
    try:
        with warnings.catch_warnings(), Image.open(path) as im:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own guard decides
            width, height = im.size
            if width * height > max_pixels:
                raise DatasetError(
                    f"Image too large: {path} is {width}x{height} = {width * height:,} pixels; the "
                    f"limit is {max_pixels:,} (a guard against decompression bombs). Resize it."
                )
            target = None
            if width * height > downscale_above:
                factor = math.sqrt(downscale_above / (width * height))
                target = (max(1, int(width * factor)), max(1, int(height * factor)))
                if im.format == "JPEG":
                    im.draft("RGB", target)  # decode at 1/2, 1/4 or 1/8 scale, no smaller than target
            im.load()
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")
            im = im.convert("RGB")
            if target is not None and im.width * im.height > downscale_above:
                im = im.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
            return im
    except DatasetError:
        raise
    except FileNotFoundError as e:
        raise DatasetError(f"Image not found: {path}") from e
    except IsADirectoryError as e:
        raise DatasetError(f"Expected an image file but found a folder: {path}") from e
    except PermissionError as e:
        raise DatasetError(f"Image cannot be read (permission denied): {path}") from e
    except UnidentifiedImageError as e:
        raise DatasetError(f"Not a readable image file: {path}") from e
    except Image.DecompressionBombError as e:
        raise DatasetError(f"Image too large (decompression bomb guard): {path}: {e}") from e
    except (OSError, SyntaxError, ValueError) as e:  # truncated/corrupt data, bad headers
        raise DatasetError(f"Corrupt or truncated image: {path} ({e})") from e


class ImageDataset(Dataset):
    """A list of :class:`Datum` as a torch Dataset yielding ``(image_tensor, label)``.

    ``transform`` maps a PIL image to a tensor (see :func:`pmpo.data.transforms.build_transform`);
    without one the image is only converted to a float tensor in [0, 1].
    """

    def __init__(
        self,
        items: Sequence[Datum],
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
    ):
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        item = self.items[index]
        image = load_image(item.path)
        tensor = self.transform(image) if self.transform is not None else TF.to_tensor(image)
        return tensor, item.label
