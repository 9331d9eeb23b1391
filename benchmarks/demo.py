#!/usr/bin/env python
"""The demo as a visitor experiences it: ``python app.py`` in a subprocess, driven over loopback
with ``gradio_client``, each interaction timed against the image-encoder floor measured in the
same run on the same images (DESIGN.md §9, "The demo at real scale").

    python benchmarks/demo.py [--backbone vitb16|offline|both] [--repeats 3] [--skip-train]
                              [--json out.json] [--markdown out.md] [--timeout S]

Backbones:
  vitb16   ``python app.py --model ViT-B-16-quickgelu --pretrained none``: OpenAI CLIP's exact
           compute with random weights, i.e. what a free 2-vCPU Hugging Face Space pays.
  offline  ``python app.py`` with no --model: the app's offline default (the shipped ShapeWorld CLIP).

Per backbone it

1. starts the app exactly as a user does (plus the flags ``app.py --help`` offers for a headless
   run on loopback: ``--host 127.0.0.1``, ``--device cpu``) and waits until the page is served;
2. waits until the app process is idle (its start-up warm-up done), then measures the floor in
   *this* process while the app does nothing: the same backbone through the library
   (``pmpo.backbone.load_backbone``), the same PIL images through the model's eval transform,
   ``clip.encode_image`` under ``torch.no_grad()`` on the batch of 8 and on 1 image (median of the
   repeats after a warm-up call), plus 1000 plain prompts through the text tower; the floor model
   is freed before the app is driven again;
3. drives the app: Classify 8 new images × 8 classes (fresh renders every repeat, so no content
   cache can answer), the same 8 again, Embeddings of those images, per-depth attention of one of
   them, Classify 1 new image × a new 1000-class list, and (unless --skip-train) the Train tab's
   defaults on its example set (PMPO) and CoOp on the same set;
4. always stops the app (also on Ctrl-C, SIGTERM or an error).

Every client call has a timeout (--timeout; trainings --train-timeout). Peak RSS is the app
process's VmHWM from /proc/<pid>/status, i.e. the peak since the process started, read after
each interaction. Threads: the app sets none, so it runs with torch's default (all cores); the
floor sets the same number (torch's default in this process, same environment), and the report
says how many. A request that computes nothing (/cancel_training) gives the fixed cost of a round
trip; the app's CPU seconds per call (from /proc) and the cores the floor kept busy show whether
other work shared the CPU (the header also gives the load average before and after).

/train is driven by the contract the Train tab implements: inputs (train_files, label_table,
zip_file, folder, method, epochs, time_budget, name, bb_model, bb_pretrained), a generator whose
outputs are [status, plot, report_json, download, checkpoint]; a live app that differs fails the
training rows with a message saying how. label_table is sent as the page's empty table (gradio's
Dataframe refuses None), so the labels come from the example files' names.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import gc
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/demo.py` from a checkout without an install
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # its siblings, also when loaded by path

from demo_floor import measure_floor, render_set  # noqa: E402
from demo_process import (  # noqa: E402
    AppProcess,
    cpu_model,
    cpu_seconds,
    headless_flags,
    mem_total_gib,
    peak_rss_gib,
    wait_idle,
)
from demo_report import (  # noqa: E402
    N_BIG_CLASSES,
    REPORT_KEYS,
    TRAIN_OUTPUTS,
    BenchError,
    as_report,
    check_train_contract,
    class_list,
    fmt,
    make_row,
    parse_train_reports,
    render_markdown,
    render_table,
)

from pmpo.config import method_title  # noqa: E402

BACKBONES: dict[str, dict[str, Any]] = {
    "vitb16": {
        "label": "ViT-B/16 (ViT-B-16-quickgelu, random init)",
        "model": "ViT-B-16-quickgelu", "pretrained": "none",
        "app_args": ["--model", "ViT-B-16-quickgelu", "--pretrained", "none"],
        "whole_run_target_s": 180.0,
    },
    "offline": {
        "label": "offline default (shipped ShapeWorld CLIP)",
        "model": None, "pretrained": None,  # whatever the app loads by default; read back from its API
        "app_args": [],
        "whole_run_target_s": None,
        "gain_target": (15.0, 60.0),  # held-out gain ≥ 15 points within 60 s of submit
    },
}

FIRST_HELDOUT_TARGET_S = 60.0
COOP_TARGET_S = 60.0
CLASSIFY_TARGET_X = 1.3
AGAIN_TARGET_S = 0.3
EMBED_TARGET_X = 0.3
ATTENTION_TARGET_X = 1.3
N_IMAGES = 8


# --- driving the app ------------------------------------------------------------------------------------
def connect(url: str, timeout: float):
    from gradio_client import Client

    with contextlib.redirect_stdout(sys.stderr):
        return Client(url, verbose=False, download_files=False, analytics_enabled=False,
                      httpx_kwargs={"timeout": timeout})


def endpoint_kwargs(endpoints: dict, api_name: str, given: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for ``api_name``: what the page's components start with (a visitor's
    defaults), overridden by ``given``; a name the endpoint does not take is a clear error."""
    info = endpoints.get(api_name)
    if info is None:
        raise BenchError(f"the app has no {api_name} endpoint (it has {', '.join(sorted(endpoints))})")
    params = {p["parameter_name"]: p for p in info.get("parameters", [])}
    unknown = [k for k in given if k not in params]
    if unknown:
        raise BenchError(f"{api_name} takes ({', '.join(params)}), not {', '.join(unknown)}: the benchmark needs updating")
    kwargs = {name: (p.get("parameter_default") if p.get("parameter_has_default") else None) for name, p in params.items()}
    kwargs.update(given)
    return kwargs


