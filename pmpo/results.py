"""Reading ``result.json`` files and turning them into the tables papers print.

Aggregation follows the papers: per (protocol, dataset, method, shots) the mean ± std over
seeds; for base-to-new the harmonic mean is taken of the *seed-averaged* base and new
accuracies, and the dataset average is the mean of the per-dataset means with HM again of the
averaged base and new (CoCoOp/MaPLe compute their "Average" rows that way). Tables render as
Markdown, CSV or LaTeX (booktabs), the best value of each column within a dataset in bold.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .data import BENCHMARK_DATASETS, harmonic_mean
from .errors import InputError
from .protocols import RESULT_FILE, RESULT_FORMAT
from .reference import base2new_reference

FORMATS = ("md", "csv", "latex")
REQUIRED = ("name", "method", "dataset", "protocol", "seed", "shots", "accuracy")
LABELS = {"base": "Base", "new": "New", "hm": "HM", "all": "Acc", "avg": "Avg"}


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_result(path: str | Path) -> dict:
    """One result file, checked; the dict gets a ``_path`` entry naming where it came from."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise InputError(f"{path} is not valid JSON ({exc}); rerun that run or delete the file") from exc
    if not isinstance(data, dict) or data.get("format") != RESULT_FORMAT:
        raise InputError(f"{path} is not a pmpo result file (no 'format': '{RESULT_FORMAT}')")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise InputError(f"{path} lacks {', '.join(missing)}")
    data["_path"] = str(path)
    return data


def find_result_files(paths: Iterable[str | Path]) -> list[Path]:
    """Result files among ``paths``: files as given, folders searched recursively."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found.extend(sorted(p.rglob(RESULT_FILE)))
        elif p.is_file():
            found.append(p)
        else:
            raise InputError(f"no such file or folder: {p}")
    return found


def load_results(paths: Iterable[str | Path]) -> list[dict]:
    files = find_result_files(paths)
    if not files:
        raise InputError(f"no {RESULT_FILE} files found in {', '.join(map(str, paths))}")
    return [load_result(f) for f in files]


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------


@dataclass
class Stat:
    mean: float | None
    std: float | None = None

    @staticmethod
    def of(values: Sequence[float]) -> Stat:
        vals = [float(v) for v in values if v is not None]
        if not vals:
            return Stat(None)
        mean = sum(vals) / len(vals)
        # Population std over seeds (ddof 0), as CoOp's parse_test_res.py (np.std) reports it, so
        # that our "mean ± std" cells read like the papers'.
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
        return Stat(mean, std)


@dataclass
class Row:
    protocol: str
    dataset: str
    name: str
    shots: int | str
    seeds: list[int]
    metrics: dict[str, Stat]
    reference: str | None = None  # source, for published numbers
    n_datasets: int = 1


def metric_names(protocol: str, results: Sequence[dict] = ()) -> list[str]:
    targets: list[str] = []
    for r in results:
        for t in r.get("targets") or {}:
            if t not in targets:
                targets.append(t)
    if protocol == "base2new":
        # Targets of a base-to-new run (e.g. ShapeWorld's sketch style) are extra columns.
        return ["base", "new", "hm", *targets]
    if protocol == "fewshot":
        return ["all"]
    return ["all", *targets, "avg"] if targets else ["all"]


def _seed_metrics(r: dict, names: Sequence[str]) -> dict[str, float | None]:
    acc, targets = r.get("accuracy") or {}, r.get("targets") or {}
    out: dict[str, float | None] = {}
    for m in names:
        if m in ("base", "new", "hm", "all"):
            out[m] = acc.get(m)
        elif m == "avg":
            vals = [v for v in targets.values() if v is not None]
            out[m] = sum(vals) / len(vals) if vals else None
        else:
            out[m] = targets.get(m)
    return out


def aggregate(results: Sequence[dict]) -> list[Row]:
    """Mean ± std over seeds per (protocol, dataset, name, shots); HM of the averaged base/new."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["protocol"], r["dataset"], r["name"], str(r["shots"])), []).append(r)
    rows = []
    for (protocol, dataset, name, _), runs in groups.items():
        seen: dict[int, str] = {}
        for r in runs:
            if r["seed"] in seen:
                raise InputError(
                    f"two results for {protocol}/{dataset}/{name} seed {r['seed']}: {seen[r['seed']]} and {r.get('_path', '?')}"
                )
            seen[r["seed"]] = r.get("_path", "?")
        names = metric_names(protocol, [r for rs in groups.values() for r in rs if r["protocol"] == protocol])
        per_seed = [_seed_metrics(r, names) for r in runs]
        metrics = {m: Stat.of([s[m] for s in per_seed]) for m in names}
        if protocol == "base2new" and metrics["base"].mean is not None and metrics["new"].mean is not None:
            metrics["hm"] = Stat(harmonic_mean(metrics["base"].mean, metrics["new"].mean))
        rows.append(Row(protocol, dataset, name, runs[0]["shots"], sorted(seen), metrics))
    rows.sort(key=lambda r: (r.protocol, str(r.shots), _dataset_order(r.dataset), r.name))
    return rows


