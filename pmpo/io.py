"""Small file helpers shared by configs, checkpoints and the engine: atomic safetensors writes
and YAML reading with one-line errors."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .errors import InputError

if TYPE_CHECKING:
    import torch

# Read once at import (os.umask can only be read by setting it, which is not thread-safe later).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def give_normal_mode(path: str | os.PathLike) -> None:
    """``mkstemp`` creates files readable by their owner only (0600); a result or a checkpoint
    should get the mode any other file the user writes gets (0666 minus the umask)."""
    os.chmod(path, 0o666 & ~_UMASK)


def atomic_save_safetensors(tensors: dict[str, "torch.Tensor"], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Write to a temp file in the same folder, then rename: a crash never leaves a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        give_normal_mode(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_yaml_mapping(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping; ``what`` names it in errors ("training config")."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise InputError(f"{what} {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise InputError(f"{what} {path} must be a mapping of option: value")
    return data
