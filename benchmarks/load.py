#!/usr/bin/env python
"""Strangers at once: N visitors (separate sessions) each send a one-image Classify at the same
moment, with and without another visitor's training running; loopback only, bounded in requests
and time.

    python benchmarks/load.py                                   # offline model, N = 1, 4, 16
    python benchmarks/load.py --model ViT-B-16-quickgelu --pretrained none --visitors 1 4

Reports per N the p50 / p95 / max seconds of the answers, errors, the app's peak RSS, and checks
that every visitor got the answer for its own image (no answer crosses sessions). The training is
the Train tab's example set with PMPO and a long run (cancelled after the measurement); the
app pauses it between steps while a request computes (``AppState.inference``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pmpo.app.launcher import launch, stop  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_process import peak_rss_gib  # noqa: E402  (the demo benchmark's reader of the app's peak RSS)

CLASSES = "red circle, red triangle, blue circle, blue triangle, green hexagon, green diamond, yellow hexagon, yellow diamond"


def images(folder: Path, n: int, tag: str) -> list[Path]:
    """One distinct image per visitor (content no cache has seen)."""
    from PIL import Image

    rng = np.random.default_rng(abs(hash(tag)) % 2**32)
    paths = []
    for i in range(n):
        path = folder / f"{tag}-visitor{i}.png"
        Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def burst(url: str, paths: list[Path], timeout: float) -> dict:
    """Every visitor its own session, all submitted together; latency from the common start."""
    from gradio_client import Client, handle_file

    clients = [Client(url, verbose=False) for _ in paths]
    start = threading.Barrier(len(paths))
    results: list = [None] * len(paths)

    def visit(i: int) -> None:
        start.wait()
        t0 = time.perf_counter()
        try:
            status, _, _, _, answer = clients[i].submit(files=[handle_file(str(paths[i]))], classes_text=CLASSES,
                                                         api_name="/classify").result(timeout=timeout)
            own = answer.get("images", [{}])[0].get("image") == paths[i].name
            results[i] = (time.perf_counter() - t0, None if own and not status.startswith("**Error") else status[:120])
        except Exception as exc:  # noqa: BLE001 - counted and shown
            results[i] = (time.perf_counter() - t0, f"{type(exc).__name__}: {str(exc)[:120]}")

    with ThreadPoolExecutor(len(paths)) as pool:
        list(pool.map(visit, range(len(paths))))
    for c in clients:
        c.close()
    seconds = sorted(r[0] for r in results)
    errors = [r[1] for r in results if r[1]]
    return {"n": len(paths), "p50": statistics.median(seconds), "p95": seconds[min(len(seconds) - 1, int(0.95 * len(seconds)))],
            "max": seconds[-1], "errors": errors}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="app.py --model (default: the app's default: offline without a network)")
    p.add_argument("--pretrained")
    p.add_argument("--visitors", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--timeout", type=float, default=300.0)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pmpo-load-"))
    app_args = (["--model", args.model] if args.model else []) + (["--pretrained", args.pretrained] if args.pretrained else [])
    proc, url, _ = launch([*app_args, "--device", "cpu"], work / "app.log",
                          env={"PMPO_WARMUP": "0", "PMPO_CACHE_DIR": str(work / "cache")}, timeout=300)
    rows = []
    try:
        from gradio_client import Client, handle_file

        from pmpo.app.served import BackboneSpec
        from pmpo.app.trainset import example_set_for

        burst(url, images(work, 1, "warm"), args.timeout)  # builds the model and the text features
        for training in (False, True):
            trainer = job = None
            if training:
                trainer = Client(url, verbose=False)
                spec = BackboneSpec.of(args.model or "shapeworld-clip", args.pretrained)
                files = [handle_file(f) for f in example_set_for(spec, work / "train-examples")]
                job = trainer.submit(train_files=files, zip_file=None, method="pmpo", epochs=50, time_budget=0,
                                     api_name="/train")
                deadline = time.perf_counter() + args.timeout
                while time.perf_counter() < deadline and not any(  # until its steps run
                        isinstance(o, (list, tuple)) and "step" in str(o[0]) for o in job.outputs()):
                    time.sleep(0.2)
            for n in args.visitors:
                row = burst(url, images(work, n, f"{training}-{n}"), args.timeout)
                row.update(training=training, rss_gib=peak_rss_gib(proc.pid))
                rows.append(row)
                print(f"training={training!s:5} N={n:2d}: p50 {row['p50']:.2f} s, p95 {row['p95']:.2f} s, "
                      f"max {row['max']:.2f} s, errors {len(row['errors'])}, peak RSS {row['rss_gib']:.2f} GiB", flush=True)
            if trainer is not None:
                trainer.predict(api_name="/cancel_training")
                job.result(timeout=args.timeout)
                trainer.close()
    finally:
        stop(proc)
    print("\n| visitors | training running | p50 s | p95 s | max s | errors | app peak RSS GiB |\n|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['n']} | {'yes' if r['training'] else 'no'} | {r['p50']:.2f} | {r['p95']:.2f} | {r['max']:.2f} | "
              f"{len(r['errors'])} | {r['rss_gib']:.2f} |")
    for n in args.visitors:
        quiet = next(r for r in rows if r["n"] == n and not r["training"])
        busy = next(r for r in rows if r["n"] == n and r["training"])
        print(f"N = {n}: slowest answer with a training running / without: {busy['max'] / quiet['max']:.2f}×")
    bad = [e for r in rows for e in r["errors"]]
    if bad:
        print("errors:", *bad[:5], sep="\n  ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
