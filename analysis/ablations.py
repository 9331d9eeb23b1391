"""Ablations: sweep the reconstruction's uncertain choices one at a time, then plot base/new/HM.

The paper body is not available, so N, the partition scheme, the coupling and the prior weight α
are *our* choices (DESIGN.md §2); this is the tool that shows how much each one matters. A sweep
is a YAML file (``pmpo/configs/ablations/shapeworld.yaml``): a base configuration, a protocol, seeds
and ``factors`` — each factor is varied over its values with every other option at the base
value (one factor at a time, the usual ablation table, not a full grid). Variants equal to the
base configuration are run once and shared.

Runs go through :func:`pmpo.protocols.run_protocol` into ``<out>/runs/<variant>/seed_<s>/``;
a run whose ``result.json`` exists is skipped, so an interrupted sweep resumes where it stopped.
Plotting reads only ``result.json`` files (``plot`` works on any folder of them): a run named
``base`` or ``<factor>=<value>`` is a point of that factor's curve, its x value read from the
stored config. Aggregation (seed means, HM of the seed-averaged base and new) is
:mod:`pmpo.results`' own.

    python -m pmpo.analysis.ablations run shapeworld --out runs/ablations
    python -m pmpo.analysis.ablations plot runs/ablations --out figs/ablations
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pmpo.config import PMPOConfig, default_alpha, preset_file
from pmpo.errors import InputError
from pmpo.io import read_yaml_mapping

from . import common, style

NAME = "ablations"
DESCRIPTION = "Run a one-factor-at-a-time ablation sweep from YAML (resumable) and plot base/new/HM per factor."
BASE = "base"
SWEEP_FILE = "sweep.json"
METRICS = {"base2new": ("base", "new", "hm"), "fewshot": ("all",)}
METRIC_STYLE = {"base": ("Base", "#0072B2", "o"), "new": ("New", "#D55E00", "s"),
                "hm": ("HM", "#000000", "D"), "all": ("Accuracy", "#0072B2", "o")}


# --- the sweep -----------------------------------------------------------------------------------

@dataclass
class Sweep:
    name: str
    protocol: str
    dataset: str
    root: str
    shots: int | str
    seeds: list[int]
    model: dict[str, Any]  # PMPOConfig fields of the base configuration
    train: dict[str, Any]  # TrainConfig overrides (on top of the method's training preset)
    factors: dict[str, list[Any]]
    device: str = "auto"


@dataclass
class Variant:
    name: str  # "base" or "<factor>=<value>"
    overrides: dict[str, Any]
    config: PMPOConfig


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep YAML (a path, or the name of a preset in pmpo/configs/ablations/);
    every factor must be a PMPOConfig field."""
    path = preset_file("ablations", path)
    data = read_yaml_mapping(path, "sweep")
    known = {"name", "protocol", "dataset", "root", "shots", "seeds", "model", "train", "factors", "device"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InputError(f"sweep {path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    for key in ("protocol", "dataset", "factors"):
        if key not in data:
            raise InputError(f"sweep {path} needs '{key}'")
    if data["protocol"] not in METRICS:
        raise InputError(f"sweep {path}: protocol must be one of {', '.join(METRICS)} (ablations compare "
                         f"within one dataset), got {data['protocol']!r}")
    fields = {f.name for f in dataclasses.fields(PMPOConfig)}
    factors = data["factors"]
    if not isinstance(factors, dict) or not factors:
        raise InputError(f"sweep {path}: 'factors' must map config options to lists of values")
    for f, values in factors.items():
        if f not in fields or f in ("method", "model", "pretrained"):
            raise InputError(f"sweep {path}: factor {f!r} is not a prompt option of PMPOConfig")
        if not isinstance(values, list) or not values:
            raise InputError(f"sweep {path}: factor {f!r} needs a non-empty list of values")
    seeds = data.get("seeds", [1, 2, 3])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise InputError(f"sweep {path}: 'seeds' must be a list of integers")
    model = dict(data.get("model") or {})
    if model.pop("offline", False):
        from pmpo.backbone import OFFLINE_MODEL

        model["model"] = OFFLINE_MODEL
        model.setdefault("pretrained", "none")
    return Sweep(name=data.get("name", path.stem), protocol=data["protocol"], dataset=data["dataset"],
                 root=str(data.get("root", "data")), shots=data.get("shots", 16), seeds=seeds, model=model,
                 train=dict(data.get("train") or {}), factors=factors, device=str(data.get("device", "auto")))


def _value_name(value: Any) -> str:
    return json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else str(value)


def _config_key(cfg: PMPOConfig) -> str:
    """Identity of a configuration; floats to 6 decimals so ``alpha: 0.333333`` is the base's 1/3."""
    return json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in cfg.to_dict().items()}, sort_keys=True)


