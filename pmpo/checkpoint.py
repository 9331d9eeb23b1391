"""Prompt checkpoints: safetensors holding only the learnable tensors plus JSON metadata.

They are small (kilobytes to a few MB), class-agnostic (any class list works at load time),
never contain the frozen CLIP, and can be opened without unpickling anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from . import __version__
from .backbone import Backbone, load_backbone, portable_model_name, resolve_model_name
from .config import LEGACY_DEFAULTS, PMPOConfig
from .errors import CheckpointError, PMPOError
from .io import atomic_save_safetensors, read_safetensors
from .model import PMPOModel

FORMAT = "pmpo-prompts/1"


def backbone_shape(model: PMPOModel) -> dict[str, int]:
    """The sizes a checkpoint's tensors depend on."""
    return {
        "text_width": model.text.width,
        "vision_width": model.vision.width,
        "vision_layers": model.vision.n_layers,
        "text_layers": model.text.n_layers,
    }


def save_checkpoint(model: PMPOModel, path: str | os.PathLike, **metadata: str) -> None:
    """Write atomically (temp file + rename) so an interrupted save never leaves a broken file."""
    tensors = {} if model.prompts is None else {
        k: v.detach().float().contiguous().cpu() for k, v in model.prompts.state_dict().items()
    }
    meta = {str(k): str(v) for k, v in metadata.items()}
    cfg = model.cfg.to_dict()
    cfg["templates"] = list(model.templates)
    cfg["model"] = portable_model_name(cfg["model"])  # a shipped model by its name, not this machine's path
    meta.update(
        format=FORMAT,
        pmpo_version=__version__,
        config=json.dumps(cfg, sort_keys=True),
        backbone=json.dumps({"model": portable_model_name(model.backbone.model_name), "pretrained": model.backbone.pretrained,
                             **backbone_shape(model)}),
    )
    atomic_save_safetensors(tensors, path, meta)


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a prompt checkpoint; never unpickles."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        tensors, meta = read_safetensors(path)
    except Exception as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({exc.__class__.__name__}); prompt checkpoints are "
            ".safetensors files written by pmpo (pickled .pt/.pth files are refused on purpose)"
        ) from exc
    if meta.get("format") != FORMAT or "config" not in meta:
        raise CheckpointError(f"{path} is a safetensors file but not a pmpo prompt checkpoint (no '{FORMAT}' metadata)")
    return tensors, meta


def stored_config(meta: dict[str, str]) -> dict:
    """The config dict a checkpoint stores, with options it predates set to what it was trained with."""
    cfg = json.loads(meta["config"])
    for key, value in LEGACY_DEFAULTS.items():
        cfg.setdefault(key, value)
    return cfg


def checkpoint_config(path: str | os.PathLike) -> PMPOConfig:
    _, meta = read_checkpoint(path)
    return PMPOConfig.from_dict(stored_config(meta))


def load_checkpoint(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    model: str | None = None,
    pretrained: str | None = None,
    backbone: Backbone | None = None,
) -> PMPOModel:
    """Rebuild the model of a checkpoint: backbone from the stored metadata unless overridden.

    ``model``/``pretrained`` override the stored backbone; ``backbone`` reuses one already loaded
    (the app shares one CLIP between many prompt checkpoints).
    """
    tensors, meta = read_checkpoint(path)
    cfg_dict = stored_config(meta)
    if model is not None:
        cfg_dict["model"], cfg_dict["pretrained"] = model, pretrained
    elif pretrained is not None:
        cfg_dict["pretrained"] = pretrained
    cfg_dict["model"] = resolve_model_name(cfg_dict["model"])
    cfg = PMPOConfig.from_dict(cfg_dict)
    if backbone is None:
        backbone = load_backbone(cfg.model, cfg.pretrained, device=device, quick_gelu=cfg.quick_gelu)
    stored = json.loads(meta["backbone"])
    try:
        built = PMPOModel(cfg, backbone)
    except PMPOError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    have = backbone_shape(built)
    wanted = {k: stored[k] for k in have if k in stored}
    if any(have[k] != v for k, v in wanted.items()):
        diff = ", ".join(f"{k} {wanted[k]} vs {have[k]}" for k in have if wanted.get(k, have[k]) != have[k])
        raise CheckpointError(
            f"{path} was trained on {stored['model']} ({stored.get('pretrained')}) and does not fit "
            f"{backbone.model_name} ({backbone.pretrained}): {diff}"
        )
    if built.prompts is not None:
        missing = set(built.prompts.state_dict()) ^ set(tensors)
        if missing:
            raise CheckpointError(f"{path}: tensors do not match the stored config (differing keys: {sorted(missing)})")
        try:
            built.prompts.load_state_dict(tensors)
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: {str(exc).splitlines()[0]}") from exc
    elif tensors:
        raise CheckpointError(f"{path}: config has no prompts but the file holds tensors {sorted(tensors)}")
    return built.to(device)
