"""One matplotlib style for every analysis figure, sized for a two-column paper.

A figure made at its printed size needs no rescaling, so fonts stay readable: a single-column
figure is ``COLUMN_WIDTH`` (3.3 in) wide with 7-8 pt text, a full-width one ``PAGE_WIDTH``.
Colours are the Okabe-Ito palette (distinguishable with the common colour-vision deficiencies);
depth segment ``i`` has the same colour in every figure, and the manual prior is always black.

Figures are :class:`matplotlib.figure.Figure` objects on an Agg canvas, made without pyplot: they
render to files on a machine without a display, yet importing this module selects no backend
(``matplotlib.use`` would change the whole process's, e.g. a notebook's or a host app's), and no
figure is ever registered with pyplot, so none needs closing.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap
from matplotlib.figure import Figure

COLUMN_WIDTH = 3.3  # inches: one column of a two-column paper (CVPR/ICCV/NeurIPS-like)
PAGE_WIDTH = 6.9  # inches: full text width
DPI = 200  # PNG resolution: crisp in docs and slides, a few hundred kB at most

# Okabe-Ito, without black (reserved for the manual prior / reference lines).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#999999")
PRIOR_COLOUR = "#000000"
HEATMAP_CMAP = "inferno"

RC = {
    "font.size": 7,
    "axes.titlesize": 7.5,
    "axes.labelsize": 7,
    "xtick.labelsize": 6,
    "ytick.labelsize": 6,
    "legend.fontsize": 6,
    "legend.frameon": False,
    "axes.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "xtick.major.size": 2.5,
    "ytick.major.size": 2.5,
    "lines.linewidth": 1.2,
    "lines.markersize": 3.5,
    "errorbar.capsize": 2,
    "grid.linewidth": 0.4,
    "grid.alpha": 0.4,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.02,
    "pdf.fonttype": 42,  # TrueType in PDFs: editable text, accepted by paper submission systems
    "ps.fonttype": 42,
    "figure.dpi": 100,
}


def apply() -> None:
    """Install the style in matplotlib's rcParams (:func:`figure` calls this before each figure:
    artists read their fonts and line widths from rcParams when they are made)."""
    matplotlib.rcParams.update(RC)


def colormap(name: str) -> Colormap:
    """A registered colormap by name, without going through pyplot."""
    return matplotlib.colormaps[name]


def segment_colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def figure(width: str | float = "column", aspect: float = 0.75, nrows: int = 1, ncols: int = 1,
           **kwargs: Any) -> tuple[Figure, Any]:
    """A figure at print size: ``width`` is "column", "page" or inches; height = width * aspect."""
    apply()
    inches = {"column": COLUMN_WIDTH, "page": PAGE_WIDTH}.get(width, width) if isinstance(width, str) else width
    if not isinstance(inches, (int, float)):
        raise ValueError(f"width must be 'column', 'page' or inches, got {width!r}")
    fig = Figure(figsize=(inches, inches * aspect))
    FigureCanvasAgg(fig)  # draws headless; PDF output switches canvas per file as usual
    axes = fig.subplots(nrows, ncols, **kwargs)
    return fig, axes


def save_figure(fig: Figure, out_dir: str | Path, name: str) -> list[Path]:
    """Write ``name``.png and ``name``.pdf into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=DPI)
    fig.savefig(paths[1])
    return paths


def write_csv(path: str | Path, rows: Iterable[Mapping[str, Any]], columns: Sequence[str] | None = None) -> Path:
    """Rows of dicts as CSV; floats with 6 significant digits (enough for any figure's claim)."""
    rows = list(rows)
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _fmt(r.get(k)) for k in columns})
    return path


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return "" if v is None else v


def short_label(text: str, width: int = 18) -> str:
    """Class names and captions cut to fit a panel title at 7 pt."""
    return text if len(text) <= width else text[: width - 1] + "…"