def default_of(endpoints: dict, api_name: str, param: str, fallback: Any = None) -> Any:
    for p in (endpoints.get(api_name) or {}).get("parameters", []):
        if p.get("parameter_name") == param and p.get("parameter_has_default"):
            return p.get("parameter_default")
    return fallback


def call(client, api_name: str, kwargs: dict[str, Any], timeout: float,
         first: list | None = None) -> tuple[float, Any]:
    """Submit, wait at most ``timeout`` seconds; (seconds from submit to result, result). An answer
    whose status text starts with '**Error' is a failure (the app reports errors that way).
    ``first`` receives the seconds to the first output of an endpoint that answers in stages
    (Classify shows the learned columns before zero-shot's pass; equal to the total otherwise)."""
    t0 = time.perf_counter()
    job = client.submit(api_name=api_name, **kwargs)
    if first is not None:
        while not job.outputs() and not job.done() and time.perf_counter() - t0 < timeout:
            time.sleep(0.005)
        first.append(time.perf_counter() - t0)
    try:
        result = job.result(timeout=timeout)
    except concurrent.futures.TimeoutError as exc:
        job.cancel()
        raise BenchError(f"{api_name} did not answer within {timeout:.0f} s") from exc
    except Exception as exc:
        raise BenchError(f"{api_name} failed: {type(exc).__name__}: {str(exc)[:300]}") from exc
    seconds = time.perf_counter() - t0
    status = result[0] if isinstance(result, (list, tuple)) and result else result
    if isinstance(status, str) and status.lstrip().startswith("**Error"):
        raise BenchError(f"{api_name} answered with an error: {status.strip()[:300]}")
    return seconds, result


def files_arg(paths: Sequence[Path]) -> list:
    from gradio_client import handle_file

    return [handle_file(str(p)) for p in paths]