def _dataset_order(name: str) -> tuple[int, str]:
    return (BENCHMARK_DATASETS.index(name), name) if name in BENCHMARK_DATASETS else (len(BENCHMARK_DATASETS), name)


def dataset_average(rows: Sequence[Row]) -> list[Row]:
    """Per (protocol, name, shots) the mean over datasets of the seed means (HM of the averages)."""
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        if r.reference is None and r.protocol in ("base2new", "fewshot"):
            groups.setdefault((r.protocol, r.name, str(r.shots)), []).append(r)
    out = []
    for (protocol, name, _), members in groups.items():
        if len(members) < 2:
            continue
        names = list(members[0].metrics)
        metrics = {m: Stat(_mean([r.metrics[m].mean for r in members])) for m in names}
        if protocol == "base2new" and metrics["base"].mean is not None and metrics["new"].mean is not None:
            metrics["hm"] = Stat(harmonic_mean(metrics["base"].mean, metrics["new"].mean))
        seeds = sorted({s for r in members for s in r.seeds})
        out.append(Row(protocol, "average", name, members[0].shots, seeds, metrics, n_datasets=len(members)))
    return out


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if len(vals) == len(values) and vals else None


def reference_rows(shots: int | str = 16) -> list[Row]:
    return [
        Row("base2new", "average", f"{ref.label} (paper)", shots, [],
            {"base": Stat(ref.base), "new": Stat(ref.new), "hm": Stat(ref.hm)}, reference=ref.source, n_datasets=11)
        for ref in base2new_reference()
    ]


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


@dataclass
class Table:
    protocol: str
    shots: int | str
    metrics: list[str]
    groups: list[list[Row]]  # one group per dataset (bold is decided within a group)
    notes: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        return f"{self.protocol}, {self.shots} shots"

    def header(self) -> list[str]:
        return ["Dataset", "Method", "Seeds", *[LABELS.get(m, m) for m in self.metrics]]


def build_tables(results: Sequence[dict], reference: bool = False, protocol: str | None = None) -> list[Table]:
    """One table per (protocol, shots); the dataset average last, with the papers' numbers
    beside it when ``reference`` is set (base-to-new only: that is what they report)."""
    if protocol is not None:
        results = [r for r in results if r["protocol"] == protocol]
        if not results:
            raise InputError(f"no results of protocol {protocol!r}")
    rows = aggregate(results)
    rows += dataset_average(rows)
    tables = []
    keys = sorted({(r.protocol, str(r.shots)) for r in rows})
    for proto, shots in keys:
        mine = [r for r in rows if r.protocol == proto and str(r.shots) == shots]
        datasets = []
        for r in mine:
            if r.dataset not in datasets:
                datasets.append(r.dataset)
        datasets.sort(key=lambda d: (d == "average", _dataset_order(d)))
        groups = [[r for r in mine if r.dataset == d] for d in datasets]
        notes = []
        average = next((g for g in groups if g and g[0].dataset == "average"), [])  # the group itself, so refs join it
        if reference and proto == "base2new":
            refs = reference_rows(mine[0].shots)
            if average:
                average.extend(refs)
            else:
                groups.append(refs)
            notes.append("(paper): published 11-dataset averages, ViT-B/16, 16 shots; sources in pmpo/reference.py.")
            n = max((r.n_datasets for r in mine if r.dataset == "average"), default=1)
            if n != len(BENCHMARK_DATASETS):
                notes.append(f"our average covers {n} dataset(s), not the papers' 11: not directly comparable.")
        metrics = metric_names(proto, [r for r in results if r["protocol"] == proto])
        tables.append(Table(proto, mine[0].shots, metrics, groups, notes))
    return tables


