"""``pmpo recipe``: the fully resolved recipe ``pmpo train`` would run, and docs/RECIPES.md's table."""

from __future__ import annotations

import argparse
import json

from ..config import list_methods
from ..data import parse_shots, resolve_dataset_name
from ..protocols import PROTOCOLS
from . import SUMMARIES
from .train import add_template_arg, add_train_args, recipe_from_args

EPILOG = """\
examples:
  pmpo recipe --method maple --protocol cross_dataset --dataset imagenet
  pmpo recipe --method coop --protocol fewshot --dataset eurosat --shots 1 --json
  pmpo recipe --method kgcoop --dataset dtd          # KgCoOp's own DTD prior
  pmpo recipe --method promptsrc --protocol fewshot --dataset eurosat   # GPA 45 / 5 on EuroSAT
  pmpo recipe --table > docs/RECIPES-table.md        # every method x protocol (docs/RECIPES.md)

Options given to `pmpo train` (--epochs, --lr, --config, --template, ...) are accepted here too and
change the recipe the same way, so this is the place to check what a command line will run.
"""

# The table of docs/RECIPES.md: one row per (method, protocol), values at 16 shots on a generic dataset.
TABLE_MODEL_FIELDS = ("n_prompts", "n_ctx", "ctx_init", "frozen_init_tail", "text_depth", "visual_prompts",
                      "partition", "coupling", "n_ctx_vision", "prompt_ln_pre", "meta_net", "alpha",
                      "consistency_weight", "text_l1_weight", "image_l1_weight", "logit_kl_weight")
TABLE_TRAIN_FIELDS = ("epochs", "batch_size", "lr", "optimizer", "scheduler", "warmup_epochs", "warmup_lr",
                      "weight_decay", "momentum", "gpa_mean", "gpa_std")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "recipe", help=SUMMARIES["recipe"],
        description="Print the model options, training options and prior templates a run would use, and the "
                    "files (ours and the authors') they come from.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--method", default="pmpo", choices=list_methods(), help="method preset (default: pmpo)")
    p.add_argument("--protocol", default="base2new", choices=PROTOCOLS, help="(default: base2new)")
    p.add_argument("--dataset", help="dataset (its own template and per-dataset exceptions); default: none")
    p.add_argument("--shots", default="16", help="images per class, or 'all' (default: 16)")
    p.add_argument("--config", help="model YAML, as for pmpo train")
    p.add_argument("--model", help="backbone, as for pmpo train")
    p.add_argument("--pretrained", help="pretrained tag, as for pmpo train")
    p.add_argument("--offline", action="store_true", help="the shipped offline model, as for pmpo train")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--table", action="store_true", help="print the methods x protocols table of docs/RECIPES.md")
    add_template_arg(p)
    add_train_args(p)
    p.set_defaults(func=run)


def recipe_table() -> str:
    """Markdown: one row per (method, protocol) with every resolved value and its references."""
    from ..recipes import resolve_recipe

    head = ["method", "protocol", *TABLE_MODEL_FIELDS, *TABLE_TRAIN_FIELDS, "exceptions", "files", "follows"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in list_methods():
        for protocol in PROTOCOLS:
            r = resolve_recipe(method, protocol, shots=16)
            model = [_cell(getattr(r.model, f)) for f in TABLE_MODEL_FIELDS]
            train = [_cell(getattr(r.train, f)) if r.trains else "–" for f in TABLE_TRAIN_FIELDS]
            files = r.sources["model"] + ("; " + r.sources["train"] if r.trains else "")
            refs = r.references["model"] + ("; " + r.references["train"] if r.trains and r.references["train"] else "")
            lines.append("| " + " | ".join([method, protocol, *model, *train, _exceptions(r), files, refs]) + " |")
    return "\n".join(lines) + "\n"


def _exceptions(recipe) -> str:
    """The per-shots / per-dataset blocks of the files a recipe came from, in one cell."""
    from ..config import preset_blocks
    from ..engine import train_preset_path
    from ..io import read_yaml_mapping

    parts = [f"{d}: " + ", ".join(f"{k} {_cell(v)}" for k, v in o.items())
             for d, o in preset_blocks(recipe.method)["datasets"].items()]
    if recipe.trains:
        data = read_yaml_mapping(train_preset_path(recipe.method, recipe.protocol), "training config")
        parts += [f"K={k}: " + ", ".join(f"{a} {_cell(v)}" for a, v in o.items())
                  for k, o in (data.get("per_shots") or {}).items()]
        parts += [f"{d}: " + ", ".join(f"{a} {_cell(v)}" for a, v in o.items())
                  for d, o in (data.get("per_dataset") or {}).items()]
    return "; ".join(parts) or "–"


def _cell(value) -> str:
    if isinstance(value, str):
        return f'"{value}"' if value else '""'
    if isinstance(value, float):
        return f"{value:g}"
    return json.dumps(value)


def run(args: argparse.Namespace) -> int:
    if args.table:
        print(recipe_table(), end="")
        return 0
    dataset = resolve_dataset_name(args.dataset) if args.dataset else None
    recipe = recipe_from_args(args, args.protocol, dataset, parse_shots(args.shots))
    data = recipe.to_dict()
    if args.json:
        print(json.dumps(data, indent=1))
        return 0
    print(f"{recipe.method} · {recipe.protocol} · dataset {dataset or '(any)'} · shots {recipe.shots or 'all'}")
    print(f"\nmodel ({recipe.sources['model']}; follows {recipe.references['model'] or '-'}):")
    for key, value in data["model"].items():
        print(f"  {key}: {_cell(value)}")
    if recipe.trains:
        print(f"\ntraining ({recipe.sources['train']}; follows {recipe.references['train'] or '-'}):")
        for key, value in data["train"].items():
            print(f"  {key}: {_cell(value)}")
    else:
        print("\ntraining: none (no learnable prompts)")
    print(f"\nprior templates (from {recipe.templates_from}):")
    for t in recipe.templates:
        print(f"  {t}")
    if recipe.protocol in ("cross_dataset", "domain_generalization"):
        print("targets are scored with " + ("their own templates" if recipe.target_templates else "these templates"))
    return 0


__all__ = ["recipe_table"]
