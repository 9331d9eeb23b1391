"""What the app serves at start, and how it says so: the requested backbone, else the shipped
offline model, else the requested architecture with random weights — the page always comes up, and
its notices say what was loaded and why."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from pmpo.backbone import LOCAL_DIR, OFFLINE_MODEL, Backbone, load_backbone
from pmpo.checkpoint import checkpoint_config
from pmpo.errors import BackboneLoadError, PMPOError

from .served import BackboneSpec
from .state import SHIPPED_PREFIX, AppState, offline_model_present

DEFAULT_MODEL = "ViT-B-16-quickgelu"
DEFAULT_PRETRAINED = "openai"
DEFAULT_SHIPPED = "pmpo"  # shipped prompts selected at start when the backbone has them

HOW_TO_LOAD = (
    "To load real CLIP weights: run once with a network so they reach the Hugging Face cache "
    "(`python app.py --model ViT-B-16-quickgelu --pretrained openai`), or pass a weights file "
    "(`--pretrained /path/open_clip_model.safetensors`) or an open_clip folder (`--model local-dir:/path`)."
)


def open_state(
    model: str | None = None,
    pretrained: str | None = None,
    checkpoint: str | None = None,
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
    shipped_dir: str | Path | None = None,
) -> AppState:
    """Load the start-up backbone, falling back (with a visible notice) when it cannot be had.

    Order: the requested backbone (or the one a ``checkpoint`` names, or ViT-B/16 + OpenAI);
    without network or local copy the shipped offline ShapeWorld CLIP; if that is not there
    either, the requested architecture with random weights, so the app still serves and says why.
    """
    notices: list[str] = []
    if checkpoint and model is None:
        try:
            stored = checkpoint_config(checkpoint)
            model, pretrained = stored.model, stored.pretrained  # BackboneSpec.of resolves a shipped name
        except PMPOError as exc:
            notices.append(f"**Checkpoint not loaded:** {exc}")
            checkpoint = None
    requested = BackboneSpec.of(model or DEFAULT_MODEL, pretrained if model else (pretrained or DEFAULT_PRETRAINED))

    attempts = [requested]
    if requested.model != OFFLINE_MODEL:
        attempts.append(BackboneSpec.of(OFFLINE_MODEL, None))
    fallback_arch = requested.model if not requested.model.startswith(LOCAL_DIR) else DEFAULT_MODEL
    attempts.append(BackboneSpec(fallback_arch, "none"))

    loaded: tuple[BackboneSpec, Backbone] | None = None
    failures: list[str] = []
    for spec in attempts:
        if spec.model == OFFLINE_MODEL and not offline_model_present():
            failures.append(
                "the shipped offline ShapeWorld CLIP (checkpoints/shapeworld-clip/) is not in this copy "
                "(it is produced by tools/pretrain_shapeworld.py)"
            )
            continue
        try:
            loaded = (spec, load_backbone(spec.model, spec.pretrained, device=device))
            break
        except BackboneLoadError as exc:
            failures.append(str(exc))
    if loaded is None:  # only when even a random-init build fails: nothing sensible to serve
        raise BackboneLoadError("no backbone could be loaded: " + " | ".join(failures))
    spec, backbone = loaded

    if spec != requested:
        reason = failures[0] if failures else ""
        what = (
            "the offline **ShapeWorld CLIP** (a small CLIP pretrained on synthetic coloured shapes; "
            "it knows classes like 'red circle' or 'blue star', not real-world objects)"
            if spec.model == OFFLINE_MODEL
            else f"**{spec.label} with random weights — predictions are meaningless**"
        )
        notices.append(f"Could not load {requested.label}: {_first_sentence(reason)}. Running {what}. {HOW_TO_LOAD}")
        if spec.model != OFFLINE_MODEL and len(failures) > 1:
            notices.append(f"Also unavailable: {failures[1]}.")
    elif spec.model == OFFLINE_MODEL:
        notices.append("Running the offline **ShapeWorld CLIP** (synthetic coloured shapes). " + HOW_TO_LOAD)
    elif spec.pretrained in (None, "none") and not spec.model.startswith(LOCAL_DIR):
        notices.append(f"Running **{spec.label}**: random weights, predictions are meaningless (for speed tests).")

    state = AppState(device, spec, notices, cache_dir=cache_dir, shipped_dir=shipped_dir)
    state.add_backbone(spec, backbone)
    default_shipped = SHIPPED_PREFIX + DEFAULT_SHIPPED
    if default_shipped in state.shipped_choices():
        state.default_choice = default_shipped  # the learned column shows learned prompts from the first click
    if checkpoint:
        try:
            choice = state.add_checkpoint_file(checkpoint)
            state.model(spec, choice)
            state.default_choice = choice
        except PMPOError as exc:
            state.notices.append(f"**Checkpoint not loaded:** {exc}")
    return state


def _first_sentence(text: str) -> str:
    text = re.sub(r"^could not load [^:]+: ", "", text.strip())  # the notice already names the backbone
    cut = text.find(". ")
    return (text[:cut] if cut > 0 else text).rstrip(".")[:300]
