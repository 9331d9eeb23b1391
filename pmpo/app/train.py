"""The Train tab: few-shot prompt training on the user's own labelled images.

Labelled images come from uploaded files with a label per file (guessed from the file name,
editable in a table), from a zip with one folder per class, or — on a local install only —
from a folder path with class subfolders. Training runs :func:`pmpo.engine.train` in a worker
thread; the handler is a generator that turns the engine's per-step progress into live updates,
and a ``threading.Event`` passed as ``stop`` cancels between steps. The trained prompts are
saved as a safetensors prompt checkpoint, offered in the checkpoint picker at once and
downloadable.

Before training, one image in four of every class (with at least two images) is held out; the
report compares zero-shot CLIP with the trained prompts on those images only, so the number a
visitor sees is accuracy on images the prompts never saw, not training accuracy.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import threading
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from pmpo.backbone import OFFLINE_MODEL, resolve_model_name
from pmpo.config import PMPOConfig, list_methods
from pmpo.data.datasets import IMAGE_EXTENSIONS, Datum
from pmpo.data.loader import load_image
from pmpo.errors import DatasetError, InputError, PMPOError
from pmpo.model import build_model

from .inputs import MAX_CLASSNAME_CHARS, display_name, file_path
from .state import TRAINED_PREFIX, AppState, BackboneSpec, LRU

TRAIN_METHODS = tuple(m for m in ("pmpo", "coop", "cocoop", "kgcoop", "vpt", "ivlp", "maple", "promptsrc")
                      if m in list_methods())
MAX_TRAIN_IMAGES = 2000
MAX_EPOCHS = 50
MAX_ZIP_MEMBERS = 5000
MAX_ZIP_BYTES = 500 * 1024 * 1024


def local_paths_allowed() -> bool:
    """Reading a server folder is for local installs; on a public Space it would expose its disk."""
    return not os.environ.get("SPACE_ID") and os.environ.get("PMPO_ALLOW_LOCAL_PATHS", "1") != "0"


# --- labelled data ---------------------------------------------------------------------------------
def guess_label(name: str) -> str:
    """'golden_retriever_03.jpg' -> 'golden retriever': the file stem without a trailing number."""
    stem = Path(name).stem
    stem = re.sub(r"[\s_\-.]*\(?\d+\)?$", "", stem)
    return re.sub(r"[_\-]+", " ", stem).strip()


def label_rows(files: Any) -> list[list[str]]:
    """Rows (file, guessed label) for the editable label table."""
    paths = [file_path(f) for f in (files or [])]
    return [[display_name(p), guess_label(display_name(p))] for p in paths]


def items_from_table(files: Any, table: Any) -> tuple[list[Datum], list[str]]:
    """Uploaded files labelled by the table's (file, label) rows, matched by file name."""
    paths = [file_path(f) for f in (files or [])]
    if not paths:
        raise InputError("No training images: upload labelled images, a zip with one folder per class, or give a folder.")
    rows = _table_rows(table)
    labels = {str(r[0]).strip(): str(r[1]).strip() for r in rows if len(r) >= 2 and str(r[0]).strip()}
    pairs = []
    for p in paths:
        label = labels.get(display_name(p), "") or guess_label(display_name(p))
        if not label:
            raise InputError(f"No label for {display_name(p)!r}: fill in its row of the label table.")
        pairs.append((p, label))
    return _to_items(pairs)


def _table_rows(table: Any) -> list[list]:
    if table is None:
        return []
    if hasattr(table, "values") and hasattr(table, "columns"):  # pandas DataFrame
        return table.values.tolist()
    if isinstance(table, dict):  # gradio's {"headers": [...], "data": [...]}
        return list(table.get("data") or [])
    return [list(r) for r in table]


def items_from_zip(zip_file: Any, dest: str | Path) -> tuple[list[Datum], list[str]]:
    """A zip whose images sit in one folder per class (any depth: the image's parent folder names it)."""
    path = Path(file_path(zip_file))
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"{path.name!r} is not a readable zip file ({exc}).") from exc
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        if len(members) > MAX_ZIP_MEMBERS:
            raise InputError(f"The zip holds {len(members)} files; the limit is {MAX_ZIP_MEMBERS}.")
        if sum(m.file_size for m in members) > MAX_ZIP_BYTES:
            raise InputError(f"The zip expands to more than {MAX_ZIP_BYTES // 2**20} MB; the limit keeps the server alive.")
        dest = Path(dest) / uuid.uuid4().hex[:8]
        pairs = []
        for m in members:
            parts = Path(m.filename).parts
            if m.filename.startswith("/") or ".." in parts or any(p.startswith(".") or p == "__MACOSX" for p in parts):
                continue  # unsafe or hidden entries are never written
            if len(parts) < 2 or not parts[-1].lower().endswith(IMAGE_EXTENSIONS):
                continue
            target = dest.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(m) as src, open(target, "wb") as out:
                out.write(src.read())
            pairs.append((str(target), parts[-2]))
    if not pairs:
        raise InputError("The zip has no images inside class folders (expected e.g. cat/1.jpg, dog/2.jpg).")
    return _to_items(pairs)


