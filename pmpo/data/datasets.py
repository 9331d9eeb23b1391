"""Dataset loaders: turn a folder on disk into train/val/test lists of labelled image paths.

Numbers are only comparable with CoOp/CoCoOp/MaPLe when every run sees the same images with
the same labels and class names, so the 11 benchmark datasets and the 4 ImageNet variants are
read from CoOp's folder layouts and fixed ``split_zhou_<Name>.json`` files (see CoOp's
DATASETS.md), with CoOp's class-name clean-ups. Two generic formats (``imagefolder`` and
``csv``) let users bring their own data without writing Python.

Nothing here opens an image: loaders only list paths, so building a split stays cheap and the
image decoding (and its error handling) lives in :mod:`pmpo.data.loader`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from pmpo.data.coop import (
    _SPLIT_FILE_SPECS,
    _VARIANT_SPECS,
    _build_fgvc_aircraft,
    _build_imagenet,
    _build_imagenetv2,
    _build_wnid_variant,
    _load_split_file_dataset,
)
from pmpo.data.custom import _build_csv, _build_imagefolder
from pmpo.data.folders import IMAGE_EXTENSIONS
from pmpo.data.types import DEFAULT_TEMPLATE, DatasetSplits, Datum, clean_classname
from pmpo.errors import DatasetError


def _build_shapeworld(root: Path) -> DatasetSplits:
    from .shapeworld import build_shapeworld_splits

    return build_shapeworld_splits(root)


def _build_shapeworld_sketch(root: Path) -> DatasetSplits:
    """ShapeWorld's held-out "sketch" style: the same 64 classes and labels, test split only
    (a domain-generalisation target, like ImageNet-Sketch: never trained on, never pretrained on)."""
    from .shapeworld import build_shapeworld_splits

    return build_shapeworld_splits(root, style="sketch", n_train_per_class=0, n_val_per_class=0)


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------


def _split_file_builder(key: str) -> Callable[[Path], DatasetSplits]:
    return lambda root: _load_split_file_dataset(_SPLIT_FILE_SPECS[key], root)


def _variant_builder(key: str) -> Callable[[Path], DatasetSplits]:
    return lambda root: _build_wnid_variant(_VARIANT_SPECS[key], root)


DATASETS: dict[str, Callable[[Path], DatasetSplits]] = {
    "imagenet": _build_imagenet,
    "caltech101": _split_file_builder("caltech101"),
    "oxford_pets": _split_file_builder("oxford_pets"),
    "stanford_cars": _split_file_builder("stanford_cars"),
    "oxford_flowers": _split_file_builder("oxford_flowers"),
    "food101": _split_file_builder("food101"),
    "fgvc_aircraft": _build_fgvc_aircraft,
    "sun397": _split_file_builder("sun397"),
    "dtd": _split_file_builder("dtd"),
    "eurosat": _split_file_builder("eurosat"),
    "ucf101": _split_file_builder("ucf101"),
    "imagenetv2": _build_imagenetv2,
    "imagenet_sketch": _variant_builder("imagenet_sketch"),
    "imagenet_a": _variant_builder("imagenet_a"),
    "imagenet_r": _variant_builder("imagenet_r"),
    "imagefolder": _build_imagefolder,
    "csv": _build_csv,
    "shapeworld": _build_shapeworld,
    "shapeworld_sketch": _build_shapeworld_sketch,
}

# The 11 datasets of the base-to-new and cross-dataset benchmarks, and the 4 ImageNet shifts.
BENCHMARK_DATASETS = (
    "imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
    "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101",
)
DOMAIN_SHIFT_DATASETS = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")

# Other spellings (compared without case, '_', '-' or spaces), e.g. CoOp's class names.
_ALIASES = {
    "describabletextures": "dtd",
    "flowers102": "oxford_flowers",
    "flowers": "oxford_flowers",
    "pets": "oxford_pets",
    "cars": "stanford_cars",
    "aircraft": "fgvc_aircraft",
    "caltech": "caltech101",
    "food": "food101",
    "sun": "sun397",
    "ucf": "ucf101",
    "imagefolder": "imagefolder",
    "folder": "imagefolder",
}


def _normalise(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name.lower())


def resolve_dataset_name(name: str) -> str:
    """Map any accepted spelling ("OxfordPets", "oxford-pets", "ImageNet-A") to its key."""
    norm = _normalise(name)
    for key in DATASETS:
        if _normalise(key) == norm:
            return key
    if norm in _ALIASES:
        return _ALIASES[norm]
    raise DatasetError(f"Unknown dataset {name!r}; valid names: {', '.join(DATASETS)}.")


def dataset_templates(name: str) -> list[str] | None:
    """A named dataset's own prior templates, known without reading its files: CoOp's
    ``CUSTOM_TEMPLATES`` for the benchmarks (what the papers' zero-shot rows used), ShapeWorld's
    for ShapeWorld; ``None`` for user data (imagefolder, csv), which keeps the method's generic one."""
    key = resolve_dataset_name(name)
    if key in _SPLIT_FILE_SPECS:
        return [_SPLIT_FILE_SPECS[key].template]
    if key == "imagenet" or key in DOMAIN_SHIFT_DATASETS:
        return [DEFAULT_TEMPLATE]
    if key in ("shapeworld", "shapeworld_sketch"):
        from .shapeworld import TEMPLATES

        return list(TEMPLATES)
    return None


def list_datasets() -> list[str]:
    """The dataset keys :func:`build_dataset` accepts."""
    return list(DATASETS)


def build_dataset(name: str, root: str | Path) -> DatasetSplits:
    """Load dataset ``name`` (any spelling :func:`resolve_dataset_name` accepts).

    ``root`` is the folder holding CoOp's dataset folders (``$DATA``) for the benchmarks, the
    image folder for ``imagefolder`` and the CSV file for ``csv``. The result holds every image
    of every class; apply :func:`pmpo.data.fewshot.sample_few_shot` and then
    :func:`pmpo.data.fewshot.subsample_classes`, in that order.
    """
    key = resolve_dataset_name(name)
    root_path = Path(os.path.abspath(os.path.expanduser(str(root))))
    if key not in ("csv", "shapeworld", "shapeworld_sketch") and not root_path.exists():
        raise DatasetError(f"{key}: data root not found: {root_path}.")
    return DATASETS[key](root_path)


# Datum, DatasetSplits, clean_classname and IMAGE_EXTENSIONS are re-exported: users import them from here.
__all__ = ["BENCHMARK_DATASETS", "DATASETS", "DEFAULT_TEMPLATE", "DOMAIN_SHIFT_DATASETS", "DatasetSplits", "Datum",
           "IMAGE_EXTENSIONS", "build_dataset", "clean_classname", "dataset_templates", "list_datasets",
           "resolve_dataset_name"]
