"""A training session as the app runs it: zero-shot on the held-out images, the engine's training
with held-out scores on a time cadence, and the final score, streamed as picklable updates.

It is a kernel (:mod:`pmpo.app.zerogpu`): in-process it shares the server's pass store and gives
way to visitors' requests between steps; on ZeroGPU it runs whole in a forked worker with a GPU,
and a cancel reaches it as a file (:class:`StopFlag`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from pmpo.cache import TensorCache
from pmpo.data.datasets import Datum
from pmpo.data.loader import load_image
from pmpo.errors import PMPOError

from . import zerogpu
from .features import ImageFeatures
from .served import BackboneSpec

log = logging.getLogger(__name__)

# Held-out scoring while training: at most every EVAL_GAP_MIN_S seconds, at least every
# EVAL_GAP_MAX_S, and otherwise when scoring has cost no more than 1/EVAL_SHARE of the time since.
EVAL_GAP_MIN_S, EVAL_GAP_MAX_S, EVAL_SHARE = 4.0, 45.0, 5.0
FIRST_EVAL_S = 12.0  # the first comparison after this much training (or the first epoch's end)
YIELD_MAX_S = 30.0  # longest pause of a training for visitors' requests between two of its steps


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
        self.text = TensorCache()  # the prior of the class list, once for every scoring
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
            prior = self.model.prior_features(self.classnames, cache=self.text)
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
                cw = model.class_weights(self.classnames, cache=self.text)
                views = [VisionOutput(self.plain, None, 0)] if self.x is None else model.encode_image(self.x)
                accuracy = self._accuracy(model.logits_from(views, cw))
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
                  budget_s: float, started: float, stop, score_s: float = 0.0, features: ImageFeatures | None = None,
                  gate=None) -> Iterator[dict]:
    """Zero-shot on the held-out images, the training with held-out scores on a time cadence, and
    the final score, as a stream of picklable updates: ``zero_shot``, ``features``, ``step`` (with
    ``steps_s``, the seconds inside steps so far), ``epoch``, ``heldout`` (with the scorer's cadence)
    and last ``result`` (the TrainResult, the learned tensors on the CPU, whether the budget stopped
    it) or ``failed``. ``score_s``: the estimated seconds of one held-out scoring, until one is
    measured (the budget keeps room for the final one). ``features``/``gate`` are the server's pass store and request gate in-process
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
    clock = {"train_start": None, "last_eval": None, "steps_s": 0.0, "mark": time.perf_counter(), "budget_hit": False,
             "last_step": None}
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
            step_s = now - clock["mark"]
            clock["steps_s"] += step_s
            clock["last_step"] = entry  # the final score's step (this thread's, not the consumer's)
            updates.put({**entry, "steps_s": clock["steps_s"]})
            if clock["train_start"] is None:
                clock["train_start"] = now
            # Stop when another step and the final scoring would cross the budget, so that the
            # run *ends* there, its held-out result included (not one score and one step later).
            final_s = (scorer.cost_s or score_s) if scorer is not None else 0.0
            if budget_s and now - started + step_s + final_s >= budget_s and not stop.is_set():
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
            if scorer is not None and clock["last_step"] is not None:
                updates.put(score(clock["last_step"]))
            learned = {k: v.detach().cpu() for k, v in model.prompts.state_dict().items()}
            updates.put({"type": "result", "result": result, "state": learned, "budget_hit": clock["budget_hit"]})
        except BaseException as exc:  # noqa: BLE001 (the session reports it; the thread must not die silently)
            updates.put(_failed(exc))
        finally:
            updates.put(None)

    thread = threading.Thread(target=run, name="pmpo-train-session", daemon=True)
    thread.start()
    try:
        while (entry := updates.get()) is not None:
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