def variants(sweep: Sweep) -> list[Variant]:
    """The base configuration, then each factor value that changes it (duplicates of the base dropped)."""
    base = PMPOConfig(**sweep.model)
    out = [Variant(BASE, {}, base)]
    seen = {_config_key(base): BASE}
    for factor, values in sweep.factors.items():
        for value in values:
            cfg = PMPOConfig(**{**sweep.model, factor: value})
            key = _config_key(cfg)
            if key in seen:
                continue
            seen[key] = f"{factor}={_value_name(value)}"
            out.append(Variant(seen[key], {factor: value}, cfg))
    return out


def run_sweep(sweep: Sweep, out: str | Path, log=print) -> list[Path]:
    """Run every (variant, seed) without a result yet; returns the result files of the sweep."""
    from pmpo.backbone import load_backbone
    from pmpo.device import resolve_device
    from pmpo.engine import load_train_preset
    from pmpo.protocols import RESULT_FILE, read_finished, run_protocol

    out = Path(out)
    todo = variants(sweep)
    device = resolve_device(sweep.device)
    (out).mkdir(parents=True, exist_ok=True)
    (out / SWEEP_FILE).write_text(json.dumps(dataclasses.asdict(sweep), indent=2), encoding="utf-8")
    train_cfg = load_train_preset(todo[0].config.method, sweep.protocol, sweep.dataset, **sweep.train)
    backbone = None
    files = []
    total = len(todo) * len(sweep.seeds)
    for k, (variant, seed) in enumerate(((v, s) for v in todo for s in sweep.seeds), start=1):
        folder = out / "runs" / variant.name / f"seed_{seed}"
        files.append(folder / RESULT_FILE)
        if read_finished(folder) is not None:
            log(f"[{k}/{total}] {variant.name} seed {seed}: done earlier, skipped")
            continue
        if backbone is None:  # one frozen CLIP shared by every run
            base = todo[0].config
            backbone = load_backbone(base.model, base.pretrained, device=device, quick_gelu=base.quick_gelu)
        log(f"[{k}/{total}] {variant.name} seed {seed}: running")
        result = run_protocol(sweep.protocol, sweep.dataset, sweep.root, variant.config, train_cfg, folder,
                              shots=sweep.shots, seed=seed, name=variant.name, device=device,
                              backbone=backbone, resume=True)
        if result is not None:
            acc = {m: result["accuracy"].get(m) for m in METRICS[sweep.protocol]}
            log(f"[{k}/{total}] {variant.name} seed {seed}: " + ", ".join(f"{m} {v:.2f}" for m, v in acc.items() if v is not None))
    return files


# --- from result files to curves -------------------------------------------------------------------

@dataclass
class Point:
    dataset: str
    factor: str
    value: Any
    variant: str
    seeds: list[int]
    metrics: dict[str, tuple[float | None, float | None]]  # metric -> (mean, std over seeds)

    @property
    def is_base(self) -> bool:
        return self.variant == BASE


def _factor_of(name: str) -> str | None:
    return name.split("=", 1)[0] if "=" in name else None


def name_by_difference(results: Sequence[dict], base: str) -> tuple[list[dict], list[str]]:
    """Runs of any sweep, renamed as this module's runs: ``base`` becomes ``"base"``, and a run whose
    prompt config differs from the base run's in exactly one option becomes ``<option>=<value>``.

    So a sweep that names its runs its own way (the ShapeWorld benchmark's ``pmpo-n1``,
    ``pmpo-no-prior``, ...) plots without being rerun. An alpha that follows a changed ``n_prompts``
    (the default 1/(N+1) on both sides) is part of that one change, not a second one. Runs that
    differ in no option, in several, or in their training recipe (not a prompt option, so not a
    factor) are left out and returned by name, so the caller can say what was skipped."""
    base_runs = [r for r in results if r["name"] == base]
    if not base_runs:
        names = ", ".join(sorted({r["name"] for r in results})) or "none"
        raise InputError(f"--base {base!r}: no run has that name (runs: {names})")
    ref_cfg = base_runs[0].get("config") or {}
    ref_train = {k: v for k, v in (base_runs[0].get("train") or {}).items() if k != "seed"}
    renamed, skipped = [], []
    for r in results:
        if r["name"] == base:
            renamed.append({**r, "name": BASE})
            continue
        cfg = r.get("config") or {}
        diff = {k: v for k, v in cfg.items() if ref_cfg.get(k) != v}
        if "n_prompts" in diff and "alpha" in diff and all(
                isinstance(c.get("n_prompts"), int) and c.get("alpha") is not None
                and abs(c["alpha"] - default_alpha(c["n_prompts"])) < 1e-9 for c in (cfg, ref_cfg)):
            diff.pop("alpha")
        train = {k: v for k, v in (r.get("train") or {}).items() if k != "seed"}
        if len(diff) != 1 or train != ref_train:
            skipped.append(r["name"])
            continue
        (factor, value), = diff.items()
        renamed.append({**r, "name": f"{factor}={_value_name(value)}"})
    return renamed, sorted(set(skipped))