def run_training(client, endpoints: dict, method: str, epochs: int, files: Sequence[Path], bb: tuple[str, str],
                 timeout: float, poll_s: float = 0.02, gain: tuple[float, float] = (15.0, 60.0),
                 budget_s: float = 0.0) -> dict[str, Any]:
    """One training through /train as the contract defines it; every output timestamped from submit."""
    problems = check_train_contract(endpoints.get("/train"))
    if problems:
        raise BenchError("the live /train endpoint does not match the contract the benchmark is written against: "
                         + "; ".join(problems))
    # No labels given: the contract's label_table=None. Gradio's Dataframe refuses None through the API
    # ("Expected a DataframeData ... None"), so send the empty table a visitor's page sends; the app
    # then reads the labels from the file names, as it does for the example set.
    table = default_of(endpoints, "/train", "label_table")
    if not (isinstance(table, dict) and not table.get("data")):
        table = {"headers": ["file", "label"], "data": [], "metadata": None}
    kwargs = dict(train_files=files_arg(files), label_table=table, zip_file=None, folder="", method=method,
                  epochs=int(epochs), time_budget=budget_s, name=f"bench-{method}", bb_model=bb[0], bb_pretrained=bb[1])
    t0 = time.perf_counter()
    job = client.submit(api_name="/train", **kwargs)
    events: list[tuple[float, Any]] = []
    statuses: list[tuple[float, str]] = []
    seen = 0
    while True:
        done = job.done()
        outputs = job.outputs()
        now = time.perf_counter() - t0
        for out in outputs[seen:]:
            if isinstance(out, (list, tuple)) and len(out) == len(TRAIN_OUTPUTS):
                events.append((now, out[2]))
                if isinstance(out[0], str):
                    statuses.append((now, out[0]))
            else:
                raise BenchError(f"/train yielded {type(out).__name__} of length "
                                 f"{len(out) if hasattr(out, '__len__') else '?'}; the contract has {len(TRAIN_OUTPUTS)} outputs")
        seen = len(outputs)
        if done:
            break
        if now > timeout:
            job.cancel()
            with contextlib.suppress(Exception):
                client.submit(api_name="/cancel_training").result(timeout=30)
            raise BenchError(f"/train ({method}) did not finish within {timeout:.0f} s; "
                             f"{len(events)} reports so far: {parse_train_reports(events)}")
        time.sleep(poll_s)
    exc = job.exception()
    if exc is not None:
        raise BenchError(f"/train ({method}) failed: {type(exc).__name__}: {str(exc)[:300]}")
    errors = [s for _, s in statuses if s.lstrip().startswith("**Error")]
    if errors:
        raise BenchError(f"/train ({method}) answered with an error: {errors[-1].strip()[:300]}")
    parsed = parse_train_reports(events, within_s=gain[1], gain_points=gain[0])
    if parsed["n_reports"] == 0:
        raise BenchError(f"/train ({method}) gave no report_json dict among {len(events)} outputs")
    if parsed["missing_keys"]:
        raise BenchError(f"/train ({method}) reports lack {', '.join(parsed['missing_keys'])} (contract: {', '.join(REPORT_KEYS)})")
    if parsed["done_s"] is None:
        raise BenchError(f"/train ({method}) ended without a report with done=true")
    parsed["timeline"] = [{"t": round(t, 3), "phase": (r or {}).get("phase"), "heldout": len((r or {}).get("heldout") or []),
                           "done": (r or {}).get("done")} for t, raw in events for r in [as_report(raw)]]
    parsed["last_status"] = statuses[-1][1] if statuses else None
    return parsed


def train_epochs(model: str, pretrained: str | None, override: int | None) -> tuple[int, str]:
    """The Train tab's default epochs for the backbone: ``pmpo.app.recipe.default_epochs``."""
    if override is not None:
        return override, "--train-epochs"
    try:
        from pmpo.app.recipe import default_epochs
        from pmpo.app.served import BackboneSpec
    except ImportError as exc:
        raise BenchError(f"pmpo.app.recipe.default_epochs is gone ({exc}); give --train-epochs") from exc
    return int(default_epochs(BackboneSpec.of(model, pretrained))), "pmpo.app.recipe.default_epochs"