def items_from_folder(folder: str) -> tuple[list[Datum], list[str]]:
    """Images in class subfolders of a local folder (``folder/<class>/*.jpg``)."""
    if not local_paths_allowed():
        raise InputError("Reading a server folder is disabled here (public Space); upload files or a zip instead.")
    root = Path(folder.strip()).expanduser()
    if not root.is_dir():
        raise InputError(f"Folder not found: {root}")
    pairs = [(str(p), p.parent.name) for p in sorted(root.glob("*/*")) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
             and not p.name.startswith(".")]
    if not pairs:
        raise InputError(f"No images in class subfolders of {root} (expected {root}/<class>/<image>.jpg).")
    return _to_items(pairs)


def _to_items(pairs: Sequence[tuple[str, str]]) -> tuple[list[Datum], list[str]]:
    """Labels become class ids in sorted order; needs two classes and bounded sizes."""
    if len(pairs) > MAX_TRAIN_IMAGES:
        raise InputError(f"{len(pairs)} training images is more than the app's limit of {MAX_TRAIN_IMAGES}; use `pmpo train`.")
    names = sorted({label.replace("_", " ").strip() for _, label in pairs}, key=str.lower)
    too_long = [n for n in names if len(n) > MAX_CLASSNAME_CHARS]
    if too_long:
        raise InputError(f"Label too long ({len(too_long[0])} characters, limit {MAX_CLASSNAME_CHARS}): {too_long[0][:40]!r}...")
    lowered = {}
    for n in names:
        if n.lower() in lowered:
            raise InputError(f"Labels {lowered[n.lower()]!r} and {n!r} differ only in case; use one spelling.")
        lowered[n.lower()] = n
    if len(names) < 2:
        raise InputError(f"Training needs at least two classes; all images are labelled {names[0]!r}." if names
                         else "Training needs at least two classes.")
    index = {n: i for i, n in enumerate(names)}
    items = [Datum(path=p, label=index[label.replace("_", " ").strip()], classname=label.replace("_", " ").strip())
             for p, label in pairs]
    return items, names


def check_images(items: list[Datum]) -> tuple[list[Datum], list[str]]:
    """Drop unreadable images up front (with their reasons) so training never dies mid-epoch."""
    good, problems = [], []
    for d in items:
        try:
            load_image(d.path)
            good.append(d)
        except DatasetError as exc:
            problems.append(str(exc).replace(d.path, repr(display_name(d.path))))
    return good, problems


HOLDOUT_EVERY = 4  # every 4th image of a class (sorted by file name) is held out


def split_holdout(items: Sequence[Datum], every: int = HOLDOUT_EVERY) -> tuple[list[Datum], list[Datum]]:
    """(train, held-out): per class, in file-name order, images every-1, 2·every-1, … are held out;
    a class with a single image keeps it for training. Deterministic, so a rerun scores the same images."""
    by_class: dict[int, list[Datum]] = {}
    for d in items:
        by_class.setdefault(d.label, []).append(d)
    train, held = [], []
    for label in sorted(by_class):
        group = sorted(by_class[label], key=lambda d: display_name(d.path))
        for i, d in enumerate(group):
            (held if len(group) >= 2 and i % every == every - 1 else train).append(d)
        if len(group) >= 2 and not any(d.label == label for d in held):
            held.append(train.pop())  # 2 or 3 images: still hold one out
    return train, held


# --- running a training ---------------------------------------------------------------------------
@dataclass
class TrainUpdate:
    """One live update: a status line, the per-step history so far, and when done the checkpoint."""

    status: str
    history: list[dict] = field(default_factory=list)
    done: bool = False
    checkpoint: str | None = None  # path of the downloadable .safetensors
    choice: str | None = None  # its name in the checkpoint picker
    error: bool = False
    heldout: dict | None = None  # {"n": images, "zero_shot": %, "trained": %} on the held-out images


