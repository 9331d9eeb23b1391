"""The Train tab's data: labelled images from uploads (a label per file, guessed from its name and
editable), a zip with one folder per class, or — on a local install only — a folder with class
subfolders; what the tab shows about them before a run; and the held-out split.

One image in four of every class (with at least two images) is held out, so the number a visitor
sees is accuracy on images the prompts never saw, not training accuracy.
"""

from __future__ import annotations

import os
import uuid
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pmpo.data.datasets import IMAGE_EXTENSIONS, Datum, clean_classname
from pmpo.data.loader import load_image
from pmpo.errors import DatasetError, InputError

from .inputs import MAX_CLASSNAME_CHARS, display_name, file_path, guess_label
from .served import BackboneSpec
from .state import is_offline_model

MAX_TRAIN_IMAGES = 2000
MAX_ZIP_MEMBERS = 5000
MAX_ZIP_BYTES = 500 * 1024 * 1024


def local_paths_allowed() -> bool:
    """Reading a server folder is for local installs; on a public Space it would expose its disk."""
    return not os.environ.get("SPACE_ID") and os.environ.get("PMPO_ALLOW_LOCAL_PATHS", "1") != "0"


# --- labelled data ---------------------------------------------------------------------------------
def label_rows(files: Any) -> list[list[str]]:
    """Rows (file, guessed label) for the editable label table."""
    paths = [file_path(f) for f in (files or [])]
    return [[display_name(p), guess_label(display_name(p))] for p in paths]


def items_from_table(files: Any, table: Any) -> tuple[list[Datum], list[str]]:
    """Uploaded files labelled by the table's (file, label) rows, matched by file name."""
    pairs = _labelled(files, table)
    if not pairs:
        raise InputError("No training images: upload labelled images, a zip with one folder per class, or give a folder.")
    for p, label in pairs:
        if not label:
            raise InputError(f"No label for {display_name(p)!r}: fill in its row of the label table.")
    return _to_items(pairs)


def _table_rows(table: Any) -> list[list]:
    if table is None:
        return []
    if hasattr(table, "values") and hasattr(table, "columns"):  # pandas DataFrame
        return table.values.tolist()
    if isinstance(table, dict):  # gradio's {"headers": [...], "data": [...]}
        return list(table.get("data") or [])
    return [list(r) for r in table]


def items_from_zip(zip_file: Any, dest: str | Path) -> tuple[list[Datum], list[str]]:
    """A zip whose images sit in one folder per class (any depth: the image's parent folder names it)."""
    path = Path(file_path(zip_file))
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"{path.name!r} is not a readable zip file ({exc}).") from exc
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        if len(members) > MAX_ZIP_MEMBERS:
            raise InputError(f"The zip holds {len(members)} files; the limit is {MAX_ZIP_MEMBERS}.")
        if sum(m.file_size for m in members) > MAX_ZIP_BYTES:
            raise InputError(f"The zip expands to more than {MAX_ZIP_BYTES // 2**20} MB; the limit keeps the server alive.")
        dest = Path(dest) / uuid.uuid4().hex[:8]
        pairs = []
        for m in members:
            parts = Path(m.filename).parts
            if m.filename.startswith("/") or ".." in parts or any(p.startswith(".") or p == "__MACOSX" for p in parts):
                continue  # unsafe or hidden entries are never written
            if len(parts) < 2 or not parts[-1].lower().endswith(IMAGE_EXTENSIONS):
                continue
            target = dest.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(m) as src, open(target, "wb") as out:
                out.write(src.read())
            pairs.append((str(target), parts[-2]))
    if not pairs:
        raise InputError("The zip has no images inside class folders (expected e.g. cat/1.jpg, dog/2.jpg).")
    return _to_items(pairs)


def items_from_folder(folder: str) -> tuple[list[Datum], list[str]]:
    """Images in class subfolders of a local folder (``folder/<class>/*.jpg``)."""
    if not local_paths_allowed():
        raise InputError("Reading a server folder is disabled here (public Space); upload files or a zip instead.")
    root = Path(folder.strip()).expanduser()
    if not root.is_dir():
        raise InputError(f"Folder not found: {root}")
    pairs = [(str(p), p.parent.name) for p in sorted(root.glob("*/*")) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
             and not p.name.startswith(".")]
    if not pairs:
        raise InputError(f"No images in class subfolders of {root} (expected {root}/<class>/<image>.jpg).")
    return _to_items(pairs)


def _to_items(pairs: Sequence[tuple[str, str]]) -> tuple[list[Datum], list[str]]:
    """Labels become class ids in sorted order; needs two classes and bounded sizes."""
    if len(pairs) > MAX_TRAIN_IMAGES:
        raise InputError(f"{len(pairs)} training images is more than the app's limit of {MAX_TRAIN_IMAGES}; use `pmpo train`.")
    names = sorted({clean_classname(label) for _, label in pairs}, key=str.lower)
    too_long = [n for n in names if len(n) > MAX_CLASSNAME_CHARS]
    if too_long:
        raise InputError(f"Label too long ({len(too_long[0])} characters, limit {MAX_CLASSNAME_CHARS}): {too_long[0][:40]!r}...")
    lowered = {}
    for n in names:
        if n.lower() in lowered:
            raise InputError(f"Labels {lowered[n.lower()]!r} and {n!r} differ only in case; use one spelling.")
        lowered[n.lower()] = n
    if len(names) < 2:
        raise InputError(f"Training needs at least two classes; all images are labelled {names[0]!r}." if names
                         else "Training needs at least two classes.")
    index = {n: i for i, n in enumerate(names)}
    items = [Datum(path=p, label=index[clean_classname(label)], classname=clean_classname(label)) for p, label in pairs]
    return items, names


