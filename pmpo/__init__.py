"""PMPO: multi-prompt, depth-partitioned prompt learning for CLIP (on open_clip).

The public names are imported on first use (PEP 562), so that ``pmpo --help`` and the light
modules (config, errors) start without importing torch.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

__version__ = "0.1.0"

# The UI, the analyses and the shipped models are ``pmpo.app``, ``pmpo.analysis`` and
# ``pmpo.checkpoints``. In the source tree (a checkout, a Space, which never installs the package)
# they sit beside this folder, where the project's layout puts them; a built wheel has them inside it
# (setuptools' package-dir mapping, pyproject.toml). Only this package's own search path is extended.
_SOURCE_TREE = Path(__file__).resolve().parent.parent
if not (Path(__file__).resolve().parent / "app").is_dir() and (_SOURCE_TREE / "app" / "__init__.py").is_file():
    __path__.append(str(_SOURCE_TREE))

_EXPORTS = {
    "Backbone": ".backbone",
    "load_backbone": ".backbone",
    "PMPOConfig": ".config",
    "list_methods": ".config",
    "PMPOError": ".errors",
    "PMPOModel": ".model",
    "build_model": ".model",
    "load_checkpoint": ".checkpoint",
    "save_checkpoint": ".checkpoint",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pmpo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
