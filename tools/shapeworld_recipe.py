"""Choose the ShapeWorld benchmark's training recipe on the validation split, never on test.

The benchmark (``pmpo/configs/sweeps/shapeworld.yaml``) trains every method with one recipe. This
script trains each learnable method of that sweep file with each candidate (epochs × lr ×
batch size) on the base classes of one seed's 16-shot draw — the very draw and initialisation
the benchmark run of that seed uses — and scores the few-shot **val** images of the base and
the new classes (4 per class). The candidate with the best mean val HM over the methods wins;
copy it into the sweep file's ``train:`` block.

    python tools/shapeworld_recipe.py                        # the grid behind the shipped choice (epochs x lr)
    python tools/shapeworld_recipe.py --epochs 5 10 --lr 0.0035 0.028 --batch-size 32 --json recipe.json

Selecting on the mean over methods (not on PMPO alone) keeps the choice from favouring the
method this project is about.

A *candidate offline model* is checked the same way before it replaces the shipped one:
``--model local-dir:PATH`` trains on it, ``--presets-unchanged`` drops the sweep file's per-method
config overrides (the benchmark of a shallower model scaled the prompt depths to its towers), ``--shift KEY=VALUE`` renders the
data with a changed ``DOWNSTREAM_SHIFT`` (use a fresh ``--root``: rendered images are cached there),
and every row reports the zero-shot val accuracy and the training accuracy beside the method's:

    python tools/shapeworld_recipe.py --model local-dir:/tmp/pt/S2 --presets-unchanged --root /tmp/sw-mild \
        --shift rotation_deg=8 --shift pos_jitter=0.04 --lr 0.028 --min-crop-scale 0.5 --methods coop kgcoop maple pmpo
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pmpo.commands.sweep import MethodSpec, Sweep, load_sweep  # noqa: E402
from pmpo.config import PMPOConfig  # noqa: E402
from pmpo.data import build_dataset, harmonic_mean, sample_few_shot, subsample_classes  # noqa: E402
from pmpo.data import shapeworld as sw  # noqa: E402
from pmpo.engine import derive_seed, evaluate, load_train_preset, seeded_init, train  # noqa: E402
from pmpo.errors import PMPOError  # noqa: E402
from pmpo.model import build_model  # noqa: E402


def model_config(sweep: Sweep, spec: MethodSpec) -> PMPOConfig:
    """The PMPOConfig the sweep builds for ``spec`` (same merge order as ``pmpo sweep``)."""
    return PMPOConfig.from_dict({"method": spec.method, **spec.config,
                                 **({"model": sweep.model} if sweep.model else {}),
                                 **({"pretrained": sweep.pretrained} if sweep.pretrained else {})})


def score_recipes(sweep: Sweep, candidates: Sequence[dict], seed: int, methods: Sequence[str] | None = None,
                  device: str = "cpu", log=print) -> list[dict]:
    """Val base/new/HM of every (candidate, learnable method); one row per pair."""
    from pmpo.backbone import load_backbone

    if sweep.protocol != "base2new" or len(sweep.datasets) != 1:
        raise PMPOError("recipe selection expects a base-to-new sweep over one dataset")
    dataset = sweep.datasets[0]
    splits = build_dataset(dataset, sweep.root)
    fewshot = sample_few_shot(splits, sweep.shots, seed, cache_dir=None)
    base, new = subsample_classes(fewshot, "base"), subsample_classes(fewshot, "new")
    specs = [m for m in sweep.methods if methods is None or m.name in methods]
    backbone, rows, zero_shot = None, [], None
    for candidate, spec in itertools.product(candidates, specs):
        cfg = model_config(sweep, spec)
        if cfg.n_prompts == 0:
            continue  # nothing to train: the recipe cannot matter
        if backbone is None:
            backbone = load_backbone(cfg.model, cfg.pretrained, device=device, quick_gelu=cfg.quick_gelu)
            zs_model = build_model(PMPOConfig.from_dict({"method": "zeroshot", "model": cfg.model,
                                                         "pretrained": cfg.pretrained}), device=device, backbone=backbone)
            zero_shot = {part: evaluate(zs_model, split.val, split.classnames, batch_size=200).accuracy
                         for part, split in (("base", base), ("new", new))}
            zero_shot["train"] = evaluate(zs_model, base.train, base.classnames, batch_size=200).accuracy
            log(f"zero-shot: val base {zero_shot['base']:.2f} new {zero_shot['new']:.2f} "
                f"train {zero_shot['train']:.2f}")
        train_cfg = load_train_preset(spec.method, sweep.protocol, dataset,
                                      **{**sweep.train, **spec.train, **candidate})
        train_cfg = dataclasses.replace(train_cfg, seed=seed)
        with seeded_init(derive_seed(seed, -2)):  # as run_protocol: the same prompt initialisation
            model = build_model(cfg, device=device, backbone=backbone)
        ctx0 = model.prompts.ctx.detach().clone() if model.prompts is not None and model.prompts.ctx is not None else None
        start = time.perf_counter()
        train(model, base.train, base.classnames, train_cfg)
        acc = {part: evaluate(model, split.val, split.classnames, batch_size=train_cfg.eval_batch_size).accuracy
               for part, split in (("base", base), ("new", new))}
        train_acc = evaluate(model, base.train, base.classnames, batch_size=train_cfg.eval_batch_size).accuracy
        row = {**candidate, "method": spec.name, "val_base": acc["base"], "val_new": acc["new"],
               "val_hm": harmonic_mean(acc["base"], acc["new"]), "train_acc": train_acc,
               "zero_shot_val_base": zero_shot["base"], "zero_shot_val_new": zero_shot["new"],
               "zero_shot_train_acc": zero_shot["train"], "seconds": time.perf_counter() - start}
        if ctx0 is not None:  # how far training moved the text context, relative to its initial norm
            row["ctx_move"] = float((model.prompts.ctx.detach() - ctx0).norm() / ctx0.norm())
        rows.append(row)
        log(f"{json.dumps(candidate)} {spec.name}: val base {acc['base']:.2f} new {acc['new']:.2f} "
            f"HM {row['val_hm']:.2f}, train {train_acc:.2f} (zero-shot: val base {zero_shot['base']:.2f}, "
            f"train {zero_shot['train']:.2f})" + (f", context moved {row['ctx_move']:.2f}× its norm" if ctx0 is not None else "")
            + f" ({row['seconds']:.0f} s)")
    return rows


def choose(rows: Sequence[dict], keys: Sequence[str]) -> tuple[dict, list[dict]]:
    """The candidate with the best mean val HM over methods, and the per-candidate summary."""
    summary: dict[tuple, list[float]] = {}
    for r in rows:
        summary.setdefault(tuple(r[k] for k in keys), []).append(r["val_hm"])
    table = [{**dict(zip(keys, k)), "mean_val_hm": sum(v) / len(v), "methods": len(v)} for k, v in summary.items()]
    best = max(table, key=lambda t: t["mean_val_hm"])
    return {k: best[k] for k in keys}, table


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", default=str(REPO / "pmpo" / "configs" / "sweeps" / "shapeworld.yaml"))
    p.add_argument("--root", help="override the sweep's data root")
    p.add_argument("--seed", type=int, default=1, help="few-shot draw and training seed (default: 1)")
    p.add_argument("--epochs", type=int, nargs="+", default=[5, 7, 9])
    p.add_argument("--lr", type=float, nargs="+", default=[0.028, 0.056])
    p.add_argument("--batch-size", type=int, nargs="+", default=[32])
    p.add_argument("--min-crop-scale", type=float, nargs="+", default=[1.0],
                   help="RandomResizedCrop's lower scale bound (0.08: CoOp's protocol; 1.0: no crop, the benchmark's choice)")
    p.add_argument("--methods", nargs="+", help="sweep method names to score (default: every learnable one)")
    p.add_argument("--json", help="also write the rows and the choice to this file")
    p.add_argument("--model", help="train on this backbone instead of the sweep's (a candidate offline model)")
    p.add_argument("--presets-unchanged", action="store_true",
                   help="drop the sweep's per-method config overrides (for a candidate shallower than the presets)")
    p.add_argument("--shift", action="append", default=[], metavar="KEY=VALUE",
                   help="override one knob of DOWNSTREAM_SHIFT for the rendered data (with a fresh --root)")
    p.add_argument("--method-config", action="append", default=[], metavar="KEY=VALUE",
                   help="set one model option (YAML value) for every method, e.g. ctx_init='a cluttered photo of' "
                        "(a diagnostic: never a recipe chosen with knowledge of the test domain)")
    args = p.parse_args(argv)
    try:
        for item in args.shift:
            key, _, value = item.partition("=")
            if key not in sw.DOWNSTREAM_SHIFT:
                raise PMPOError(f"--shift: unknown key {key!r}; keys: {', '.join(sorted(sw.DOWNSTREAM_SHIFT))}")
            if not args.root:
                raise PMPOError("--shift changes the rendered images: give a fresh --root for them")
            sw.DOWNSTREAM_SHIFT[key] = float(value)
        sweep = load_sweep(args.sweep)
        if args.root:
            sweep.root = args.root
        if args.model:
            sweep.model, sweep.pretrained = args.model, "none"
        if args.presets_unchanged:
            sweep.methods = [dataclasses.replace(m, config={}) for m in sweep.methods]
        if args.method_config:
            extra = {}
            for item in args.method_config:
                key, sep, value = item.partition("=")
                if not sep:
                    raise PMPOError(f"--method-config expects KEY=VALUE, got {item!r}")
                extra[key] = yaml.safe_load(value)
            sweep.methods = [dataclasses.replace(m, config={**m.config, **extra}) for m in sweep.methods]
        candidates = [{"epochs": e, "lr": lr, "batch_size": b, "min_crop_scale": c}
                      for e, lr, b, c in itertools.product(args.epochs, args.lr, args.batch_size, args.min_crop_scale)]
        rows = score_recipes(sweep, candidates, args.seed, args.methods,
                             log=lambda m: print(m, file=sys.stderr, flush=True))
        keys = ["epochs", "lr", "batch_size", "min_crop_scale"]
        best, table = choose(rows, keys)
    except PMPOError as exc:
        print(f"shapeworld_recipe: error: {exc}", file=sys.stderr)
        return 1
    print("| epochs | lr | batch | min crop scale | mean val HM | methods |\n|---:|---:|---:|---:|---:|---:|")
    for t in table:
        print(f"| {t['epochs']} | {t['lr']} | {t['batch_size']} | {t['min_crop_scale']} | {t['mean_val_hm']:.2f} "
              f"| {t['methods']} |")
    print(f"\nchosen (best mean val HM): {json.dumps(best)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"seed": args.seed, "rows": rows, "summary": table, "chosen": best},
                                              indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
