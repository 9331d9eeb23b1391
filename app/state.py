"""What the app keeps between requests: loaded backbones, prompt models, caches, checkpoints.

One frozen CLIP (a :class:`~pmpo.backbone.Backbone`) is loaded once and shared by every prompt
model built on it (``build_model(cfg, backbone=...)`` / ``load_checkpoint(..., backbone=...)``):
prompt checkpoints are kilobytes, a CLIP is hundreds of megabytes. Everything cached here is a
bounded LRU, so a long-running public Space cannot grow without limit.

Requests never mutate a shared model: templates are passed explicitly, and the model keeps no
state between calls (its features are cached here, in thread-safe :class:`~pmpo.cache.TensorCache`
stores), so concurrent requests share it without a lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from pmpo.backbone import LOCAL_DIR, OFFLINE_MODEL, Backbone, load_backbone, resolve_model_name
from pmpo.cache import TensorCache
from pmpo.checkpoint import checkpoint_config, load_checkpoint, read_checkpoint
from pmpo.config import PMPOConfig
from pmpo.engine import seeded_init
from pmpo.errors import CheckpointError, InputError
from pmpo.model import ClassWeights, PMPOModel, build_model, clean_classnames

from . import zerogpu
from .features import ImageFeatures
from .lru import LRU
from .served import BackboneSpec, LoadedModel

log = logging.getLogger(__name__)

UNTRAINED = "untrained PMPO (init)"
UPLOAD_PREFIX = "upload: "
TRAINED_PREFIX = "trained: "
SHIPPED_PREFIX = "shipped: "
MAX_SESSIONS = 64  # browser sessions whose uploads / trainings are kept (least recently used go first)
MAX_SESSION_CHECKPOINTS = 8  # per session
TEXT_CACHE_BYTES = 64 * 2**20  # class weights: a 1000-class list at D=512 is ~2 MB per view


def _remove_stored(path: str | Path) -> None:
    """Delete a stored checkpoint and the one-file folder it was given."""
    path = Path(path)
    path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        path.parent.rmdir()


def _session_folder(session: str) -> str:
    """A folder name for a session that never exposes (or trusts) the raw session hash."""
    return "s-" + hashlib.sha256(session.encode()).hexdigest()[:16]

class InferenceGate:
    """Lets a training give way to visitors' requests: inference holds ``busy()``; the training
    thread calls ``wait_idle()`` between steps and pauses while any request computes. On a 2-core
    server the two otherwise split the cores, and every answer takes as long as a training step."""

    def __init__(self):
        self._active = 0
        self._idle = threading.Condition()

    @contextlib.contextmanager
    def busy(self):
        with self._idle:
            self._active += 1
        try:
            yield
        finally:
            with self._idle:
                self._active -= 1
                if not self._active:
                    self._idle.notify_all()

    def wait_idle(self, timeout: float) -> float:
        """Block until no request computes (at most ``timeout`` s, so a flood cannot stop a training
        for good); returns the seconds waited."""
        start = time.perf_counter()
        with self._idle:
            self._idle.wait_for(lambda: self._active == 0, timeout=timeout)
        return time.perf_counter() - start


def default_cache_dir() -> Path:
    root = os.environ.get("PMPO_CACHE_DIR")
    if root:
        path = Path(root)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return Path(tempfile.mkdtemp(prefix="pmpo-app-"))


class AppState:
    """Model registry and caches shared by every session of one app process."""

    def __init__(
        self,
        device: str | torch.device,
        default_spec: BackboneSpec,
        notices: list[str] | None = None,
        cache_dir: str | Path | None = None,
        shipped_dir: str | Path | None = None,
        max_backbones: int = 2,
        max_models: int = 6,
        default_choice: str = UNTRAINED,
    ):
        self.device = torch.device(device)
        self.default_spec = default_spec
        self.notices = list(notices or [])
        # A temporary folder the app made itself is removed when the app exits (cleanup());
        # one the user named (PMPO_CACHE_DIR, cache_dir=) is theirs and kept.
        self.owns_cache_dir = not cache_dir and not os.environ.get("PMPO_CACHE_DIR")
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        # Prompts shipped beside the start-up backbone (trained on it): offered to everyone.
        self.shipped_dir = Path(shipped_dir) if shipped_dir is not None else shipped_prompts_dir(default_spec)
        self.default_choice = default_choice
        self._backbones: LRU[BackboneSpec, Backbone] = LRU(max_backbones, on_evict=self._backbone_evicted)
        self._models: LRU[tuple, LoadedModel] = LRU(max_models)
        # Checkpoints given at start (--checkpoint) are offered to everyone; uploads and in-app
        # trainings belong to the browser session that made them, bounded per session and in sessions.
        self._startup_checkpoints: dict[str, str] = {}
        self._sessions: LRU[str, LRU[str, str]] = LRU(MAX_SESSIONS, on_evict=self._session_evicted)
        self._load_lock = threading.RLock()
        # Image features shared by every tab and session (keyed by content, backbone and prompts).
        self.features = ImageFeatures()
        self.text = TensorCache(TEXT_CACHE_BYTES)  # class weights, keyed like the image features
        self.inference = InferenceGate()  # trainings pause between steps while a request computes
        # Measured seconds per image / text pass of each backbone (the Train tab's estimates).
        self.pass_costs: LRU[BackboneSpec, object] = LRU(max_backbones + 2)

    # --- backbones -----------------------------------------------------------------------------
    def add_backbone(self, spec: BackboneSpec, backbone: Backbone) -> None:
        self._backbones.put(spec, backbone)

    def allowed_backbones(self) -> list[BackboneSpec] | None:
        """On a public Space (``SPACE_ID`` set) only these backbones load, so that a visitor cannot make
        the Space download and hold any open_clip model: the one it started with, the offline model,
        and those of ``PMPO_ALLOWED_BACKBONES`` ("model[+pretrained], ..."). None: no restriction."""
        if not os.environ.get("SPACE_ID"):
            return None
        allowed = [self.default_spec, BackboneSpec.of(OFFLINE_MODEL, None)]
        for item in filter(None, (x.strip() for x in os.environ.get("PMPO_ALLOWED_BACKBONES", "").split(","))):
            model, _, pretrained = item.partition("+")
            allowed.append(BackboneSpec.of(model.strip(), pretrained.strip() or None))
        return list(dict.fromkeys(allowed))

    def backbone(self, spec: BackboneSpec | None = None) -> Backbone:
        """The CLIP of ``spec``, loaded on first use and then shared."""
        spec = spec or self.default_spec
        allowed = self.allowed_backbones()
        if allowed is not None and spec not in allowed and spec not in self._backbones.keys():
            names = ", ".join(a.label for a in allowed)
            raise InputError(f"On this public Space only these backbones can be loaded: {names} "
                             "(the Space's owner sets PMPO_ALLOWED_BACKBONES). Run the app yourself for any other.")

        def load() -> Backbone:
            log.info("loading backbone %s", spec.label)
            return load_backbone(spec.model, spec.pretrained, device=self.device)

        return self._backbones.get_or_load(spec, load, self._load_lock)

    def _backbone_evicted(self, spec: BackboneSpec, _: Backbone) -> None:
        for key, _entry in self._models.items():
            if key[0] == spec:
                self._models.pop(key)

    # --- checkpoints -----------------------------------------------------------------------------
    def checkpoint_choices(self, session: str | None = None) -> list[str]:
        """The picker's entries for one browser session: the untrained init, the prompts shipped
        with the start-up backbone, the checkpoint given at start, and that session's own uploads
        and trainings."""
        own = self._sessions.get(session) if session else None
        return [UNTRAINED, *self.shipped_choices(), *self._startup_checkpoints, *(own.keys() if own is not None else [])]

    def shipped_choices(self) -> list[str]:
        folder = self.shipped_dir
        names = sorted(p.stem for p in folder.glob("*.safetensors")) if folder is not None and folder.is_dir() else []
        return [SHIPPED_PREFIX + n for n in names]

    def checkpoint_path(self, choice: str, session: str | None = None) -> Path | None:
        if not choice or choice == UNTRAINED:
            return None
        own = self._sessions.get(session) if session else None
        extra = (own.get(choice) if own is not None else None) or self._startup_checkpoints.get(choice)
        if extra is not None:
            return Path(extra)
        if choice in self.shipped_choices():
            return self.shipped_dir / f"{choice[len(SHIPPED_PREFIX):]}.safetensors"
        raise InputError(f"Unknown prompt checkpoint {choice!r}; pick one from the list or upload a .safetensors file.")

    def add_checkpoint_file(self, path: str | Path, prefix: str = UPLOAD_PREFIX, name: str | None = None,
                            session: str | None = None, spec: BackboneSpec | None = None) -> str:
        """Validate a prompt checkpoint (safetensors + pmpo metadata), build its model on ``spec``
        (so one that does not fit the backbone is refused here), and only then offer it in the
        picker of ``session`` (of every session when ``session`` is None: the start-up checkpoint).
        ``name`` is what the user knows the file as (never the server's temporary path)."""
        path = Path(path)
        shown = name or path.name
        if path.suffix.lower() != ".safetensors":
            raise CheckpointError(
                f"{shown!r} is not a .safetensors file. Prompt checkpoints are safetensors files written by "
                "pmpo (pickled .pt/.pth files are refused on purpose)."
            )
        try:
            read_checkpoint(path)
            checkpoint_config(path)
        except CheckpointError as exc:  # the message names the path it was read from: name the user's file
            raise CheckpointError(str(exc).replace(str(path), repr(shown))) from exc
        folder = self.cache_dir / "checkpoints" / (_session_folder(session) if session else "startup")
        stored = folder / uuid.uuid4().hex[:8] / Path(shown).name  # the user's file name, for downloads
        stored.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, stored)
        choice = prefix + Path(shown).name
        if spec is not None:
            try:
                self.model(spec, choice, _path=stored)
            except Exception:
                _remove_stored(stored)
                raise
        if session is None:
            self._startup_checkpoints[choice] = str(stored)
            return choice
        own = self._sessions.get(session)
        if own is None:
            own = LRU(MAX_SESSION_CHECKPOINTS, on_evict=lambda _choice, old: _remove_stored(old))
            self._sessions.put(session, own)
        replaced = own.get(choice)
        own.put(choice, str(stored))
        if replaced is not None and replaced != str(stored):
            _remove_stored(replaced)  # same name uploaded again: the new file wins
        return choice

    def cleanup(self) -> None:
        """At exit: delete the temporary folder this app created (uploads, trainings, examples)."""
        if self.owns_cache_dir:
            shutil.rmtree(self.cache_dir, ignore_errors=True)

    def drop_session(self, session: str) -> None:
        """A browser session ended (tab closed): forget and delete its checkpoints."""
        own = self._sessions.pop(session)
        if own is not None:
            self._session_evicted(session, own)

    def _session_evicted(self, session: str, own: LRU[str, str]) -> None:
        stored = {path for _, path in own.items()}
        for path in stored:
            _remove_stored(path)
        for key, _entry in self._models.items():
            if key[1] in stored:
                self._models.pop(key)

    # --- prompt models ---------------------------------------------------------------------------
    def model(self, spec: BackboneSpec | None = None, choice: str | None = None, session: str | None = None,
              _path: Path | None = None) -> LoadedModel:
        """The prompt model ``choice`` (as ``session`` sees it) on backbone ``spec``, built once and
        then cached by the file it comes from (two sessions may both have an "upload: x.safetensors")."""
        spec = spec or self.default_spec
        choice = choice or self.default_choice
        path = _path or self.checkpoint_path(choice, session)
        stamp = path.stat().st_mtime_ns if path is not None else 0
        key = (spec, str(path) if path is not None else choice, stamp)
        return self._models.get_or_load(key, lambda: self._build(spec, choice, path), self._load_lock)

    def _build(self, spec: BackboneSpec, choice: str, path: Path | None) -> LoadedModel:
        backbone = self.backbone(spec)
        notices = []
        if path is None:
            cfg = PMPOConfig(method="pmpo", model=backbone.model_name, pretrained=backbone.pretrained or "none")
            with seeded_init(0):  # the same "untrained" prompts in every session and run
                model = build_model(cfg, device=self.device, backbone=backbone)
            notices.append(
                "The learned prompts are an **untrained PMPO initialisation** (contexts from "
                "'a photo of a', random couplings): load or train a prompt checkpoint for learned prompts."
            )
        else:
            stored = checkpoint_config(path)
            try:
                model = load_checkpoint(path, device=self.device, backbone=backbone)
            except CheckpointError as exc:
                raise CheckpointError(str(exc).replace(str(path), repr(choice))) from exc
            if choice.startswith(SHIPPED_PREFIX):
                notices.append(shipped_note(choice, path))
            if _backbone_key(resolve_model_name(stored.model)) != _backbone_key(backbone.model_name) or (
                (stored.pretrained or "none") != (backbone.pretrained or "none") and not backbone.model_name.startswith(LOCAL_DIR)
            ):
                notices.append(
                    f"Checkpoint {choice!r} was trained on {stored.model} ({stored.pretrained}); it is running on "
                    f"{spec.label}. The sizes fit, but the prompts were learned for another CLIP."
                )
        return LoadedModel(model.eval(), choice, spec, notices)

    # --- text features ----------------------------------------------------------------------------
    def class_weights(self, entry: LoadedModel, names: list[str], templates: list[str],
                      progress: Callable[[int, int], None] | None = None) -> ClassWeights:
        """Class weights with *these* templates, without touching ``model.templates``: from the
        app's text store (keyed by backbone, prompts, names and templates) or one text pass
        (:func:`text_weights`); two requests that miss at once both compute, and store the same numbers."""
        key = ("text", entry.spec, entry.fingerprint, tuple(names), tuple(templates))
        found = self.text.get(key)
        if found is None:
            # A callback cannot cross into a ZeroGPU worker; there the text pass runs without one.
            cw = text_weights(entry.model, list(names), list(templates), None if zerogpu.active() else progress)
            self.text.put(key, (cw.weights, cw.prompts if cw.prompts is not None else torch.empty(0), cw.prior))
            return cw
        weights, prompts, prior = found
        return ClassWeights(weights, prompts if prompts.numel() else None, prior,
                            tuple(clean_classnames(names)), entry.model.cfg.uses_meta_net and prompts.numel() > 0)


