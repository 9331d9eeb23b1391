"""A real browser against the served app: Debian's Chromium, headless, driven by Playwright."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_app_client import launch_app

from pmpo.app.launcher import launch, stop
from pmpo.app.trainset import FASHION_PER_CLASS

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is missing (apt-get install -y chromium)")


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    cache = tmp_path_factory.mktemp("browser-app")
    proc, url, _ = launch_app(tiny_model, cache)
    yield url, cache
    stop(proc)


@pytest.fixture(scope="module")
def page(served):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page._console_lines = []  # read by diagnosis() when a test fails
        page.on("console", lambda msg: page._console_lines.append(f"{msg.type}: {msg.text}"))
        page.set_default_timeout(30_000)
        page.goto(served[0])
        page.wait_for_selector("#classify-btn")
        yield page
        browser.close()


def upload(page, path: Path) -> None:
    """Set the file input and wait for the file to be listed. Right after the first paint the
    upload component may not be wired up yet (the input event is then lost), so try again — but only
    while nothing is listed: on a loaded runner the first upload can be listed after the wait, and a
    second one then adds the same image twice (CI saw "2 image(s)" where the test expected 1)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    listed = page.locator("#images").get_by_text(path.name)
    for attempt in range(3):
        if attempt and listed.count():
            return
        page.locator("#images input[type=file]").set_input_files(str(path))
        try:
            listed.first.wait_for(timeout=30_000)
            return
        except PlaywrightTimeout:
            if attempt == 2:
                raise


def diagnosis(page, log: Path) -> str:
    """What a failure message needs to tell the cause apart: the status line, the browser console
    (collected since the page opened) and the end of the server's log."""
    status = page.locator("#classify-status").inner_text() if page.locator("#classify-status").count() else "?"
    files = page.locator("#images").inner_text() if page.locator("#images").count() else "?"
    console = "\n".join(getattr(page, "_console_lines", [])[-20:])
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:]) if log.is_file() else f"{log} missing"
    return f"status: {status!r}\nlisted: {files!r}\n--- browser console ---\n{console}\n--- {log.name} ---\n{tail}"


