"""``pmpo sweep``: datasets × methods × seeds from one YAML file, resumable.

A finished run (valid result.json) is skipped; an unfinished one (no result.json) is rerun
with resume, so it continues from its last finished epoch. Killing a sweep and starting it
again therefore loses at most one epoch of one run. The CLIP backbone is loaded once and
shared by all runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import distributed as pdist
from ..config import preset_file
from ..data import parse_shots, resolve_dataset_name
from ..errors import InputError, PMPOError
from ..io import read_yaml_mapping
from ..protocols import PROTOCOLS, read_finished, run_dir, run_protocol
from ..results import build_tables, load_results, render
from . import SUMMARIES

EPILOG = """\
example sweep file (pmpo/configs/sweeps/base2new_11.yaml is the full benchmark):
  protocol: base2new
  root: $DATA              # environment variables are expanded
  out: runs
  shots: 16
  seeds: [1, 2, 3]
  datasets: [dtd, eurosat]
  methods: [pmpo, maple, {name: pmpo-n2, method: pmpo, config: {n_prompts: 2}}]
  train: {num_workers: 8}  # overrides every run's training preset
  model: ViT-B-16-quickgelu
  pretrained: openai

examples:
  pmpo sweep base2new_11 --dry-run
  pmpo sweep base2new_11
  torchrun --nproc_per_node=8 -m pmpo sweep base2new_11
