"""``pmpo train``: one protocol run (few-shot, base-to-new, cross-dataset or DG) into a run folder."""

from __future__ import annotations

import argparse
import sys

from .. import distributed as pdist
from ..data import list_datasets
from ..engine import OPTIMIZERS, PRECISIONS, SCHEDULERS, TrainConfig, load_train_config, train_preset_path
from ..errors import BackboneLoadError, InputError
from ..protocols import PROTOCOLS, run_dir, run_protocol
from .common import add_model_args, config_from_args, offline_fallback
from . import SUMMARIES

EPILOG = """\
examples:
  # base-to-new on DTD with PMPO (MaPLe's recipe: 5 epochs, batch 4), seed 1
  pmpo train --dataset dtd --root $DATA --protocol base2new --shots 16 --seed 1 --method pmpo
  # CoOp with its own recipe (pmpo/configs/train/coop_base2new.yaml is picked automatically)
  pmpo train --dataset dtd --root $DATA --method coop
  # a killed run continues from its last finished epoch
  pmpo train --dataset dtd --root $DATA --method pmpo --resume
  # 4 GPUs (batch_size stays the global batch)
  torchrun --nproc_per_node=4 -m pmpo train --dataset imagenet --root $DATA --protocol cross_dataset
  # your own images: <folder>/<class>/*.jpg, offline model, CPU
  pmpo train --dataset imagefolder --root ./my_images --protocol fewshot --shots 8 --offline --device cpu

The run folder is <out>/<protocol>/<dataset>/<name>/shots_<K>/seed_<S> (or --run-dir) and
receives result.json, last.safetensors (prompts), metrics.jsonl and train_state.safetensors.
Training presets: pmpo/configs/train/<method>_<protocol>.yaml, else pmpo/configs/train/<protocol>.yaml.
"""


def add_train_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training (override the preset)")
    g.add_argument("--train-config", help="training YAML (default: the preset for method and protocol)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int, help="global batch: images per optimizer step over all processes")
    g.add_argument("--lr", type=float)
    g.add_argument("--optimizer", choices=OPTIMIZERS)
    g.add_argument("--momentum", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--scheduler", choices=SCHEDULERS, help="after warm-up, stepped per epoch")
    g.add_argument("--warmup-epochs", type=int)
    g.add_argument("--warmup-lr", type=float)
    g.add_argument("--grad-accum", type=int, help="micro-batches per step (same result, less memory)")
    g.add_argument("--precision", choices=PRECISIONS)
    g.add_argument("--num-workers", type=int, help="DataLoader workers per process")
    g.add_argument("--eval-batch-size", type=int)
    g.add_argument("--min-crop-scale", type=float,
                   help="smallest area fraction of the train crop (default 0.08, CoOp's protocol)")


def train_config_from_args(args: argparse.Namespace, method: str, protocol: str, dataset: str) -> TrainConfig:
    path = args.train_config or train_preset_path(method, protocol)
    overrides = {k: getattr(args, k, None) for k in (
        "epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay", "scheduler", "warmup_epochs",
        "warmup_lr", "grad_accum", "precision", "num_workers", "eval_batch_size", "min_crop_scale")}
    return load_train_config(path, dataset=dataset, **overrides)


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
    p.add_argument("--dataset-templates", action="store_true", help="use each dataset's own template (CoOp's) as the prior")
    p.add_argument("--out", default="runs", help="root of run folders (default: runs)")
    p.add_argument("--run-dir", help="exact run folder (overrides --out)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last finished epoch")
    add_model_args(p)
    add_train_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.checkpoint:
        raise InputError("train starts from the method preset; --checkpoint is for 'pmpo eval' and 'pmpo predict'")
    from ..data import resolve_dataset_name

    dataset = resolve_dataset_name(args.dataset)
    model_cfg = config_from_args(args)
    train_cfg = train_config_from_args(args, model_cfg.method, args.protocol, dataset)
    device = pdist.init_from_env(args.device)
    info = pdist.info()
    name = args.name or model_cfg.method
    folder = args.run_dir or run_dir(args.out, args.protocol, dataset, name, args.shots, args.seed)
    log = (lambda msg: print(msg, file=sys.stderr)) if info.is_main else None
    targets = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else None

    def run_with(backbone=None):
        return run_protocol(
            args.protocol, dataset, args.root, model_cfg, train_cfg, folder, shots=args.shots, seed=args.seed,
            name=name, targets=targets, target_root=args.target_root, dataset_templates=args.dataset_templates,
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
