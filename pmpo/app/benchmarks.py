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
        return pd.DataFrame(columns=["table", "Dataset", "Method", "Seeds", "Base", "New", "HM"]), 0
    rows = []
    for table in build_tables(load_results(files)):
        header = table.header()
        for group in table.groups:
            for r in group:
                cells = [r.dataset, r.name, len(r.seeds) or "–", *[_cell(r.metrics.get(m)) for m in table.metrics]]
                rows.append({"table": table.title, **dict(zip(header, cells))})
    return pd.DataFrame(rows), len(files)


def hm_by_method(ours: pd.DataFrame) -> dict[str, float]:
    """Our harmonic means of base-to-new runs per method (the dataset-average row when there is one)."""
    if ours.empty or "HM" not in ours:
        return {}
    b2n = ours[ours["table"].str.startswith("base2new")]
    out: dict[str, float] = {}
    for method, group in b2n.groupby("Method", sort=False):
        avg = group[group["Dataset"] == "average"]
        pick = avg if not avg.empty else group
        values = [float(str(v).split(" ")[0]) for v in pick["HM"] if str(v) not in ("–", "nan")]
        if values:
            out[str(method)] = sum(values) / len(values)
    return out


def resolve_dirs(text: str) -> list[Path]:
    dirs = []
    for part in split_lines_or_commas(text or ""):
        path = Path(part).expanduser()
        path = (path if path.is_absolute() else Path.cwd().resolve() / path).resolve()
        if not path.is_relative_to(Path.cwd().resolve()) and os.environ.get("SPACE_ID"):
            raise InputError(f"On a public Space only folders inside the project can be read, not {part!r}.")
        dirs.append(path)
    if not dirs:
        raise InputError("Give at least one result folder.")
    return dirs


def build_view(text: str) -> BenchView:
    dirs = resolve_dirs(text)
    ref = reference_frame()
    ours, n_files = result_frame(dirs)
    status = (f"{len(ref)} reference rows; {n_files} result.json file(s) in "
              f"{', '.join(str(d.relative_to(Path.cwd().resolve())) if d.is_relative_to(Path.cwd().resolve()) else str(d) for d in dirs)}.")
    if not n_files:
        status += " No runs yet: the benchmark protocols (see the README) write result.json files there."
    return BenchView(status, ref, ours, comparison_figure(ref, ours))


def comparison_figure(ref: pd.DataFrame, ours: pd.DataFrame) -> Figure:
    """Harmonic mean: each published method, then each of our methods (base-to-new runs)."""
    fig = Figure(figsize=(8, 3.2), dpi=80, layout="constrained")
    ax = fig.subplots()
    labels = [f"{m} (paper)" for m in ref["method"]]
    values = [float(v) for v in ref["hm"]]
    colours = ["#9e9e9e"] * len(labels)
    for method, hm in hm_by_method(ours).items():
        labels.append(f"{method} (ours)")
        values.append(hm)
        colours.append("#d62728")
    ax.bar(range(len(labels)), values, color=colours)
    for i, v in enumerate(values):
        ax.text(i, v + 0.5, f"{v:.1f}", ha="center", fontsize=7)
    ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("harmonic mean (base/new) %")
    ax.set_ylim(0, 100)
    return fig
