"""PMPO: multi-prompt, depth-partitioned prompt learning for CLIP (on open_clip)."""

__version__ = "0.1.0"

from .backbone import Backbone, load_backbone  # noqa: E402
from .config import PMPOConfig, list_methods  # noqa: E402
from .errors import PMPOError  # noqa: E402
from .model import PMPOModel, build_model  # noqa: E402
from .checkpoint import load_checkpoint, save_checkpoint  # noqa: E402

__all__ = [
    "Backbone",
    "PMPOConfig",
    "PMPOError",
    "PMPOModel",
    "build_model",
    "list_methods",
    "load_backbone",
    "load_checkpoint",
    "save_checkpoint",
    "__version__",
]
