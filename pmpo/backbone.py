"""Loading a frozen open_clip CLIP from a hub tag, a weights file or a ``local-dir:`` folder.

The same function serves users with a network (``ViT-B-16-quickgelu`` + ``openai``), users with
local copies, and our tests (tiny random-init models saved to a folder and loaded back), so the
code path the tests exercise is the one users run.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from .errors import BackboneLoadError

log = logging.getLogger(__name__)

LOCAL_DIR = "local-dir:"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
RANDOM_INIT = ("", "none", "random")  # ``pretrained`` values meaning "no weights" (tests, benchmarks)
# Where the shipped offline model lives (see checkpoints/shapeworld-clip/MODEL_CARD.md): inside
# the package, so a wheel installed anywhere has it. Shipped models are also addressed by their bare
# name (``shapeworld-clip``), which sweep files use so that they run from any directory.
# The shipped models' folder, wherever ``pmpo.checkpoints`` resolves (beside the package in the
# source tree, inside it in a wheel: pmpo/__init__.py).
SHIPPED_MODELS = Path(importlib.import_module("pmpo.checkpoints").__path__[0])
OFFLINE_MODEL_NAME = "shapeworld-clip"
OFFLINE_MODEL = LOCAL_DIR + str(SHIPPED_MODELS / OFFLINE_MODEL_NAME)


def shipped_model_names() -> list[str]:
    return sorted(p.name for p in SHIPPED_MODELS.iterdir() if (p / "open_clip_config.json").is_file()) \
        if SHIPPED_MODELS.is_dir() else []


def resolve_model_name(model: str) -> str:
    """A shipped model's bare name -> its ``local-dir:`` path. So does a ``local-dir:`` path that does
    not exist here but names a shipped folder: the relative ``local-dir:checkpoints/shapeworld-clip``
    of older sweep files, or the absolute path a checkpoint made on another machine recorded.
    Every other name is returned unchanged."""
    if model in shipped_model_names():
        return LOCAL_DIR + str(SHIPPED_MODELS / model)
    if model.startswith(LOCAL_DIR):
        folder = Path(model[len(LOCAL_DIR):]).expanduser()
        shipped = SHIPPED_MODELS / folder.name
        if not folder.exists() and (shipped / "open_clip_config.json").is_file():
            return LOCAL_DIR + str(shipped)
    return model


def portable_model_name(model: str) -> str:
    """The inverse of :func:`resolve_model_name` for shipped models: ``local-dir:<shipped>/<name>`` ->
    ``<name>``, so what a checkpoint or a result file records does not name this machine's folders.
    Every other name is returned unchanged."""
    if model.startswith(LOCAL_DIR):
        folder = Path(model[len(LOCAL_DIR):]).expanduser()
        if folder.name in shipped_model_names() and folder.resolve() == (SHIPPED_MODELS / folder.name).resolve():
            return folder.name
    return model


@dataclass
class Backbone:
    """A frozen CLIP plus what is needed to feed it: tokenizer and preprocessing sizes."""

    clip: nn.Module
    tokenizer: Callable[..., torch.Tensor]
    model_name: str
    pretrained: str | None
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def description(self) -> str:
        source = self.pretrained or "random init"
        if self.model_name.startswith(LOCAL_DIR):
            source = "local folder"
        return f"{self.model_name} ({source})"


def _is_local_dir(name: str) -> bool:
    return name.startswith(LOCAL_DIR)


def _needs_quick_gelu(model: str, pretrained: str | None, quick_gelu: bool | None) -> bool:
    """OpenAI's CLIP was trained with QuickGELU; open_clip's plain ``ViT-B-16`` config uses GELU.

    Loading ``openai`` weights into a GELU model runs silently and gives a different (worse)
    network, so unless the user decides explicitly we switch QuickGELU on and say so.
    """
    if quick_gelu is not None:
        return quick_gelu
    if pretrained == "openai" and not model.endswith("-quickgelu"):
        warnings.warn(
            f"{model!r} with 'openai' weights: enabling QuickGELU, which these weights were trained "
            f"with (use {model + '-quickgelu'!r} to say so explicitly, or quick_gelu=False to opt out).",
            stacklevel=3,
        )
        return True
    return False


def _offline_hint() -> str:
    return (
        "Options: connect to the network once so the weights reach the Hugging Face cache; pass a "
        "local weights file (--pretrained /path/to/open_clip_model.safetensors); pass an open_clip "
        f"folder (--model local-dir:/path/to/folder); or use the shipped offline model (--model {OFFLINE_MODEL_NAME})."
    )


def load_backbone(
    model: str,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    quick_gelu: bool | None = None,
    cache_dir: str | None = None,
) -> Backbone:
    """Build a frozen open_clip CLIP in eval mode.

    ``model`` is an open_clip model name or ``local-dir:PATH``; ``pretrained`` is a hub tag
    (``openai``, ``laion2b_s34b_b88k`` …), a local ``.safetensors``/``.bin`` file, or ``None`` /
    ``"none"`` (random init; for tests and speed measurements).
    """
    import open_clip

    if pretrained is not None and pretrained.strip().lower() in RANDOM_INIT:
        pretrained = None
    model = resolve_model_name(model)
    if _is_local_dir(model):
        folder = Path(model[len(LOCAL_DIR):]).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise BackboneLoadError(
                f"model folder {folder} has no open_clip_config.json; an open_clip 'local-dir:' folder "
                "holds open_clip_config.json (with 'model_cfg') and open_clip_model.safetensors"
            )
        model = LOCAL_DIR + str(folder.resolve())
        pretrained = None
    elif model not in open_clip.list_models():
        raise BackboneLoadError(
            f"unknown open_clip model {model!r}; use a name from open_clip.list_models() "
            f"(e.g. ViT-B-16-quickgelu), local-dir:/path/to/folder or a shipped model "
            f"({', '.join(shipped_model_names()) or 'none in this copy'})"
        )

    force_quick_gelu = _needs_quick_gelu(model, pretrained, quick_gelu)
    kwargs: dict[str, Any] = dict(device=device, force_quick_gelu=force_quick_gelu, cache_dir=cache_dir)
    if pretrained and _looks_like_path(pretrained):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise BackboneLoadError(f"weights file not found: {path}")
        if path.suffix not in WEIGHT_SUFFIXES:
            raise BackboneLoadError(f"weights file {path} should be one of {', '.join(WEIGHT_SUFFIXES)}")
        kwargs["pretrained"] = str(path)
    elif pretrained:
        tags = open_clip.list_pretrained_tags_by_model(model)
        if pretrained not in tags:
            raise BackboneLoadError(
                f"{pretrained!r} is neither a weights file nor a pretrained tag of {model}; "
                f"tags: {', '.join(tags) or '(none)'}"
            )
        kwargs["pretrained"] = pretrained

    try:
        if kwargs.get("pretrained") and not _looks_like_path(kwargs["pretrained"]) and _hub_offline():
            kwargs.update(_cached_tag_weights(model, kwargs["pretrained"], cache_dir))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="QuickGELU mismatch")
            clip, _, preprocess = open_clip.create_model_and_transforms(model, **kwargs)
        tokenizer = open_clip.get_tokenizer(model)
    except BackboneLoadError:
        raise
    except Exception as exc:  # open_clip raises RuntimeError/ValueError/OSError with long chains
        what = f"{model} + {pretrained}" if pretrained else model
        reason = (str(exc).splitlines()[0] if str(exc) else type(exc).__name__).rstrip(".")
        hint = _offline_hint() if pretrained and not _looks_like_path(pretrained) else ""
        raise BackboneLoadError(f"could not load {what}: {reason}. {hint}".strip()) from exc

    clip.eval().requires_grad_(False)
    image_size, mean, std = _preprocess_numbers(clip, preprocess)
    return Backbone(clip, tokenizer, model, pretrained, image_size, mean, std)


def _looks_like_path(value: str) -> bool:
    return value.endswith(WEIGHT_SUFFIXES) or os.sep in value or os.path.exists(value)


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the Hugging Face endpoint: a cheap, bounded answer to "are we online?"."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_offline() -> bool:
    """Whether to load hub weights from the local cache only: the user said so (``HF_HUB_OFFLINE``)
    or the hub cannot be reached, where huggingface_hub would retry for about a minute first."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or not hub_reachable()


