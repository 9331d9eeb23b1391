"""The Benchmarks tab: published reference numbers next to this project's own result files.

The reference numbers live once, in :mod:`pmpo.reference`; run results are the ``result.json``
files that :func:`pmpo.protocols.run_protocol` writes, aggregated by :mod:`pmpo.results` exactly
as the command line's tables are. This module only arranges them into frames and one plot.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from pmpo.errors import InputError

from .inputs import split_lines_or_commas

# Result folders are read relative to the directory the app runs in (the Space's checkout; a user's
# project folder), not to where the package is installed.
RESULT_DIRS = ("results", "docs/results", "runs")


@dataclass
class BenchView:
    status: str
    reference: pd.DataFrame
    ours: pd.DataFrame
    figure: Figure | None


def default_dirs() -> list[str]:
    return [d for d in RESULT_DIRS if (Path.cwd().resolve() / d).is_dir()] or [RESULT_DIRS[0]]


def reference_frame() -> pd.DataFrame:
    """Published base-to-new averages (11 datasets, ViT-B/16, 16 shots) from :mod:`pmpo.reference`."""
    from pmpo.reference import base2new_reference

    rows = [{"method": r.label, "base": r.base, "new": r.new, "hm": r.hm, "source": r.source} for r in base2new_reference()]
    return pd.DataFrame(rows, columns=["method", "base", "new", "hm", "source"])


def result_frame(dirs: list[Path]) -> tuple[pd.DataFrame, int]:
    """The tables :func:`pmpo.results.build_tables` makes (seed mean ± std, dataset average) as one frame."""
    from pmpo.results import _cell, build_tables, find_result_files, load_results

    files = find_result_files([d for d in dirs if d.exists()])
    if not files:
        return pd.DataFrame(columns=["table", "Dataset", "Method", "Seeds", "Base", "New", "HM", "datasets"]), 0
    rows = []
    for table in build_tables(load_results(files)):
        header = table.header()
        for group in table.groups:
            for r in group:
                cells = [r.dataset, r.name, len(r.seeds) or "–", *[_cell(r.metrics.get(m)) for m in table.metrics]]
                rows.append({"table": table.title, **dict(zip(header, cells)),
                             "datasets": r.n_datasets if r.dataset == "average" else 1})
    return pd.DataFrame(rows), len(files)


PAPER_GROUP = "11-dataset average, base2new, 16 shots"  # what the papers' rows are
N_BENCHMARK_DATASETS = 11


def _hm(value) -> float | None:
    text = str(value)
    return None if text in ("–", "nan", "None", "") else float(text.split(" ")[0])


def hm_groups(ours: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Our base-to-new harmonic means, grouped so that only like is compared with like: the
    papers' group holds dataset averages over all 11 benchmark datasets at 16 shots; every other
    run is shown per (dataset, protocol, shots), never averaged with unrelated runs (a 2-shot
    ShapeWorld run and a 16-shot ImageFolder run have nothing to average)."""
    groups: dict[str, dict[str, float]] = {}
    if ours.empty or "HM" not in ours:
        return groups
    b2n = ours[ours["table"].str.startswith("base2new")]
    for _, row in b2n.iterrows():
        hm = _hm(row["HM"])
        if hm is None:
            continue
        if row["Dataset"] == "average":
            if row["table"] == "base2new, 16 shots" and int(row.get("datasets", 0)) == N_BENCHMARK_DATASETS:
                groups.setdefault(PAPER_GROUP, {})[str(row["Method"])] = hm
            continue  # a partial average mixes whatever datasets were run: not shown as a bar
        groups.setdefault(f"{row['Dataset']} ({row['table']})", {})[str(row["Method"])] = hm
    return groups


MAX_PATH_CHARS = 1024


def resolve_dirs(text: str) -> list[Path]:
    dirs, here = [], Path.cwd().resolve()
    for part in split_lines_or_commas(text or ""):
        if len(part) > MAX_PATH_CHARS:
            raise InputError(f"A result folder's name of {len(part)} characters is not a folder name (limit {MAX_PATH_CHARS}).")
        path = Path(part).expanduser()
        try:
            path = (path if path.is_absolute() else here / path).resolve()
        except OSError as exc:
            raise InputError(f"{part[:80]!r} is not a readable folder name ({exc.strerror or exc}).") from exc
        if not path.is_relative_to(here) and os.environ.get("SPACE_ID"):
            raise InputError(f"On a public Space only folders inside the project can be read, not {part!r}.")
        dirs.append(path)
    if not dirs:
        raise InputError("Give at least one result folder.")
    return dirs


def build_view(text: str) -> BenchView:
    dirs = resolve_dirs(text)
    ref = reference_frame()
    ours, n_files = result_frame(dirs)
    here = Path.cwd().resolve()
    where = ", ".join(str(d.relative_to(here)) if d.is_relative_to(here) else str(d) for d in dirs)
    status = f"{len(ref)} reference rows; {n_files} result.json file(s) in {where}."
    if not n_files:
        status += " No runs yet: the benchmark protocols (see the README) write result.json files there."
    else:
        groups = hm_groups(ours)
        beside = ", ".join(groups.get(PAPER_GROUP, {})) or "none (no run covers all 11 datasets at 16 shots)"
        own = [g for g in groups if g != PAPER_GROUP]
        status += (f" Beside the papers' 11-dataset averages: {beside}."
                   + (f" In their own panels (not comparable with the papers): {'; '.join(own)}." if own else ""))
    return BenchView(status, ref, ours, comparison_figure(ref, ours))


MAX_PANELS = 6


def comparison_figure(ref: pd.DataFrame, ours: pd.DataFrame) -> Figure:
    """Harmonic means, one panel per comparable group: the papers' 11-dataset averages (with ours
    only when they are averages over the same 11 datasets at 16 shots), then each of our own
    (dataset, protocol, shots) groups alone."""
    groups = hm_groups(ours)
    panels = [(PAPER_GROUP, [(f"{m} (paper)", float(v), "#9e9e9e") for m, v in zip(ref["method"], ref["hm"])]
               + [(f"{m} (ours)", v, "#d62728") for m, v in groups.get(PAPER_GROUP, {}).items()])]
    panels += [(g, [(m, v, "#d62728") for m, v in bars.items()]) for g, bars in groups.items() if g != PAPER_GROUP]
    panels = panels[:MAX_PANELS]
    widths = [max(2, len(bars)) for _, bars in panels]
    fig = Figure(figsize=(min(14, 2.2 + 0.55 * sum(widths)), 3.4), dpi=80, layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False, width_ratios=widths)[0]
    for ax, (title, bars) in zip(axes, panels):
        ax.bar(range(len(bars)), [v for _, v, _ in bars], color=[c for _, _, c in bars])
        for i, (_, v, _) in enumerate(bars):
            ax.text(i, v + 0.5, f"{v:.1f}", ha="center", fontsize=7)
        ax.set_xticks(range(len(bars)), [label for label, _, _ in bars], fontsize=7, rotation=30, ha="right")
        ax.set_title(title, fontsize=8)
        ax.set_ylim(0, 100)
    axes[0].set_ylabel("harmonic mean (base/new) %")
    return fig
