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

import csv
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from pmpo.data.types import DEFAULT_TEMPLATE, DatasetSplits, Datum, clean_classname
from pmpo.errors import DatasetError

COOP_DATASETS_URL = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"

# File endings treated as images when a loader lists a folder (compared lower-cased).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# Fractions of the deterministic per-class split used when custom data has no split of its own.
CUSTOM_SPLIT_FRACTIONS = (0.7, 0.1, 0.2)


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


def _read_wnid_classnames(path: Path, title: str, hint: str) -> dict[str, str]:
    """CoOp's ``classnames.txt``: lines ``<wnid> <class name>``, in ImageNet label order
    (dict order is kept: ImageNetV2 relies on it)."""
    table: dict[str, str] = {}
    for n, line in enumerate(_read_text_lines(path, title, hint), start=1):
        parts = line.split(maxsplit=1)
        if len(parts) != 2:
            raise DatasetError(f"{title}: line {n} of {path} is not '<wnid> <class name>': {line!r}")
        table[parts[0]] = clean_classname(parts[1])
    return table


# --------------------------------------------------------------------------------------------
# Benchmark datasets with a CoOp split file
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SplitFileSpec:
    """Where a CoOp benchmark lives and how its class names are fixed."""

    key: str
    title: str  # CoOp's dataset name, used in messages
    folder: str  # CoOp's dataset_dir under $DATA
    image_dir: str  # folder the split's relative paths start from ("" = the dataset folder)
    split_file: str
    template: str
    anchor: str  # section of CoOp's DATASETS.md
    layout: str
    renames: dict[str, str] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()  # top-level folders never used as classes


# EuroSAT's folder names are CamelCase codes; CoOp replaces them by descriptive names.
EUROSAT_CLASSNAMES = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}

# Caltech101: plural/odd folder names CoOp renames, and the two folders it leaves out.
CALTECH101_CLASSNAMES = {
    "airplanes": "airplane",
    "Faces": "face",
    "Leopards": "leopard",
    "Motorbikes": "motorbike",
}
CALTECH101_IGNORED = ("BACKGROUND_Google", "Faces_easy")

_SPLIT_FILE_SPECS: dict[str, _SplitFileSpec] = {
    s.key: s
    for s in (
        _SplitFileSpec(
            "caltech101", "Caltech101", "caltech-101", "101_ObjectCategories",
            "split_zhou_Caltech101.json", "a photo of a {}.", "caltech101",
            "caltech-101/101_ObjectCategories/<class>/*.jpg, caltech-101/split_zhou_Caltech101.json",
            renames=CALTECH101_CLASSNAMES, ignored=CALTECH101_IGNORED,
        ),
        _SplitFileSpec(
            "oxford_pets", "OxfordPets", "oxford_pets", "images", "split_zhou_OxfordPets.json",
            "a photo of a {}, a type of pet.", "oxfordpets",
            "oxford_pets/images/*.jpg, oxford_pets/annotations/, oxford_pets/split_zhou_OxfordPets.json",
        ),
        _SplitFileSpec(
            "stanford_cars", "StanfordCars", "stanford_cars", "", "split_zhou_StanfordCars.json",
            "a photo of a {}.", "stanfordcars",
            "stanford_cars/cars_train/*.jpg, stanford_cars/cars_test/*.jpg, stanford_cars/devkit/,"
            " stanford_cars/split_zhou_StanfordCars.json",
        ),
        _SplitFileSpec(
            "oxford_flowers", "OxfordFlowers", "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json",
            "a photo of a {}, a type of flower.", "flowers102",
            "oxford_flowers/jpg/*.jpg, oxford_flowers/cat_to_name.json,"
            " oxford_flowers/split_zhou_OxfordFlowers.json",
        ),
        _SplitFileSpec(
            "food101", "Food101", "food-101", "images", "split_zhou_Food101.json",
            "a photo of {}, a type of food.", "food101",
            "food-101/images/<class>/*.jpg, food-101/split_zhou_Food101.json",
        ),
        _SplitFileSpec(
            "sun397", "SUN397", "sun397", "SUN397", "split_zhou_SUN397.json",
            "a photo of a {}.", "sun397",
            "sun397/SUN397/<letter>/<class>/*.jpg, sun397/split_zhou_SUN397.json",
        ),
        _SplitFileSpec(
            "dtd", "DescribableTextures", "dtd", "images", "split_zhou_DescribableTextures.json",
            "{} texture.", "dtd",
            "dtd/images/<class>/*.jpg, dtd/split_zhou_DescribableTextures.json",
        ),
        _SplitFileSpec(
            "eurosat", "EuroSAT", "eurosat", "2750", "split_zhou_EuroSAT.json",
            "a centered satellite photo of {}.", "eurosat",
            "eurosat/2750/<class>/*.jpg, eurosat/split_zhou_EuroSAT.json",
            renames=EUROSAT_CLASSNAMES,
        ),
        _SplitFileSpec(
            "ucf101", "UCF101", "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json",
            "a photo of a person doing {}.", "ucf101",
            "ucf101/UCF-101-midframes/<Action_Name>/*.jpg, ucf101/split_zhou_UCF101.json",
        ),
    )
}


