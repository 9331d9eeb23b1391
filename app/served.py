"""What the app serves: which CLIP (:class:`BackboneSpec`) and a prompt model on it, ready to serve
(:class:`LoadedModel`). Plain records that the state, the feature store and every tab pass around."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from pmpo.backbone import LOCAL_DIR, resolve_model_name
from pmpo.errors import InputError
from pmpo.model import PMPOModel


@dataclass(frozen=True)
class BackboneSpec:
    """Which CLIP: an open_clip name (or ``local-dir:PATH``) and a pretrained tag/file or None."""

    model: str
    pretrained: str | None = None

    @staticmethod
    def of(model: str, pretrained: str | None) -> BackboneSpec:
        model = (model or "").strip()
        if not model:
            raise InputError("Backbone model name is empty: give an open_clip name (e.g. ViT-B-16-quickgelu) or local-dir:PATH.")
        pretrained = (pretrained or "").strip() or None
        model = resolve_model_name(model)  # "shapeworld-clip" is the shipped folder, not a hub name
        if model.startswith(LOCAL_DIR) or (pretrained or "").lower() in ("none", "random"):
            pretrained = None if model.startswith(LOCAL_DIR) else "none"
        return BackboneSpec(model, pretrained)

    @property
    def label(self) -> str:
        if self.model.startswith(LOCAL_DIR):
            return f"{Path(self.model[len(LOCAL_DIR):]).name} (local folder)"
        return f"{self.model} ({'random init' if self.pretrained in (None, 'none') else self.pretrained})"


@dataclass
class LoadedModel:
    """A prompt model ready to serve (shared by concurrent requests: it holds parameters only)."""

    model: PMPOModel
    choice: str
    spec: BackboneSpec
    notices: list[str] = field(default_factory=list)

    @functools.cached_property
    def fingerprint(self) -> str:
        """The prompts' identity for feature caches: config and tensor bytes (served models never
        change; a trained one is a new file, hence a new entry)."""
        h = hashlib.blake2b(digest_size=16)
        h.update(self.model.cfg.to_json().encode())
        for name, tensor in sorted((self.model.prompts.state_dict() if self.model.prompts is not None else {}).items()):
            h.update(name.encode())
            h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    @property
    def description(self) -> str:
        m = self.model
        n = m.prompts.n_prompts if m.prompts is not None else 0
        return f"{self.choice} — {m.cfg.method}, N={n}, {m.num_learnable():,} learnable parameters"
