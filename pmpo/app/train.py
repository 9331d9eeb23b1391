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

import contextvars
import logging
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

from . import zerogpu
from .features import ImageFeatures
from .inputs import MAX_CLASSNAME_CHARS, display_name, file_path
from .state import TRAINED_PREFIX, AppState, BackboneSpec, LRU

log = logging.getLogger(__name__)

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
    pairs = _labelled(files, table)
    if not pairs:
        raise InputError("No training images: upload labelled images, a zip with one folder per class, or give a folder.")
    for p, label in pairs:
        if not label:
            raise InputError(f"No label for {display_name(p)!r}: fill in its row of the label table.")
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


# --- what the Train tab shows before a run -----------------------------------------------------------
SUMMARY_HEADERS = ["class", "images", "held out"]
FASHION_PER_CLASS = 12  # 9 to train on and 3 held out per class: a default run fits a free Space's minutes


def _labelled(files: Any, table: Any) -> list[tuple[str, str]]:
    """(path, label) per uploaded file: its row of the label table, else what its name says; empty
    labels are kept (``items_from_table`` refuses them, the overview leaves them out)."""
    paths = [file_path(f) for f in (files or [])]
    labels = {str(r[0]).strip(): str(r[1]).strip() for r in _table_rows(table) if len(r) >= 2 and str(r[0]).strip()}
    return [(p, labels.get(display_name(p), "") or guess_label(display_name(p))) for p in paths]


def _by_class(files: Any, table: Any) -> dict[str, list[str]]:
    """Class -> its files, classes in case-insensitive order (unlabelled files left out)."""
    groups: dict[str, list[str]] = {}
    for path, label in _labelled(files, table):
        if label:
            groups.setdefault(label, []).append(path)
    return dict(sorted(groups.items(), key=lambda kv: kv[0].lower()))


