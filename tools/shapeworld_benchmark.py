"""The ShapeWorld benchmark in one command: run its two sweeps, then write the tables into
docs/SHAPEWORLD.md and the README's summary table (between ``<!-- shapeworld:... -->`` markers).

    python tools/shapeworld_benchmark.py                 # run (resumable) + rewrite the doc's tables
    python tools/shapeworld_benchmark.py --tables-only   # only rewrite the tables from finished runs
    python tools/shapeworld_benchmark.py --probe-only    # only the linear-probe reference (no training)

Running is ``pmpo sweep`` on pmpo/configs/sweeps/shapeworld.yaml and shapeworld_ablations.yaml
(finished runs are skipped, so after retraining the offline model delete ``runs/shapeworld``
first); tables are ``pmpo table``'s (mean ± std over seeds, HM of the seed-averaged base/new).
This script only adds what the doc needs beside them: which model produced the numbers, the
linear-probe reference (how much the frozen features carry, ``pmpo.probe``), and the wall time
of every run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pmpo.backbone import resolve_model_name  # noqa: E402
from pmpo.cli import main as pmpo_main  # noqa: E402
from pmpo.commands.sweep import Sweep, load_sweep  # noqa: E402
from pmpo.errors import PMPOError  # noqa: E402
from pmpo.protocols import RESULT_FILE, run_dir  # noqa: E402
from pmpo.results import aggregate, build_tables, load_results, render  # noqa: E402

SWEEPS = (REPO / "pmpo" / "configs" / "sweeps" / "shapeworld.yaml", REPO / "pmpo" / "configs" / "sweeps" / "shapeworld_ablations.yaml")
DOC = REPO / "docs" / "SHAPEWORLD.md"
README = REPO / "README.md"
SECTIONS = ("model", "benchmark", "probe", "ablations", "times")
README_SECTION = "summary"  # the README's short table, between <!-- shapeworld:summary --> markers


def result_files(sweep: Sweep) -> list[Path]:
    """The finished runs of a sweep, in sweep order."""
    files = [run_dir(sweep.out, sweep.protocol, d, m.name, sweep.shots, s) / RESULT_FILE
             for d in sweep.datasets for m in sweep.methods for s in sweep.seeds]
    return [f for f in files if f.is_file()]


def table_markdown(results: list[dict]) -> str:
    text = render(build_tables(results, protocol="base2new"), "md")
    return re.sub(r"^### .*\n\n", "", text)  # the doc has its own headings


def summary_markdown(results: list[dict]) -> str:
    """The README's table: per method, in sweep order, ``pmpo table``'s seed-mean base / new accuracy
    and HM of those means, and the base gain over zero-shot."""
    order = list(dict.fromkeys(r["name"] for r in results))
    rows = sorted(aggregate(results), key=lambda row: order.index(row.name))
    zs = next((row.metrics["base"].mean for row in rows if row.name == "zeroshot"), None)
    out = ["| Method | Seeds | Base | New | HM | Base − zero-shot |", "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        base, new, hm = (row.metrics[m].mean for m in ("base", "new", "hm"))
        gain = "–" if zs is None or row.name == "zeroshot" else f"{base - zs:+.1f}"
        out.append(f"| {row.name} | {len(row.seeds)} | {base:.2f} | {new:.2f} | {hm:.2f} | {gain} |")
    return "\n".join(out) + "\n"


def model_markdown(results: list[dict]) -> str:
    """Which backbone the runs used, with its recorded zero-shot numbers and a weights hash."""
    models = sorted({r["backbone"]["model"] for r in results})
    lines = []
    for spec in models:
        folder = Path(resolve_model_name(spec).removeprefix("local-dir:"))  # a shipped model is recorded by name
        weights = folder / "open_clip_model.safetensors"
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:12] if weights.is_file() else "?"
        lines.append(f"Backbone `{_repo_relative(folder)}` (weights sha256 `{digest}…`).")
        stale = stale_runs(results, weights)
        if stale:
            lines.append(f"**Warning: {len(stale)} run(s) finished before these weights were written** (e.g. "
                         f"`{_repo_relative(Path(stale[0]))}`): they may come from an older model. Delete "
                         "`runs/shapeworld/` and rerun.")
            print(f"warning: {len(stale)} run(s) predate {weights}; delete runs/shapeworld and rerun", file=sys.stderr)
        record = folder / "eval.json"
        if record.is_file():
            ev = json.loads(record.read_text(encoding="utf-8"))
            stages, tr = [], ev.get("training", {})
            while tr:  # a stage records the one it continued from
                stages.insert(0, tr.get("steps", "?"))
                tr = tr.get("continued_from") or {}
            lines.append(f"Its `eval.json`: pretraining stage(s) of {' + '.join(map(str, stages))} steps; "
                         "zero-shot on its own fixed eval set (`generate_eval_set(seed=1234)`), base/new/HM: "
                         + "; ".join(f"{k} {ev[k]['base']:.2f}/{ev[k]['new']:.2f}/{ev[k]['hm']:.2f}"
                                     for k in ("downstream", "sketch") if k in ev) + ".")
    commits = sorted({(r.get("git_commit") or "?")[:10] for r in results})
    versions = results[0].get("versions", {}) if results else {}
    lines.append(f"Code: commit(s) {', '.join(commits)}; torch {versions.get('torch', '?')}, "
                 f"open_clip {versions.get('open_clip', '?')}; device {results[0].get('device', '?') if results else '?'}.")
    return "\n".join(lines) + "\n"


def probe_markdown(sweep: Sweep, device: str = "cpu") -> str:
    """The linear-probe reference row (``pmpo.probe``): per seed, logistic regression on the frozen
    image features of that seed's 16-shot train split of each half, C chosen on its val split,
    scored on the half's test split; beside it zero-shot on the same test images."""
    import statistics as st

    from pmpo import PMPOConfig, build_model
    from pmpo.data import build_dataset, sample_few_shot, subsample_classes
    from pmpo.engine import evaluate
    from pmpo.probe import linear_probe

    model = build_model(PMPOConfig(method="zeroshot", model=sweep.model, pretrained=sweep.pretrained), device=device)
    splits = build_dataset(sweep.datasets[0], sweep.root)
    rows: dict[str, dict[str, list[float]]] = {"zero-shot": {"base": [], "new": []},
                                               "linear probe": {"base": [], "new": []}}
    chosen = []
    for seed in sweep.seeds:
        fewshot = sample_few_shot(splits, sweep.shots, seed)
        for half in ("base", "new"):
            part = subsample_classes(fewshot, half)
            res = linear_probe(model, part.train, part.val, part.test)
            rows["linear probe"][half].append(res.accuracy)
            chosen.append(res.C)
            if seed == sweep.seeds[0]:  # zero-shot does not depend on the seed
                rows["zero-shot"][half].append(evaluate(model, part.test, part.classnames, batch_size=400).accuracy)
    out = ["| Reference | Seeds | Base | New | Base − zero-shot base |", "|---|---:|---:|---:|---:|"]
    zs_base = rows["zero-shot"]["base"][0]
    for name, r in rows.items():
        cells = []
        for half in ("base", "new"):
            v = r[half]
            cells.append(f"{st.mean(v):.2f} ± {st.pstdev(v):.2f}" if len(v) > 1 else f"{v[0]:.2f}")
        gain = st.mean(r["base"]) - zs_base
        out.append(f"| {name} | {len(r['base'])} | {cells[0]} | {cells[1]} | {gain:+.2f} |")
    out.append(f"\nProbe: `pmpo.probe.linear_probe` — scikit-learn logistic regression (L-BFGS) on the normalised, "
               f"unprompted image features (eval transform, no augmentation) of each seed's {sweep.shots}-shot train "
               f"split of the half, C ∈ {{0.01, 0.1, 1, 10, 100}} chosen on that seed's val split (chosen: "
               f"{', '.join(f'{c:g}' for c in chosen)}), scored on the half's test split (800 images). New-class "
               "probes are trained on the new classes' own shots, so they measure the features, not generalisation. "
               "std over seeds is the population std (ddof 0); where a dataset has no more than K train images per "
               "class (ShapeWorld: 16) every seed draws all of them, so seeds differ only in order.")
    return "\n".join(out) + "\n"