class TrainJobs:
    """Cancel events of running trainings, by session: bounded, entries removed when a run ends."""

    def __init__(self, capacity: int = 16):
        self._events: LRU[str, threading.Event] = LRU(capacity)

    def start(self, key: str) -> threading.Event:
        event = threading.Event()
        self._events.put(key, event)
        return event

    def cancel(self, key: str) -> bool:
        event = self._events.get(key)
        if event is None:
            return False
        event.set()
        return True

    def finish(self, key: str, event: threading.Event) -> None:
        if self._events.get(key) is event:
            self._events.pop(key)

    def __len__(self) -> int:
        return len(self._events)


OFFLINE_EPOCHS = 20
# The ShapeWorld benchmark's val-chosen lr (0.056 at batch 32, docs/SHAPEWORLD.md) scaled linearly to
# this tab's batch of 4; used on the offline model when the caller names no lr.
OFFLINE_LR = 0.056 * 4 / 32


def _is_offline_model(model_name: str) -> bool:
    return resolve_model_name(model_name) == OFFLINE_MODEL


def default_epochs(spec: BackboneSpec) -> int:
    """The Epochs slider's start value: 20 on the offline model, whose example task (PMPO, the 32
    held-out images of the 8 example classes, zero-shot 18.8 %) reached 40.6, 53.1, 62.5, 75.0, 87.5,
    87.5 and 87.5 % after 20 epochs in seven unseeded runs (about 50 s each with one thread on an
    otherwise idle 2-core CPU; the prompt initialisation and the batch order decide whether a run
    finds the context that undoes the swapped names); 5 elsewhere, where one epoch of a real CLIP
    costs far more."""
    return OFFLINE_EPOCHS if _is_offline_model(spec.model) else 5


def train_config(epochs: int, n_items: int, lr: float | None = None, random_crop: bool = True):
    """MaPLe's recipe (the engine's defaults), with the batch no larger than the data.

    ``random_crop=False`` trains on flipped full images only: the ShapeWorld benchmark's choice for
    the offline model, made on its val split, because a crop of a 64-px scene with one small object
    often cuts the object out (docs/SHAPEWORLD.md, "Choosing the recipe"). The offline model also
    takes the benchmark's lr, scaled to the batch (``OFFLINE_LR``, set by ``run_training``)."""
    from pmpo.engine import TrainConfig

    epochs = int(epochs)
    if not 1 <= epochs <= MAX_EPOCHS:
        raise InputError(f"Epochs must be between 1 and {MAX_EPOCHS}, got {epochs}.")
    cfg = TrainConfig(epochs=epochs, batch_size=max(1, min(4, n_items)), warmup_epochs=1 if epochs > 1 else 0)
    if not random_crop:
        cfg.min_crop_scale = 1.0
    if lr is not None:
        cfg.lr = float(lr)
    return cfg


