#!/usr/bin/env python
"""Start the app as a user would, measure it, and capture one screenshot per tab.

    python tools/app_screenshots.py                       # default start-up (offline: ShapeWorld CLIP)
    python tools/app_screenshots.py --no-screenshots --app-args="--model ViT-B-16-quickgelu --pretrained none"

Prints the seconds from ``python app.py`` to a served page and the latency of classify requests
(one example image, 8 classes) through gradio_client; with screenshots (Debian's Chromium,
headless, via Playwright) writes small PNGs of each tab to ``docs/screenshots/``.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pmpo.app.examples import EXAMPLE_TRAIN_PER_CLASS  # noqa: E402
from pmpo.app.launcher import launch, stop  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def measure_classify(url: str, images: list[str], classes: str, repeats: int) -> list[float]:
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        status, *_ = client.predict(files=[handle_file(images[i % len(images)])], classes_text=classes, api_name="/classify")
        elapsed = time.perf_counter() - start
        if status.startswith("**Error"):
            raise RuntimeError(status)
        if i:  # the first request builds the prompt model and the text features
            times.append(elapsed)
        else:
            print(f"first classify request (builds the model, caches text): {elapsed:.2f} s")
    return times


def shrink(path: Path, width: int = 1100) -> None:
    """Screenshots for a README: scaled down and palette-quantised (a few hundred kB at most)."""
    from PIL import Image

    im = Image.open(path).convert("RGB")
    if im.width > width:
        im = im.resize((width, round(im.height * width / im.width)), Image.LANCZOS)
    # Octree keeps small saturated areas (plot markers, legend swatches); median cut greyed them out.
    im.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)


def screenshots(url: str, out: Path, examples: list[str]) -> list[Path]:
    from playwright.sync_api import expect, sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    shots = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        page.set_default_timeout(180_000)
        expect.set_options(timeout=180_000)
        page.goto(url)
        page.locator("#examples-btn").click()
        expect(page.locator("#images")).to_contain_text(Path(examples[-1]).stem)

        def capture(name: str) -> None:
            path = out / f"{name}.png"
            page.wait_for_timeout(800)
            page.screenshot(path=str(path), full_page=True)
            shrink(path)
            shots.append(path)

        page.locator("#classify-btn").click()
        expect(page.locator("#classify-status")).to_contain_text("image(s)")
        capture("classify")

        page.get_by_role("tab", name="Per-depth attention").click()
        page.locator("#attention-btn").click()
        expect(page.locator("#attention-status")).to_contain_text("Row 1")
        capture("attention")

        page.get_by_role("tab", name="Embeddings").click()
        page.locator("#embeddings-btn").click()
        expect(page.locator("#embeddings-status")).to_contain_text("points")
        capture("embeddings")

        page.get_by_role("tab", name="Train").click()
        page.locator("#train-examples-btn").click()  # offline: 8 classes x 16 downstream renders; 4 per class held out
        expect(page.locator("#train-files")).to_contain_text(f"yellow_diamond_{EXAMPLE_TRAIN_PER_CLASS}")
        page.locator("#train-btn").click()
        expect(page.locator("#train-status")).to_contain_text("Held-out accuracy", timeout=300_000)
        capture("train")

        page.get_by_role("tab", name="Benchmarks").click()
        expect(page.locator("#benchmarks-status")).to_contain_text("reference rows")
        capture("benchmarks")
        browser.close()
    return shots


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--app-args", default="", help="options passed to app.py (quoted)")
    p.add_argument("--out", default=str(ROOT / "docs" / "screenshots"))
    p.add_argument("--repeats", type=int, default=5, help="classify requests timed after the first")
    p.add_argument("--no-screenshots", action="store_true")
    p.add_argument("--no-warmup", action="store_true", help="PMPO_WARMUP=0: no UMAP compilation competing with the timing")
    args = p.parse_args()

    cache = Path(tempfile.mkdtemp(prefix="pmpo-shots-"))
    proc, url, seconds = launch(shlex.split(args.app_args) + ["--device", "cpu"], cache / "app.log",
                                env={"PMPO_CACHE_DIR": str(cache), "PMPO_WARMUP": "0" if args.no_warmup else "1"}, timeout=300)
    try:
        print(f"python app.py {args.app_args} -> page served after {seconds:.1f} s")
        examples = sorted(str(p) for p in (cache / "examples").glob("*.png"))
        classes = ", ".join(Path(e).stem.replace("_", " ") for e in examples)
        times = measure_classify(url, examples, classes, args.repeats)
        print(f"classify, 1 image x {len(examples)} classes: median {statistics.median(times):.3f} s "
              f"(min {min(times):.3f}, max {max(times):.3f}, n={len(times)})")
        if not args.no_screenshots:
            for path in screenshots(url, Path(args.out), examples):
                print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} ({path.stat().st_size // 1024} kB)")
    finally:
        stop(proc)
        print("--- app log ---\n" + (cache / "app.log").read_text()[-2000:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