def classify_fresh(page, url: str, image: Path, classes: str, expected: str, log: Path) -> None:
    """Upload, fill the classes, click Classify and wait for ``expected`` in the status. The first
    request of a fresh page was seen to go unanswered (status empty for 180 s, a second click no help)
    in every full-suite run on one 2-core VM and once right after Chromium's install, never when this
    file ran alone or after one other module; so after 90 s of nothing the page is loaded anew and
    the request made once more. The likely cause, found when CI's diagnosis showed "2 image(s)":
    :func:`upload` used to set the file again when it was listed late, and the wait was for "1 image(s)"."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for attempt, wait_ms in enumerate((90_000, 180_000)):
        if attempt:
            page.goto(url)
            page.wait_for_selector("#classify-btn")
        upload(page, image)
        page.locator("#classes textarea").fill(classes)
        page.locator("#classify-btn").click()
        try:
            page.locator("#classify-status").get_by_text(expected).wait_for(timeout=wait_ms)
            return
        except PlaywrightTimeout:
            if attempt:
                pytest.fail(f"no answer to Classify after a reload\n{diagnosis(page, log)}")


def test_upload_classify_and_read_result(page, served, tmp_path):
    from playwright.sync_api import expect

    image = sorted((Path(served[1]) / "examples").glob("*.png"))[0]
    # The first request of a fresh server builds the models; on a loaded 2-core CI runner that took
    # longer than the 30 s default.
    # "image(s)" without the count: should an upload be listed late and made twice, the answer is right for 2.
    classify_fresh(page, served[0], image, "red circle\nblue square\nsomething else", "image(s), 3 classes",
                   Path(served[1]) / "app.log")
    classes = page.locator("#classes textarea")
    status = page.locator("#classify-status")
    table = page.locator("#topk-table")
    expect(table).to_contain_text(image.name)
    text = table.inner_text()
    assert "zero-shot CLIP" in text and "learned" in text
    assert any(c in text for c in ("red circle", "blue square", "something else"))
    shot = tmp_path / "classify.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    # One class: answered (every image 100 % for it) with a notice, not an internal error.
    classes.fill("red circle")
    page.locator("#classify-btn").click()
    status.get_by_text("image(s), 1 classes").wait_for(timeout=60_000)
    assert "Internal error" not in page.content() and "Only one class" in status.inner_text()


def test_corrupt_upload_shows_message_in_page(page, served, tmp_path):
    page.goto(served[0])  # a fresh session: nothing uploaded yet
    page.wait_for_selector("#classify-btn")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    upload(page, bad)
    page.locator("#classify-btn").click()
    page.locator("#classify-status").get_by_text("Error").wait_for()
    text = page.locator("#classify-status").inner_text()
    assert "broken.jpg" in text and "No usable image" in text


def test_every_tab_main_flow(page, served):
    """Examples → classify (learned column on screen at 1400 px) → attention → embeddings → a short
    training → benchmarks, reading what each tab shows."""
    from playwright.sync_api import expect

    page.goto(served[0])
    page.wait_for_selector("#classify-btn")
    page.locator("#examples-btn").click()
    expect(page.locator("#images")).to_contain_text("yellow_diamond")
    page.locator("#classify-btn").click()
    expect(page.locator("#classify-status")).to_contain_text("8 image(s), 8 classes", timeout=180_000)
    header = page.locator("#topk-table th", has_text="learned").first
    box = header.bounding_box()
    assert box is not None and box["x"] + box["width"] <= 1400, box  # the main result is not off-screen

    page.get_by_role("tab", name="Per-depth attention").click()
    page.locator("#attention-btn").click()
    expect(page.locator("#attention-status")).to_contain_text("Row 1", timeout=120_000)
    expect(page.locator("#attention-status")).to_contain_text("Ground truth")  # an example image: masks known

    page.get_by_role("tab", name="Embeddings").click()
    page.locator("#embeddings-btn").click()
    expect(page.locator("#embeddings-status")).to_contain_text("points", timeout=180_000)
    assert "Internal error" not in page.content()

    page.get_by_role("tab", name="Train").click()
    page.locator("#train-examples-btn").click()  # a real-photo set on a backbone other than the offline model
    expect(page.locator("#train-files")).to_contain_text(f"ankle_boot_{FASHION_PER_CLASS}")
    expect(page.locator("#train-summary")).to_contain_text("ankle boot")  # counts per class, not a row per file
    expect(page.locator("#train-estimate")).to_contain_text("per epoch")  # measured on this backbone
    page.set_viewport_size({"width": 1400, "height": 900})
    page.evaluate("window.scrollTo(0, 0)")
    for button in ("#train-btn", "#cancel-btn"):  # both on screen without scrolling
        box = page.locator(button).bounding_box()
        assert box is not None and box["y"] + box["height"] <= 900, (button, box)
    page.set_viewport_size({"width": 1400, "height": 1000})
    for field, value in (("#train-epochs", "50"), ("#train-budget", "0")):  # a long run, so Cancel meets it mid-way
        page.locator(f"{field} input[type=number]").fill(value)
        page.locator(f"{field} input[type=number]").press("Enter")
    page.locator("#train-btn").click()
    status = page.locator("#train-status")
    expect(status).to_contain_text("held-out: zero-shot", timeout=300_000)  # an early comparison, mid-run
    assert "left" in status.inner_text()  # with an ETA
    page.locator("#cancel-btn").click()
    expect(page.locator("#cancel-status")).to_contain_text("Cancelling")
    expect(status).to_contain_text("Held-out accuracy", timeout=120_000)
    assert "Cancelled" in status.inner_text() and "saved" in status.inner_text()
    assert page.locator("#checkpoint input").input_value().startswith("trained: ")  # the kept prompts are selected

    page.get_by_role("tab", name="Benchmarks").click()
    expect(page.locator("#benchmarks-status")).to_contain_text("reference rows")
    assert "Internal error" not in page.content()


@pytest.fixture(scope="module")
def served_offline(tmp_path_factory):
    from pmpo.app.state import offline_model_present

    if not offline_model_present():
        pytest.skip("checkpoints/shapeworld-clip is not in this copy")
    cache = tmp_path_factory.mktemp("browser-offline")
    proc, url, _ = launch(["--model", "shapeworld-clip", "--device", "cpu"], cache / "app.log",
                          env={"PMPO_WARMUP": "0", "PMPO_CACHE_DIR": str(cache)})
    yield url
    stop(proc)


def test_offline_classify_shows_the_shipped_prompts_at_work(page, served_offline):
    """The first Classify click on the offline model: the learned column is the shipped PMPO, says
    where it comes from, and reads the swapped example names that zero-shot CLIP gets wrong."""
    from playwright.sync_api import expect

    page.goto(served_offline)
    page.wait_for_selector("#classify-btn")
    assert page.locator("#checkpoint input").input_value() == "shipped: pmpo"
    page.locator("#examples-btn").click()
    expect(page.locator("#images")).to_contain_text("yellow_diamond")
    page.locator("#classify-btn").click()
    status = page.locator("#classify-status")
    expect(status).to_contain_text("8 image(s), 8 classes", timeout=120_000)
    expect(status).to_contain_text("held-out test accuracy")  # the shipped prompts' provenance
    expect(status).not_to_contain_text("running the plain image pass", timeout=120_000)  # the full answer
    # The bars: per image its name, then a table whose first row is the learned column's top-1 class.
    learned = page.evaluate("""() => {
        const out = [];
        for (const t of document.querySelectorAll('#topk-bars table')) {
            const name = t.previousElementSibling.textContent.trim();
            out.push([name, t.querySelector('tr td').textContent.trim()]);
        }
        return out;
    }""")
    right = sum(cls == name.removesuffix(".png").replace("_", " ") for name, cls in learned)
    assert len(learned) == 8 and right >= 6, learned  # measured 7 of 8 (zero-shot CLIP: 2, test_app.py)
