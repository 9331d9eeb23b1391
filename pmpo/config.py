"""Model configuration: one dataclass for every method, filled from YAML presets.

Zero-shot CLIP, CoOp, KgCoOp, MaPLe and PMPO differ only in a handful of options (DESIGN.md §2),
so a method is a *preset* of :class:`PMPOConfig`, stored as YAML in ``pmpo/configs/methods/``. Fields
left as ``None`` are filled from the preset of ``method``; fields set explicitly win. This keeps
``PMPOConfig(method="coop")`` meaning "CoOp" rather than "PMPO's defaults with a different name".
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError
from .io import read_yaml_mapping

# Presets ship inside the package (as open_clip ships its model configs), so an installed wheel
# has them wherever it runs from.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
METHOD_DIR = CONFIG_DIR / "methods"

PARTITION_NAMES = ("equal", "all", "first-half", "second-half")
VISUAL_MODES = ("replace", "carry")
VISUAL_PASSES = ("single", "per_prompt")
COUPLINGS = ("per_prompt", "shared", "per_layer")
# Blocks of a method preset that are not options but exceptions to them, applied by
# pmpo.recipes: ``protocols: {cross_dataset: {text_depth: 3}}`` (MaPLe's cross-dataset depth) and
# ``datasets: {dtd: {templates: [...]}}`` (KgCoOp's DTD prior).
PRESET_BLOCKS = ("protocols", "datasets")
# Options added after checkpoints were first written, with the value that reproduces what those
# older checkpoints computed (pmpo.checkpoint fills them in when a stored config lacks them).
LEGACY_DEFAULTS = {"frozen_init_tail": False, "prompt_ln_pre": False}


@dataclass
class PMPOConfig:
    """Everything that defines a prompt model. ``None`` means "from the method preset"."""

    method: str = "pmpo"
    # Backbone: an open_clip model name (or ``local-dir:PATH``) and a pretrained tag or weights file.
    model: str | None = None
    pretrained: str | None = None
    quick_gelu: bool | None = None  # None: decided from the pretrained tag (OpenAI -> QuickGELU)

    # Text prompts.
    n_prompts: int | None = None  # N learnable prompts (0 = zero-shot CLIP)
    n_ctx: int | None = None  # M context tokens per prompt
    ctx_init: str | list[str] | None = None  # init phrase, or one phrase per prompt
    text_depth: int | None = None  # 1 = shallow; >1 adds deep text prompts in layers 1..depth-1
    # Tokens of ctx_init beyond the first M stay in the prompt as frozen words, as MaPLe builds
    # "[SOS] c1 c2 of a {class}." from "a photo of a" with M = 2; off: "[SOS] c1 c2 {class}.".
    frozen_init_tail: bool | None = None

    # Visual prompts (coupled to the text prompts by a linear map d_t -> d_v).
    visual_prompts: bool | None = None
    partition: str | list[list[int]] | None = None  # name or explicit [[first, last], ...]
    visual_start: int | None = None  # first vision layer that gets prompts (named partitions)
    visual_mode: str | None = None  # "replace" (re-inject every layer) or "carry"
    visual_pass: str | None = None  # "single" (one pass) or "per_prompt" (N passes)
    coupling: str | None = None  # "per_prompt", "shared" or "per_layer" (MaPLe)
    # Visual prompts injected at layer 0 go through the tower's ln_pre with the patch tokens, as
    # MaPLe concatenates them before ln_pre (exact: LayerNorm acts per token).
    prompt_ln_pre: bool | None = None

    # Manual prior and class weights.
    templates: list[str] | None = None
    alpha: float | None = None  # prior weight; None in the preset means 1/(N+1)

    # Losses.
    aux_weight: float | None = None  # beta: per-prompt auxiliary CE
    consistency_weight: float | None = None  # lambda: KgCoOp-style prior consistency

    def __post_init__(self) -> None:
        preset = load_preset(self.method)
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is None and f.name in preset:
                setattr(self, f.name, preset[f.name])
        if self.alpha is None:
            self.alpha = 1.0 / (self.n_prompts + 1)
        self.validate()

    def validate(self) -> None:
        """Reject impossible combinations early, with a message naming the option."""
        if self.n_prompts < 0:
            raise InputError(f"n_prompts must be >= 0, got {self.n_prompts}")
        if self.n_prompts > 0 and self.n_ctx < 1:
            raise InputError(f"n_ctx must be >= 1 when there are prompts, got {self.n_ctx}")
        if not 0.0 <= self.alpha <= 1.0:
            raise InputError(f"alpha must lie in [0, 1], got {self.alpha}")
        if self.n_prompts == 0 and self.alpha != 1.0:
            raise InputError("with n_prompts = 0 the class weights are the prior alone: alpha must be 1")
        if self.text_depth < 1:
            raise InputError(f"text_depth must be >= 1, got {self.text_depth}")
        if isinstance(self.partition, str) and self.partition not in PARTITION_NAMES:
            raise InputError(f"partition must be one of {PARTITION_NAMES} or a list of [first, last] layer pairs, got {self.partition!r}")
        for name, value, allowed in (("visual_mode", self.visual_mode, VISUAL_MODES),
                                     ("visual_pass", self.visual_pass, VISUAL_PASSES),
                                     ("coupling", self.coupling, COUPLINGS)):
            if value not in allowed:
                raise InputError(f"{name} must be one of {allowed}, got {value!r}")
        if isinstance(self.ctx_init, list) and len(self.ctx_init) != self.n_prompts:
            raise InputError(f"ctx_init gives {len(self.ctx_init)} phrases for {self.n_prompts} prompts")
        if not self.templates or any("{}" not in t for t in self.templates):
            raise InputError(f"templates must be a non-empty list of strings containing '{{}}', got {self.templates!r}")

    @property
    def uses_visual_prompts(self) -> bool:
        return bool(self.visual_prompts) and self.n_prompts > 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PMPOConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown config option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "PMPOConfig":
        data = read_yaml_mapping(path, "model config")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data)


def preset_file(kind: str, name: str | Path) -> Path:
    """A YAML file given by path, or by the name of a preset shipped in ``pmpo/configs/<kind>/``
    (``pmpo sweep tiny``): the same command works from any directory and from an installed wheel.
    A path that exists wins over a preset of the same name."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    shipped_file = CONFIG_DIR / kind / f"{path.stem}.yaml"
    if path.parent in (Path("."), Path("configs") / kind, Path("pmpo") / "configs" / kind) and shipped_file.is_file():
        return shipped_file
    shipped = sorted(p.stem for p in (CONFIG_DIR / kind).glob("*.yaml"))
    raise InputError(f"{kind} file {str(name)!r} not found (neither a file nor a shipped preset: {', '.join(shipped) or 'none'})")