def collect_points(results: Sequence[dict], factors: Sequence[str] | None = None) -> list[Point]:
    """Curve points per (dataset, factor): the base run and the runs named ``<factor>=<value>``."""
    from pmpo.results import aggregate

    results = [r for r in results if r["protocol"] in METRICS]
    if not results:
        raise InputError(f"no base-to-new or few-shot results among the files (ablations need {', '.join(METRICS)})")
    named = [r for r in results if r["name"] == BASE or _factor_of(r["name"])]
    if not named:
        raise InputError("no ablation runs: result names must be 'base' or '<factor>=<value>' "
                         "(as python -m pmpo.analysis.ablations run writes them)")
    found = list(dict.fromkeys(f for r in named if (f := _factor_of(r["name"]))))
    factors = list(factors) if factors else found
    rows = {(row.dataset, row.name): row for row in aggregate(named)}
    by_run: dict[tuple[str, str], list[dict]] = {}
    for r in named:
        by_run.setdefault((r["dataset"], r["name"]), []).append(r)

    points = []
    for (dataset, name), runs in by_run.items():
        row = rows[(dataset, name)]
        metrics = METRICS[runs[0]["protocol"]]
        stats = {}
        for m in metrics:
            mean = row.metrics[m].mean if m in row.metrics else None
            per_seed = [r["accuracy"].get(m) for r in runs if r["accuracy"].get(m) is not None]
            std = float(np.std(per_seed)) if per_seed else 0.0  # population std (ddof 0), as pmpo.results; HM: spread of per-seed HMs
            stats[m] = (mean, std if mean is not None else None)
        owners = factors if name == BASE else [_factor_of(name)]
        for factor in owners:
            if factor not in factors:
                continue
            config = runs[0].get("config") or {}
            if factor not in config:
                raise InputError(f"{runs[0].get('_path', name)}: its config has no option {factor!r}")
            points.append(Point(dataset, factor, config[factor], name, row.seeds, stats))
    missing = [f for f in factors if not any(p.factor == f and not p.is_base for p in points)]
    if missing:
        raise InputError(f"no runs vary factor(s) {', '.join(missing)}; runs vary {', '.join(found) or 'nothing'}")
    points.sort(key=lambda p: (p.dataset, factors.index(p.factor), _sort_key(p.value)))
    return points


def _sort_key(value: Any) -> tuple:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return (1, _value_name(value))
    return (0, float(value))