def cached_tag_file(model: str, tag: str, cache_dir: str | None = None) -> str | None:
    """The file open_clip would load for ``model`` + hub ``tag``, if it is already on this machine.

    Looked up the way open_clip downloads it (the Hugging Face copy, its ``.safetensors`` variant
    first, else the direct URL's file in ``~/.cache/clip``) but without any network request:
    ``None`` when it is not cached.
    """
    import open_clip.pretrained as ocp
    from huggingface_hub import try_to_load_from_cache

    cfg = ocp.get_pretrained_cfg(model, tag)
    if cfg.get("hf_hub") and ocp.has_hf_hub():
        repo_id, filename = os.path.split(cfg["hf_hub"])
        filename = filename or ocp.HF_WEIGHTS_NAME
        for name in (*ocp._get_safe_alternatives(filename), filename):
            found = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
            if isinstance(found, str):
                return found
        return None
    if cfg.get("url"):
        local = Path(cache_dir or Path("~/.cache/clip").expanduser()) / os.path.basename(cfg["url"])
        return str(local) if local.is_file() else None
    return None


def _cached_tag_weights(model: str, tag: str, cache_dir: str | None) -> dict[str, Any]:
    """open_clip options that load hub ``tag`` from its cached file, with the tag's preprocessing.

    Offline, the tag's file is resolved here and handed to open_clip as a file, rather than
    switching huggingface_hub to offline mode (a process-wide flag other threads would see, e.g.
    the app's). A tag that is not cached fails at once with advice instead of a minute of retries.
    """
    import open_clip.pretrained as ocp
    from open_clip.transform import merge_preprocess_dict

    path = cached_tag_file(model, tag, cache_dir)
    if path is None:
        raise BackboneLoadError(
            f"could not load {model} + {tag}: its weights are not in the local cache and the Hugging Face "
            f"hub cannot be reached. {_offline_hint()}"
        )
    # What open_clip takes from a tag besides its file: mean/std, interpolation, resize mode.
    preprocess = merge_preprocess_dict({}, ocp.get_pretrained_cfg(model, tag))
    preprocess.pop("size", None)  # the model's own image size wins, as on the tag path
    return {"pretrained": path, "force_preprocess_cfg": preprocess}


def _preprocess_numbers(clip: nn.Module, preprocess: Any) -> tuple[int, tuple, tuple]:
    """Image size, mean and std as open_clip configured them for this checkpoint."""
    size = clip.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    for t in getattr(preprocess, "transforms", []):
        if t.__class__.__name__ == "Normalize":
            mean, std = tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std)
    return size, mean, std


def save_local_dir(clip: nn.Module, model_cfg: dict, folder: str | Path, preprocess_cfg: dict | None = None,
                   dtype: torch.dtype | None = None) -> str:
    """Write a CLIP as an open_clip ``local-dir:`` folder (config JSON + safetensors).

    Used to ship the offline model and by the tests to round-trip tiny random-init models through
    exactly the loading path that real weights take. ``dtype`` stores the floating tensors in that
    type (the shipped model is fp16; open_clip loads it into an fp32 model) without touching
    ``clip``, which a training may still be using.
    """
    import json

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or {}}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    state = {}
    for k, v in clip.state_dict().items():
        v = v.detach()
        state[k] = (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous().cpu()
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return LOCAL_DIR + str(folder.resolve())
