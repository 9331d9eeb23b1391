"""Few-shot sampling, the base/new class split and the harmonic mean, as CoOp/CoCoOp do them.

The point of following CoOp's framework (Dassl) to the letter is that the same seed and split
file give *the same training shots* as published CoOp/MaPLe runs, so accuracy differences come
from the method and not from luckier images. Dassl seeds Python's global ``random`` with the
run seed and then calls ``random.sample`` per class; a ``random.Random(seed)`` instance yields
exactly the same stream without touching global state.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from random import Random

from pmpo.data.datasets import DatasetSplits, Datum
from pmpo.errors import DatasetError
from pmpo.io import write_json_atomic

CACHE_VERSION = 1

# Dassl caps the few-shot validation set at 4 images per class.
MAX_VAL_SHOTS = 4


def parse_shots(shots: int | str | None) -> int | None:
    """``None``, ``"all"`` or a number <= 0 mean "keep every image" (returned as ``None``)."""
    if shots is None:
        return None
    if isinstance(shots, str):
        text = shots.strip().lower()
        if text == "all":
            return None
        try:
            shots = int(text)
        except ValueError:
            raise DatasetError(f"shots must be a whole number or 'all', got {shots!r}.") from None
    if isinstance(shots, bool) or not isinstance(shots, int):
        raise DatasetError(f"shots must be a whole number or 'all', got {shots!r}.")
    return shots if shots > 0 else None


def _sample_per_label(items: Sequence[Datum], k: int, rng: Random) -> list[int]:
    """Dassl's ``generate_fewshot_dataset`` on indices: group by label in order of first
    appearance; ``rng.sample(group, k)`` when the group has at least ``k`` items (so even an
    exact fit is drawn, which shuffles it and advances the stream), otherwise the whole group
    untouched. ``sample`` depends only on the group's length, so sampling indices picks the
    same items as sampling the Datum objects."""
    groups: dict[int, list[int]] = {}
    for i, d in enumerate(items):
        groups.setdefault(d.label, []).append(i)
    picked: list[int] = []
    for group in groups.values():
        picked.extend(rng.sample(group, k) if len(group) >= k else group)
    return picked


def _common_folder(paths: list[str]) -> str:
    """The longest folder prefix (ending in a separator) shared by all paths; string based, as
    ``os.path.commonpath``/``relpath`` are too slow for ImageNet's 1.3M paths."""
    if not paths:
        return ""
    prefix = os.path.commonprefix([min(paths), max(paths)])
    cut = max(prefix.rfind("/"), prefix.rfind(os.sep))
    return prefix[: cut + 1]


def split_fingerprint(splits: DatasetSplits) -> dict:
    """What the cached indices depend on: the train/val lists (labels and paths, in order).
    Paths are hashed relative to their common folder, so moving the data root does not
    invalidate the cache."""
    base = _common_folder([d.path for d in splits.train] + [d.path for d in splits.val])
    n = len(base)
    h = hashlib.sha256()
    for part, items in (("train", splits.train), ("val", splits.val)):
        body = "".join(f"{d.label}\t{d.path[n:].replace(os.sep, '/')}\n" for d in items)
        h.update(f"[{part}]\n{body}".encode())
    return {"n_train": len(splits.train), "n_val": len(splits.val), "sha256": h.hexdigest()}