@zerogpu.gpu(duration=zerogpu.PASS_S)
def text_weights(model: PMPOModel, names: list[str], templates: list[str],
                 progress: Callable[[int, int], None] | None = None) -> ClassWeights:
    """The text pass itself (a kernel: :mod:`pmpo.app.zerogpu`), its tensors on the CPU."""
    model = zerogpu.kernel_model(model)
    with torch.no_grad():
        cw = model.class_weights(names, templates, progress)
    return dataclasses.replace(cw, weights=cw.weights.cpu(), prior=cw.prior.cpu(),
                               prompts=cw.prompts.cpu() if cw.prompts is not None else None)


def shipped_prompts_dir(spec: BackboneSpec) -> Path | None:
    """``<folder>/prompts`` of a local backbone folder (the offline model ships trained prompts
    there): prompts trained on that backbone, so offered with it and only with it."""
    if not spec.model.startswith(LOCAL_DIR):  # a shipped model's bare name is resolved by BackboneSpec.of
        return None
    folder = Path(spec.model[len(LOCAL_DIR):]) / "prompts"
    return folder if folder.is_dir() else None


def shipped_note(choice: str, path: Path) -> str:
    """Where shipped prompts come from and how they scored, from their own metadata."""
    import json

    _, meta = read_checkpoint(path)
    try:
        acc, zs = json.loads(meta["test_accuracy"]), json.loads(meta["zeroshot_test_accuracy"])
        classes = len(json.loads(meta.get("train_classes", "[]")))
        return (f"**{choice}**: {meta.get('provenance', 'shipped prompts')}; trained on {classes} base classes, "
                f"held-out test accuracy base {acc['base']:.1f} / new {acc['new']:.1f} % (zero-shot CLIP "
                f"{zs['base']:.1f} / {zs['new']:.1f} %). Class-agnostic: they serve any class list.")
    except (KeyError, ValueError, TypeError):
        return f"**{choice}**: prompts shipped with this backbone."


def _backbone_key(model: str) -> str:
    """Compare local-dir backbones by folder name: a checkpoint made elsewhere names another path."""
    if model.startswith(LOCAL_DIR):
        return LOCAL_DIR + Path(model[len(LOCAL_DIR):]).name
    return model


def is_offline_model(model_name: str) -> bool:
    """The shipped ShapeWorld CLIP (by any of its names): its tasks, recipe and examples differ."""
    return resolve_model_name(model_name) == OFFLINE_MODEL


def offline_model_present() -> bool:
    return (Path(OFFLINE_MODEL[len(LOCAL_DIR):]) / "open_clip_config.json").is_file()


__all__ = ["AppState", "UNTRAINED", "offline_model_present"]
