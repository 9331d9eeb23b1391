"""Model configuration: one dataclass for every method, filled from YAML presets.

Zero-shot CLIP, CoOp, CoCoOp, KgCoOp, VPT, IVLP, MaPLe, PromptSRC and PMPO differ only in a handful
of options (DESIGN.md §2),
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
# How visual prompt tokens are made: a Linear(d_t -> d_v) of the text context (one per prompt, one
# shared, one per prompted layer: MaPLe), or "independent" tokens of their own (VPT, IVLP, PromptSRC).
COUPLINGS = ("per_prompt", "shared", "per_layer", "independent")
# Blocks of a method preset that are not options but exceptions to them, applied by
# pmpo.recipes: ``protocols: {cross_dataset: {text_depth: 3}}`` (MaPLe's cross-dataset depth) and
# ``datasets: {dtd: {templates: [...]}}`` (KgCoOp's DTD prior).
PRESET_BLOCKS = ("protocols", "datasets")
# Preset keys that are neither options nor blocks: ``reference`` (the authors' files), ``title`` (how
# tables and the app name the method), ``app`` (offered in the demo's Train tab) and
# ``dataset_templates`` (false: the method classifies with its preset's templates on every dataset,
# as VPT's code does, instead of each dataset's own; applied by pmpo.recipes).
PRESET_META = ("method", "reference", "title", "app", "dataset_templates")
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
    n_ctx: int | None = None  # M context tokens per prompt (0: no learnable text, VPT)
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
    coupling: str | None = None  # "per_prompt", "shared", "per_layer" (MaPLe) or "independent" (VPT, IVLP)
    # Visual prompt tokens per prompted layer; a coupling maps M text tokens to M visual ones, so only
    # "independent" tokens may differ (VPT: 8 without any text context). None: n_ctx.
    n_ctx_vision: int | None = None
    # CoCoOp's meta-net: Linear(D -> D/16), ReLU, Linear(D/16 -> d_t) of the normalised image feature,
    # added to every context token, so the class weights depend on the image.
    meta_net: bool | None = None
    # Visual prompts injected at layer 0 go through the tower's ln_pre with the patch tokens, as
    # MaPLe concatenates them before ln_pre (exact: LayerNorm acts per token).
    prompt_ln_pre: bool | None = None

    # Manual prior and class weights.
    templates: list[str] | None = None
    alpha: float | None = None  # prior weight; None in the preset means 1/(N+1)

    # Losses.
    aux_weight: float | None = None  # beta: per-prompt auxiliary CE
    consistency_weight: float | None = None  # lambda: KgCoOp-style prior consistency
    # PromptSRC's self-regulating terms, each against the frozen CLIP: L1 between prompted and frozen
    # text features (frozen side: mean over ``teacher_templates``), L1 between prompted and frozen
    # image features, KL between the frozen (zero-shot) and the prompted logits.
    text_l1_weight: float | None = None
    image_l1_weight: float | None = None
    logit_kl_weight: float | None = None
    # The frozen text side of those terms: a template list, or the name of a pool shipped in
    # pmpo/configs/templates/ (``imagenet``: the 60 templates PromptSRC averages).
    teacher_templates: str | list[str] | None = None

    def __post_init__(self) -> None:
        preset = load_preset(self.method)
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is None and f.name in preset:
                setattr(self, f.name, preset[f.name])
        if self.alpha is None:
            self.alpha = default_alpha(self.n_prompts)
        if self.n_ctx_vision is None:
            self.n_ctx_vision = self.n_ctx
        self.validate()

    def validate(self) -> None:
        """Reject impossible combinations early, with a message naming the option."""
        if self.n_prompts < 0:
            raise InputError(f"n_prompts must be >= 0, got {self.n_prompts}")
        if self.n_ctx < 0 or self.n_ctx_vision < 0:
            raise InputError(f"n_ctx and n_ctx_vision must be >= 0, got {self.n_ctx} and {self.n_ctx_vision}")
        if self.n_prompts > 0 and self.n_ctx == 0:
            # VPT: prompts on the image side only; the class weights are the prior.
            if not (self.visual_prompts and self.coupling == "independent"):
                raise InputError("n_ctx 0 (no text context) needs visual_prompts with coupling 'independent'")
            if self.alpha != 1.0 or self.text_depth != 1 or self.meta_net:
                raise InputError("with n_ctx 0 there is no learned text: alpha must be 1, text_depth 1, meta_net off")
        if self.uses_visual_prompts and self.n_ctx_vision < 1:
            raise InputError(f"n_ctx_vision must be >= 1 with visual prompts, got {self.n_ctx_vision}")
        if self.uses_visual_prompts and self.coupling != "independent" and self.n_ctx_vision != self.n_ctx:
            raise InputError(f"coupling {self.coupling!r} maps the {self.n_ctx} text tokens to as many visual ones: "
                             f"n_ctx_vision must equal n_ctx (or use coupling 'independent'), got {self.n_ctx_vision}")
        if self.meta_net and self.n_prompts > 0 and self.visual_pass != "single":
            raise InputError("meta_net conditions the context on the single-pass image feature: use visual_pass 'single'")
        for name in ("aux_weight", "consistency_weight", "text_l1_weight", "image_l1_weight", "logit_kl_weight"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise InputError(f"{name} must be >= 0, got {value}")
        if isinstance(self.teacher_templates, list) and (
                not self.teacher_templates or any("{}" not in t for t in self.teacher_templates)):
            raise InputError(f"teacher_templates must be a pool name or a non-empty list of strings containing "
                             f"'{{}}', got {self.teacher_templates!r}")
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

    @property
    def uses_text_prompts(self) -> bool:
        return self.n_prompts > 0 and self.n_ctx > 0

    @property
    def uses_meta_net(self) -> bool:
        """Class weights depend on the image (CoCoOp): nothing per class list can be cached."""
        return bool(self.meta_net) and self.uses_text_prompts

    @property
    def uses_teacher(self) -> bool:
        """Any of PromptSRC's self-regulating terms is on (needs the frozen CLIP's view each step)."""
        return bool(self.text_l1_weight or self.image_l1_weight or self.logit_kl_weight)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PMPOConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown config option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> PMPOConfig:
        data = read_yaml_mapping(path, "model config")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data)


def default_alpha(n_prompts: int) -> float:
    """The prior's weight when a config leaves it unset: 1/(N+1), the prior counting as one more prompt."""
    return 1.0 / (n_prompts + 1)


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


