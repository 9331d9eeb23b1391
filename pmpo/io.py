"""Small file helpers shared by configs, checkpoints, results and the engine: atomic writes (bytes,
JSON, safetensors), safetensors reading that never unpickles, YAML reading with one-line errors,
and the git commit of a checkout."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .errors import InputError

if TYPE_CHECKING:
    import torch


def create_temp_beside(path: str | os.PathLike) -> tuple[int, str]:
    """A new, empty temp file in ``path``'s folder, open for writing: ``(fd, name)``.

    A result or a checkpoint should get the mode any other file the user writes gets (0666 minus
    the umask), not ``mkstemp``'s owner-only 0600. Creating it with mode 0666 lets the kernel
    apply the umask of the moment, so nothing ever has to read the umask -- which Python can
    only do by setting it, a process-wide change that races with other threads (and which this
    module used to do at import). ``O_EXCL`` with a random name makes it as safe as ``mkstemp``.
    """
    path = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        name = str(path.parent / f"{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(name, flags, 0o666), name
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temp file name beside {path}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file in the same folder, then rename: a crash, or a second process writing
    the same file, never leaves a half file for a reader."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(path: str | os.PathLike, data: Any, indent: int | None = 2) -> None:
    """``data`` as JSON, written atomically (:func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, json.dumps(data, indent=indent).encode("utf-8"))


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """A safetensors file written atomically. The bytes are serialised in memory (``save_file``
    would create a 0600 file of its own); prompt checkpoints and training states are kilobytes to
    a few megabytes."""
    from safetensors.torch import save

    atomic_write_bytes(path, save(tensors, metadata=metadata))


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; never unpickles. Any failure to read it is
    re-raised as is, for the caller to word (a checkpoint and a training state say different things)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    return tensors, meta


def git_head(folder: str | os.PathLike) -> str | None:
    """The HEAD commit of the git work tree holding ``folder`` (None outside one, or without git)."""
    try:
        proc = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = proc.stdout.strip()
    return commit if proc.returncode == 0 and len(commit) == 40 else None


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
