"""The evaluation protocols of CoOp/CoCoOp/MaPLe (DESIGN.md §3), one run at a time.

A run = (protocol, dataset, method, shots, seed). It samples the few-shot training set over
*all* classes with the run seed (as Dassl does), then — for base-to-new — keeps the base
classes for training and scores base and new classes separately, each among its own classes.
Cross-dataset and domain generalisation train on the source's classes and score other
datasets with their own class lists. The last epoch is evaluated; there is no model selection.

Each run folder ends up with ``result.json`` (written last and atomically: its presence means
"finished"), the prompt checkpoint ``last.safetensors``, ``metrics.jsonl``, the training state
and the sampled few-shot indices.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from . import __version__
from . import distributed as pdist
from .backbone import Backbone, portable_model_name
from .checkpoint import save_checkpoint
from .config import PMPOConfig
from .data import (
    BENCHMARK_DATASETS,
    DOMAIN_SHIFT_DATASETS,
    build_dataset,
    harmonic_mean,
    parse_shots,
    resolve_dataset_name,
    sample_few_shot,
    subsample_classes,
)
from .engine import LAST_CHECKPOINT, TrainConfig, derive_seed, evaluate, seeded_init, train
from .errors import InputError
from .io import git_head, write_json_atomic
from .model import build_model

PROTOCOLS = ("base2new", "fewshot", "cross_dataset", "domain_generalization")
RESULT_FILE = "result.json"
RESULT_FORMAT = "pmpo-result/1"


def default_targets(protocol: str, source: str) -> list[str]:
    """Cross-dataset: the other 10 benchmark datasets. Domain generalisation: ImageNet's 4 shifts."""
    if protocol == "cross_dataset":
        return [d for d in BENCHMARK_DATASETS if d != source]
    if protocol == "domain_generalization":
        return list(DOMAIN_SHIFT_DATASETS)
    return []


def run_dir(out: str | Path, protocol: str, dataset: str, name: str, shots: int | str | None, seed: int) -> Path:
    """``<out>/<protocol>/<dataset>/<name>/shots_<K>/seed_<S>``: one folder per run."""
    k = parse_shots(shots)
    return Path(out) / protocol / dataset / name / f"shots_{k if k is not None else 'all'}" / f"seed_{seed}"


def versions() -> dict[str, str]:
    import open_clip

    return {"pmpo": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
            "python": platform.python_version()}


def git_commit() -> str | None:
    """The commit of the code that produced a result (None outside a git checkout)."""
    return git_head(Path(__file__).resolve().parent)


def read_finished(folder: str | Path) -> dict | None:
    """The run's result when it finished (a readable result.json of this format), else None."""
    path = Path(folder) / RESULT_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == RESULT_FORMAT else None


