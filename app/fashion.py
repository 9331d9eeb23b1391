"""A small real-image example set for real CLIP backbones: Fashion-MNIST test images.

The ShapeWorld examples are read almost perfectly by a real CLIP (ViT-B/16, OpenAI weights), so
they cannot show what prompt learning adds. Fashion-MNIST (Zalando, MIT licence) is far from CLIP's
web photos — 28×28 greyscale product thumbnails of look-alike classes (shirt, t shirt, pullover,
coat) — the kind of domain where few-shot prompt learning gains most, so it is the set the Train tab
offers on a real backbone. (Not measured here: no real CLIP weights reach the machines this project
is built on; the demo benchmark measures speed on it, not accuracy.)

The images are committed under ``examples/fashion_mnist/`` as ``<class>_<k>.png`` (spaces as
``_``, k = 1..16: the first 16 test images of each class in file order), so the Train tab reads
each label from its file name. ``tools/make_fashion_examples.py`` regenerates them from the
Debian package ``dataset-fashion-mnist``; the folder's README.md and LICENSE say where they come
from.
"""

from __future__ import annotations

import re
from pathlib import Path

# Label order 0..9 of the dataset. "t shirt", not "t-shirt": the Train tab's file-name label
# guess turns '-' and '_' into spaces, and these are the labels it reads back.
FASHION_CLASSES: list[str] = ["t shirt", "trouser", "pullover", "dress", "coat",
                              "sandal", "shirt", "sneaker", "bag", "ankle boot"]
FASHION_DIR: Path = Path(__file__).resolve().parent / "examples" / "fashion_mnist"
FASHION_PER_CLASS = 16
FASHION_CREDIT = ("Fashion-MNIST test images © 2017 Zalando SE (MIT licence), "
                  "from github.com/zalandoresearch/fashion-mnist via Debian's dataset-fashion-mnist.")


def fashion_stem(cls: str, k: int) -> str:
    """'ankle boot', 3 -> 'ankle_boot_3' (k counts from 1)."""
    return f"{cls.replace(' ', '_')}_{k}"


def fashion_images(per_class: int | None = None) -> list[str]:
    """Paths of the shipped images, sorted by class (label order) then k; ``per_class`` keeps
    the first ``per_class`` of each class (all of them when None)."""
    if per_class is not None and per_class < 0:
        raise ValueError(f"per_class must be >= 0, got {per_class}")
    files = sorted(FASHION_DIR.glob("*.png")) if FASHION_DIR.is_dir() else []
    paths: list[str] = []
    for cls in FASHION_CLASSES:
        pattern = re.compile(re.escape(cls.replace(" ", "_")) + r"_(\d+)\.png")
        found = sorted((int(m.group(1)), f) for f in files if (m := pattern.fullmatch(f.name)))
        paths += [str(f) for _, f in found[:per_class]]
    return paths


def fashion_available() -> bool:
    """True when every class has at least one image (an install that dropped package data has none)."""
    names = {p.name for p in FASHION_DIR.glob("*.png")} if FASHION_DIR.is_dir() else set()
    return all(fashion_stem(cls, 1) + ".png" in names for cls in FASHION_CLASSES)


__all__ = ["FASHION_CLASSES", "FASHION_DIR", "FASHION_PER_CLASS", "FASHION_CREDIT",
           "fashion_images", "fashion_available", "fashion_stem"]
