"""Per-depth prompt analysis and publication-ready figures and tables for PMPO.

Every analysis is a module with ``add_arguments(parser)`` and ``run(args) -> list[Path]``, runnable
as ``python -m pmpo.analysis.<name>`` or ``pmpo analyze <name>``; each writes PNG + PDF figures and the
numbers behind them as CSV into ``--out``. They use only pmpo's public API, so they run the same
on the shipped ShapeWorld CLIP and on real CLIP checkpoints.
"""

from __future__ import annotations

import importlib
from types import ModuleType

ANALYSES = (
    "attention_atlas",
    "attention_truth",
    "prompt_words",
    "prompt_geometry",
    "embedding_clusters",
    "ablations",
    "tables",
)


def get(name: str) -> ModuleType:
    """The module of analysis ``name`` (imported on demand: matplotlib and umap are slow to import)."""
    if name not in ANALYSES:
        from pmpo.errors import InputError

        raise InputError(f"unknown analysis {name!r}; choose from {', '.join(ANALYSES)}")
    return importlib.import_module(f"pmpo.analysis.{name}")
