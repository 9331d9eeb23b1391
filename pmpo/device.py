"""Which torch device a ``--device`` value means: the one place that decides it.

The command line, the app, the benches, the analyses and ``torchrun`` set-up all accept the same
``auto | cpu | cuda | cuda:N`` values; resolving them in one function keeps "auto" meaning the
same thing everywhere and asking for CUDA on a machine without it a one-line error everywhere.
"""

from __future__ import annotations

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
