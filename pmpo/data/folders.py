"""What every dataset loader does with a folder: list its images and class folders, say exactly
what is missing and where it goes, read small text files, and check that a split's labels make
a classifier (0..n-1, one name each). Nothing here opens an image."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from pmpo.data.types import Datum
from pmpo.errors import DatasetError

# File endings treated as images when a loader lists a folder (compared lower-cased).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")



# --------------------------------------------------------------------------------------------
# Helpers shared by the loaders
# --------------------------------------------------------------------------------------------


def _missing(title: str, what: str, path: Path | str, hint: str) -> DatasetError:
    return DatasetError(f"{title}: {what} not found: {path}. {hint}")


def _dataset_dir(root: Path, folder: str) -> Path:
    """``root`` is normally CoOp's ``$DATA`` (holding ``oxford_pets/`` etc.); also accept the
    dataset folder itself so ``--root /data/oxford_pets`` works too."""
    candidate = root / folder
    if not candidate.is_dir() and root.name == folder and root.is_dir():
        return root
    return candidate


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _list_images(folder: Path) -> list[str]:
    """Image file names in ``folder``, sorted so the order (and hence the few-shot draw) does
    not depend on the file system's listing order."""
    return sorted(e.name for e in os.scandir(folder) if e.is_file() and _is_image(e.name))


def _list_subdirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _classnames_from(items: Iterable[Datum], title: str, source: Path | str) -> list[str]:
    """Derive the label -> name table from the data (as Dassl does) and insist on labels
    0..n-1 with one name each, because a classifier is built with one row per label."""
    names: dict[int, str] = {}
    for d in items:
        known = names.setdefault(d.label, d.classname)
        if known != d.classname:
            raise DatasetError(
                f"{title}: label {d.label} has two class names ({known!r} and {d.classname!r})"
                f" in {source}; the file is malformed."
            )
    if not names:
        raise DatasetError(f"{title}: no images listed in {source}.")
    if sorted(names) != list(range(len(names))):
        missing = sorted(set(range(max(names) + 1)) - set(names))[:10]
        raise DatasetError(
            f"{title}: labels in {source} are not 0..{len(names) - 1}; missing labels {missing}."
        )
    return [names[i] for i in range(len(names))]


def _check_first_exists(title: str, splits: dict[str, list[Datum]], relative_to: Path, hint: str) -> None:
    """Checking every path of a 100k-image split is slow; the first image of each split is
    enough to catch a wrong layout (a missing file later is reported by the image loader)."""
    for items in splits.values():
        if items and not os.path.isfile(items[0].path):
            raise _missing(
                title, "image listed in the split", items[0].path,
                f"Paths in the split are relative to {relative_to}. {hint}",
            )


def _read_text_lines(path: Path, title: str, hint: str) -> list[str]:
    if not path.is_file():
        raise _missing(title, "file", path, hint)
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]
