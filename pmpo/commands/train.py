"""``pmpo train``: one protocol run (few-shot, base-to-new, cross-dataset or DG) into a run folder."""

from __future__ import annotations

import argparse
import sys

from .. import distributed as pdist
from ..data import list_datasets
from ..errors import BackboneLoadError, InputError
from ..protocols import PROTOCOLS, run_dir, run_protocol
from ..train_config import OPTION_CHOICES, OPTION_HELP, option_type
from . import SUMMARIES
from .common import add_model_args, offline_fallback

EPILOG = """\
examples:
  # base-to-new on DTD with PMPO (MaPLe's recipe: 5 epochs, batch 4), seed 1
  pmpo train --dataset dtd --root $DATA --protocol base2new --shots 16 --seed 1 --method pmpo
  # CoOp with its own recipe (pmpo/configs/train/coop_base2new.yaml is picked automatically;
  # `pmpo recipe --method coop --protocol base2new --dataset dtd` shows everything that will run)
  pmpo train --dataset dtd --root $DATA --method coop
  # a killed run continues from its last finished epoch
  pmpo train --dataset dtd --root $DATA --method pmpo --resume
  # 4 GPUs (batch_size stays the global batch)
  torchrun --nproc_per_node=4 -m pmpo train --dataset imagenet --root $DATA --protocol cross_dataset
  # your own images: <folder>/<class>/*.jpg, offline model, CPU
  pmpo train --dataset imagefolder --root ./my_images --protocol fewshot --shots 8 --offline --device cpu

The run folder is <out>/<protocol>/<dataset>/<name>/shots_<K>/seed_<S> (or --run-dir) and
receives result.json, last.safetensors (prompts), metrics.jsonl and train_state.safetensors.
Recipes (docs/RECIPES.md): the method preset with its per-protocol / per-dataset blocks, the training
preset pmpo/configs/train/<method>_<protocol>.yaml (else <protocol>.yaml) with its per-shots /
per-dataset blocks, and each benchmark dataset's own prior template (CoOp's); options given here win.
"""


def add_train_args(parser: argparse.ArgumentParser) -> None:
    """``--train-config`` and one flag per overridable TrainConfig option (train_config.OPTION_HELP)."""
    g = parser.add_argument_group("training (override the preset)")
    g.add_argument("--train-config", help="training YAML (default: the preset for method and protocol)")
    for name, help_text in OPTION_HELP.items():
        g.add_argument("--" + name.replace("_", "-"), type=option_type(name), choices=OPTION_CHOICES.get(name),
                       help=help_text)


TRAIN_OPTIONS = tuple(OPTION_HELP)


def add_template_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--template", action="append", dest="templates", metavar="TEMPLATE",
                        help="prior template with {} for the class name (repeatable; default: the dataset's own, "
                             "CoOp's, or 'a photo of a {}.' for your own data)")


def recipe_from_args(args: argparse.Namespace, protocol: str, dataset: str | None, shots: int | None):
    """The recipe these options select (pmpo.recipes.resolve_recipe): what train runs and recipe prints."""
    from ..backbone import OFFLINE_MODEL
    from ..recipes import resolve_recipe

    model = OFFLINE_MODEL if getattr(args, "offline", False) else getattr(args, "model", None)
    options = {"model": model, "pretrained": getattr(args, "pretrained", None),
               "templates": getattr(args, "templates", None)}
    return resolve_recipe(args.method, protocol, dataset, shots, config_file=getattr(args, "config", None),
                          model_options=options, train_file=getattr(args, "train_config", None),
                          train_options={k: getattr(args, k, None) for k in TRAIN_OPTIONS})


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help=SUMMARIES["train"],
        description="Sample K shots per class with the seed, train the prompts (last epoch, no model "
                    "selection) and evaluate as the protocol says (DESIGN.md section 3).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", required=True, help=f"one of: {', '.join(list_datasets())}")
    p.add_argument("--root", required=True, help="data root ($DATA in CoOp's DATASETS.md; the folder for imagefolder)")
    p.add_argument("--protocol", default="base2new", choices=PROTOCOLS, help="(default: base2new)")
    p.add_argument("--shots", default="16", help="images per class, or 'all' (default: 16)")
    p.add_argument("--seed", type=int, default=1, help="few-shot draw and training seed (default: 1)")
    p.add_argument("--name", help="name of the method in tables and run folders (default: the method; use it for ablations)")
    p.add_argument("--targets", help="comma-separated target datasets (cross_dataset/domain_generalization; default: the protocol's)")
    p.add_argument("--target-root", help="data root of the targets (default: --root)")
    p.add_argument("--out", default="runs", help="root of run folders (default: runs)")
    p.add_argument("--run-dir", help="exact run folder (overrides --out)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last finished epoch")
    add_model_args(p)
    add_template_arg(p)
    add_train_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.checkpoint:
        raise InputError("train starts from the method preset; --checkpoint is for 'pmpo eval' and 'pmpo predict'")
    from ..data import parse_shots, resolve_dataset_name

    dataset = resolve_dataset_name(args.dataset)
    recipe = recipe_from_args(args, args.protocol, dataset, parse_shots(args.shots))
    model_cfg, train_cfg = recipe.model, recipe.train
    device = pdist.init_from_env(args.device)
    info = pdist.info()
    name = args.name or model_cfg.method
    folder = args.run_dir or run_dir(args.out, args.protocol, dataset, name, args.shots, args.seed)
    log = (lambda msg: print(msg, file=sys.stderr)) if info.is_main else None
    targets = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else None

    def run_with(backbone=None):
        return run_protocol(
            args.protocol, dataset, args.root, model_cfg, train_cfg, folder, shots=args.shots, seed=args.seed,
            name=name, targets=targets, target_root=args.target_root, target_templates=recipe.target_templates,
            recipe=recipe.to_dict(),
            device=device, backbone=backbone, resume=args.resume, log=log,
        )

    try:
        try:
            result = run_with()
        except BackboneLoadError as exc:  # no network: the default backbone falls back to the offline model
            result = run_with(offline_fallback(model_cfg, args, device, exc))
    finally:
        pdist.shutdown()
    if info.is_main and result is not None:
        acc = {k: round(v, 2) for k, v in result["accuracy"].items() if v is not None}
        extra = "".join(f" {k}={v:.2f}" for k, v in result["targets"].items())
        print(f"{folder}: " + " ".join(f"{k}={v}" for k, v in acc.items()) + extra)
    return 0