def _tick(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return style.short_label(_value_name(value), 12)


def plot(points: Sequence[Point], out: Path) -> list[Path]:
    paths = []
    for dataset in dict.fromkeys(p.dataset for p in points):
        mine = [p for p in points if p.dataset == dataset]
        factors = list(dict.fromkeys(p.factor for p in mine))
        n = len(factors)
        width = style.COLUMN_WIDTH if n <= 2 else style.PAGE_WIDTH
        fig, axes = style.figure(width, aspect=1.6 / width, ncols=n, squeeze=False, sharey=True)
        for ax, factor in zip(axes[0], factors):
            pts = [p for p in mine if p.factor == factor]
            x = np.arange(len(pts))
            for m in pts[0].metrics:
                label, colour, marker = METRIC_STYLE[m]
                mean = np.array([p.metrics[m][0] if p.metrics[m][0] is not None else np.nan for p in pts], dtype=float)
                std = np.array([p.metrics[m][1] or 0.0 for p in pts], dtype=float)
                ax.errorbar(x, mean, yerr=std, color=colour, marker=marker, label=label,
                            linewidth=1.0 if m != "hm" else 1.4, markersize=3)
            for i, p in enumerate(pts):
                if p.is_base:
                    ax.axvspan(i - 0.35, i + 0.35, color="#000000", alpha=0.06, linewidth=0)
            ax.set_xticks(x, [_tick(p.value) for p in pts], rotation=30 if any(len(_tick(p.value)) > 5 for p in pts) else 0)
            ax.set_xlim(-0.5, len(pts) - 0.5)
            ax.set_xlabel(factor.replace("_", " "))
            ax.grid(True, axis="y")
        axes[0][0].set_ylabel(f"{style.short_label(dataset, 24)} accuracy (%)")
        handles, labels = axes[0][0].get_legend_handles_labels()
        # Shaded column = the base configuration; error bars = std over seeds (see the CSV).
        fig.legend(handles, labels, loc="upper center", ncol=len(labels), bbox_to_anchor=(0.5, 1.08))
        stem = "ablations" if len(set(p.dataset for p in points)) == 1 else f"ablations_{dataset}"
        paths += style.save_figure(fig, out, stem)
    return paths


def write_points(points: Sequence[Point], out: Path) -> Path:
    metrics = list(dict.fromkeys(m for p in points for m in p.metrics))
    rows = [{"dataset": p.dataset, "factor": p.factor, "value": _value_name(p.value), "variant": p.variant,
             "is_base": p.is_base, "seeds": " ".join(map(str, p.seeds)),
             **{f"{m}_{k}": v for m in metrics for k, v in zip(("mean", "std"), p.metrics.get(m, (None, None)))}}
            for p in points]
    columns = ["dataset", "factor", "value", "variant", "is_base", "seeds"] + [f"{m}_{k}" for m in metrics for k in ("mean", "std")]
    return style.write_csv(out / "ablations.csv", rows, columns)


# --- command line ------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="<action>", required=True)
    r = sub.add_parser("run", help="run the sweep of a YAML file (skips finished runs), then plot it")
    r.add_argument("sweep", help="sweep YAML, e.g. pmpo/configs/ablations/shapeworld.yaml")
    r.add_argument("--out", default="runs/ablations", help="folder for runs and figures (default: runs/ablations)")
    r.add_argument("--dry-run", action="store_true", help="list the runs and which are finished; run nothing")
    p = sub.add_parser("plot", help="plot from result.json files (folders are searched recursively)")
    p.add_argument("results", nargs="+", help="result.json files or folders holding them")
    p.add_argument("--factors", help="comma-separated factors to plot, in this order (default: all found)")
    p.add_argument("--base", help="name of the base run, for runs not named 'base' / '<factor>=<value>' (e.g. "
                                  "the ShapeWorld benchmark's: --base pmpo); each other run's factor is the one "
                                  "option its config changes")
    p.add_argument("--out", default=f"outputs/analysis/{NAME}", help=f"output folder (default: outputs/analysis/{NAME})")


def run(args: argparse.Namespace) -> list[Path]:
    from pmpo.results import load_results

    if args.action == "run":
        sweep = load_sweep(args.sweep)
        out = Path(args.out)
        if args.dry_run:
            from pmpo.protocols import read_finished

            for v in variants(sweep):
                for s in sweep.seeds:
                    done = read_finished(out / "runs" / v.name / f"seed_{s}") is not None
                    print(f"{'done' if done else 'todo'}  {v.name}  seed {s}", file=sys.stderr)
            return []
        files = run_sweep(sweep, out, log=lambda msg: print(msg, file=sys.stderr))
        results = load_results([f for f in files if f.is_file()])
        figures = out / "figures"
        factors = list(sweep.factors)
    else:
        results = load_results(args.results)
        if args.base:
            results, skipped = name_by_difference(results, args.base)
            if skipped:
                print(f"left out (not one prompt option away from {args.base!r}): {', '.join(skipped)}",
                      file=sys.stderr)
        figures = Path(args.out)
        factors = [f.strip() for f in args.factors.split(",") if f.strip()] if args.factors else None
    points = collect_points(results, factors)
    figures.mkdir(parents=True, exist_ok=True)
    return [write_points(points, figures)] + plot(points, figures)


def main(argv: Sequence[str] | None = None) -> int:
    return common.main_for(NAME, add_arguments, run, DESCRIPTION, argv)


if __name__ == "__main__":
    raise SystemExit(main())