def method_title(method: str) -> str:
    """How tables, benchmarks and the app name a method (its preset's ``title``)."""
    try:
        return str(read_method_preset(method).get("title") or method)
    except InputError:
        return method


def app_methods() -> list[str]:
    """The methods the demo's Train tab offers (``app: true`` in their preset), PMPO first."""
    offered = [m for m in list_methods() if read_method_preset(m).get("app")]
    return sorted(offered, key=lambda m: (m != "pmpo", m))


def read_method_preset(method: str) -> dict[str, Any]:
    """The whole YAML of a method preset: its options, ``reference`` and the PRESET_BLOCKS."""
    path = METHOD_DIR / f"{method}.yaml"
    if not path.is_file():
        raise InputError(f"unknown method {method!r}; presets: {', '.join(list_methods())} (in {METHOD_DIR})")
    return read_yaml_mapping(path, "method preset")


def load_preset(method: str) -> dict[str, Any]:
    """The options of a method preset (without ``method``, ``reference`` and the blocks)."""
    skip = {*PRESET_META, *PRESET_BLOCKS}
    return {k: v for k, v in read_method_preset(method).items() if k not in skip}


TEMPLATE_DIR = CONFIG_DIR / "templates"


def template_pool(spec: str | list[str]) -> list[str]:
    """A template list as given, or the pool of that name shipped in ``pmpo/configs/templates/``."""
    if isinstance(spec, list):
        return list(spec)
    path = TEMPLATE_DIR / f"{spec}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in TEMPLATE_DIR.glob("*.yaml"))
        raise InputError(f"unknown template pool {spec!r}; shipped: {', '.join(known)}")
    templates = read_yaml_mapping(path, "template pool").get("templates")
    if not isinstance(templates, list) or not templates or any("{}" not in str(t) for t in templates):
        raise InputError(f"{path}: 'templates' must be a non-empty list of strings containing '{{}}'")
    return [str(t) for t in templates]


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


__all__ = [
    "LEGACY_DEFAULTS", "PMPOConfig", "app_methods", "default_alpha", "list_methods", "load_preset", "method_title",
    "preset_blocks", "preset_file", "read_method_preset", "template_pool",
]
