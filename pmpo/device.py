"""Which torch device a ``--device`` value means, and mixed precision on it: the one place that
decides either.

The command line, the app, the benches, the analyses and ``torchrun`` set-up all accept the same
``auto | cpu | cuda | cuda:N`` values; resolving them in one function keeps "auto" meaning the
same thing everywhere and asking for CUDA on a machine without it a one-line error everywhere.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from .errors import InputError


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` is CUDA when available, else the CPU; a CUDA device without CUDA is an InputError."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name} requested but CUDA is not available on this machine")
    return torch.device(name)


_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, dtype: str | None) -> AbstractContextManager:
    """Autocast to ``dtype`` ("bf16" or "fp16") on ``device``'s type; anything else ("fp32",
    None) runs as is. Deciding *whether* a run uses half precision is the caller's (the engine's
    ``precision: auto``); this is only how."""
    half = _HALF.get(dtype or "")
    return torch.autocast(device_type=device.type, dtype=half) if half is not None else nullcontext()