def run_backbone(key: str, opts: argparse.Namespace, work: Path, into: list | None = None) -> dict[str, Any]:
    """Measure one backbone; ``res`` is appended to ``into`` first, so an interrupted run keeps its rows."""
    cfg = BACKBONES[key]
    res: dict[str, Any] = {"backbone": key, "label": cfg["label"], "rows": [], "notes": [], "errors": []}
    if into is not None:
        into.append(res)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = res["rows"]
    try:
        from pmpo.app.examples import EXAMPLE_CLASSES as classes
    except ImportError:
        classes = ["red circle", "red triangle", "blue circle", "blue triangle",
                   "green hexagon", "green diamond", "yellow hexagon", "yellow diamond"]
    classes = list(classes)[:N_IMAGES]
    img_dir = work / key / "images"
    seed = opts.seed
    warm_set = render_set(img_dir, classes, seed, opts.image_px, "warm")
    sets = [render_set(img_dir, classes, seed + 1 + r, opts.image_px, f"r{r + 1}") for r in range(opts.repeats)]
    singles = [render_set(img_dir, classes[r % len(classes):r % len(classes) + 1], seed + 101 + r, opts.image_px,
                          f"one{r + 1}") for r in range(opts.repeats)]
    env = {"PMPO_CACHE_DIR": str(work / key / "app-cache")}  # the launcher adds PYTHONPATH, drops SPACE_ID
    app = AppProcess(cfg["app_args"] + headless_flags(ROOT / "app.py", opts.device), work / key / "app.log", env)
    res["command"] = app.command
    client = None
    try:
        app.start(opts.start_timeout)
        res["startup_s"] = app.startup_s
        res["rss_after_start_gib"] = peak_rss_gib(app.pid)
        client = connect(app.url, opts.timeout)
        endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
        res["endpoints"] = sorted(endpoints)
        bb = (default_of(endpoints, "/classify", "bb_model", cfg["model"]),
              default_of(endpoints, "/classify", "bb_pretrained", cfg["pretrained"]) or "")
        res["app_backbone"] = f"{bb[0]} + {bb[1] or 'no tag'}"
        template = (default_of(endpoints, "/classify", "templates_text", "") or "a photo of a {}.").splitlines()[0]
        res["idle_wait_s"] = wait_idle(app.pid, timeout=opts.idle_timeout)

        # The floor: this process computes, the app is idle. Then free the model.
        floor = measure_floor(bb[0], bb[1] or None, sets, warm_set, opts.threads, template, text=not opts.no_text_floor,
                              floor_repeats=opts.floor_repeats)
        floor["source_px"] = opts.image_px
        res["floor"] = floor
        f8, f1, ft = floor["batch8_s"]["median"], floor["single_s"]["median"], floor["text1000_s"]
        gc.collect()
        wait_idle(app.pid, timeout=30)

        def rss() -> float | None:
            return peak_rss_gib(app.pid)

        def classify_kwargs(paths, names):
            return endpoint_kwargs(endpoints, "/classify", {"files": files_arg(paths), "classes_text": "\n".join(names)})

        def attempt(fn: Callable[[], Any]) -> str | None:
            try:
                fn()
                return None
            except BenchError as exc:
                res["errors"].append(str(exc))
                wait_idle(app.pid, timeout=opts.timeout)  # a timed-out request may still be computing
                return str(exc)

        # The fixed cost of one request (queue, events, JSON) on an endpoint that computes nothing.
        if "/cancel_training" in endpoints:
            trips: list[float] = []
            err = attempt(lambda: trips.extend(call(client, "/cancel_training", {}, opts.timeout)[0]
                                               for _ in range(max(3, opts.repeats))))
            rows.append(make_row("round trip of a request that computes nothing (/cancel_training)", trips,
                                 target="report", rss_gib=rss(), error=err))

        # A visitor's first request: 8 new images, a class list the app has not encoded yet.
        first: list[float] = []
        err = attempt(lambda: first.append(call(client, "/classify", classify_kwargs(warm_set, classes), opts.timeout)[0]))
        rows.append(make_row("first Classify after start (8 new images × 8 classes, text not cached)", first, f8,
                             "8 passes", "report", rss_gib=rss(), error=err))

        samples: dict[str, list[float]] = {k: [] for k in ("fresh", "again", "emb", "att", "big")}
        first_answer: list[float] = []  # Classify of new images: the learned columns, before zero-shot's pass
        cpu: dict[str, list[float]] = {k: [] for k in samples}
        cores: dict[str, list[float]] = {k: [] for k in samples}
        errs: dict[str, str | None] = {k: None for k in samples}
        rss_at: dict[str, float | None] = {k: None for k in samples}
        emb_method = default_of(endpoints, "/embeddings", "method", "UMAP")

        def measure(kind: str, api: str, kwargs: dict[str, Any]) -> None:
            c0 = cpu_seconds(app.pid)
            seconds, _ = call(client, api, kwargs, opts.timeout, first_answer if kind == "fresh" else None)
            c1 = cpu_seconds(app.pid)
            samples[kind].append(seconds)
            if c0 is not None and c1 is not None:
                cpu[kind].append(c1 - c0)
                cores[kind].append((c1 - c0) / seconds if seconds > 0 else 0.0)
            rss_at[kind] = rss()

        def measure_lazily(kind: str, api: str, make_kwargs: Callable[[], dict]) -> None:
            measure(kind, api, make_kwargs())  # kwargs built inside attempt(): a missing endpoint is reported

        for paths in sets:
            for kind, api, make_kwargs in (
                ("fresh", "/classify", partial(classify_kwargs, paths, classes)),
                ("again", "/classify", partial(classify_kwargs, paths, classes)),
                ("emb", "/embeddings", partial(endpoint_kwargs, endpoints, "/embeddings", {
                    "files": files_arg(paths), "classes_text": "\n".join(classes), "method": emb_method})),
                ("att", "/attention", partial(endpoint_kwargs, endpoints, "/attention", {
                    "files": files_arg(paths[:1]), "classes_text": "\n".join(classes)})),
            ):
                if errs[kind] is None:
                    errs[kind] = attempt(partial(measure_lazily, kind, api, make_kwargs))
        for r, paths in enumerate(singles):
            if errs["big"] is None:
                errs["big"] = attempt(partial(measure_lazily, "big", "/classify",
                                              partial(classify_kwargs, paths, class_list(N_BIG_CLASSES, r))))

        extra = {k: {"app_cpu_s": cpu[k], "app_cores_used": cores[k]} for k in cpu}
        rows.append(make_row("Classify 8 new images × 8 classes", samples["fresh"], f8, "8 passes",
                             f"≤ {CLASSIFY_TARGET_X}× floor", limit_s=None if f8 is None else CLASSIFY_TARGET_X * f8,
                             rss_gib=rss_at["fresh"], error=errs["fresh"], **extra["fresh"]))
        rows.append(make_row("… its first answer (the learned columns; zero-shot's column follows)", first_answer, f8,
                             "8 passes", "report", rss_gib=rss_at["fresh"], error=errs["fresh"]))
        rows.append(make_row("the same 8 images again", samples["again"], f8, "8 passes", f"≤ {AGAIN_TARGET_S} s",
                             limit_s=AGAIN_TARGET_S, rss_gib=rss_at["again"], error=errs["again"], **extra["again"]))
        rows.append(make_row(f"Embeddings ({emb_method}) of the 8 just classified", samples["emb"], f8, "8 passes",
                             f"no image pass (≤ {EMBED_TARGET_X}× floor)",
                             limit_s=None if f8 is None else EMBED_TARGET_X * f8, rss_gib=rss_at["emb"],
                             error=errs["emb"], **extra["emb"]))
        rows.append(make_row("per-depth attention of 1 image", samples["att"], f1, "1 pass",
                             f"≤ {ATTENTION_TARGET_X}× one pass + maps (checked without the maps)",
                             limit_s=None if f1 is None else ATTENTION_TARGET_X * f1, rss_gib=rss_at["att"],
                             error=errs["att"], **extra["att"]))
        big_floor = None if f1 is None or ft is None else f1 + ft
        rows.append(make_row(f"Classify 1 new image × a new {N_BIG_CLASSES}-class list", samples["big"], big_floor,
                             f"1 pass + {N_BIG_CLASSES} prompts", "report (s, RSS)", rss_gib=rss_at["big"],
                             error=errs["big"], **extra["big"]))
        res["notes"].append("× floor of 'the same 8 images again' and of Embeddings is relative to the 8-pass floor; "
                            "peak RSS is the app's VmHWM (peak since start) after the row's last call.")
        names = {"fresh": "Classify", "again": "again", "emb": "Embeddings", "att": "attention", "big": "1000 classes"}
        used = ", ".join(f"{names[k]} {statistics.median(v):.2f} s ({statistics.median(cores[k]):.1f} cores)"
                         for k, v in cpu.items() if v)
        if used:
            res["notes"].append(f"App process CPU per call (median CPU seconds, and CPU ÷ wall = cores kept busy): {used}; "
                                f"the floor kept {fmt(floor.get('cores_used'), 1)} cores busy with {floor.get('threads')} threads"
                                + (" (fewer: other work had part of the CPU)."
                                   if (floor.get("cores_used") or 0) < 0.8 * (floor.get("threads") or 1) else "."))

        if not opts.skip_train:
            run_trainings(res, client, endpoints, bb, work / key, opts, cfg, rss,
                          settle=lambda: wait_idle(app.pid, timeout=opts.timeout))
    except BenchError as exc:
        res["errors"].append(str(exc))
    except Exception as exc:  # noqa: BLE001 - report it and still stop the app (the finally below)
        import traceback

        res["errors"].append(f"{type(exc).__name__}: {exc}")
        res["traceback"] = traceback.format_exc()
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
        res["rss_final_gib"] = peak_rss_gib(app.pid) if app.proc is not None else None
        t = time.perf_counter()
        app.stop()
        res["stop_s"] = time.perf_counter() - t
        res["wall_s"] = time.perf_counter() - started
        res["app_log_tail"] = app.log_tail(20)
    return res