def few_shot_cache_path(cache_dir: str | Path, dataset: str, shots: int, seed: int) -> Path:
    """``<cache_dir>/<dataset>/shot_<K>-seed_<S>.json`` (CoOp's file naming, as JSON)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset) or "data"
    return Path(cache_dir) / safe / f"shot_{shots}-seed_{seed}.json"


def _valid_indices(value: object, n: int) -> bool:
    return isinstance(value, list) and all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in value
    )


def _read_cache(path: Path, fingerprint: dict, splits: DatasetSplits) -> tuple[list[int], list[int]] | None:
    """Cached (train, val) indices, or ``None`` (with a warning) when the file is unreadable or
    was made from a different split, so the caller resamples."""
    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        warnings.warn(f"Ignoring unreadable few-shot cache {path} ({e}); resampling.", stacklevel=3)
        return None
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        warnings.warn(f"Ignoring few-shot cache {path} of an unknown format; resampling.", stacklevel=3)
        return None
    if data.get("fingerprint") != fingerprint:
        warnings.warn(
            f"Few-shot cache {path} was made from a different split of {splits.name} "
            "(the split file or images changed); resampling and overwriting it.",
            stacklevel=3,
        )
        return None
    train, val = data.get("train"), data.get("val")
    if not (_valid_indices(train, len(splits.train)) and _valid_indices(val, len(splits.val))):
        warnings.warn(f"Ignoring few-shot cache {path} with invalid indices; resampling.", stacklevel=3)
        return None
    return train, val


def _write_cache(path: Path, payload: dict) -> None:
    """Written atomically, so concurrent runs never read half a file. A cache that cannot be
    written only costs a resample next time, so it is a warning."""
    try:
        write_json_atomic(path, payload, indent=None)
    except OSError as e:
        warnings.warn(f"Could not write few-shot cache {path}: {e}", stacklevel=3)


def sample_few_shot(
    splits: DatasetSplits, shots: int | str, seed: int, cache_dir: str | Path | None = None
) -> DatasetSplits:
    """K training images per class and min(K, 4) validation images per class, drawn as Dassl
    does (DESIGN.md section 3). Call it on the full dataset, *before* :func:`subsample_classes`,
    as CoOp does: the draw then covers all classes and matches published runs.

    ``shots`` <= 0 or ``"all"`` keeps everything. With ``cache_dir`` the drawn indices are
    stored in ``<cache_dir>/<name>/shot_<K>-seed_<S>.json`` and reused while the split is
    unchanged. The test list is never touched.
    """
    k = parse_shots(shots)
    if k is None:
        return splits
    fingerprint = split_fingerprint(splits)
    cache = few_shot_cache_path(cache_dir, splits.name, k, seed) if cache_dir is not None else None

    cached = _read_cache(cache, fingerprint, splits) if cache is not None else None
    if cached is not None:
        train_idx, val_idx = cached
    else:
        rng = Random(seed)
        train_idx = _sample_per_label(splits.train, k, rng)
        val_idx = _sample_per_label(splits.val, min(k, MAX_VAL_SHOTS), rng)
        if cache is not None:
            _write_cache(cache, {
                "version": CACHE_VERSION, "dataset": splits.name, "shots": k, "seed": seed,
                "fingerprint": fingerprint, "train": train_idx, "val": val_idx,
            })
    return replace(
        splits,
        train=[splits.train[i] for i in train_idx],
        val=[splits.val[i] for i in val_idx],
    )


SUBSAMPLE_CHOICES = ("all", "base", "new")


def base_new_labels(num_classes: int) -> tuple[list[int], list[int]]:
    """CoCoOp's split: of the sorted label ids the first ceil(n/2) are base, the rest new."""
    m = math.ceil(num_classes / 2)
    labels = list(range(num_classes))
    return labels[:m], labels[m:]


def subsample_classes(splits: DatasetSplits, subsample: str) -> DatasetSplits:
    """Keep only the base or the new classes (``"all"`` keeps everything), relabelled from 0 in
    sorted order, in train, val and test alike. New-class accuracy is thus measured among
    new classes only, as in CoCoOp."""
    choice = subsample.strip().lower() if isinstance(subsample, str) else subsample
    if choice not in SUBSAMPLE_CHOICES:
        raise DatasetError(f"subsample must be one of {', '.join(SUBSAMPLE_CHOICES)}, got {subsample!r}.")
    if choice == "all":
        return splits
    if splits.num_classes < 2:
        raise DatasetError(
            f"{splits.name}: a base/new split needs at least 2 classes, it has {splits.num_classes}."
        )
    base, new = base_new_labels(splits.num_classes)
    selected = base if choice == "base" else new
    relabel = {old: new_id for new_id, old in enumerate(selected)}

    def keep(items: list[Datum]) -> list[Datum]:
        return [replace(d, label=relabel[d.label]) for d in items if d.label in relabel]

    return replace(
        splits,
        classnames=[splits.classnames[y] for y in selected],
        train=keep(splits.train),
        val=keep(splits.val),
        test=keep(splits.test),
    )


def harmonic_mean(base: float, new: float) -> float:
    """HM = 2BN/(B+N) of base and new accuracy (0 when both are 0); reward methods that do
    well on both, which is what base-to-new generalisation asks for."""
    total = base + new
    return 0.0 if total == 0 else 2.0 * base * new / total
