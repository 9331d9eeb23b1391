"""``pmpo predict``: class probabilities for image files."""

from __future__ import annotations

import argparse
import json

from ..data.loader import load_image
from ..errors import InputError
from . import SUMMARIES
from .common import add_model_args, load_model_from_args, parse_classes


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help=SUMMARIES["predict"],
        description="Print the top-k classes and probabilities for each image.",
        epilog='example: pmpo predict --offline --classes "red circle,blue star" image.png',
    )
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--classes", required=True, help="comma-separated class names, or @file with one per line")
    p.add_argument("--templates", help="'|'-separated manual templates containing {} (default: the config's)")
    p.add_argument("--top-k", type=int, default=5, help="classes shown per image (default: 5)")
    p.add_argument("--json", action="store_true", help="print one JSON object per image instead of text")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    classes = parse_classes(args.classes)
    if not classes:
        raise InputError("--classes is empty: give at least one class name")
    pils = [load_image(path) for path in args.images]  # fail on a bad image before loading a model
    model = load_model_from_args(args).eval()
    if args.templates:
        model.templates = [t.strip() for t in args.templates.split("|") if t.strip()]
    probs = model.predict(pils, classes)
    k = max(1, min(args.top_k, len(classes)))
    for path, row in zip(args.images, probs):
        values, idx = row.topk(k)
        if args.json:
            print(json.dumps({"image": path, "top": [[classes[i], round(float(v), 6)] for v, i in zip(values, idx)]}))
        else:
            print(path)
            for v, i in zip(values, idx):
                print(f"  {float(v):7.2%}  {classes[i]}")
    return 0