def class_summary(files: Any, table: Any) -> list[list]:
    """Rows (class, images, held out) instead of a row per file: the held-out count follows
    ``split_holdout`` (one in four, at least one of two or more)."""
    return [[label, len(paths), max(1, len(paths) // HOLDOUT_EVERY) if len(paths) >= 2 else 0]
            for label, paths in _by_class(files, table).items()]


def class_thumbnails(files: Any, table: Any, limit: int = 40) -> list[tuple[str, str]]:
    """One (image, "class (n)") per class, for the gallery."""
    return [(paths[0], f"{label} ({len(paths)})") for label, paths in _by_class(files, table).items()][:limit]


def example_set_for(spec: BackboneSpec, folder: str | Path) -> list[str]:
    """The example training images that can show a gain on ``spec``: ShapeWorld's swapped-name
    task on the offline model; real Fashion-MNIST photos on a real CLIP (which already reads shapes)."""
    from .fashion import fashion_available, fashion_images
    from .state import example_training_images

    if _is_offline_model(spec.model) or not fashion_available():
        return example_training_images(folder)
    return fashion_images(per_class=FASHION_PER_CLASS)


def example_note(spec: BackboneSpec) -> str:
    from .fashion import FASHION_CLASSES, FASHION_CREDIT, fashion_available
    from .state import EXAMPLE_TRAIN_PER_CLASS, TRAIN_EXAMPLE_CLASSES

    if _is_offline_model(spec.model) or not fashion_available():
        return (f"*Example set: ShapeWorld, {len(TRAIN_EXAMPLE_CLASSES)} classes × {EXAMPLE_TRAIN_PER_CLASS}: shapes whose "
                "names the offline model's plain prompt reads swapped (its model card says why), so zero-shot CLIP gets "
                "them wrong while its image features tell them apart — a gap a learned prompt can close.*")
    return (f"*Example set: Fashion-MNIST, {len(FASHION_CLASSES)} clothing classes × {FASHION_PER_CLASS} real 28-px "
            f"greyscale product photos, far from CLIP's web images. {FASHION_CREDIT}*")


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
    """One live update: a status line, the report (what API clients read: held-out scores so far,
    ETA, phase), the per-step history for the plot, and when done the checkpoint."""

    status: str
    history: list[dict] = field(default_factory=list)
    done: bool = False
    checkpoint: str | None = None  # path of the downloadable .safetensors
    choice: str | None = None  # its name in the checkpoint picker
    error: bool = False
    report: dict = field(default_factory=dict)

    @property
    def heldout(self) -> dict | None:
        """The latest held-out comparison: {"n", "zero_shot", "trained", ...} or None."""
        rows = self.report.get("heldout") or []
        return {"n": self.report.get("n_heldout"), **rows[-1]} if rows else None


@dataclass(frozen=True)
class TrainLimits:
    """What a server's owner allows one training (environment variables; a public Space, where
    ``SPACE_ID`` is set, gets defaults that keep it shared):

    * ``PMPO_MAX_TRAIN_SECONDS`` — every run stops there at the latest, keeps its prompts and
      reports held-out accuracy (Space default 600; ZeroGPU 120, at most 270: a training is one GPU
      call; elsewhere none);
    * ``PMPO_MAX_TRAIN_IMAGES`` — training images per run (Space default 500; elsewhere 2000);
    * ``PMPO_MAX_TRAININGS`` — trainings running at once, server-wide; more wait in the queue
      (default 1). A session never runs two at once."""

    max_seconds: float = 0.0  # 0: no limit
    max_images: int = MAX_TRAIN_IMAGES
    max_concurrent: int = 1

    @classmethod
    def from_env(cls, env: dict | None = None) -> "TrainLimits":
        env = os.environ if env is None else env
        space = bool(env.get("SPACE_ID"))

        def number(name: str, default: float, kind=float, least: float = 0):
            raw = env.get(name, "").strip()
            if not raw:
                return kind(default)
            try:
                value = kind(float(raw))
            except ValueError:
                raise InputError(f"{name}={raw!r} is not a number") from None
            if value < least:
                raise InputError(f"{name} must be at least {least:g}, got {raw}")
            return value

        if zerogpu.active(env):  # a training is one GPU call, billed to the visitor's daily quota
            most = zerogpu.TRAIN_MAX_S - zerogpu.TRAIN_SETUP_S
            seconds = number("PMPO_MAX_TRAIN_SECONDS", ZEROGPU_TRAIN_S)
            if not 0 < seconds <= most:
                raise InputError(f"PMPO_MAX_TRAIN_SECONDS must lie between 1 and {most} on ZeroGPU (a training is one "
                                 f"GPU call of at most {zerogpu.TRAIN_MAX_S} s), got {seconds:g}")
        else:
            seconds = number("PMPO_MAX_TRAIN_SECONDS", 600 if space else 0)
        return cls(max_seconds=seconds,
                   max_images=number("PMPO_MAX_TRAIN_IMAGES", 500 if space else MAX_TRAIN_IMAGES, int, 2),
                   max_concurrent=number("PMPO_MAX_TRAININGS", 1, int, 1))

    def budget(self, requested: float) -> float:
        """The run's time budget: the visitor's (0 = none), never above the owner's limit."""
        requested = float(requested or 0)
        if not self.max_seconds:
            return requested
        return min(requested, self.max_seconds) if requested else self.max_seconds

    def check_images(self, n: int) -> None:
        if n > self.max_images:
            raise InputError(f"{n} training images is more than this server's limit of {self.max_images} "
                             "(PMPO_MAX_TRAIN_IMAGES); use fewer, or `pmpo train` on your own machine.")

    def describe(self) -> str:
        seconds = f"every run stops after **{self.max_seconds:.0f} s**" if self.max_seconds else "no time limit"
        return (f"*Limits on this server: {seconds} (keeping what it learned); at most **{self.max_images}** "
                f"training images; {self.max_concurrent} training(s) at once (others wait in line), one per visitor.*")


class TrainJobs:
    """Cancel events of running trainings, by session: bounded, entries removed when a run ends."""

    def __init__(self, capacity: int = 16):
        self._events: LRU[str, threading.Event] = LRU(capacity)

    def running(self, key: str) -> bool:
        return self._events.get(key) is not None

    def start(self, key: str) -> threading.Event:
        """A cancel event for ``key``'s new run; refused while that session's last run goes on."""
        if self.running(key):
            raise InputError("A training of yours is still running: wait for it, or Cancel it (what it learned is kept).")
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
APP_BATCH = 4
DEFAULT_BUDGET_S = 150  # the time-budget slider's start value: a default run ends within 3 minutes
MAX_BUDGET_S = 3600
# Methods without visual prompts encode this many augmented views of each training image once
# (TrainConfig.cached_views): then every step is a text pass.
APP_CACHED_VIEWS = 2
# Held-out scoring while training: at most every EVAL_GAP_MIN_S seconds, at least every
# EVAL_GAP_MAX_S, and otherwise when scoring has cost no more than 1/EVAL_SHARE of the time since.
EVAL_GAP_MIN_S, EVAL_GAP_MAX_S, EVAL_SHARE = 4.0, 45.0, 5.0
FIRST_EVAL_S = 12.0  # the first comparison after this much training (or the first epoch's end)
ZEROGPU_TRAIN_S = 120  # default PMPO_MAX_TRAIN_SECONDS on ZeroGPU
YIELD_MAX_S = 30.0  # longest pause of a training for visitors' requests between two of its steps


def _is_offline_model(model_name: str) -> bool:
    return resolve_model_name(model_name) == OFFLINE_MODEL


def default_epochs(spec: BackboneSpec) -> int:
    """The Epochs slider's start value: 20 on the offline model, whose example task (PMPO, the 32
    held-out images of the 8 example classes, zero-shot 18.8 %) gains there; 5 elsewhere, where the
    time budget usually ends the run first (the epochs are then fitted to the budget)."""
    return OFFLINE_EPOCHS if _is_offline_model(spec.model) else 5


def train_config(epochs: int, n_items: int, lr: float | None = None, random_crop: bool = True,
                 cached_views: int = 0):
    """The app's recipe: MaPLe's (the engine's defaults) **without the warm-up epoch** — a 1e-5
    epoch is a fifth of a short run spent standing still, and a visitor judges in the first minute —
    with the batch no larger than the data.

    ``random_crop=False`` trains on flipped full images only: the ShapeWorld benchmark's choice for
    the offline model, made on its val split, because a crop of a 64-px scene with one small object
    often cuts the object out (docs/SHAPEWORLD.md, "Choosing the recipe"). The offline model also
    takes the benchmark's lr, scaled to the batch (``OFFLINE_LR``, set by ``run_training``)."""
    from pmpo.engine import TrainConfig

    epochs = int(epochs)
    if not 1 <= epochs <= MAX_EPOCHS:
        raise InputError(f"Epochs must be between 1 and {MAX_EPOCHS}, got {epochs}.")
    cfg = TrainConfig(epochs=epochs, batch_size=max(1, min(APP_BATCH, n_items)), warmup_epochs=0,
                      cached_views=cached_views)
    if not random_crop:
        cfg.min_crop_scale = 1.0
    if lr is not None:
        cfg.lr = float(lr)
    return cfg


# --- cost estimate --------------------------------------------------------------------------------
@dataclass(frozen=True)
class PassCost:
    """Seconds for one image through the frozen tower and one prompted text sequence, no gradient:
    measured once per backbone on this machine (``measure_cost``)."""

    image_s: float
    text_s: float
    at: float = 0.0  # time.monotonic() of the last measurement


COST_REFRESH_S = 120.0


def measure_cost(state: AppState, spec: BackboneSpec) -> PassCost:
    """Time 4 images and 64 short text sequences through ``spec``'s towers (after one warm-up
    call each); about 1.5 s at ViT-B/16 on 2 cores. Remembered by the app state and measured again
    after ``COST_REFRESH_S``, keeping the smallest times seen: a measurement taken while something
    else ran (the start-up warm-up, another visitor's training) is slow, and would otherwise
    shorten every run fitted to a budget (the budget still stops a run that the estimate misjudged)."""
    found = state.pass_costs.get(spec)
    if found is not None and time.monotonic() - found.at < COST_REFRESH_S:
        return found
    image_s, text_s = time_passes(state.backbone(spec))
    if found is not None:
        image_s, text_s = min(image_s, found.image_s), min(text_s, found.text_s)
    cost = PassCost(image_s, text_s, time.monotonic())
    state.pass_costs.put(spec, cost)
    return cost


@zerogpu.gpu(duration=zerogpu.PASS_S)
def time_passes(backbone) -> tuple[float, float]:
    """Seconds per image and per text sequence through ``backbone``'s towers (a kernel:
    :mod:`pmpo.app.zerogpu`; on ZeroGPU it times the worker's GPU, where the training will run)."""
    import torch

    from pmpo.encoders import TextEncoder

    clip = zerogpu.kernel_model(backbone.clip)
    device = next(clip.parameters()).device
    size = backbone.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    x = torch.randn(4, 3, *size, device=device)
    tokens = backbone.tokenizer([f"a photo of a thing number {i}." for i in range(64)]).to(device)
    with torch.no_grad():
        clip.encode_image(x[:1])
        t0 = time.perf_counter()
        clip.encode_image(x)
        image_s = (time.perf_counter() - t0) / 4
        text = TextEncoder(clip, backbone.tokenizer)
        text.encode_tokens(tokens[:4])
        t0 = time.perf_counter()
        text.encode_tokens(tokens)
        text_s = (time.perf_counter() - t0) / 64
    return image_s, text_s


@dataclass
class Estimate:
    """Predicted seconds of a run, from :class:`PassCost` and the method's shape."""

    setup_s: float  # zero-shot on the held-out images, plus the feature pass of cached methods
    epoch_s: float
    eval_s: float  # one held-out scoring of the prompts

    def total(self, epochs: int) -> float:
        return self.setup_s + epochs * self.epoch_s + self.eval_s

    def epochs_within(self, budget_s: float, most: int) -> int:
        """The most epochs (at least 1) whose estimate fits ``budget_s`` (0: no budget)."""
        if not budget_s:
            return most
        room = budget_s - self.setup_s - self.eval_s
        return max(1, min(most, int(room // max(self.epoch_s, 1e-9))))


# Backward through the frozen image tower (input gradients only) plus the prompted forward: about
# 2.5 forward passes; text sequences with gradients: forward + backward, about 3.
IMAGE_TRAIN_FACTOR, TEXT_TRAIN_FACTOR = 2.5, 3.0


def estimate(cost: PassCost, cfg: PMPOConfig, n_train: int, n_heldout: int, n_classes: int, cached_views: int) -> Estimate:
    """Cost model of one run: image passes × measured image cost + text sequences × measured text cost."""
    n_prompts = max(1, cfg.n_prompts)
    visual = cfg.uses_visual_prompts
    batch = max(1, min(APP_BATCH, n_train))
    steps = max(1, n_train // batch)
    text_per_step = n_prompts * n_classes * (batch if cfg.uses_meta_net else 1)
    step = TEXT_TRAIN_FACTOR * text_per_step * cost.text_s
    setup = n_heldout * cost.image_s
    if cached_views:
        setup += cached_views * n_train * cost.image_s
        eval_s = n_prompts * n_classes * cost.text_s * (n_heldout if cfg.uses_meta_net else 1)
    else:
        step += IMAGE_TRAIN_FACTOR * batch * cost.image_s if visual else batch * cost.image_s
        eval_s = n_heldout * cost.image_s + n_prompts * n_classes * cost.text_s
    return Estimate(setup, steps * step, eval_s)


def describe_estimate(state: AppState, spec: BackboneSpec, method: str, n_images: int, n_classes: int,
                      epochs: int, budget_s: float) -> str:
    """The line shown before Train: per-epoch and total seconds for this backbone and data."""
    if method not in TRAIN_METHODS:
        raise InputError(f"Unknown method {method!r}; choose one of {', '.join(TRAIN_METHODS)}.")
    if n_images < 2 or n_classes < 2:
        return "Add labelled images of at least two classes to see how long training takes."
    held = max(0, round(n_images / HOLDOUT_EVERY))
    cfg = PMPOConfig(method=method)
    views = 0 if cfg.uses_visual_prompts else APP_CACHED_VIEWS
    est = estimate(measure_cost(state, spec), cfg, n_images - held, held, n_classes, views)
    fit = est.epochs_within(budget_s, int(epochs))
    line = (f"**Estimate** on {spec.label} (measured here: {state.pass_costs.get(spec).image_s:.2f} s per image pass): "
            f"≈ {est.epoch_s:.0f} s per epoch of {n_images - held} training images"
            + (f", after {est.setup_s:.0f} s computing their features once" if views else "")
            + f"; {int(epochs)} epoch(s) ≈ {_duration(est.total(int(epochs)))}.")
    if budget_s and fit < int(epochs):
        line += f" The {budget_s:.0f} s budget fits **{fit}** epoch(s) ≈ {_duration(est.total(fit))}: that many will run."
    return line


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


# --- held-out scoring -----------------------------------------------------------------------------
class HeldOut:
    """Accuracy on the held-out images: their plain features once (zero-shot, and the prompted
    view of methods without visual prompts), the prompted pass of the others at every scoring."""

    def __init__(self, features: ImageFeatures, spec: BackboneSpec, model, items: list[Datum], classnames: list[str]):
        import torch

        from .features import preprocess

        self.model, self.classnames = model, classnames
        images = [load_image(d.path) for d in items]
        self.labels = torch.tensor([d.label for d in items])
        self.plain = features.plain(spec, model, images)
        self.x = None if model.frozen_image_side else preprocess(model, images)
        self.cost_s = 0.0
        self.zero_shot_accuracy: float | None = None

    @property
    def gap_s(self) -> float:
        """Seconds between scorings: at least EVAL_GAP_MIN_S, at most EVAL_GAP_MAX_S, and otherwise
        long enough that scoring takes at most 1/EVAL_SHARE of the run."""
        return min(EVAL_GAP_MAX_S, max(EVAL_GAP_MIN_S, EVAL_SHARE * self.cost_s))

    def zero_shot(self) -> float:
        import torch

        with torch.no_grad():
            prior = self.model.prior_features(self.classnames)
        self.zero_shot_accuracy = self._accuracy(self.plain @ prior.t())
        return self.zero_shot_accuracy

    def trained(self) -> float:
        import torch

        from pmpo.encoders import VisionOutput

        started = time.perf_counter()
        model = self.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                cw = model.class_weights(self.classnames)
                vision = VisionOutput(self.plain, None, 0) if self.x is None else model.encode_image(self.x)
                accuracy = self._accuracy(model.logits_from(vision, cw))
        finally:
            model.train(was_training)
        self.cost_s = time.perf_counter() - started
        return accuracy

    def _accuracy(self, logits) -> float:
        return 100.0 * float((logits.argmax(-1).cpu() == self.labels).float().mean())


# --- the training session (a kernel: pmpo.app.zerogpu) -------------------------------------------
class StopFlag:
    """A cancel signal that crosses into a ZeroGPU worker: a file (``threading.Event`` cannot be pickled)."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / f"stop-{uuid.uuid4().hex}"

    def set(self) -> None:
        self.path.touch()

    def is_set(self) -> bool:
        return self.path.exists()

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def _session_seconds(*_, budget_s: float = 0.0, **__) -> int:
    """The GPU time a session asks ZeroGPU for: its budget plus setup, within the platform's bound."""
    return int(min(zerogpu.TRAIN_MAX_S, (budget_s or zerogpu.TRAIN_MAX_S) + zerogpu.TRAIN_SETUP_S))


@zerogpu.gpu(duration=_session_seconds)
def train_session(*, model, spec: BackboneSpec, items: list[Datum], held: list[Datum], classnames: list[str], cfg,
                  budget_s: float, started: float, stop, features: ImageFeatures | None = None,
                  gate=None) -> Iterator[dict]:
    """Zero-shot on the held-out images, the training with held-out scores on a time cadence, and
    the final score, as a stream of picklable updates: ``zero_shot``, ``features``, ``step`` (with
    ``steps_s``, the seconds inside steps so far), ``epoch``, ``heldout`` (with the scorer's cadence)
    and last ``result`` (the TrainResult, the learned tensors on the CPU, whether the budget stopped
    it) or ``failed``. ``features``/``gate`` are the server's pass store and request gate in-process
    (None in a ZeroGPU worker, which has neither); ``started`` is the run's ``time.perf_counter()``
    origin (system-wide on Linux, so a forked worker shares it)."""
    from pmpo.engine import train

    try:
        model = zerogpu.kernel_model(model)
        scorer = HeldOut(features or ImageFeatures(), spec, model, held, classnames) if held else None
        yield {"type": "zero_shot", "accuracy": scorer.zero_shot() if scorer else None}
    except Exception as exc:  # noqa: BLE001 (reported as an update: a worker's exception may not pickle)
        yield _failed(exc)
        return
    updates: queue.Queue = queue.Queue()
    # steps_s: seconds inside optimizer steps only (the ETA's rate); mark: when the training last left
    # the callback (so feature passes, scoring and pauses for visitors are not counted as steps).
    clock = {"train_start": None, "last_eval": None, "steps_s": 0.0, "mark": time.perf_counter(), "budget_hit": False}
    steps_per_epoch = max(1, len(items) // cfg.batch_size)

    def score(entry: dict) -> dict:
        """The prompts as they are now; ``entry`` is the step they come from."""
        accuracy = scorer.trained()
        clock["last_eval"] = time.perf_counter()
        return {"type": "heldout", "elapsed_s": time.perf_counter() - started, "step": entry["step"],
                "epoch": round(entry["epoch"] - 1 + entry["epoch_step"] / steps_per_epoch, 2),
                "zero_shot": scorer.zero_shot_accuracy, "trained": accuracy, "gap_s": scorer.gap_s,
                "cost_s": scorer.cost_s}

    def progress(entry: dict) -> None:
        now = time.perf_counter()
        try:
            if entry.get("type") != "step":
                updates.put(entry)
                return
            clock["steps_s"] += now - clock["mark"]
            updates.put({**entry, "steps_s": clock["steps_s"]})
            if clock["train_start"] is None:
                clock["train_start"] = now
            if budget_s and now - started >= budget_s and not stop.is_set():
                clock["budget_hit"] = True
                stop.set()
            if gate is not None:
                gate.wait_idle(YIELD_MAX_S)  # give way to visitors' requests between steps
            if scorer is None or entry["step"] == entry["total_steps"]:
                return  # the last step's score comes after the run (also when cancelled)
            since = time.perf_counter() - (clock["last_eval"] or clock["train_start"])
            first_due = clock["last_eval"] is None and (since >= FIRST_EVAL_S or entry["epoch_step"] == steps_per_epoch)
            if first_due or (clock["last_eval"] is not None and since >= scorer.gap_s):
                updates.put(score(entry))
        finally:
            clock["mark"] = time.perf_counter()

    def run() -> None:
        try:
            result = train(model, items, classnames, cfg, progress=progress, stop=stop)
            last = updates_seen.get("step")
            if scorer is not None and last is not None:
                updates.put(score(last))
            learned = {k: v.detach().cpu() for k, v in model.state_dict().items() if k.startswith("prompts.")}
            updates.put({"type": "result", "result": result, "state": learned, "budget_hit": clock["budget_hit"]})
        except BaseException as exc:  # noqa: BLE001 (the session reports it; the thread must not die silently)
            updates.put(_failed(exc))
        finally:
            updates.put(None)

    updates_seen: dict[str, dict] = {}
    thread = threading.Thread(target=run, name="pmpo-train-session", daemon=True)
    thread.start()
    try:
        while (entry := updates.get()) is not None:
            if entry.get("type") == "step":
                updates_seen["step"] = entry
            yield entry
    finally:  # the consumer went away (a closed stream): stop the training at its next step
        if thread.is_alive():
            stop.set()
        thread.join()


def _failed(exc: BaseException) -> dict:
    """A failure as a picklable update: a PMPOError's message is for the visitor; anything else
    names its type, and the traceback goes to the server's log."""
    import traceback

    message = str(exc) if isinstance(exc, PMPOError) else f"{type(exc).__name__}: {exc}"
    if not isinstance(exc, PMPOError):
        log.error("training failed", exc_info=exc)
    return {"type": "failed", "error": message, "traceback": "".join(traceback.format_exception(exc))}


# --- the run --------------------------------------------------------------------------------------
def run_training(state: AppState, spec: BackboneSpec, method: str, epochs: int, items: list[Datum],
                 classnames: list[str], stop: threading.Event, name: str | None = None,
                 lr: float | None = None, poll_s: float = 1.0, session: str | None = None,
                 budget_s: float = 0.0, seed: int = 1) -> Iterator[TrainUpdate]:
    """Train in a worker thread and yield updates at most every ``poll_s`` seconds (and at once
    when a held-out score arrives). The held-out images are scored while the run goes on, on a
    time cadence; ``budget_s`` (0: none) fits the epochs to the estimate and stops the run there at
    the latest; a cancel or the budget keeps the prompts learned so far. The final update names
    the new checkpoint, which only ``session`` (the browser session that trained it) is offered."""
    if method not in TRAIN_METHODS:
        raise InputError(f"Unknown method {method!r}; choose one of {', '.join(TRAIN_METHODS)}.")
    budget_s = float(budget_s or 0)
    if not 0 <= budget_s <= MAX_BUDGET_S:
        raise InputError(f"The time budget must lie between 0 (none) and {MAX_BUDGET_S} s, got {budget_s:g}.")
    train_config(epochs, 1)  # validates the epochs before any work
    started = time.perf_counter()
    items, problems = check_images(items)
    if problems:
        yield TrainUpdate("Skipped unreadable images: " + " ".join(problems[:5]))
    if len({d.label for d in items}) < 2:
        raise InputError("After skipping unreadable images fewer than two classes remain.")
    items, held = split_holdout(items)
    backbone = state.backbone(spec)
    offline = _is_offline_model(backbone.model_name)
    import torch

    cfg_model = PMPOConfig(method=method, model=backbone.model_name, pretrained=backbone.pretrained or "none")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the same initial prompts for the same request
            model = build_model(cfg_model, device=state.device, backbone=backbone)
    except PMPOError as exc:
        raise InputError(f"{method} does not fit {spec.label}: {exc}") from exc
    views = APP_CACHED_VIEWS if model.frozen_image_side else 0
    est = estimate(measure_cost(state, spec), model.cfg, len(items), len(held), len(classnames), views)
    run_epochs = est.epochs_within(budget_s, int(epochs))
    cfg = train_config(run_epochs, len(items), OFFLINE_LR if lr is None and offline else lr, random_crop=not offline,
                       cached_views=views)
    cfg.seed = seed
    report: dict[str, Any] = {"phase": "preparing", "elapsed_s": 0.0, "eta_s": est.total(run_epochs), "zero_shot": None,
                              "heldout": [], "done": False, "stopped": False, "checkpoint": None, "images_per_s": None,
                              "n_train": len(items), "n_heldout": len(held), "epochs": run_epochs, "budget_s": budget_s}
    plan = (f"{run_epochs} epoch(s)" + (f" (fitted to the {budget_s:.0f} s budget)" if run_epochs < int(epochs) else "")
            + f", estimated {_duration(est.total(run_epochs))}")
    updates: queue.Queue = queue.Queue()
    outcome: dict[str, Any] = {}
    # On ZeroGPU the session runs in a forked worker: a threading.Event cannot be pickled into it, so
    # a cancel there travels as a file (StopFlag), set by this loop when ``stop`` is.
    flag = StopFlag(state.cache_dir) if zerogpu.active() else None
    session_args = dict(model=model, spec=spec, items=items, held=held, classnames=classnames, cfg=cfg,
                        budget_s=budget_s, started=started, stop=flag or stop,
                        features=None if flag else state.features, gate=None if flag else state.inference)

    def worker() -> None:
        try:
            for entry in train_session(**session_args):
                updates.put(entry)
        except BaseException as exc:  # reported to the user below; the thread must not die silently
            outcome["error"] = exc
        finally:
            updates.put(None)

    # The copied context carries the visitor's request into the thread (ZeroGPU bills their quota).
    thread = threading.Thread(target=contextvars.copy_context().run, args=(worker,), name="pmpo-app-train", daemon=True)
    thread.start()
    history: list[dict] = []
    features_done = None
    clock: dict[str, Any] = {"steps_s": 0.0, "train_start": None, "gap_s": None, "cost_s": 0.0}
    finished, last_yield = False, 0.0
    while not finished:
        if flag is not None and stop.is_set():
            flag.set()
        urgent = False
        try:
            item = updates.get(timeout=poll_s)
            batch = [item]
            while not updates.empty():
                batch.append(updates.get_nowait())
        except queue.Empty:
            batch = []
        for entry in batch:
            kind = entry.get("type") if entry is not None else None
            if entry is None:
                finished = True
            elif kind == "zero_shot":
                report["zero_shot"] = entry["accuracy"]
                urgent = True
                if entry["accuracy"] is not None:
                    yield TrainUpdate(f"Held out {len(held)} of {len(items) + len(held)} images (one in {HOLDOUT_EVERY} "
                                      f"per class) to score the result; zero-shot accuracy on them: "
                                      f"{entry['accuracy']:.1f}%. Training {plan}…", report=_stamp(report, started))
            elif kind == "heldout":
                report["heldout"].append({k: v for k, v in entry.items() if k not in ("type", "gap_s", "cost_s")})
                clock.update(gap_s=entry["gap_s"], cost_s=entry["cost_s"])
                urgent = True
            elif kind == "features":
                features_done = (entry["done"], entry["total"])
            elif kind == "result":
                outcome.update(entry)
            elif kind == "failed":
                outcome["error"] = entry["error"]
            elif kind == "step":
                clock.update(steps_s=entry["steps_s"], train_start=clock["train_start"] or time.perf_counter())
                history.append({k: v for k, v in entry.items() if k != "steps_s"})
            else:
                history.append(entry)
        now = time.perf_counter()
        if not finished and (urgent or now - last_yield >= poll_s):
            last_yield = now
            report["phase"] = "features" if features_done and not history else ("training" if history else "preparing")
            report["eta_s"] = _eta(history, cfg, clock, est)
            yield TrainUpdate(_running_status(history, cfg.epochs, started, len(items), features_done, report),
                              list(history), report=_stamp(report, started))
    thread.join()
    if flag is not None:
        flag.clear()

    if "error" in outcome:
        exc = outcome["error"]
        if isinstance(exc, str):  # reported by the session, which logged its traceback
            message = exc
        else:
            if not isinstance(exc, PMPOError):
                log.error("training failed", exc_info=exc)
            message = str(exc) if isinstance(exc, PMPOError) else f"{type(exc).__name__}: {exc}"
        report.update(phase="failed", done=True, eta_s=0.0)
        yield TrainUpdate(f"Training failed: {message}", history, done=True, error=True, report=_stamp(report, started))
        return
    result = outcome["result"]
    model.load_state_dict(outcome["state"], strict=False)  # the session's model (a copy on ZeroGPU)
    report.update(stopped=result.stopped, images_per_s=result.images_per_s or None)
    if not history:
        report.update(phase="cancelled", done=True, eta_s=0.0)
        yield TrainUpdate("Training stopped before its first step; nothing was learned, so nothing was saved.",
                          history, done=True, report=_stamp(report, started))
        return
    label = name.strip() if name and name.strip() else f"{method}-{len(classnames)}cls-{time.strftime('%H%M%S')}"
    label = re.sub(r"[^A-Za-z0-9_.\-]+", "-", label)[:60]
    written = state.cache_dir / "trained" / uuid.uuid4().hex[:8] / f"{label}.safetensors"
    model.eval()
    steps_done = history[-1]["step"]
    model.save(str(written), classnames=",".join(classnames)[:2000], epochs=str(len(result.history)),
               steps=str(steps_done), stopped=str(result.stopped), source="pmpo app")
    choice = state.add_checkpoint_file(written, prefix=TRAINED_PREFIX, name=written.name, session=session)
    out = state.checkpoint_path(choice, session)  # the session's copy (deleted with the session)
    shutil.rmtree(written.parent, ignore_errors=True)
    last = history[-1]
    if held and report["heldout"]:
        accuracy = report["heldout"][-1]["trained"]
        score_line = (f"**Held-out accuracy** ({len(held)} images the training never saw): zero-shot "
                      f"{report['zero_shot']:.1f}% → trained {accuracy:.1f}% ({accuracy - report['zero_shot']:+.1f} points). ")
    else:
        score_line = "No class has two images, so nothing could be held out to score the result. "
    why = ("Stopped at the time budget" if outcome["budget_hit"] else "Cancelled") if result.stopped else "Finished"
    report.update(phase="done", done=True, eta_s=0.0, checkpoint=choice)
    status = (
        f"{why} after {steps_done} step(s) ({len(result.history)} full epoch(s)) in {time.perf_counter() - started:.1f} s "
        f"({result.images_per_s:.1f} training images/s) on {len(items)} images; " + score_line
        + f"Last step loss {last['loss']:.4f}. The prompts learned so far are saved and selected as **{choice}** "
        "in the checkpoint picker."
    )
    yield TrainUpdate(status, history, done=True, checkpoint=str(out), choice=choice, report=_stamp(report, started))


def _stamp(report: dict, started: float) -> dict:
    report["elapsed_s"] = round(time.perf_counter() - started, 2)
    return {**report, "heldout": list(report["heldout"])}


def _eta(history: list[dict], cfg, clock: dict, est: Estimate) -> float:
    """Seconds left: the remaining steps at the measured step time (scoring excluded), plus the
    scorings still to come at their measured cost; before the first step, the estimate."""
    if not history or clock["train_start"] is None:
        return round(est.total(cfg.epochs), 1)
    h = history[-1]
    per_step = clock["steps_s"] / max(1, h["step"])
    left = max(0, h["total_steps"] - h["step"]) * per_step
    if clock["gap_s"]:
        left += (left / clock["gap_s"] + 1) * clock["cost_s"]
    return round(left, 1)


def _running_status(history: list[dict], epochs: int, started: float, n: int, features_done, report: dict) -> str:
    elapsed = time.perf_counter() - started
    scores = report["heldout"]
    held = (f" — **held-out: zero-shot {scores[-1]['zero_shot']:.1f}% → prompts so far {scores[-1]['trained']:.1f}%**"
            if scores else "")
    eta = f", about {_duration(report['eta_s'])} left" if report.get("eta_s") is not None else ""
    if not history:
        if features_done:
            return f"Computing image features once ({features_done[0]}/{features_done[1]} views, {elapsed:.0f} s{eta})"
        return f"Preparing… ({elapsed:.0f} s, {n} images{eta})"
    h = history[-1]
    return (f"Epoch {h['epoch']}/{epochs}, step {h['step']}/{h['total_steps']} — loss {h['loss']:.4f}, "
            f"lr {h['lr']:.2e} ({elapsed:.0f} s{eta}){held}")


SMOOTH = 10  # steps in the running training accuracy of the plot
SERIES = {f"training batches (last {SMOOTH} steps)": "#9ecae1", "held-out: prompts so far": "#d62728",
          "held-out: zero-shot": "#7f7f7f"}  # the Classify tab's colours for learned and zero-shot


def progress_frame(history: list[dict], report: dict):
    """The live plot's data, drawn by the browser (gr.LinePlot): running training accuracy per step,
    held-out accuracy of the prompts so far and zero-shot's, all in percent, against steps. Every
    series is present from the first frame (an empty one as a NaN row): the browser's plot fixes
    its colour scale on the first data it gets, and would not draw a series that came later."""
    import pandas as pd

    training, prompts, zero_shot = SERIES
    rows = []
    for i, h in enumerate(history):
        window = history[max(0, i - SMOOTH + 1):i + 1]
        rows.append({"step": h["step"], "accuracy": sum(w["acc"] for w in window) / len(window), "series": training})
    for r in report.get("heldout") or []:
        rows.append({"step": r["step"], "accuracy": r["trained"], "series": prompts})
        rows.append({"step": r["step"], "accuracy": r["zero_shot"], "series": zero_shot})
    present = {r["series"] for r in rows}
    rows += [{"step": 0, "accuracy": float("nan"), "series": name} for name in SERIES if name not in present]
    frame = pd.DataFrame(rows, columns=["step", "accuracy", "series"])
    return frame.astype({"step": "int64", "accuracy": "float64", "series": "object"})
