"""The demo benchmark's pure parts: statistics, the 1000-class list, the /train contract and its
reports, and the Markdown report (tested in tests/test_demo_bench.py without an app)."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

# /train, as the Train tab's owner defines it (DESIGN.md §9): inputs in this order, 5 outputs.
TRAIN_INPUTS = ("train_files", "label_table", "zip_file", "folder", "method", "epochs", "time_budget", "name",
                "bb_model", "bb_pretrained")
TRAIN_OUTPUTS = ("status_markdown", "plot", "report_json", "download_file", "checkpoint_dropdown")
REPORT_KEYS = ("phase", "elapsed_s", "eta_s", "zero_shot", "heldout", "done", "stopped", "checkpoint",
               "images_per_s", "n_train", "n_heldout")
N_BIG_CLASSES = 1000


class BenchError(RuntimeError):
    """A step of the benchmark failed in a way the report states (the app said no, a timeout, ...)."""


def summarize(samples: Sequence[float]) -> dict[str, float | int | None]:
    """Median, min and max of a list of seconds (None for an empty list)."""
    xs = [float(x) for x in samples if x is not None]
    if not xs:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def ratio(value: float | None, floor: float | None) -> float | None:
    """value / floor, or None when either is missing or the floor is not positive."""
    if value is None or floor is None or floor <= 0:
        return None
    return value / floor


_NOUNS = ("object", "item", "thing", "sample", "specimen", "article", "piece", "entity", "unit", "exhibit")


def class_list(n: int = N_BIG_CLASSES, variant: int = 0) -> list[str]:
    """``n`` distinct class names, deterministic; another ``variant`` gives a list none of whose
    names occur in the others (so a text cache never answers a 'new' list): 'class 0001 object'."""
    noun = _NOUNS[variant % len(_NOUNS)]
    suffix = "" if variant < len(_NOUNS) else f" v{variant // len(_NOUNS)}"
    return [f"class {i + 1:04d} {noun}{suffix}" for i in range(n)]


def check_train_contract(endpoint: dict | None) -> list[str]:
    """Where the live /train endpoint (an entry of ``view_api(return_format='dict')['named_endpoints']``)
    differs from the contract; empty when it matches."""
    if endpoint is None:
        return ["the app has no /train endpoint"]
    problems = []
    names = tuple(p.get("parameter_name") or p.get("label") for p in endpoint.get("parameters", []))
    if names != TRAIN_INPUTS:
        problems.append(f"inputs are ({', '.join(map(str, names))}); the contract is ({', '.join(TRAIN_INPUTS)})")
    n_out = len(endpoint.get("returns", []))
    if n_out != len(TRAIN_OUTPUTS):
        problems.append(f"it returns {n_out} outputs; the contract has {len(TRAIN_OUTPUTS)} ({', '.join(TRAIN_OUTPUTS)})")
    return problems


def as_report(value: Any) -> dict | None:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if isinstance(value, dict) and "done" in value and "heldout" in value:
        return value
    return None


def parse_train_reports(events: Sequence[tuple[float, Any]], within_s: float = 60.0,
                        gain_points: float = 15.0) -> dict[str, Any]:
    """Digest a training's stream: ``events`` are (seconds since submit, report_json) in arrival order.

    Values that are not reports (a gradio "no change" update, None) are skipped. Returns the time of
    the first report with a non-empty held-out list, of the final report (``done``), the final
    held-out zero-shot / trained accuracy, images/s, and the best held-out gain (trained − zero-shot,
    points) among the reports that arrived within ``within_s``, and when a gain of ``gain_points`` first showed."""
    reports = [(float(t), r) for t, raw in events if (r := as_report(raw)) is not None]
    out: dict[str, Any] = {"n_reports": len(reports), "first_report_s": reports[0][0] if reports else None,
                           "first_heldout_s": None, "first_heldout": None, "done_s": None, "final": None,
                           "zero_shot": None, "trained": None, "gain": None, "images_per_s": None,
                           "stopped": None, "checkpoint": None, f"best_gain_within_{within_s:g}s": None,
                           f"first_gain_{gain_points:g}_s": None,
                           "missing_keys": sorted({k for _, r in reports for k in REPORT_KEYS if k not in r})}
    best = None
    for t, r in reports:
        held = r.get("heldout") or []
        if held and out["first_heldout_s"] is None:
            out["first_heldout_s"], out["first_heldout"] = t, held[0]
        if t <= within_s:
            for h in held:
                if h.get("trained") is not None and h.get("zero_shot") is not None:
                    gain = float(h["trained"]) - float(h["zero_shot"])
                    best = gain if best is None else max(best, gain)
        for h in held:
            if (h.get("trained") is not None and h.get("zero_shot") is not None and out[f"first_gain_{gain_points:g}_s"] is None
                    and float(h["trained"]) - float(h["zero_shot"]) >= gain_points):
                out[f"first_gain_{gain_points:g}_s"] = t
        if r.get("done") and out["done_s"] is None:
            out["done_s"] = t
    out[f"best_gain_within_{within_s:g}s"] = best
    if reports:
        final = next((r for _, r in reversed(reports) if r.get("done")), reports[-1][1])
        held = final.get("heldout") or []
        last = held[-1] if held else {}
        out.update(final=final, zero_shot=last.get("zero_shot", final.get("zero_shot")), trained=last.get("trained"),
                   images_per_s=final.get("images_per_s"), stopped=final.get("stopped"),
                   checkpoint=final.get("checkpoint"))
        if out["trained"] is not None and out["zero_shot"] is not None:
            out["gain"] = float(out["trained"]) - float(out["zero_shot"])
    return out


def make_row(name: str, samples: Sequence[float], floor_s: float | None = None, floor_label: str = "",
             target: str = "", limit_s: float | None = None, rss_gib: float | None = None,
             value_text: str | None = None, ok: bool | None = None, error: str | None = None,
             **extra: Any) -> dict[str, Any]:
    """One table row. ``limit_s``: the target as seconds (pass/fail from the median) unless ``ok`` is given."""
    stats = summarize(samples)
    if ok is None and limit_s is not None and stats["median"] is not None:
        ok = stats["median"] <= limit_s
    return {"interaction": name, "samples_s": [float(s) for s in samples], **stats, "floor_s": floor_s,
            "floor_label": floor_label, "x_floor": ratio(stats["median"], floor_s), "rss_gib": rss_gib,
            "target": target, "limit_s": limit_s, "ok": ok if error is None else False, "value_text": value_text,
            "error": error, **extra}


def fmt(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def render_table(rows: Iterable[dict[str, Any]]) -> str:
    """| interaction | median s | min–max | floor s | × floor | peak RSS GiB | target | (target cell ends in ✓/✗)."""
    lines = ["| interaction | median s | min–max | floor s | × floor | peak RSS GiB | target |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        median = r.get("value_text") or fmt(r.get("median"))
        span = "—" if r.get("min") is None or r.get("n", 0) < 1 else f"{r['min']:.2f}–{r['max']:.2f}"
        floor = fmt(r.get("floor_s"))
        if r.get("floor_s") is not None and r.get("floor_label"):
            floor += f" ({r['floor_label']})"
        mark = {True: " ✓", False: " ✗", None: ""}[r.get("ok")]
        target = (r.get("target") or "report") + mark
        if r.get("error"):
            target += f" — **error:** {r['error']}"
        name = r["interaction"].replace("|", "/")
        lines.append(f"| {name} | {median} | {span} | {floor} | {fmt(r.get('x_floor'))}"
                     f" | {fmt(r.get('rss_gib'))} | {target.replace('|', '/')} |")
    return "\n".join(lines)


def machine_line(m: dict[str, Any]) -> str:
    def load(x):
        return "/".join(f"{v:.2f}" for v in x) if x else "?"
    return (f"Machine: {m.get('cpu_model', '?')}, {m.get('cores', '?')} cores; load average (1/5/15 min) before "
            f"{load(m.get('load_before'))}, after {load(m.get('load_after'))}; torch {m.get('torch', '?')}, "
            f"gradio {m.get('gradio', '?')}, gradio_client {m.get('gradio_client', '?')}, Python {m.get('python', '?')}; "
            f"floor threads {m.get('threads', '?')} (torch's default = all cores, as the app, which sets none).")


def render_markdown(result: dict[str, Any]) -> str:
    """The whole report: a machine header and one table per backbone, with its notes."""
    out = [f"# Demo benchmark ({result.get('date', '')})", "", machine_line(result.get("machine", {})), "",
           f"Repeats: {result.get('repeats')}; per-call timeout {result.get('timeout_s')} s."]
    if result.get("machine", {}).get("busy_note"):
        out += ["", result["machine"]["busy_note"]]
    for b in result.get("backbones", []):
        out += ["", f"## {b.get('label', b.get('backbone'))}", ""]
        if b.get("command"):
            out.append(f"App: `{b['command']}`, served after {fmt(b.get('startup_s'), 1)} s; idle after a further "
                       f"{fmt(b.get('idle_wait_s'), 1)} s; backbone on the page: {b.get('app_backbone', '?')}.")
        f = b.get("floor") or {}
        if f:
            out.append(f"Floor ({f.get('model')}, {f.get('pretrained') or 'no tag'}; {f.get('threads')} threads; "
                       f"image {f.get('image_size')} px from {f.get('source_px')} px renders): encode_image 8 images "
                       f"{fmt(f.get('batch8_s', {}).get('median'), 3)} s, 1 image {fmt(f.get('single_s', {}).get('median'), 3)} s "
                       f"(medians of {f.get('batch8_s', {}).get('n')}, after a warm-up call); eval transform of 8 images "
                       f"{fmt(f.get('preprocess8_s'), 3)} s; 1000 prompts through the text tower "
                       f"{fmt(f.get('text1000_s'), 2)} s (1 run).")
        out += ["", render_table(b.get("rows", []))]
        notes = list(b.get("notes", [])) + [f"**Error:** {e}" for e in b.get("errors", [])]
        if notes:
            out += [""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"