def _parse_split_entry(entry: object, title: str, path: Path, split: str, n: int) -> tuple[str, int, str]:
    if (
        isinstance(entry, (list, tuple))
        and len(entry) == 3
        and isinstance(entry[0], str)
        and isinstance(entry[1], int) and not isinstance(entry[1], bool)
        and isinstance(entry[2], str)
    ):
        return entry[0], entry[1], entry[2]
    raise DatasetError(
        f"{title}: entry {n} of '{split}' in {path} is not [relative_path, label, classname]: {entry!r}"
    )


def _load_split_file_dataset(spec: _SplitFileSpec, root: Path) -> DatasetSplits:
    ddir = _dataset_dir(root, spec.folder)
    hint = (
        f"Download {spec.split_file} and the images as described in "
        f"{COOP_DATASETS_URL}#{spec.anchor}; expected layout: {spec.layout}"
    )
    split_path = ddir / spec.split_file
    image_dir = ddir / spec.image_dir if spec.image_dir else ddir
    if not split_path.is_file():
        raise _missing(spec.title, "split file", split_path, hint)
    if not image_dir.is_dir():
        raise _missing(spec.title, "image folder", image_dir, hint)
    try:
        with open(split_path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{spec.title}: cannot read split file {split_path}: {e}. {hint}") from e
    if not isinstance(raw, dict) or any(not isinstance(raw.get(k), list) for k in ("train", "val", "test")):
        raise DatasetError(
            f"{spec.title}: split file {split_path} must be a JSON object with lists "
            f"'train', 'val' and 'test'. {hint}"
        )

    image_root = str(image_dir)
    splits: dict[str, list[Datum]] = {}
    for split in ("train", "val", "test"):
        items = []
        for n, entry in enumerate(raw[split]):
            rel, label, cname = _parse_split_entry(entry, spec.title, split_path, split, n)
            if spec.ignored and rel.replace("\\", "/").split("/", 1)[0] in spec.ignored:
                continue
            cname = clean_classname(spec.renames.get(cname, cname))
            items.append(Datum(os.path.normpath(os.path.join(image_root, rel)), label, cname))
        splits[split] = items
    _check_first_exists(spec.title, splits, image_dir, hint)
    classnames = _classnames_from(
        (d for items in splits.values() for d in items), spec.title, split_path
    )
    return DatasetSplits(
        spec.key, classnames, splits["train"], splits["val"], splits["test"], [spec.template]
    )


# --------------------------------------------------------------------------------------------
# FGVC Aircraft: CoOp reads the dataset's own variant lists instead of a split file
# --------------------------------------------------------------------------------------------


def _build_fgvc_aircraft(root: Path) -> DatasetSplits:
    title = "FGVCAircraft"
    ddir = _dataset_dir(root, "fgvc_aircraft")
    hint = (
        f"Extract fgvc-aircraft-2013b.tar.gz, keep only data/ and rename it to fgvc_aircraft/ "
        f"({COOP_DATASETS_URL}#fgvcaircraft); expected layout: fgvc_aircraft/images/*.jpg, "
        "fgvc_aircraft/variants.txt, fgvc_aircraft/images_variant_{train,val,test}.txt"
    )
    classnames_raw = _read_text_lines(ddir / "variants.txt", title, hint)
    label_of = {name: i for i, name in enumerate(classnames_raw)}
    image_dir = ddir / "images"
    if not image_dir.is_dir():
        raise _missing(title, "image folder", image_dir, hint)
    splits: dict[str, list[Datum]] = {}
    for split in ("train", "val", "test"):
        list_file = ddir / f"images_variant_{split}.txt"
        items = []
        for line in _read_text_lines(list_file, title, hint):
            parts = line.split(maxsplit=1)
            if len(parts) != 2 or parts[1] not in label_of:
                raise DatasetError(
                    f"{title}: line {line!r} of {list_file} is not '<image id> <variant>' with a "
                    f"variant from {ddir / 'variants.txt'}."
                )
            image = str(image_dir / f"{parts[0]}.jpg")
            items.append(Datum(image, label_of[parts[1]], clean_classname(parts[1])))
        splits[split] = items
    _check_first_exists(title, splits, image_dir, hint)
    classnames = [clean_classname(c) for c in classnames_raw]
    return DatasetSplits(
        "fgvc_aircraft", classnames, splits["train"], splits["val"], splits["test"],
        ["a photo of a {}, a type of aircraft."],
    )


# --------------------------------------------------------------------------------------------
# ImageNet and its test-only variants (class folders + classnames.txt)
# --------------------------------------------------------------------------------------------


def _read_class_folders(
    folder: Path, wnids: list[str], labels: dict[str, int], classnames: list[str]
) -> list[Datum]:
    items = []
    for wnid in wnids:
        label = labels[wnid]
        class_dir = folder / wnid
        items.extend(
            Datum(str(class_dir / name), label, classnames[label]) for name in _list_images(class_dir)
        )
    return items


def _names_for(wnids: list[str], table: dict[str, str], title: str, source: Path) -> list[str]:
    unknown = [w for w in wnids if w not in table]
    if unknown:
        raise DatasetError(
            f"{title}: class folders {unknown[:5]} are not listed in {source}; copy CoOp's "
            f"ImageNet classnames.txt there ({COOP_DATASETS_URL}#imagenet)."
        )
    return [table[w] for w in wnids]


def _build_imagenet(root: Path) -> DatasetSplits:
    """ImageNet has no split file in CoOp: train = ``images/train``, test = ``images/val``.
    CoOp also uses the test set as the validation set (the model of the last epoch is
    evaluated, so val never selects anything); we mirror that with ``val = test``."""
    title = "ImageNet"
    ddir = _dataset_dir(root, "imagenet")
    hint = (
        f"See {COOP_DATASETS_URL}#imagenet; expected layout: imagenet/images/train/<wnid>/*.JPEG, "
        "imagenet/images/val/<wnid>/*.JPEG, imagenet/classnames.txt (lines '<wnid> <class name>')"
    )
    cn_path = ddir / "classnames.txt"
    table = _read_wnid_classnames(cn_path, title, hint)
    train_dir, val_dir = ddir / "images" / "train", ddir / "images" / "val"
    for d in (train_dir, val_dir):
        if not d.is_dir():
            raise _missing(title, "image folder", d, hint)
    wnids = _list_subdirs(train_dir)
    if not wnids:
        raise DatasetError(f"{title}: no class folders in {train_dir}. {hint}")
    labels = {w: i for i, w in enumerate(wnids)}
    classnames = _names_for(wnids, table, title, cn_path)
    val_wnids = _list_subdirs(val_dir)
    stray = [w for w in val_wnids if w not in labels]
    if stray:
        raise DatasetError(
            f"{title}: class folders {stray[:5]} of {val_dir} are not in {train_dir}. The val "
            f"images must be sorted into <wnid> folders. {hint}"
        )
    train = _read_class_folders(train_dir, wnids, labels, classnames)
    test = _read_class_folders(val_dir, val_wnids, labels, classnames)
    return DatasetSplits("imagenet", classnames, train, list(test), test, [DEFAULT_TEMPLATE])


@dataclass(frozen=True)
class _VariantSpec:
    key: str
    title: str
    folder: str
    image_dir: str
    anchor: str
    layout: str


_VARIANT_SPECS = {
    s.key: s
    for s in (
        _VariantSpec(
            "imagenet_sketch", "ImageNetSketch", "imagenet-sketch", "images", "imagenet-sketch",
            "imagenet-sketch/images/<wnid>/*.JPEG (1,000 folders), imagenet-sketch/classnames.txt",
        ),
        _VariantSpec(
            "imagenet_a", "ImageNetA", "imagenet-adversarial", "imagenet-a", "imagenet-a",
            "imagenet-adversarial/imagenet-a/<wnid>/*.jpg (200 folders), imagenet-adversarial/classnames.txt",
        ),
        _VariantSpec(
            "imagenet_r", "ImageNetR", "imagenet-rendition", "imagenet-r", "imagenet-r",
            "imagenet-rendition/imagenet-r/<wnid>/*.jpg (200 folders), imagenet-rendition/classnames.txt",
        ),
    )
}


def _build_wnid_variant(spec: _VariantSpec, root: Path) -> DatasetSplits:
    """Sketch, -A and -R: labels are the positions of the sorted wnid folders present (so 0..199
    for -A/-R, as in CoOp), class names come from the copied ImageNet classnames.txt."""
    ddir = _dataset_dir(root, spec.folder)
    hint = (
        f"See {COOP_DATASETS_URL}#{spec.anchor} (copy imagenet/classnames.txt into "
        f"{spec.folder}/); expected layout: {spec.layout}"
    )
    cn_path = ddir / "classnames.txt"
    table = _read_wnid_classnames(cn_path, spec.title, hint)
    image_dir = ddir / spec.image_dir
    if not image_dir.is_dir():
        raise _missing(spec.title, "image folder", image_dir, hint)
    wnids = _list_subdirs(image_dir)
    if not wnids:
        raise DatasetError(f"{spec.title}: no class folders in {image_dir}. {hint}")
    classnames = _names_for(wnids, table, spec.title, cn_path)
    test = _read_class_folders(image_dir, wnids, {w: i for i, w in enumerate(wnids)}, classnames)
    return DatasetSplits(spec.key, classnames, [], [], test, [DEFAULT_TEMPLATE])


def _build_imagenetv2(root: Path) -> DatasetSplits:
    """ImageNetV2 folders are named by ImageNet label (``0``..``999``); the class name of label
    ``i`` is the ``i``-th line of classnames.txt, as in CoOp."""
    title = "ImageNetV2"
    ddir = _dataset_dir(root, "imagenetv2")
    hint = (
        f"See {COOP_DATASETS_URL}#imagenetv2; expected layout: "
        "imagenetv2/imagenetv2-matched-frequency-format-val/<0..999>/*.jpeg, imagenetv2/classnames.txt"
    )
    cn_path = ddir / "classnames.txt"
    classnames = list(_read_wnid_classnames(cn_path, title, hint).values())
    image_dir = ddir / "imagenetv2-matched-frequency-format-val"
    if not image_dir.is_dir():
        raise _missing(title, "image folder", image_dir, hint)
    folders = [f for f in _list_subdirs(image_dir) if f.isdigit()]
    bad = [f for f in folders if int(f) >= len(classnames)]
    if not folders or bad:
        raise DatasetError(
            f"{title}: {image_dir} must hold folders 0..{len(classnames) - 1}"
            + (f" (found {bad[:5]})" if bad else " (found none)") + f". {hint}"
        )
    test = []
    for folder in sorted(folders, key=int):
        label = int(folder)
        class_dir = image_dir / folder
        test.extend(
            Datum(str(class_dir / n), label, classnames[label]) for n in _list_images(class_dir)
        )
    return DatasetSplits("imagenetv2", classnames, [], [], test, [DEFAULT_TEMPLATE])


# --------------------------------------------------------------------------------------------
# Custom data: an image folder or a CSV file
# --------------------------------------------------------------------------------------------


def _split_per_class(by_class: dict[str, list[str]]) -> dict[str, list[tuple[str, str]]]:
    """Deterministic 70/10/20 split of each class, shuffled with a seed derived from the class
    name (not from a global stream) so adding a class never changes the others' splits."""
    out: dict[str, list[tuple[str, str]]] = {"train": [], "val": [], "test": []}
    for cname, paths in by_class.items():
        paths = sorted(paths)
        random.Random(f"pmpo-split:{cname}").shuffle(paths)
        n = len(paths)
        n_test = max(1, round(n * CUSTOM_SPLIT_FRACTIONS[2])) if n >= 2 else 0
        n_val = round(n * CUSTOM_SPLIT_FRACTIONS[1]) if n - n_test >= 2 else 0
        n_train = n - n_test - n_val
        out["train"].extend((p, cname) for p in paths[:n_train])
        out["val"].extend((p, cname) for p in paths[n_train:n_train + n_val])
        out["test"].extend((p, cname) for p in paths[n_train + n_val:])
    return out


def _custom_splits(
    name: str, classes: list[str], rows: dict[str, list[tuple[str, str]]]
) -> DatasetSplits:
    label_of = {c: i for i, c in enumerate(classes)}
    splits = {
        s: [Datum(p, label_of[c], clean_classname(c)) for p, c in rows.get(s, [])]
        for s in ("train", "val", "test")
    }
    return DatasetSplits(
        name, [clean_classname(c) for c in classes], splits["train"], splits["val"], splits["test"],
        [DEFAULT_TEMPLATE],
    )


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "data"


def _build_imagefolder(root: Path) -> DatasetSplits:
    """``root/<class>/<image>`` (classes sorted, label = position), or
    ``root/{train,val,test}/<class>/<image>`` when ``train/`` and ``test/`` exist (``val/`` is
    optional and left empty when absent). Without split folders each class is split 70/10/20."""
    title = "imagefolder"
    hint = "expected layout: <root>/<class>/*.jpg or <root>/{train,val,test}/<class>/*.jpg"
    if not root.is_dir():
        raise _missing(title, "folder", root, hint)
    name = f"imagefolder-{_safe_name(root.name)}"

    def read(folder: Path) -> dict[str, list[str]]:
        return {
            c: [str(folder / c / f) for f in _list_images(folder / c)] for c in _list_subdirs(folder)
        }

    if (root / "train").is_dir() and (root / "test").is_dir():
        parts = {s: read(root / s) if (root / s).is_dir() else {} for s in ("train", "val", "test")}
        classes = sorted(c for c, paths in parts["train"].items() if paths)
        if not classes:
            raise DatasetError(f"{title}: no images in {root / 'train'}; {hint}")
        for s in ("val", "test"):
            extra = sorted(c for c, paths in parts[s].items() if paths and c not in classes)
            if extra:
                raise DatasetError(
                    f"{title}: classes {extra[:5]} in {root / s} have no images in {root / 'train'}."
                )
        rows = {s: [(p, c) for c in sorted(parts[s]) for p in parts[s][c]] for s in parts}
        return _custom_splits(name, classes, rows)

    by_class = {c: paths for c, paths in read(root).items() if paths}
    if not by_class:
        raise DatasetError(f"{title}: no images found in class folders under {root}; {hint}")
    classes = sorted(by_class)
    return _custom_splits(name, classes, _split_per_class(by_class))


_SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def _build_csv(csv_path: Path) -> DatasetSplits:
    """A CSV with header ``path,label[,split]``: ``label`` is a class name (classes sorted,
    label id = position), relative paths are resolved against the CSV's folder, ``split`` is
    train/val/test. Without a split column each class is split 70/10/20 deterministically."""
    title = "csv"
    hint = "expected a CSV file with header 'path,label' (optional 'split' column: train/val/test)"
    if not csv_path.is_file():
        raise _missing(title, "CSV file", csv_path, hint)
    base = csv_path.parent
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip().lower() for h in (reader.fieldnames or [])]
            if "path" not in header or "label" not in header:
                raise DatasetError(f"{title}: {csv_path} has header {reader.fieldnames}; {hint}")
            raw_rows = [{(k or "").strip().lower(): (v or "").strip() for k, v in r.items()} for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"{title}: cannot read {csv_path}: {e}") from e

    has_split = "split" in header
    entries: list[tuple[str, str, str]] = []
    missing: list[str] = []
    for n, r in enumerate(raw_rows, start=2):  # line 1 is the header
        if not r.get("path") or not r.get("label"):
            raise DatasetError(f"{title}: line {n} of {csv_path} has an empty path or label.")
        path = os.path.normpath(os.path.join(base, os.path.expanduser(r["path"])))
        if not os.path.isfile(path):
            missing.append(path)
        split = ""
        if has_split:
            split = _SPLIT_ALIASES.get(r.get("split", "").lower(), "")
            if not split:
                raise DatasetError(
                    f"{title}: line {n} of {csv_path} has split {r.get('split')!r}; use train, val or test."
                )
        entries.append((path, r["label"], split))
    if missing:
        raise DatasetError(
            f"{title}: {len(missing)} image(s) listed in {csv_path} not found, e.g. {missing[0]}. "
            "Relative paths are resolved against the CSV's folder."
        )
    if not entries:
        raise DatasetError(f"{title}: {csv_path} lists no images; {hint}")

    name = f"csv-{_safe_name(csv_path.stem)}"
    if has_split:
        classes = sorted({c for _, c, s in entries if s == "train"})
        if not classes:
            raise DatasetError(f"{title}: {csv_path} has no rows with split 'train'.")
        extra = sorted({c for _, c, _s in entries} - set(classes))
        if extra:
            raise DatasetError(f"{title}: classes {extra[:5]} in {csv_path} have no 'train' rows.")
        rows: dict[str, list[tuple[str, str]]] = {"train": [], "val": [], "test": []}
        for p, c, s in entries:
            rows[s].append((p, c))
        return _custom_splits(name, classes, rows)
    by_class: dict[str, list[str]] = {}
    for p, c, _ in entries:
        by_class.setdefault(c, []).append(p)
    return _custom_splits(name, sorted(by_class), _split_per_class(by_class))


# --------------------------------------------------------------------------------------------
# ShapeWorld: rendered by its own module, imported only when asked for (it pulls in numpy/PIL drawing)
# --------------------------------------------------------------------------------------------


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
