"""``pmpo eval``: accuracy of a prompt checkpoint (or a method preset) on a dataset split."""

from __future__ import annotations

import argparse
import json
import sys

from .. import distributed as pdist
from ..data import build_dataset, list_datasets, sample_few_shot, subsample_classes
from ..engine import evaluate
from . import SUMMARIES
from .common import add_model_args, load_model_from_args

EPILOG = """\
examples:
  pmpo eval --checkpoint runs/base2new/dtd/pmpo/shots_16/seed_1/last.safetensors --dataset dtd --root $DATA --subsample new
  pmpo eval --method zeroshot --dataset eurosat --root $DATA
  pmpo eval --checkpoint prompts.safetensors --dataset imagenet_r --root $DATA --json
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help=SUMMARIES["eval"],
        description="Top-1 accuracy with the eval transform (resize + center crop), class weights computed once.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", required=True, help=f"one of: {', '.join(list_datasets())}")
    p.add_argument("--root", required=True, help="data root ($DATA; the folder for imagefolder)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="(default: test)")
    p.add_argument("--subsample", default="all", choices=("all", "base", "new"),
                   help="classes: all, or the base/new half of base-to-new (default: all)")
    p.add_argument("--shots", help="with --split train/val: the few-shot subset of this many shots")
    p.add_argument("--seed", type=int, default=1, help="seed of that few-shot subset (default: 1)")
    p.add_argument("--dataset-templates", action="store_true",
                   help="score a checkpoint with the dataset's own template as the prior instead of its stored "
                        "one (a method preset without --config always uses the dataset's, as pmpo recipe says)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--per-class", action="store_true", help="also print per-class accuracy")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    splits = build_dataset(args.dataset, args.root)  # a bad path fails before a model is loaded
    if args.shots and args.split != "test":
        splits = sample_few_shot(splits, args.shots, args.seed)
    splits = subsample_classes(splits, args.subsample)
    items = getattr(splits, args.split)
    args.device = str(pdist.init_from_env(args.device))
    try:
        model = load_model_from_args(args).eval()
        own = args.dataset_templates or not (args.checkpoint or args.config)
        result = evaluate(model, items, splits.classnames, batch_size=args.batch_size,
                          templates=splits.templates if own else None)
    finally:
        pdist.shutdown()
    if not pdist.info().is_main:
        return 0
    if args.json:
        print(json.dumps({"dataset": splits.name, "split": args.split, "subsample": args.subsample,
                          "accuracy": result.accuracy, "n": result.n, "per_class": result.per_class,
                          "images_per_s": result.images_per_s}))
        return 0
    print(f"{splits.name} {args.split} ({args.subsample} classes, {len(splits.classnames)}): "
          f"accuracy {result.accuracy:.2f}% on {result.n} images ({result.images_per_s:.1f} images/s)")
    if args.per_class:
        for name, acc in sorted(result.per_class.items(), key=lambda kv: kv[1]):
            print(f"  {acc:6.2f}%  {name}")
    print(f"model: {model.cfg.method} on {model.backbone.description}", file=sys.stderr)
    return 0
