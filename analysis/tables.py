"""Paper tables from result files: base-to-new, few-shot, cross-dataset and domain generalisation.

The aggregation and rendering are :mod:`pmpo.results`' (mean ± std over seeds, HM of the
seed-averaged base and new accuracies, dataset averages as CoCoOp/MaPLe compute them, best value
per dataset and column in bold, published numbers from :mod:`pmpo.reference` as optional rows);
this module writes one file per protocol and format — ready to ``\\input`` into a paper or paste
into a README — and draws each table's summary group (the dataset average, or the only dataset)
as a bar chart, paper numbers hatched.

Outputs per protocol ``P``: ``table_P.tex`` (booktabs), ``table_P.md``, ``table_P.csv`` and
``table_P.{png,pdf}``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pmpo.errors import InputError

from . import common, style

NAME = "tables"
DESCRIPTION = "Base-to-new, cross-dataset and DG tables (LaTeX booktabs, Markdown, CSV) and bar charts from result files."


def summary_group(table) -> list:
    """The rows a figure shows: our dataset average when there is one, else our last dataset,
    followed by the published reference rows (when the table has them)."""
    ours = [g for g in table.groups if any(r.reference is None for r in g)]
    if not ours:
        return table.groups[-1]
    average = [g for g in ours if g[0].dataset == "average"]
    rows = [r for r in (average or ours)[-1] if r.reference is None]
    return rows + [r for g in table.groups for r in g if r.reference is not None]


def bar_colours(rows) -> list[str]:
    """One colour per row: published rows white (hatched), zero-shot CLIP black (it is the manual
    prior's prediction, black in every figure), and the palette in order for the rest, so up to
    ``len(style.PALETTE)`` trained methods beside zero-shot never share a colour."""
    colours, ours = [], 0
    for r in rows:
        if r.reference is not None:
            colours.append("#ffffff")
        elif r.name == "zeroshot":
            colours.append(style.PRIOR_COLOUR)
        else:
            colours.append(style.segment_colour(ours))
            ours += 1
    return colours


def plot_table(table, out: Path, stem: str) -> list[Path]:
    from pmpo.results import LABELS

    rows = summary_group(table)
    metrics = [m for m in table.metrics if any(r.metrics.get(m) and r.metrics[m].mean is not None for r in rows)]
    if not metrics:
        raise InputError(f"{table.title}: no numbers to plot")
    n = len(rows)
    width = style.COLUMN_WIDTH if len(metrics) * n <= 24 else style.PAGE_WIDTH
    fig, ax = style.figure(width, aspect=0.55 if width == style.COLUMN_WIDTH else 0.3)
    x = np.arange(len(metrics))
    bar = 0.8 / n
    for i, (r, colour) in enumerate(zip(rows, bar_colours(rows))):
        mean = [r.metrics[m].mean if r.metrics.get(m) and r.metrics[m].mean is not None else np.nan for m in metrics]
        std = [(r.metrics[m].std or 0.0) if r.metrics.get(m) and r.metrics[m].mean is not None else 0.0 for m in metrics]
        paper = r.reference is not None
        ax.bar(x - 0.4 + bar * (i + 0.5), mean, bar, yerr=None if paper else std, color=colour, label=r.name,
               edgecolor="#555555" if paper else colour, hatch="////" if paper else None, linewidth=0.4,
               error_kw={"linewidth": 0.6})
    ax.set_xticks(x, [LABELS.get(m, m) for m in metrics], rotation=30 if len(metrics) > 4 else 0)
    values = [r.metrics[m].mean for r in rows for m in metrics if r.metrics.get(m) and r.metrics[m].mean is not None]
    lo, hi = min(values), max(values)
    ax.set_ylim(max(0.0, lo - 0.15 * (hi - lo + 1) - 5), min(100.0, hi + 0.1 * (hi - lo + 1) + 2))
    ax.set_ylabel("accuracy (%)")
    label = rows[0].dataset if rows[0].dataset != "average" else f"average of {rows[0].n_datasets} datasets"
    if any(r.reference is not None for r in rows):
        label += "; hatched: papers (11-dataset average)"
    ax.set_title(f"{table.protocol}, {table.shots} shots: {label}")
    ax.grid(True, axis="y")
    ax.legend(ncol=min(4, n), loc="upper center", bbox_to_anchor=(0.5, -0.18 if len(metrics) <= 4 else -0.3))
    return style.save_figure(fig, out, stem)


def write_tables(results: Sequence[dict], out: Path, reference: bool = False,
                 protocols: Sequence[str] | None = None) -> list[Path]:
    from pmpo.results import build_tables, render

    present = list(dict.fromkeys(r["protocol"] for r in results))
    wanted = list(protocols) if protocols else present
    missing = [p for p in wanted if p not in present]
    if missing:
        raise InputError(f"no results of protocol(s) {', '.join(missing)}; the files hold {', '.join(present)}")
    paths = []
    for protocol in wanted:
        tables = build_tables(results, reference=reference, protocol=protocol)
        stem = f"table_{protocol}"
        for fmt, ext in (("latex", "tex"), ("md", "md"), ("csv", "csv")):
            path = out / f"{stem}.{ext}"
            path.write_text(render(tables, fmt), encoding="utf-8")
            paths.append(path)
        for table in tables:
            paths += plot_table(table, out, stem if len(tables) == 1 else f"{stem}_{table.shots}shots")
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", nargs="+", help="result.json files or folders holding them (searched recursively)")
    parser.add_argument("--protocol", action="append",
                        choices=("base2new", "fewshot", "cross_dataset", "domain_generalization"),
                        help="only this protocol (repeatable; default: every protocol found)")
    parser.add_argument("--reference", action="store_true",
                        help="add the published 11-dataset averages (DESIGN.md §3) as rows of the base-to-new table")
    common.add_output_args(parser, NAME)


def run(args: argparse.Namespace) -> list[Path]:
    from pmpo.results import load_results

    out = common.prepare_out(args)
    return write_tables(load_results(args.results), out, args.reference, args.protocol)


def main(argv: Sequence[str] | None = None) -> int:
    return common.main_for(NAME, add_arguments, run, DESCRIPTION, argv)


if __name__ == "__main__":
    raise SystemExit(main())
