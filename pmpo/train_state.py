"""The training state on disk: prompts, optimizer state, progress and the running GPA sum in one
safetensors file with JSON metadata (nothing is unpickled), written atomically, and read back only
into a run with the same options, model and data — so a resumed run replays the rest bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .data.datasets import Datum
from .errors import CheckpointError
from .io import atomic_save_safetensors, read_safetensors
from .model import PMPOModel
from .train_config import RESUME_FREE, TrainConfig

STATE_FORMAT = "pmpo-train-state/1"

# --------------------------------------------------------------------------------------------
# Checkpoint of the training state (safetensors + JSON metadata; nothing is unpickled)
# --------------------------------------------------------------------------------------------


def data_fingerprint(items: Sequence[Datum], classnames: Sequence[str]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(list(classnames)).encode())
    for d in items:
        h.update(f"{d.label}\t{os.path.basename(d.path)}\n".encode())
    return h.hexdigest()[:16]


def save_train_state(path: Path, model: PMPOModel, optimizer: torch.optim.Optimizer, epoch: int, step: int,
                     cfg: TrainConfig, fingerprint: str, history: list[dict],
                     aggregate: dict[str, torch.Tensor] | None = None) -> None:
    """Prompts + optimizer state + progress (+ the running GPA sum) in one file, so one
    ``os.replace`` keeps them consistent."""
    tensors = {f"prompts.{k}": v.detach().float().contiguous().cpu() for k, v in model.prompts.state_dict().items()}
    tensors.update({f"gpa.{k}": v.contiguous().cpu() for k, v in (aggregate or {}).items()})
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    meta = {
        "format": STATE_FORMAT,
        "epoch": str(epoch),
        "step": str(step),
        "train_config": json.dumps(cfg.to_dict(), sort_keys=True),
        "model_config": model.cfg.to_json(),
        "data": fingerprint,
        "history": json.dumps(history),
        "optim_scalars": json.dumps(scalars),
    }
    atomic_save_safetensors(tensors, path, meta)


def read_train_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        tensors, meta = read_safetensors(path)
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc.__class__.__name__}); delete it to start over") from exc
    if meta.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a pmpo training state (no '{STATE_FORMAT}' metadata)")
    return tensors, meta


def restore_train_state(path: Path, model: PMPOModel, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                        fingerprint: str) -> tuple[int, int, list[dict], dict[str, torch.Tensor] | None]:
    """Load ``path`` into ``model`` and ``optimizer``: (epoch, step, history, GPA sum). Refused, with
    the reason, when the run's options, model config or data differ from the stored ones."""
    tensors, meta = read_train_state(path)
    stored_cfg = json.loads(meta["train_config"])
    diff = [f"{k} {stored_cfg.get(k)!r} vs {v!r}" for k, v in cfg.to_dict().items()
            if k not in RESUME_FREE and stored_cfg.get(k) != v]
    if diff:
        raise CheckpointError(f"cannot resume {path}: it was trained with other options ({'; '.join(diff)}); "
                              "use a new output folder or the same options")
    stored_model = json.loads(meta["model_config"])
    now = model.cfg.to_dict()
    mdiff = [k for k in now if stored_model.get(k) != now[k] and k not in ("model", "pretrained")]
    if mdiff:
        raise CheckpointError(f"cannot resume {path}: the model config differs in {', '.join(mdiff)}")
    if meta.get("data") != fingerprint:
        raise CheckpointError(f"cannot resume {path}: it was trained on other images or classes")
    prompts = {k[len("prompts."):]: v for k, v in tensors.items() if k.startswith("prompts.")}
    try:
        model.prompts.load_state_dict(prompts)
    except RuntimeError as exc:
        raise CheckpointError(f"cannot resume {path}: {str(exc).splitlines()[0]}") from exc
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, values in json.loads(meta.get("optim_scalars", "{}")).items():
        state.setdefault(int(idx), {}).update(values)
    sd = optimizer.state_dict()
    sd["state"] = state
    optimizer.load_state_dict(sd)
    aggregate = {k[len("gpa."):]: v.to(model.device) for k, v in tensors.items() if k.startswith("gpa.")} or None
    return int(meta["epoch"]), int(meta["step"]), json.loads(meta["history"]), aggregate
