"""Users' own data without writing Python: ``imagefolder`` (one folder per class, optionally
inside train/val/test folders) and ``csv`` (path, label[, split] rows). Data without a split of its
own gets a deterministic per-class one (``CUSTOM_SPLIT_FRACTIONS``)."""

from __future__ import annotations

import csv
import os
import random
import re
from pathlib import Path

from pmpo.data.folders import _list_images, _list_subdirs, _missing
from pmpo.data.types import DEFAULT_TEMPLATE, DatasetSplits, Datum, clean_classname
from pmpo.errors import DatasetError

# Fractions of the deterministic per-class split used when custom data has no split of its own.
CUSTOM_SPLIT_FRACTIONS = (0.7, 0.1, 0.2)


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
