"""The Train tab's run: owner's limits, one training per session, and the handler-side stream.

:func:`run_training` validates a request, builds the prompt model, fits the epochs to the budget
(:mod:`.recipe`), runs a :func:`.session.train_session` — in a worker thread, or on ZeroGPU in a GPU
worker — and turns its updates into live status, plot and report; the trained prompts are saved
as a safetensors checkpoint that only the session that trained them is offered. The data the tab
trains on, and the held-out split, are :mod:`.trainset`'s.
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
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pmpo.checkpoint import save_checkpoint
from pmpo.config import PMPOConfig
from pmpo.data.datasets import Datum
from pmpo.engine import seeded_init
from pmpo.errors import InputError, PMPOError
from pmpo.model import build_model

from . import zerogpu
from .lru import LRU
from .recipe import (
    APP_CACHED_VIEWS,
    MAX_BUDGET_S,
    OFFLINE_LR,
    TRAIN_METHODS,
    Estimate,
    duration_text,
    estimate,
    measure_cost,
    train_config,
)
from .served import BackboneSpec
from .session import StopFlag, train_session
from .state import TRAINED_PREFIX, AppState, is_offline_model
from .trainset import HOLDOUT_EVERY, MAX_TRAIN_IMAGES, check_images, split_holdout

log = logging.getLogger(__name__)

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
    def from_env(cls, env: dict | None = None) -> TrainLimits:
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


ZEROGPU_TRAIN_S = 120  # default PMPO_MAX_TRAIN_SECONDS on ZeroGPU


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
    offline = is_offline_model(backbone.model_name)
    cfg_model = PMPOConfig(method=method, model=backbone.model_name, pretrained=backbone.pretrained or "none")
    try:
        with seeded_init(seed):  # the same initial prompts for the same request
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
            + f", estimated {duration_text(est.total(run_epochs))}")
    updates: queue.Queue = queue.Queue()
    outcome: dict[str, Any] = {}
    # On ZeroGPU the session runs in a forked worker: a threading.Event cannot be pickled into it, so
    # a cancel there travels as a file (StopFlag), set by this loop when ``stop`` is.
    flag = StopFlag(state.cache_dir) if zerogpu.active() else None
    session_args = dict(model=model, spec=spec, items=items, held=held, classnames=classnames, cfg=cfg,
                        budget_s=budget_s, started=started, stop=flag or stop, score_s=est.eval_s,
                        features=None if flag else state.features, gate=None if flag else state.inference)

    def worker() -> None:
        try:
            for entry in train_session(**session_args):
                updates.put(entry)
        except BaseException as exc:  # noqa: BLE001 reported to the user below; the thread must not die silently
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
    model.prompts.load_state_dict(outcome["state"])  # the session's prompts (a copy's on ZeroGPU)
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
    save_checkpoint(model, written, classnames=",".join(classnames)[:2000], epochs=str(len(result.history)),
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
    eta = f", about {duration_text(report['eta_s'])} left" if report.get("eta_s") is not None else ""
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