def stale_runs(results: list[dict], weights: Path) -> list[str]:
    """Result files older than the backbone weights: run with whatever model was there before.

    result.json records the backbone's path, not its contents, so a retrained model in the same
    folder is only visible through file times.
    """
    if not weights.is_file():
        return []
    written = weights.stat().st_mtime
    return [r["_path"] for r in results if Path(r["_path"]).stat().st_mtime < written]


def times_markdown(results: list[dict]) -> str:
    """Wall time per run (seconds), per method: every seed, the mean, and the total."""
    by_name: dict[str, list[dict]] = {}
    for r in results:
        by_name.setdefault(r["name"], []).append(r)
    out = ["| Method | Seeds | Wall time per run (s) | Mean (s) | Train img/s |", "|---|---:|---|---:|---:|"]
    for name, runs in by_name.items():
        runs.sort(key=lambda r: r["seed"])
        walls = [r["wall_time_s"] for r in runs]
        ips = [r["images_per_s"] for r in runs if r.get("images_per_s")]
        out.append(f"| {name} | {len(runs)} | {', '.join(f'{w:.0f}' for w in walls)} | {statistics.mean(walls):.0f} | "
                   f"{statistics.mean(ips):.0f} |" if ips else
                   f"| {name} | {len(runs)} | {', '.join(f'{w:.0f}' for w in walls)} | {statistics.mean(walls):.0f} | – |")
    total = sum(r["wall_time_s"] for r in results)
    out.append(f"\nTotal: {total:.0f} s ({total / 60:.1f} min) for {len(results)} runs, measured on the machine "
               "and load they ran on.")
    return "\n".join(out) + "\n"


