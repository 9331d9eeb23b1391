"""Options shared by several subcommands, and loading a model from them.

They live in the library (:mod:`pmpo.options`, :mod:`pmpo.device`) because the analyses, the app
and the benches take the same options and must not import the command line; this module keeps
the names the subcommands import.
"""

from __future__ import annotations

from ..device import resolve_device
from ..options import (
    add_model_args,
    config_from_args,
    load_backbone_from_args,
    load_model_from_args,
    offline_fallback,
    parse_classes,
)

__all__ = [
    "add_model_args",
    "config_from_args",
    "load_backbone_from_args",
    "load_model_from_args",
    "offline_fallback",
    "parse_classes",
    "resolve_device",
]