def run_protocol(
    protocol: str,
    dataset: str,
    root: str | Path,
    model_cfg: PMPOConfig,
    train_cfg: TrainConfig,
    out_dir: str | Path,
    shots: int | str = 16,
    seed: int = 1,
    name: str | None = None,
    targets: Sequence[str] | None = None,
    target_root: str | Path | None = None,
    target_templates: bool = True,
    recipe: dict | None = None,
    device: str | torch.device = "cpu",
    backbone: Backbone | None = None,
    resume: bool = False,
    progress: Callable[[dict], None] | None = None,
    stop: threading.Event | None = None,
    log: Callable[[str], None] | None = None,
) -> dict | None:
    """Run one protocol and return the result dict (also written to ``out_dir/result.json``).

    ``seed`` drives both the few-shot draw and training (it replaces ``train_cfg.seed``).
    ``model_cfg`` / ``train_cfg`` are what :func:`pmpo.recipes.resolve_recipe` gives (the prior
    templates included); with ``target_templates`` each transfer target is scored with its own
    templates (CoOp's), else with the config's. ``recipe`` (``Recipe.to_dict()``) is recorded in
    result.json. Returns None when cancelled through ``stop`` (nothing written but the
    checkpoints of finished epochs). With ``resume`` a finished run is returned as it is.
    """
    if protocol not in PROTOCOLS:
        raise InputError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    say = log or (lambda _msg: None)
    dinfo = pdist.info()
    out = Path(out_dir)
    if resume:
        done = pdist.broadcast_object(read_finished(out))
        if done is not None:
            say(f"{out}: finished earlier, result kept")
            return done
    dataset = resolve_dataset_name(dataset)
    train_cfg = dataclasses.replace(train_cfg, seed=int(seed))
    k = parse_shots(shots)
    start = time.perf_counter()

    splits = build_dataset(dataset, root)
    if not splits.train:
        raise InputError(f"{dataset} has no training split (it is a test-only dataset); train on another dataset")
    fewshot = sample_few_shot(splits, k if k is not None else "all", seed, cache_dir=out / "fewshot")
    source = subsample_classes(fewshot, "base") if protocol == "base2new" else fewshot
    if k is not None:
        counts = Counter(d.label for d in source.train)
        short = {c: n for c, n in counts.items() if n < k}
        missing = len(source.classnames) - len(counts)
        if short or missing:
            say(f"note: {k} shots asked, but {len(short) + missing} of {len(source.classnames)} classes have fewer "
                f"training images (smallest: {min([*short.values(), *([0] if missing else [])])}); "
                "they train on all they have")
    targets = list(targets) if targets else default_targets(protocol, dataset)
    target_splits = [build_dataset(t, target_root or root) for t in targets]  # fail early on a missing target

    with seeded_init(derive_seed(seed, -2)):  # prompt initialisation (couplings) is random too
        model = build_model(model_cfg, device=device, backbone=backbone)
    say(f"{protocol} {dataset} {model.cfg.method} shots={k or 'all'} seed={seed}: "
        f"{len(source.train)} training images, {len(source.classnames)} classes, {model.num_learnable():,} learnable")

    history: list[dict] = []
    train_time, train_ips = 0.0, 0.0
    if model.learnable_parameters():
        result = train(model, source.train, source.classnames, train_cfg, out_dir=out, resume=resume,
                       progress=progress, stop=stop)
        if result.stopped:
            return None
        history, train_time, train_ips = result.history, result.wall_time_s, result.images_per_s
    elif dinfo.is_main:
        save_checkpoint(model, out / LAST_CHECKPOINT)  # zero-shot: the config alone, so `pmpo eval` can use it

    bs, nw = train_cfg.eval_batch_size, train_cfg.num_workers
    accuracy: dict[str, float | None] = {"base": None, "new": None, "hm": None, "all": None}
    per_class: dict[str, dict[str, float]] = {}
    n_test: dict[str, int] = {}
    eval_ips = []
    if protocol == "base2new":
        new = subsample_classes(fewshot, "new")
        for part, split in (("base", source), ("new", new)):
            r = evaluate(model, split.test, split.classnames, batch_size=bs, num_workers=nw)
            accuracy[part], per_class[part], n_test[part] = r.accuracy, r.per_class, r.n
            eval_ips.append(r.images_per_s)
        accuracy["hm"] = harmonic_mean(accuracy["base"], accuracy["new"])
    else:
        r = evaluate(model, fewshot.test, fewshot.classnames, batch_size=bs, num_workers=nw)
        accuracy["all"], per_class["all"], n_test["all"] = r.accuracy, r.per_class, r.n
        eval_ips.append(r.images_per_s)
    target_acc: dict[str, float] = {}
    for tsplit in target_splits:
        r = evaluate(model, tsplit.test, tsplit.classnames, batch_size=bs, num_workers=nw,
                     templates=tsplit.templates if target_templates else None)
        target_acc[tsplit.name] = r.accuracy
        per_class[tsplit.name], n_test[tsplit.name] = r.per_class, r.n
        eval_ips.append(r.images_per_s)
        say(f"  target {tsplit.name}: {r.accuracy:.2f}%")

    result = {
        "format": RESULT_FORMAT,
        "name": name or model.cfg.method,
        "method": model.cfg.method,
        "dataset": splits.name,
        "protocol": protocol,
        "seed": int(seed),
        "shots": k if k is not None else "all",
        "config": {**model.cfg.to_dict(), "templates": list(model.templates)},
        "train": train_cfg.to_dict(),
        "templates": {"train": list(model.templates),
                      **{t.name: list(t.templates if target_templates else model.templates) for t in target_splits}},
        "recipe": recipe,
        "accuracy": accuracy,
        "targets": target_acc,
        "per_class": per_class,
        "n_train": len(source.train),
        "n_test": n_test,
        "classes": {"train": len(source.classnames)},
        "history": history,
        "wall_time_s": time.perf_counter() - start,
        "train_time_s": train_time,
        "images_per_s": train_ips,
        "eval_images_per_s": sum(eval_ips) / len(eval_ips) if eval_ips else 0.0,
        "world_size": dinfo.world_size,
        "device": str(model.device),
        "versions": versions(),
        "git_commit": git_commit(),
        "backbone": {"model": portable_model_name(model.backbone.model_name), "pretrained": model.backbone.pretrained,
                     "description": model.backbone.description},
        "checkpoint": LAST_CHECKPOINT,
    }
    if dinfo.is_main:
        write_json_atomic(out / RESULT_FILE, result)
    pdist.barrier()
    return result


__all__ = ["PROTOCOLS", "RESULT_FILE", "default_targets", "read_finished", "run_dir", "run_protocol", "versions"]
