"""What every analysis shares: command-line options, loading a model and a labelled image set.

The model options are exactly ``pmpo predict``'s (``--checkpoint`` or ``--method`` + ``--model``
/ ``--offline``), so an analysis runs on whatever a user trained or downloaded. Images come from
a dataset split (``--dataset``/``--root``, any dataset :func:`pmpo.data.build_dataset` knows,
including ``shapeworld``) or from files (``--images`` + ``--classes``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pmpo.data import Datum, build_dataset, load_image
from pmpo.errors import InputError, PMPOError
from pmpo.options import add_model_args, load_model_from_args, parse_classes

SPLITS = ("train", "val", "test")


@dataclass
class ImageSet:
    """Images to analyse. ``label`` is -1 for files given without a class."""

    items: list[Datum]
    classnames: list[str]
    source: str  # for figure captions and CSV provenance

    @property
    def labels(self) -> np.ndarray:
        return np.array([d.label for d in self.items], dtype=np.int64)


# --- options --------------------------------------------------------------------------------------

def add_output_args(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--out", default=f"outputs/analysis/{name}",
                        help=f"output folder for PNG, PDF and CSV files (default: outputs/analysis/{name})")


def add_class_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("classes")
    group.add_argument("--dataset", help="dataset name (e.g. shapeworld, oxford_pets, imagefolder); see pmpo.data")
    group.add_argument("--root", help="dataset root (CoOp's $DATA; for shapeworld the folder it renders into, default ./data)")
    group.add_argument("--classes", help="comma-separated class names, or @file with one per line "
                       "(with --dataset: restrict to these classes)")
    group.add_argument("--max-classes", type=int, help="keep only the first K classes (readable plots on big label sets)")
    group.add_argument("--templates", help="'|'-separated manual templates containing {} (default: the model's)")


def add_image_args(parser: argparse.ArgumentParser, split: str = "test", per_class: int | None = None) -> None:
    add_class_args(parser)
    group = parser.add_argument_group("images")
    group.add_argument("--split", default=split, choices=SPLITS, help=f"dataset split to draw images from (default: {split})")
    group.add_argument("--per-class", type=int, default=per_class,
                       help=f"images per class, the first K of the split (default: {per_class or 'all'})")
    group.add_argument("--images", nargs="+", help="image files instead of a dataset (needs --classes)")
    group.add_argument("--labels", help="comma-separated class of each --images file (optional)")
    group.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")


def add_common_args(parser: argparse.ArgumentParser, name: str) -> None:
    add_model_args(parser)
    add_output_args(parser, name)


# --- loading -----------------------------------------------------------------------------------

def load_model(args: argparse.Namespace):
    """The model the options describe, in eval mode, with ``--templates`` applied."""
    model = load_model_from_args(args).eval()
    if getattr(args, "templates", None):
        templates = [t.strip() for t in args.templates.split("|") if t.strip()]
        if not templates or any("{}" not in t for t in templates):
            raise InputError(f"--templates must be '|'-separated templates containing {{}}, got {args.templates!r}")
        model.templates = templates
    return model


def _dataset_root(args: argparse.Namespace) -> str:
    if args.root:
        return args.root
    if args.dataset and args.dataset.lower() == "shapeworld":
        return "data"
    raise InputError(f"--dataset {args.dataset} needs --root (the folder holding the dataset)")


def _restrict_classes(names: list[str], args: argparse.Namespace) -> list[int]:
    """Label ids kept by --classes / --max-classes, in label order."""
    keep = list(range(len(names)))
    if args.classes:
        wanted = parse_classes(args.classes)
        lookup = {n.lower(): i for i, n in enumerate(names)}
        unknown = [c for c in wanted if c.lower() not in lookup]
        if unknown:
            raise InputError(f"classes {unknown[:5]} are not in {args.dataset}; it has e.g. {names[:5]}")
        keep = sorted(lookup[c.lower()] for c in wanted)
    if args.max_classes is not None:
        if args.max_classes < 1:
            raise InputError(f"--max-classes must be >= 1, got {args.max_classes}")
        keep = keep[: args.max_classes]
    return keep


def load_classnames(args: argparse.Namespace) -> tuple[list[str], str]:
    """Class names from --dataset (possibly restricted) or --classes."""
    if args.dataset:
        splits = build_dataset(args.dataset, _dataset_root(args))
        keep = _restrict_classes(splits.classnames, args)
        return [splits.classnames[i] for i in keep], splits.name
    if not args.classes:
        raise InputError("give --classes (comma-separated or @file) or --dataset")
    names = parse_classes(args.classes)
    if not names:
        raise InputError("--classes is empty: give at least one class name")
    if args.max_classes is not None:
        names = names[: max(1, args.max_classes)]
    return names, "classes"


def load_image_set(args: argparse.Namespace) -> ImageSet:
    """Labelled images from a dataset split, or image files with --classes (and optional --labels)."""
    if args.images:
        if args.dataset:
            raise InputError("give either --images or --dataset, not both")
        names, _ = load_classnames(args)
        labels = [-1] * len(args.images)
        if args.labels:
            given = [c.strip() for c in args.labels.split(",")]
            if len(given) != len(args.images):
                raise InputError(f"--labels gives {len(given)} classes for {len(args.images)} images")
            lookup = {n.lower(): i for i, n in enumerate(names)}
            missing = [c for c in given if c.lower() not in lookup]
            if missing:
                raise InputError(f"--labels names classes not in --classes: {missing[:5]}")
            labels = [lookup[c.lower()] for c in given]
        items = [Datum(str(Path(p).resolve()), lab, names[lab] if lab >= 0 else "") for p, lab in zip(args.images, labels)]
        return ImageSet(items, names, "images")
    if not args.dataset:
        raise InputError("give --dataset (with --root) or --images with --classes")
    splits = build_dataset(args.dataset, _dataset_root(args))
    keep = _restrict_classes(splits.classnames, args)
    relabel = {old: new for new, old in enumerate(keep)}
    pool = getattr(splits, args.split)
    if not pool:
        raise InputError(f"{splits.name} has no images in its '{args.split}' split; choose another --split")
    if args.per_class is not None and args.per_class < 1:
        raise InputError(f"--per-class must be >= 1, got {args.per_class}")
    taken: dict[int, int] = {}
    items = []
    for d in pool:
        if d.label not in relabel:
            continue
        if args.per_class is not None and taken.get(d.label, 0) >= args.per_class:
            continue
        taken[d.label] = taken.get(d.label, 0) + 1
        items.append(Datum(d.path, relabel[d.label], d.classname))
    if not items:
        raise InputError(f"no images of the selected classes in the '{args.split}' split of {splits.name}")
    return ImageSet(items, [splits.classnames[i] for i in keep], f"{splits.name}/{args.split}")


def image_tensor(items: Sequence[Datum], transform: Callable) -> torch.Tensor:
    """[B, 3, H, W] of the items through ``transform`` (the model's eval transform)."""
    return torch.stack([transform(load_image(d.path)) for d in items])


def batched(fn: Callable[[torch.Tensor], torch.Tensor], items: Sequence[Datum], transform: Callable,
            batch_size: int) -> torch.Tensor:
    """``fn`` over the items in batches, concatenated; images are decoded one batch at a time."""
    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    outs = [fn(image_tensor(items[i:i + batch_size], transform)) for i in range(0, len(items), batch_size)]
    return torch.cat(outs)


def denormalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """[B, 3, H, W] normalised tensors back to [B, H, W, 3] floats in [0, 1] for display."""
    m = torch.tensor(mean, dtype=images.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=images.dtype).view(1, 3, 1, 1)
    return (images.cpu() * s + m).clamp(0, 1).permute(0, 2, 3, 1).numpy()


# --- entry points ------------------------------------------------------------------------------

def main_for(name: str, add_arguments: Callable[[argparse.ArgumentParser], None],
             run: Callable[[argparse.Namespace], list[Path]], description: str,
             argv: Sequence[str] | None = None) -> int:
    """``python -m pmpo.analysis.<name>``: parse, run, print the files written; user errors are one line."""
    parser = argparse.ArgumentParser(prog=f"python -m pmpo.analysis.{name}", description=description)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        report(run(args))
    except PMPOError as exc:
        print(f"analysis.{name}: error: {exc}", file=sys.stderr)
        return 1
    return 0


def report(paths: Sequence[Path]) -> None:
    for p in paths:
        print(p)


def prepare_out(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    return out