def run_training(state: AppState, spec: BackboneSpec, method: str, epochs: int, items: list[Datum],
                 classnames: list[str], stop: threading.Event, name: str | None = None,
                 lr: float | None = None, poll_s: float = 0.5, session: str | None = None) -> Iterator[TrainUpdate]:
    """Train in a worker thread and yield updates; the final one names the new checkpoint, which
    only ``session`` (the browser session that trained it) is offered."""
    from pmpo.engine import evaluate, train

    if method not in TRAIN_METHODS:
        raise InputError(f"Unknown method {method!r}; choose one of {', '.join(TRAIN_METHODS)}.")
    items, problems = check_images(items)
    if problems:
        yield TrainUpdate("Skipped unreadable images: " + " ".join(problems[:5]))
    if len({d.label for d in items}) < 2:
        raise InputError("After skipping unreadable images fewer than two classes remain.")
    items, held = split_holdout(items)
    backbone = state.backbone(spec)
    offline = _is_offline_model(backbone.model_name)
    cfg = train_config(epochs, len(items), OFFLINE_LR if lr is None and offline else lr, random_crop=not offline)
    try:
        model = build_model(PMPOConfig(method=method, model=backbone.model_name, pretrained=backbone.pretrained or "none"),
                            device=state.device, backbone=backbone)
    except PMPOError as exc:
        raise InputError(f"{method} does not fit {spec.label}: {exc}") from exc
    zero_shot = None
    if held:
        zs_model = build_model(PMPOConfig(method="zeroshot", model=backbone.model_name,
                                          pretrained=backbone.pretrained or "none"), device=state.device, backbone=backbone)
        zero_shot = evaluate(zs_model, held, classnames).accuracy
        yield TrainUpdate(f"Held out {len(held)} of {len(items) + len(held)} images (one in {HOLDOUT_EVERY} per class) "
                          f"to score the result; zero-shot accuracy on them: {zero_shot:.1f}%.")

    updates: queue.Queue = queue.Queue()
    outcome: dict[str, Any] = {}

    def worker() -> None:
        try:
            outcome["result"] = train(model, items, classnames, cfg, progress=updates.put, stop=stop)
        except BaseException as exc:  # reported to the user below; the thread must not die silently
            outcome["error"] = exc
        finally:
            updates.put(None)

    thread = threading.Thread(target=worker, name="pmpo-app-train", daemon=True)
    started = time.perf_counter()
    thread.start()
    history: list[dict] = []
    finished = False
    while not finished:
        try:
            item = updates.get(timeout=poll_s)
        except queue.Empty:
            yield TrainUpdate(_running_status(history, cfg.epochs, started, len(items)), list(history))
            continue
        batch = [item]
        while not updates.empty():
            batch.append(updates.get_nowait())
        for entry in batch:
            if entry is None:
                finished = True
            else:
                history.append(entry)
        if not finished:
            yield TrainUpdate(_running_status(history, cfg.epochs, started, len(items)), list(history))
    thread.join()

    if "error" in outcome:
        exc = outcome["error"]
        message = str(exc) if isinstance(exc, PMPOError) else f"{type(exc).__name__}: {exc}"
        yield TrainUpdate(f"Training failed: {message}", history, done=True, error=True)
        return
    result = outcome["result"]
    if result.stopped and not result.history:
        yield TrainUpdate("Training cancelled before the first epoch finished; nothing was saved.", history, done=True)
        return
    label = name.strip() if name and name.strip() else f"{method}-{len(classnames)}cls-{time.strftime('%H%M%S')}"
    label = re.sub(r"[^A-Za-z0-9_.\-]+", "-", label)[:60]
    written = state.cache_dir / "trained" / uuid.uuid4().hex[:8] / f"{label}.safetensors"
    model.eval()
    model.save(str(written), classnames=",".join(classnames)[:2000], epochs=str(len(result.history)), source="pmpo app")
    choice = state.add_checkpoint_file(written, prefix=TRAINED_PREFIX, name=written.name, session=session)
    out = state.checkpoint_path(choice, session)  # the session's copy (deleted with the session)
    shutil.rmtree(written.parent, ignore_errors=True)
    last = result.history[-1] if result.history else {}
    heldout = None
    if held:
        heldout = {"n": len(held), "zero_shot": zero_shot, "trained": evaluate(model, held, classnames).accuracy}
        score = (f"**Held-out accuracy** ({len(held)} images the training never saw): zero-shot "
                 f"{heldout['zero_shot']:.1f}% → trained {heldout['trained']:.1f}% "
                 f"({heldout['trained'] - heldout['zero_shot']:+.1f} points). ")
    else:
        score = "No class has two images, so nothing could be held out to score the result. "
    status = (
        f"{'Cancelled after' if result.stopped else 'Finished'} {len(result.history)} epoch(s) in {result.wall_time_s:.1f} s "
        f"({result.images_per_s:.1f} images/s) on {len(items)} images; " + score
        + f"Last epoch loss {last.get('loss', float('nan')):.4f}, training accuracy "
        f"{last.get('acc', float('nan')):.1f}%. The prompts are selected as **{choice}** in the checkpoint picker."
    )
    yield TrainUpdate(status, history, done=True, checkpoint=str(out), choice=choice, heldout=heldout)


def _running_status(history: list[dict], epochs: int, started: float, n: int) -> str:
    elapsed = time.perf_counter() - started
    if not history:
        return f"Preparing… ({elapsed:.0f} s, {n} images)"
    h = history[-1]
    return (f"Epoch {h['epoch']}/{epochs}, step {h['step']}/{h['total_steps']} — loss {h['loss']:.4f}, "
            f"batch accuracy {h['acc']:.0f}%, lr {h['lr']:.2e} ({elapsed:.0f} s)")


def history_figure(history: list[dict]):
    """Loss and batch accuracy per step."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 2.6), dpi=80, layout="constrained")
    ax = fig.subplots()
    if history:
        steps = [h["step"] for h in history]
        ax.plot(steps, [h["loss"] for h in history], color="C3", label="loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax2 = ax.twinx()
        ax2.plot(steps, [h["acc"] for h in history], color="C0", alpha=0.6, label="batch accuracy %")
        ax2.set_ylim(0, 100)
        ax2.set_ylabel("batch accuracy %")
        handles = ax.get_lines() + ax2.get_lines()
        ax.legend(handles, [h.get_label() for h in handles], loc="upper right", fontsize=8, frameon=False)
    else:
        ax.text(0.5, 0.5, "no steps yet", ha="center", va="center", transform=ax.transAxes)
    return fig
