"""The benchmark datasets as CoOp reads them: the 11 base-to-new / cross-dataset datasets from
their folder layouts and fixed ``split_zhou_<Name>.json`` files (with CoOp's class-name clean-ups),
and ImageNet with its four shifted test sets (see CoOp's DATASETS.md). Same images, labels and
class names as every run of CoOp, CoCoOp and MaPLe: numbers stay comparable."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from pmpo.data.folders import _check_first_exists, _classnames_from, _dataset_dir, _list_images, _list_subdirs, _missing, _read_text_lines
from pmpo.data.types import DEFAULT_TEMPLATE, DatasetSplits, Datum, clean_classname
from pmpo.errors import DatasetError

COOP_DATASETS_URL = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"


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