def _best(group: Sequence[Row], metric: str) -> float | None:
    vals = [r.metrics[metric].mean for r in group if metric in r.metrics and r.metrics[metric].mean is not None]
    return max(vals) if len(vals) > 1 else None


def _cell(stat: Stat | None, digits: int = 2, pm: str = " ± ") -> str:
    if stat is None or stat.mean is None:
        return "–"
    text = f"{stat.mean:.{digits}f}"
    if stat.std is not None and stat.std > 0:
        text += f"{pm}{stat.std:.{digits}f}"
    return text


def _dataset_label(r: Row) -> str:
    if r.dataset == "average" and r.reference is None:
        return f"Average ({r.n_datasets})"
    return "Average" if r.dataset == "average" else r.dataset


def render_markdown(tables: Sequence[Table]) -> str:
    out = []
    for t in tables:
        out.append(f"### {t.title}\n")
        header = t.header()
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|")
        for group in t.groups:
            best = {m: _best(group, m) for m in t.metrics}
            for r in group:
                cells = []
                for m in t.metrics:
                    text = _cell(r.metrics.get(m))
                    if best[m] is not None and r.metrics.get(m) is not None and r.metrics[m].mean == best[m]:
                        text = f"**{text}**"
                    cells.append(text)
                out.append("| " + " | ".join([_dataset_label(r), r.name, str(len(r.seeds) or "–"), *cells]) + " |")
        out.extend([""] + [f"{n}" for n in t.notes])
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def render_csv(tables: Sequence[Table]) -> str:
    """Machine-friendly: one line per row, mean and std in separate columns, no rounding."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    metrics: list[str] = []
    for t in tables:
        metrics.extend(m for m in t.metrics if m not in metrics)
    writer.writerow(["protocol", "shots", "dataset", "method", "seeds", "reference",
                     *[f"{m}_{s}" for m in metrics for s in ("mean", "std")]])
    for t in tables:
        for group in t.groups:
            for r in group:
                vals = []
                for m in metrics:
                    st = r.metrics.get(m)
                    vals += ["" if st is None or st.mean is None else f"{st.mean:.4f}",
                             "" if st is None or st.std is None else f"{st.std:.4f}"]
                writer.writerow([r.protocol, r.shots, r.dataset if r.dataset != "average" else "average",
                                 r.name, " ".join(map(str, r.seeds)), r.reference or "", *vals])
    return buf.getvalue()


def _latex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                 ("$", r"\$"), ("{", r"\{"), ("}", r"\}")):
        text = text.replace(a, b)
    return text


def render_latex(tables: Sequence[Table]) -> str:
    """booktabs tables (``\\usepackage{booktabs}``), best per dataset and column in bold."""
    out = []
    for t in tables:
        header = t.header()
        out.append(f"% {t.title}")
        out.append(r"\begin{tabular}{ll" + "r" * (len(header) - 2) + "}")
        out.append(r"\toprule")
        out.append(" & ".join(_latex_escape(h) for h in header) + r" \\")
        for group in t.groups:
            out.append(r"\midrule")
            best = {m: _best(group, m) for m in t.metrics}
            for r in group:
                cells = []
                for m in t.metrics:
                    st = r.metrics.get(m)
                    text = _cell(st, pm=r" $\pm$ ").replace("–", "--")
                    if best[m] is not None and st is not None and st.mean == best[m]:
                        text = rf"\textbf{{{text}}}"
                    cells.append(text)
                out.append(" & ".join([_latex_escape(_dataset_label(r)), _latex_escape(r.name),
                                       str(len(r.seeds) or "--"), *cells]) + r" \\")
        out.append(r"\bottomrule")
        out.append(r"\end{tabular}")
        out.extend(f"% {n}" for n in t.notes)
        out.append("")
    return "\n".join(out)


def render(tables: Sequence[Table], fmt: str = "md") -> str:
    if fmt not in FORMATS:
        raise InputError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return {"md": render_markdown, "csv": render_csv, "latex": render_latex}[fmt](tables)


__all__ = [
    "FORMATS", "Row", "Stat", "Table", "aggregate", "build_tables", "dataset_average", "find_result_files",
    "load_result", "load_results", "reference_rows", "render", "render_csv", "render_latex", "render_markdown",
]