def run_trainings(res: dict, client, endpoints: dict, bb: tuple[str, str], work: Path, opts: argparse.Namespace,
                  cfg: dict, rss: Callable[[], float | None], settle: Callable[[], Any]) -> None:
    rows = res["rows"]
    try:
        from pmpo.app.served import BackboneSpec
        from pmpo.app.trainset import example_set_for
    except ImportError as exc:
        raise BenchError(f"pmpo.app.trainset.example_set_for is gone ({exc}): cannot make the Train tab's example set") from exc
    # The set the page's "Use example training images" gives on this backbone (real photos on a real CLIP).
    files = [Path(p) for p in example_set_for(BackboneSpec.of(bb[0], bb[1] or None), work / "train-examples")]
    epochs, source = train_epochs(bb[0], bb[1] or None, opts.train_epochs)
    method = default_of(endpoints, "/train", "method", "pmpo") or "pmpo"
    budget = float(default_of(endpoints, "/train", "time_budget", 0) or 0)
    res["train"] = {"epochs": epochs, "epochs_from": source, "n_files": len(files), "time_budget_s": budget,
                    "page_default_epochs": default_of(endpoints, "/train", "epochs")}
    page = res["train"]["page_default_epochs"]
    if page is not None and int(page) != epochs:
        res["notes"].append(f"The Train tab's Epochs slider starts at {page}; the benchmark used {epochs} ({source}).")
    gain_target = cfg.get("gain_target")
    for m, whole_target in ((method, cfg.get("whole_run_target_s")), ("coop", COOP_TARGET_S)):
        label = (f"Train {method_title(m)} (≤ {epochs} epochs, budget {budget:g} s, "
                 f"{len(files)} example images)")
        try:
            t = run_training(client, endpoints, m, epochs, files, bb, opts.train_timeout,
                             gain=gain_target or (15.0, FIRST_HELDOUT_TARGET_S), budget_s=budget)
        except BenchError as exc:
            res["errors"].append(str(exc))
            rows.append(make_row(f"{label}: first held-out comparison", [], target=f"≤ {FIRST_HELDOUT_TARGET_S:g} s",
                                 error=str(exc)[:160]))
            settle()  # a failed or timed-out run may still be computing
            continue
        res["train"][m] = t
        peak = rss()
        never = t["first_heldout_s"] is None
        rows.append(make_row(f"{label}: first held-out comparison", [] if never else [t["first_heldout_s"]],
                             target=f"≤ {FIRST_HELDOUT_TARGET_S:g} s", limit_s=FIRST_HELDOUT_TARGET_S, rss_gib=peak,
                             value_text="never" if never else None, ok=False if never else None))
        rows.append(make_row(f"{label}: whole run", [t["done_s"]],
                             target=f"≤ {whole_target:g} s" if whole_target else "report",
                             limit_s=whole_target, rss_gib=peak))
        zs, tr, ips = t["zero_shot"], t["trained"], t["images_per_s"]
        text = "—" if zs is None or tr is None else f"{zs:.1f} → {tr:.1f} %"
        ok, target = None, "report"
        if gain_target and m == method:
            points, secs = gain_target
            within, first = t.get(f"best_gain_within_{secs:g}s"), t.get(f"first_gain_{points:g}_s")
            ok = within is not None and within >= points
            target = (f"gain ≥ {points:g} points within {secs:g} s (best then {fmt(within, 1)}; "
                      f"≥ {points:g} first at {fmt(first, 1)} s)")
        rows.append(make_row(f"{label}: held-out zero-shot → trained; {fmt(ips, 1)} images/s", [], value_text=text,
                             target=target, ok=ok))