def _repo_relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def replace_section(text: str, section: str, body: str) -> str:
    start, end = f"<!-- shapeworld:{section} -->", f"<!-- /shapeworld:{section} -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise PMPOError(f"{DOC.name} has no '{start}' ... '{end}' markers; add them where the {section} table goes")
    return pattern.sub(lambda _m: f"{start}\n{body.rstrip()}\n{end}", text)


def write_readme(readme: Path, sweeps: Sequence[Sweep]) -> None:
    """Rewrite the README's summary table from the finished runs of the benchmark sweep."""
    bench = load_results(result_files(sweeps[0])) if result_files(sweeps[0]) else []
    if not bench:
        raise PMPOError("no finished benchmark runs; run this script without --tables-only first")
    readme.write_text(replace_section(readme.read_text(encoding="utf-8"), README_SECTION, summary_markdown(bench)),
                      encoding="utf-8")


def write_doc(doc: Path, sweeps: Sequence[Sweep], probe: bool = True) -> None:
    bench, ablations = (load_results(result_files(s)) if result_files(s) else [] for s in sweeps)
    if not bench:
        raise PMPOError("no finished benchmark runs; run this script without --tables-only first")
    names = {m.name for m in sweeps[0].methods}
    every = bench + [r for r in ablations if r["name"] not in names]
    text = doc.read_text(encoding="utf-8")
    text = replace_section(text, "model", model_markdown(every))
    text = replace_section(text, "benchmark", table_markdown(bench))
    if probe:
        text = replace_section(text, "probe", probe_markdown(sweeps[0]))
    if ablations:
        text = replace_section(text, "ablations", table_markdown(ablations))
    text = replace_section(text, "times", times_markdown(every))
    doc.write_text(text, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tables-only", action="store_true", help="do not run; rewrite the tables from finished runs")
    p.add_argument("--skip-ablations", action="store_true", help="run only the five-method benchmark")
    p.add_argument("--no-probe", action="store_true", help="leave the linear-probe reference table as it is")
    p.add_argument("--probe-only", action="store_true", help="only (re)write the linear-probe reference table")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--doc", default=str(DOC), help=f"document to update (default: {_repo_relative(DOC)})")
    p.add_argument("--readme", default=str(README),
                   help=f"file whose '{README_SECTION}' table to update (default: {_repo_relative(README)})")
    args = p.parse_args(argv)
    doc = Path(args.doc).resolve()
    os.chdir(REPO)  # the sweep files name data/, runs/ and checkpoints/ relative to the repo root
    try:
        sweeps = [load_sweep(s) for s in SWEEPS]
        if args.probe_only:
            doc.write_text(replace_section(doc.read_text(encoding="utf-8"), "probe", probe_markdown(sweeps[0])),
                           encoding="utf-8")
            print(f"probe table written to {doc}", file=sys.stderr)
            return 0
        if not args.tables_only:
            for path in SWEEPS[:1] if args.skip_ablations else SWEEPS:
                if pmpo_main(["sweep", str(path), "--device", args.device]) != 0:
                    return 1
        write_doc(doc, sweeps, probe=not args.no_probe)
        write_readme(Path(args.readme).resolve(), sweeps)
    except PMPOError as exc:
        print(f"shapeworld_benchmark: error: {exc}", file=sys.stderr)
        return 1
    print(f"tables written to {doc} and {args.readme}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
