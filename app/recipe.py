"""What one training in the app is — the recipe, its epochs and batch — and what it will cost on
this machine: pass costs measured per backbone, an estimate per run, the epochs that fit a budget."""

from __future__ import annotations

import time
from dataclasses import dataclass

from pmpo.config import PMPOConfig, app_methods
from pmpo.errors import InputError

from . import zerogpu
from .served import BackboneSpec
from .state import AppState, is_offline_model
from .trainset import HOLDOUT_EVERY

TRAIN_METHODS = tuple(app_methods())  # the presets with `app: true`
MAX_EPOCHS = 50
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


def default_epochs(spec: BackboneSpec) -> int:
    """The Epochs slider's start value: 20 on the offline model, whose example task (PMPO, the 32
    held-out images of the 8 example classes, zero-shot 18.8 %) gains there; 5 elsewhere, where the
    time budget usually ends the run first (the epochs are then fitted to the budget)."""
    return OFFLINE_EPOCHS if is_offline_model(spec.model) else 5


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
            + f"; {int(epochs)} epoch(s) ≈ {duration_text(est.total(int(epochs)))}.")
    if budget_s and fit < int(epochs):
        line += f" The {budget_s:.0f} s budget fits **{fit}** epoch(s) ≈ {duration_text(est.total(fit))}: that many will run."
    return line


def duration_text(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"