def list_methods() -> list[str]:
    return sorted(p.stem for p in METHOD_DIR.glob("*.yaml"))


def read_method_preset(method: str) -> dict[str, Any]:
    """The whole YAML of a method preset: its options, ``reference`` and the PRESET_BLOCKS."""
    path = METHOD_DIR / f"{method}.yaml"
    if not path.is_file():
        raise InputError(f"unknown method {method!r}; presets: {', '.join(list_methods())} (in {METHOD_DIR})")
    return read_yaml_mapping(path, "method preset")


def load_preset(method: str) -> dict[str, Any]:
    """The options of a method preset (without ``method``, ``reference`` and the blocks)."""
    skip = {"method", "reference", *PRESET_BLOCKS}
    return {k: v for k, v in read_method_preset(method).items() if k not in skip}


def preset_blocks(method: str, data: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The per-protocol and per-dataset blocks of a method preset (see ``PRESET_BLOCKS``);
    ``data`` is the preset's YAML when the caller has already read it."""
    data = read_method_preset(method) if data is None else data
    out = {}
    for block in PRESET_BLOCKS:
        value = data.get(block) or {}
        if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
            raise InputError(f"{METHOD_DIR / (method + '.yaml')}: '{block}' must map names to option mappings, got {value!r}")
        out[block] = value
    return out


__all__ = ["LEGACY_DEFAULTS", "PMPOConfig", "list_methods", "load_preset", "preset_blocks", "preset_file",
           "read_method_preset"]
