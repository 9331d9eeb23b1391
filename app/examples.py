"""The example images the app offers: one ShapeWorld render per class for Classify (with their
ground-truth masks, for the attention tab's truth table) and a few-shot training set for Train.

Generated rather than committed: the renders come from the same generator the offline model was
trained on, so they are always in sync with it.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

from .inputs import guess_label

if TYPE_CHECKING:
    from PIL import Image

# The Classify examples are one image of each class of the Train tab's example task (below): shapes
# whose names the offline model's plain prompt reads swapped, so the first click shows what learned
# prompts do (the shipped PMPO: 7 of these 8 right where zero-shot CLIP gets 2).
EXAMPLE_CLASSES = ["red circle", "red triangle", "blue circle", "blue triangle",
                   "green hexagon", "green diamond", "yellow hexagon", "yellow diamond"]


EXAMPLE_SEED, EXAMPLE_SIZE = 7, 128


def _example_sample(i: int, cls: str, seed: int = EXAMPLE_SEED, size: int = EXAMPLE_SIZE):
    import numpy as np

    from pmpo.data import shapeworld as sw

    rng = np.random.default_rng([seed, i])
    return sw.sample_class_scene(sw.class_names().index(cls), rng, style="pretrain", size=size)


@functools.lru_cache(maxsize=1)
def _example_renders() -> tuple:
    return tuple(_example_sample(i, cls) for i, cls in enumerate(EXAMPLE_CLASSES))


def example_masks(image: Image.Image):
    """The ground-truth masks (``SceneMasks``) when ``image`` is pixel for pixel one of the example
    images, else None. Matched on content, not on the file name, so a renamed upload never borrows
    another image's masks."""
    import numpy as np

    pixels = np.asarray(image.convert("RGB"))
    for sample in _example_renders():
        if pixels.shape == sample.image.shape and np.array_equal(pixels, sample.image):
            return sample.masks
    return None


def _save_png(pixels, path: Path) -> None:
    """Atomically: two sessions (or processes sharing a cache) rendering the same example never
    leave each other half a file."""
    import io

    from PIL import Image

    from pmpo.io import atomic_write_bytes

    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def example_images(folder: str | Path, classes: list[str] = EXAMPLE_CLASSES, seed: int = EXAMPLE_SEED,
                   size: int = EXAMPLE_SIZE) -> list[str]:
    """Render one ShapeWorld image per class as ``<colour>_<shape>.png`` (deterministic, cheap).

    Generated rather than committed: the renders come from the same generator the offline model
    was trained on, so they are always in sync with it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, cls in enumerate(classes):
        path = folder / f"{cls.replace(' ', '_')}.png"
        if not path.is_file():
            _save_png(_example_sample(i, cls, seed, size).image, path)
        paths.append(str(path))
    return paths


EXAMPLE_TRAIN_PER_CLASS = 16  # 12 to train on, 4 held out per class (with 8, the held-out score rested on 2 images a class)
# The Train tab's example task: two colours of the two shape pairs whose names the offline model's
# plain prompt reads swapped (most of its unmarked pretraining captions swap them; MODEL_CARD.md), so
# "a photo of a red circle." leans to red triangles. The image features tell the shapes apart,
# so a learned prompt can close the gap: the situation of real CLIP on a domain whose names its
# captions used differently. Eight one-colour-apart classes would leave nothing to learn.
TRAIN_EXAMPLE_CLASSES = EXAMPLE_CLASSES


def example_training_images(folder: str | Path, classes: list[str] = TRAIN_EXAMPLE_CLASSES,
                            per_class: int = EXAMPLE_TRAIN_PER_CLASS, seed: int = 11) -> list[str]:
    """``per_class`` downstream-style ShapeWorld renders per class, named ``<colour>_<shape>_<i>.png``
    so the Train tab reads their labels from the file names: a ready few-shot task for the offline
    model (the Train tab holds one in four out to score it)."""
    import numpy as np

    from pmpo.data import shapeworld as sw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = sw.class_names()
    paths = []
    for i, cls in enumerate(classes):
        rng = np.random.default_rng([seed, i])
        for k in range(per_class):
            path = folder / f"{cls.replace(' ', '_')}_{k + 1}.png"
            sample = sw.sample_class_scene(names.index(cls), rng, style="downstream")
            if not path.is_file():
                _save_png(sample.image, path)
            paths.append(str(path))
    return paths


def label_from_filename(path: str, classnames: list[str]) -> str | None:
    """'red_circle_3.png' -> 'red circle' when that is a class: lets examples carry their labels."""
    stem = guess_label(path).lower()
    for c in classnames:
        if c.lower() == stem:
            return c
    return None


__all__ = ["EXAMPLE_CLASSES", "TRAIN_EXAMPLE_CLASSES", "example_images", "example_masks", "example_training_images",
           "label_from_filename"]