# --- main ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", choices=("vitb16", "offline", "both"), default="both")
    p.add_argument("--repeats", type=int, default=3, help="repeats per interaction (median, min, max); default 3")
    p.add_argument("--skip-train", action="store_true", help="leave out the Train tab rows")
    p.add_argument("--json", type=Path, help="write everything measured here")
    p.add_argument("--markdown", type=Path, help="write the tables here")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds each client call may take (default 300)")
    p.add_argument("--train-timeout", type=float, default=1200.0, help="seconds one training may take (default 1200)")
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds until the app must serve (default 300)")
    p.add_argument("--idle-timeout", type=float, default=180.0,
                   help="longest wait for the app's start-up work to finish before the floor (default 180)")
    p.add_argument("--train-epochs", type=int, help="override the Train tab's default epochs")
    p.add_argument("--image-px", type=int, default=224, help="side of the rendered test images (default 224)")
    p.add_argument("--seed", type=int, default=1000, help="render seed (each repeat adds one)")
    p.add_argument("--device", default="cpu", help="--device for app.py when it offers one (default cpu)")
    p.add_argument("--floor-repeats", type=int, default=3,
                   help="timings of the floor (at least --repeats; cycling over the same image sets); default 3")
    p.add_argument("--no-text-floor", action="store_true", help="skip timing 1000 prompts through the text tower")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    args.threads = None  # filled in main(): torch's default here, before anything sets it = what the app runs with
    return args


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)

    def on_term(signum, _frame):
        raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop the app

    signal.signal(signal.SIGTERM, on_term)
    keys = ["offline", "vitb16"] if opts.backbone == "both" else [opts.backbone]
    import gradio
    import gradio_client
    import torch

    opts.threads = torch.get_num_threads()  # the default (same environment as the app, which sets none)

    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "repeats": opts.repeats, "timeout_s": opts.timeout,
        "argv": sys.argv[1:] if argv is None else argv,
        "machine": {"cpu_model": cpu_model(), "cores": os.cpu_count(), "load_before": list(os.getloadavg()),
                    "torch": torch.__version__, "gradio": gradio.__version__, "gradio_client": gradio_client.__version__,
                    "python": platform.python_version(), "threads": opts.threads,
                    "nice": os.nice(0), "mem_total_gib": mem_total_gib()},
        "backbones": [],
    }
    load = result["machine"]["load_before"][0]
    if load > 0.5 * (os.cpu_count() or 1):
        result["machine"]["busy_note"] = (f"The 1-minute load average was {load:.2f} on {os.cpu_count()} cores before the run: "
                                          "other work shared the CPU, so these timings are upper bounds.")
    status = 0
    with tempfile.TemporaryDirectory(prefix="pmpo-demo-bench-") as tmp:
        try:
            for key in keys:
                print(f"[demo bench] {key}: starting the app…", file=sys.stderr, flush=True)
                b = run_backbone(key, opts, Path(tmp), into=result["backbones"])
                print(render_table(b["rows"]), file=sys.stderr, flush=True)
                if b["errors"]:
                    status = 1
        except (KeyboardInterrupt, SystemExit) as exc:
            print("[demo bench] interrupted; the app was stopped", file=sys.stderr)
            result["interrupted"] = True
            for b in result["backbones"][-1:]:
                b["errors"].append("interrupted (Ctrl-C / SIGTERM): rows so far only")
            status = exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else 130
        finally:
            result["machine"]["load_after"] = list(os.getloadavg())
            text = render_markdown(result)
            if opts.markdown:
                opts.markdown.write_text(text)
            if opts.json:
                opts.json.write_text(json.dumps(result, indent=1, default=str))
            print(text)
    return status


if __name__ == "__main__":
    sys.exit(main())