def check_images(items: list[Datum]) -> tuple[list[Datum], list[str]]:
    """Drop unreadable images up front (with their reasons) so training never dies mid-epoch."""
    good, problems = [], []
    for d in items:
        try:
            load_image(d.path)
            good.append(d)
        except DatasetError as exc:
            problems.append(str(exc).replace(d.path, repr(display_name(d.path))))
    return good, problems


# --- what the Train tab shows before a run -----------------------------------------------------------
SUMMARY_HEADERS = ["class", "images", "held out"]
FASHION_PER_CLASS = 12  # 9 to train on and 3 held out per class: a default run fits a free Space's minutes


def _labelled(files: Any, table: Any) -> list[tuple[str, str]]:
    """(path, label) per uploaded file: its row of the label table, else what its name says; empty
    labels are kept (``items_from_table`` refuses them, the overview leaves them out)."""
    paths = [file_path(f) for f in (files or [])]
    labels = {str(r[0]).strip(): str(r[1]).strip() for r in _table_rows(table) if len(r) >= 2 and str(r[0]).strip()}
    return [(p, labels.get(display_name(p), "") or guess_label(display_name(p))) for p in paths]


def _by_class(files: Any, table: Any) -> dict[str, list[str]]:
    """Class -> its files, classes in case-insensitive order (unlabelled files left out)."""
    groups: dict[str, list[str]] = {}
    for path, label in _labelled(files, table):
        if label:
            groups.setdefault(label, []).append(path)
    return dict(sorted(groups.items(), key=lambda kv: kv[0].lower()))


def class_summary(files: Any, table: Any) -> list[list]:
    """Rows (class, images, held out) instead of a row per file: the held-out count follows
    ``split_holdout`` (one in four, at least one of two or more)."""
    return [[label, len(paths), max(1, len(paths) // HOLDOUT_EVERY) if len(paths) >= 2 else 0]
            for label, paths in _by_class(files, table).items()]


def class_thumbnails(files: Any, table: Any, limit: int = 40) -> list[tuple[str, str]]:
    """One (image, "class (n)") per class, for the gallery."""
    return [(paths[0], f"{label} ({len(paths)})") for label, paths in _by_class(files, table).items()][:limit]


def example_set_for(spec: BackboneSpec, folder: str | Path) -> list[str]:
    """The example training images that can show a gain on ``spec``: ShapeWorld's swapped-name
    task on the offline model; real Fashion-MNIST photos on a real CLIP (which already reads shapes)."""
    from .examples import example_training_images
    from .fashion import fashion_available, fashion_images

    if is_offline_model(spec.model) or not fashion_available():
        return example_training_images(folder)
    return fashion_images(per_class=FASHION_PER_CLASS)


def example_note(spec: BackboneSpec) -> str:
    from .examples import EXAMPLE_TRAIN_PER_CLASS, TRAIN_EXAMPLE_CLASSES
    from .fashion import FASHION_CLASSES, FASHION_CREDIT, fashion_available

    if is_offline_model(spec.model) or not fashion_available():
        return (f"*Example set: ShapeWorld, {len(TRAIN_EXAMPLE_CLASSES)} classes × {EXAMPLE_TRAIN_PER_CLASS}: shapes whose "
                "names the offline model's plain prompt reads swapped (its model card says why), so zero-shot CLIP gets "
                "them wrong while its image features tell them apart — a gap a learned prompt can close.*")
    return (f"*Example set: Fashion-MNIST, {len(FASHION_CLASSES)} clothing classes × {FASHION_PER_CLASS} real 28-px "
            f"greyscale product photos, far from CLIP's web images. {FASHION_CREDIT}*")


HOLDOUT_EVERY = 4  # every 4th image of a class (sorted by file name) is held out


def split_holdout(items: Sequence[Datum], every: int = HOLDOUT_EVERY) -> tuple[list[Datum], list[Datum]]:
    """(train, held-out): per class, in file-name order, images every-1, 2·every-1, … are held out;
    a class with a single image keeps it for training. Deterministic, so a rerun scores the same images."""
    by_class: dict[int, list[Datum]] = {}
    for d in items:
        by_class.setdefault(d.label, []).append(d)
    train, held = [], []
    for label in sorted(by_class):
        group = sorted(by_class[label], key=lambda d: display_name(d.path))
        for i, d in enumerate(group):
            (held if len(group) >= 2 and i % every == every - 1 else train).append(d)
        if len(group) >= 2 and not any(d.label == label for d in held):
            held.append(train.pop())  # 2 or 3 images: still hold one out
    return train, held