"""

KEYS = {"protocol", "root", "out", "shots", "seeds", "datasets", "methods", "train", "model", "pretrained",
        "targets", "target_root"}


@dataclass
class MethodSpec:
    name: str
    method: str
    config: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)


@dataclass
class Sweep:
    protocol: str
    root: str
    out: str
    shots: Any
    seeds: list[int]
    datasets: list[str]
    methods: list[MethodSpec]
    train: dict[str, Any]
    model: str | None
    pretrained: str | None
    targets: list[str] | None
    target_root: str | None


def _expand(value: str | None) -> str | None:
    return os.path.expanduser(os.path.expandvars(value)) if isinstance(value, str) else value


def load_sweep(path: str | Path, root: str | None = None, out: str | None = None) -> Sweep:
    """Read and check a sweep file (a path, or the name of a preset in pmpo/configs/sweeps/);
    ``root`` / ``out`` replace the file's (the command line's --root / --out)."""
    path = preset_file("sweeps", path)
    data = read_yaml_mapping(path, "sweep file")
    unknown = sorted(set(data) - KEYS)
    if unknown:
        raise InputError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(KEYS))}")
    for key in ("root", "datasets", "methods"):
        if not data.get(key):
            raise InputError(f"{path}: '{key}' is required")
    protocol = data.get("protocol", "base2new")
    if protocol not in PROTOCOLS:
        raise InputError(f"{path}: protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    root = _expand(str(root or data["root"]))
    if "$" in root:
        raise InputError(f"{path}: root {data['root']!r} names an unset environment variable (or pass --root)")
    methods = []
    for m in data["methods"]:
        if isinstance(m, str):
            methods.append(MethodSpec(m, m))
        elif isinstance(m, dict) and "method" in m:
            extra = sorted(set(m) - {"name", "method", "config", "train"})
            if extra:
                raise InputError(f"{path}: method entry {m} has unknown key(s) {', '.join(extra)}")
            methods.append(MethodSpec(m.get("name", m["method"]), m["method"], m.get("config") or {}, m.get("train") or {}))
        else:
            raise InputError(f"{path}: a method is a preset name or {{name, method, config, train}}, got {m!r}")
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise InputError(f"{path}: method names must be unique, got {names}")
    seeds = data.get("seeds", [1, 2, 3])
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    return Sweep(
        protocol=protocol, root=root, out=_expand(str(out or data.get("out", "runs"))), shots=data.get("shots", 16),
        seeds=[int(s) for s in seeds], datasets=[resolve_dataset_name(d) for d in data["datasets"]],
        methods=methods, train=data.get("train") or {}, model=data.get("model"), pretrained=data.get("pretrained"),
        targets=data.get("targets"), target_root=_expand(data.get("target_root")),
    )


def sweep_recipe(sweep: Sweep, spec: MethodSpec, dataset: str):
    """One run's recipe: the method's own (pmpo.recipes) with the sweep's and the entry's options on top."""
    from ..recipes import resolve_recipe

    options = {**spec.config, **({"model": sweep.model} if sweep.model else {}),
               **({"pretrained": sweep.pretrained} if sweep.pretrained else {})}
    return resolve_recipe(spec.method, sweep.protocol, dataset, parse_shots(sweep.shots), model_options=options,
                          train_options={**sweep.train, **spec.train})


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep", help=SUMMARIES["sweep"],
        description="Run every combination of a sweep file; finished runs are skipped, unfinished ones resumed.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("sweep", help="sweep YAML (e.g. pmpo/configs/sweeps/base2new_11.yaml)")
    p.add_argument("--root", help="override the data root of the file")
    p.add_argument("--out", help="override the output root of the file")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state, run nothing")
    p.add_argument("--stop-on-error", action="store_true", help="stop at the first failing run (default: go on)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    sweep = load_sweep(args.sweep, root=args.root, out=args.out)
    root, out = sweep.root, sweep.out
    jobs = [(d, m, s) for d in sweep.datasets for m in sweep.methods for s in sweep.seeds]
    if args.dry_run:
        for d, m, s in jobs:
            folder = run_dir(out, sweep.protocol, d, m.name, sweep.shots, s)
            state = "done" if read_finished(folder) else ("partial" if folder.exists() else "todo")
            print(f"{state:8s} {folder}")
        return 0

    device = pdist.init_from_env(args.device)
    main = pdist.info().is_main
    say = (lambda msg: print(msg, file=sys.stderr)) if main else (lambda msg: None)
    backbone, loaded = None, None
    failed, skipped, ran = [], 0, 0
    try:
        for i, (dataset, spec, seed) in enumerate(jobs, 1):
            folder = run_dir(out, sweep.protocol, dataset, spec.name, sweep.shots, seed)
            if pdist.broadcast_object(read_finished(folder)) is not None:
                skipped += 1
                continue
            say(f"[{i}/{len(jobs)}] {folder}")
            try:
                recipe = sweep_recipe(sweep, spec, dataset)
                cfg, train_cfg = recipe.model, recipe.train
                # Compare with the spec as written, not the loader's resolved path, so a relative
                # local-dir: loads once per sweep.
                wanted = (cfg.model, cfg.pretrained or "none", cfg.quick_gelu)
                if backbone is None or wanted != loaded:
                    from ..backbone import load_backbone

                    backbone = load_backbone(cfg.model, cfg.pretrained, device=device, quick_gelu=cfg.quick_gelu)
                    loaded = wanted
                run_protocol(sweep.protocol, dataset, root, cfg, train_cfg, folder, shots=sweep.shots, seed=seed,
                             name=spec.name, targets=sweep.targets, target_root=sweep.target_root,
                             target_templates=recipe.target_templates, recipe=recipe.to_dict(),
                             device=device, backbone=backbone,
                             resume=True, log=say)
                ran += 1
            except PMPOError as exc:
                if args.stop_on_error or pdist.info().enabled:
                    raise  # under torchrun all processes must stop together
                failed.append(f"{folder}: {exc}")
                say(f"  failed: {exc}")
    finally:
        pdist.shutdown()
    if not main:
        return 0
    print(f"sweep: {ran} run(s) done, {skipped} already finished, {len(failed)} failed", file=sys.stderr)
    finished = [run_dir(out, sweep.protocol, d, m.name, sweep.shots, s) / "result.json" for d, m, s in jobs]
    finished = [f for f in finished if f.is_file()]
    if finished:
        print(render(build_tables(load_results(finished), reference=sweep.protocol == "base2new"), "md"), end="")
    if failed:
        raise InputError(f"{len(failed)} run(s) failed; first: {failed[0]}")
    return 0
