"""Training and evaluation of the prompt learner in plain PyTorch (no Dassl).

Recipe (DESIGN.md §3, MaPLe's): SGD lr 0.0035, momentum 0.9, weight decay 5e-4, batch 4,
5 epochs, 1 warm-up epoch at a constant 1e-5, then cosine. The schedule is **per epoch**, as in
Dassl: epoch ``e < warmup_epochs`` runs at ``warmup_lr``; epoch ``e >= warmup_epochs`` runs at
``lr · ½(1 + cos(π·(e − warmup_epochs)/epochs))`` — exactly the learning rates Dassl's
ConstantWarmupScheduler wrapped around CosineAnnealingLR(T_max=epochs) produces.

Reproducibility is built from one idea: **everything random in epoch e is a function of
(seed, e)** — the data order comes from a generator seeded with (seed, e) and each image's
augmentation from a generator seeded with (seed, e, image index). The engine draws only from
generators of its own, never from (or reseeding) torch's, numpy's or Python's global one, which
the process's other threads -- the app's -- share. Hence

* a run resumed from the checkpoint of epoch e (optimizer state included) replays epochs
  e+1.. bit for bit, so a killed run ends where an uninterrupted one does;
* the number of DataLoader workers does not change the result;
* K processes (torchrun) see the same global batches, with the same augmentations, as one
  process: ``batch_size`` is the **global** batch (split over processes and over gradient
  accumulation micro-batches), so a recipe means the same thing on 1 or 8 GPUs.

Only the prompt learner has parameters, so distributed training wraps just ``model.prompts``
in DistributedDataParallel: gradients of a few thousand numbers are all-reduced, the frozen
CLIP is never broadcast.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from safetensors import safe_open
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import distributed as pdist
from .checkpoint import save_checkpoint
from .config import CONFIG_DIR
from .data.datasets import Datum
from .data.loader import ImageDataset, load_image
from .errors import CheckpointError, InputError, PMPOError
from .io import atomic_save_safetensors, read_yaml_mapping
from .encoders import VisionOutput
from .model import PMPOModel, clean_classnames

TRAIN_CONFIG_DIR = CONFIG_DIR / "train"
STATE_FORMAT = "pmpo-train-state/1"
LAST_CHECKPOINT = "last.safetensors"
TRAIN_STATE = "train_state.safetensors"
METRICS = "metrics.jsonl"
OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
# Options that change neither the maths nor the data order; a resumed run may change them.
RESUME_FREE = ("num_workers", "eval_batch_size", "log_every")


class NonFiniteLossError(PMPOError):
    """The training loss became NaN/inf; the last good checkpoint is left as it was."""


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """How to train; defaults are MaPLe's base-to-new recipe (DESIGN.md §3)."""

    epochs: int = 5
    batch_size: int = 4  # global: images per optimizer step over all processes
    lr: float = 0.0035
    optimizer: str = "sgd"  # sgd | adamw
    momentum: float = 0.9  # SGD only
    weight_decay: float = 5e-4
    scheduler: str = "cosine"  # cosine | constant (after warm-up), stepped per epoch
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5  # constant learning rate during warm-up
    grad_accum: int = 1  # micro-batches per optimizer step (same maths, less memory)
    precision: str = "auto"  # auto (bf16 on CUDA, else fp32) | fp32 | bf16 (CUDA only)
    num_workers: int = 0
    seed: int = 1
    eval_batch_size: int = 64
    log_every: int = 10  # steps between metrics.jsonl step lines
    # RandomResizedCrop's smallest area fraction: CoOp's 0.08 for natural images; small synthetic
    # scenes with one small object need more (a 8 % crop usually cuts the object out).
    min_crop_scale: float = 0.08
    # PromptSRC's Gaussian prompt aggregation (GPA): the prompts after epoch e (1-based) are summed
    # with weight N(e; gpa_mean, gpa_std), the weights normalised over epochs 1..epochs, and the run
    # ends with that sum as its prompts (trainers/promptsrc.py). gpa_std 0: off, the last epoch's.
    gpa_mean: float = 0.0
    gpa_std: float = 0.0
    # Methods whose image side has no learnable part (CoOp, KgCoOp, CoCoOp: PMPOModel.frozen_image_side)
    # may compute the frozen image features once: K > 0 encodes K augmented views of every image
    # before the first step, and each step draws one of them per image, so a step is a text pass.
    # 0 (the default, and every benchmark protocol): the image tower runs on fresh augmentations
    # every step, as the authors' code does. With K views the augmentations seen are K per image
    # instead of one per epoch; without augmentation (min_crop_scale 1, flip only) K = 2 covers it.
    cached_views: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0 and math.isfinite(self.lr), f"lr must be a positive number, got {self.lr}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}"),
            (self.scheduler in SCHEDULERS, f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}"),
            (0 <= self.warmup_epochs, f"warmup_epochs must be >= 0, got {self.warmup_epochs}"),
            (self.warmup_lr > 0, f"warmup_lr must be > 0, got {self.warmup_lr}"),
            (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            (self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}"),
            (self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size}"),
            (0 < self.min_crop_scale <= 1, f"min_crop_scale must lie in (0, 1], got {self.min_crop_scale}"),
            (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.gpa_std >= 0, f"gpa_std must be >= 0 (0: no prompt aggregation), got {self.gpa_std}"),
            (0 <= self.cached_views <= 64, f"cached_views must lie in 0..64 (0: off), got {self.cached_views}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise InputError(f"unknown training option(s): {', '.join(unknown)}; known: {', '.join(known)}")
        typed = {}
        for name, value in data.items():
            kind = type(getattr(cls(), name))
            try:
                typed[name] = kind(value) if kind in (int, float) and not isinstance(value, bool) else value
            except (TypeError, ValueError):
                raise InputError(f"training option {name} must be a {kind.__name__}, got {value!r}") from None
        return cls(**typed)


def _read_yaml(path: Path) -> dict[str, Any]:
    return read_yaml_mapping(path, "training config")


def train_preset_path(method: str, protocol: str) -> Path:
    """``pmpo/configs/train/<method>_<protocol>.yaml`` when a method has its own recipe (CoOp), else
    ``pmpo/configs/train/<protocol>.yaml`` (MaPLe's recipe, shared by PMPO and MaPLe)."""
    own = TRAIN_CONFIG_DIR / f"{method}_{protocol}.yaml"
    shared = TRAIN_CONFIG_DIR / f"{protocol}.yaml"
    if own.is_file():
        return own
    if shared.is_file():
        return shared
    known = sorted(p.stem for p in TRAIN_CONFIG_DIR.glob("*.yaml"))
    raise InputError(f"no training preset for protocol {protocol!r} in {TRAIN_CONFIG_DIR} (have: {', '.join(known)})")


def load_train_config(path: str | Path, dataset: str | None = None, shots: int | None = None,
                      **overrides: Any) -> TrainConfig:
    """A TrainConfig from YAML. Two blocks hold the exceptions of a recipe: ``per_shots: {K: {option:
    value}}`` (CoOp's few-shot epochs depend on K) and ``per_dataset: {name: {option: value}}``
    (CoOp trains ImageNet for 50 epochs whatever K). The dataset's block wins over the shots' one,
    and explicit ``overrides`` (None = not given) win over both."""
    data = _read_yaml(Path(path))
    data.pop("reference", None)  # the authors' file the recipe follows (shown by pmpo recipe)
    per_shots = data.pop("per_shots", None) or {}
    per_dataset = data.pop("per_dataset", None) or {}
    for name, block in (("per_shots", per_shots), ("per_dataset", per_dataset)):
        if not isinstance(block, dict) or not all(isinstance(v, dict) for v in block.values()):
            raise InputError(f"{path}: '{name}' must map keys to option mappings, got {block!r}")
    if shots is not None:
        data.update(per_shots.get(shots, per_shots.get(str(shots), {})))
    if dataset is not None and dataset in per_dataset:
        data.update(per_dataset[dataset])
    data.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.from_dict(data)


def load_train_preset(method: str, protocol: str, dataset: str | None = None, shots: int | None = None,
                      **overrides: Any) -> TrainConfig:
    return load_train_config(train_preset_path(method, protocol), dataset, shots, **overrides)


def gpa_weights(cfg: TrainConfig) -> list[float] | None:
    """Weight of the prompts after each epoch in the Gaussian aggregation (None when off): the
    normal density at e = 1..epochs around ``gpa_mean`` with ``gpa_std``, normalised to sum 1."""
    if not cfg.gpa_std:
        return None
    density = [math.exp(-0.5 * ((e - cfg.gpa_mean) / cfg.gpa_std) ** 2) for e in range(1, cfg.epochs + 1)]
    total = sum(density)
    if total == 0.0:
        raise InputError(f"gpa_mean {cfg.gpa_mean} with gpa_std {cfg.gpa_std} gives every one of the "
                         f"{cfg.epochs} epochs zero weight")
    return [d / total for d in density]


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """Learning rate of (0-based) ``epoch``: constant warm-up, then cosine or constant."""
    if epoch < cfg.warmup_epochs:
        return cfg.warmup_lr
    if cfg.scheduler == "constant":
        return cfg.lr
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / cfg.epochs))


# --------------------------------------------------------------------------------------------
# Seeds and data order
# --------------------------------------------------------------------------------------------


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers: a stable hash, so (seed, epoch, index) never collide in practice."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Inside: torch's global CPU generator seeded with ``seed``; after: as it was before.

    For what cannot take a generator -- ``nn.init`` filling a new model's prompts -- so that an
    initialisation is reproducible without leaving the caller's (or another thread's) global
    random state reseeded. Parameters are created on the CPU, so the CPU generator is the one.
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def _loader_generator(seed: int) -> torch.Generator:
    """A DataLoader's own generator: its per-iterator base seed is drawn from it instead of from
    torch's global generator, which the engine never touches."""
    return torch.Generator().manual_seed(seed)


class _AugmentedDataset(Dataset):
    """Items keyed by ``(index, seed)``: each image's augmentation draws from a generator seeded
    with its own seed, so it does not depend on which process or worker loads it, nor on what was
    loaded before, and leaves the global random state alone."""

    def __init__(self, items: Sequence[Datum], transform: Callable):
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key
        item = self.items[index]
        image = load_image(item.path)
        if getattr(self.transform, "takes_generator", False):  # pmpo's train transform (data.transforms.Augment)
            tensor = self.transform(image, generator=torch.Generator().manual_seed(seed))
        else:  # any other transform draws from the global generator: seed it for this call only
            with seeded_init(seed):
                tensor = self.transform(image)
        return tensor, item.label


@dataclass
class _Step:
    micro: list[list[tuple[int, int]]]  # this process's micro-batches of (index, sample seed)
    weights: list[float]  # loss weight of each micro-batch (its share of the global batch)
    global_size: int


def plan_epoch(n: int, cfg: TrainConfig, epoch: int, rank: int = 0, world: int = 1) -> list[_Step]:
    """The optimizer steps of one epoch, for one process.

    A global permutation seeded with (seed, epoch) is cut into global batches (the last,
    incomplete one dropped as Dassl does, unless it is the only one); each global batch is cut
    into ``world × grad_accum`` contiguous chunks and process ``rank`` takes chunks
    ``rank·A .. rank·A + A − 1``. Every chunk's loss is weighted by its share of the global
    batch, so the summed gradient is the gradient of the global batch mean.
    """
    parts = world * cfg.grad_accum
    generator = torch.Generator().manual_seed(derive_seed(cfg.seed, epoch))
    order = torch.randperm(n, generator=generator).tolist()
    if n >= cfg.batch_size:
        batches = [order[i:i + cfg.batch_size] for i in range(0, n - cfg.batch_size + 1, cfg.batch_size)]
    else:
        batches = [order]
    steps = []
    for batch in batches:
        if len(batch) < parts:
            raise InputError(
                f"a batch of {len(batch)} images cannot be split over {world} process(es) × {cfg.grad_accum} "
                "accumulation steps; use more images, fewer processes or a smaller grad_accum"
            )
        chunks = [c.tolist() for c in np.array_split(np.array(batch), parts)]
        mine = chunks[rank * cfg.grad_accum:(rank + 1) * cfg.grad_accum]
        steps.append(_Step(
            micro=[[(i, derive_seed(cfg.seed, epoch, i)) for i in chunk] for chunk in mine],
            weights=[len(chunk) / len(batch) for chunk in mine],
            global_size=len(batch),
        ))
    return steps


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    history: list[dict[str, Any]]  # one dict per epoch: epoch, step, loss, acc, lr, images_per_s
    epochs_run: int  # epochs trained by this call (0 when the run was already complete)
    start_epoch: int  # epochs already done when this call started (resume)
    wall_time_s: float
    images_per_s: float
    stopped: bool = False  # cancelled through ``stop``
    checkpoint: str | None = None  # last.safetensors, when out_dir was given


@dataclass
class EvalResult:
    accuracy: float  # percent
    per_class: dict[str, float]  # classname -> percent (classes without test images omitted)
    n: int
    images_per_s: float


# --------------------------------------------------------------------------------------------
# Checkpoint of the training state (safetensors + JSON metadata; nothing is unpickled)
# --------------------------------------------------------------------------------------------


def data_fingerprint(items: Sequence[Datum], classnames: Sequence[str]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(list(classnames)).encode())
    for d in items:
        h.update(f"{d.label}\t{os.path.basename(d.path)}\n".encode())
    return h.hexdigest()[:16]


def save_train_state(path: Path, model: PMPOModel, optimizer: torch.optim.Optimizer, epoch: int, step: int,
                     cfg: TrainConfig, fingerprint: str, history: list[dict],
                     aggregate: dict[str, torch.Tensor] | None = None) -> None:
    """Prompts + optimizer state + progress (+ the running GPA sum) in one file, so one
    ``os.replace`` keeps them consistent."""
    tensors = {f"prompts.{k}": v.detach().float().contiguous().cpu() for k, v in model.prompts.state_dict().items()}
    tensors.update({f"gpa.{k}": v.contiguous().cpu() for k, v in (aggregate or {}).items()})
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    meta = {
        "format": STATE_FORMAT,
        "epoch": str(epoch),
        "step": str(step),
        "train_config": json.dumps(cfg.to_dict(), sort_keys=True),
        "model_config": model.cfg.to_json(),
        "data": fingerprint,
        "history": json.dumps(history),
        "optim_scalars": json.dumps(scalars),
    }
    atomic_save_safetensors(tensors, path, meta)


def read_train_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc.__class__.__name__}); delete it to start over") from exc
    if meta.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a pmpo training state (no '{STATE_FORMAT}' metadata)")
    return tensors, meta


def _restore(path: Path, model: PMPOModel, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
             fingerprint: str) -> tuple[int, int, list[dict], dict[str, torch.Tensor] | None]:
    tensors, meta = read_train_state(path)
    stored_cfg = json.loads(meta["train_config"])
    diff = [f"{k} {stored_cfg.get(k)!r} vs {v!r}" for k, v in cfg.to_dict().items()
            if k not in RESUME_FREE and stored_cfg.get(k) != v]
    if diff:
        raise CheckpointError(f"cannot resume {path}: it was trained with other options ({'; '.join(diff)}); "
                              "use a new output folder or the same options")
    stored_model = json.loads(meta["model_config"])
    now = model.cfg.to_dict()
    mdiff = [k for k in now if stored_model.get(k) != now[k] and k not in ("model", "pretrained")]
    if mdiff:
        raise CheckpointError(f"cannot resume {path}: the model config differs in {', '.join(mdiff)}")
    if meta.get("data") != fingerprint:
        raise CheckpointError(f"cannot resume {path}: it was trained on other images or classes")
    prompts = {k[len("prompts."):]: v for k, v in tensors.items() if k.startswith("prompts.")}
    try:
        model.prompts.load_state_dict(prompts)
    except RuntimeError as exc:
        raise CheckpointError(f"cannot resume {path}: {str(exc).splitlines()[0]}") from exc
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, values in json.loads(meta.get("optim_scalars", "{}")).items():
        state.setdefault(int(idx), {}).update(values)
    sd = optimizer.state_dict()
    sd["state"] = state
    optimizer.load_state_dict(sd)
    aggregate = {k[len("gpa."):]: v.to(model.device) for k, v in tensors.items() if k.startswith("gpa.")} or None
    return int(meta["epoch"]), int(meta["step"]), json.loads(meta["history"]), aggregate


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


class _PromptObjective(nn.Module):
    """What DDP wraps: registers only the prompt learner, so DDP syncs (and broadcasts once) the
    learnable tensors alone; the frozen CLIP is reached through a plain attribute."""

    def __init__(self, model: PMPOModel):
        super().__init__()
        self.prompts = model.prompts
        self.__dict__["model"] = model  # not a submodule: never broadcast, never in gradient buckets

    def forward(self, images: torch.Tensor | None, labels: torch.Tensor, classnames: Sequence[str],
                vision: VisionOutput | None = None) -> dict[str, torch.Tensor]:
        if vision is None:
            return self.model.loss(images, labels, classnames)
        return self.model.loss(images, labels, classnames, vision=vision)


def _build_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _autocast(device: torch.device, precision: str):
    if precision == "bf16" and device.type != "cuda":
        raise InputError("precision bf16 needs a CUDA device; use fp32 or auto on CPU")
    use = device.type == "cuda" and (precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()))
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16) if use else nullcontext()


def _check_items(items: Sequence[Datum], classnames: Sequence[str], what: str) -> list[str]:
    names = clean_classnames(classnames)
    if not items:
        raise InputError(f"no images to {what}")
    bad = [d for d in items if not 0 <= d.label < len(names)]
    if bad:
        raise InputError(f"label {bad[0].label} of {bad[0].path} is outside the {len(names)} classes given")
    return names


def _workers(requested: int) -> int:
    """Never more loader workers than CPUs; results do not depend on the number (per-image seeds)."""
    return max(0, min(requested, os.cpu_count() or 1))


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def _trim_metrics(path: Path, keep_before_epoch: int) -> None:
    """On resume, drop log lines of the epoch that was interrupted (it is replayed)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("epoch", 0) <= keep_before_epoch:
                kept.append(line)
        except ValueError:
            continue  # a line cut by the kill
    path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")


@torch.no_grad()
def cached_image_features(model: PMPOModel, items: Sequence[Datum], cfg: TrainConfig,
                          progress: Callable[[dict], None] | None = None,
                          stop: threading.Event | None = None) -> torch.Tensor | None:
    """[K, n, D] image features of ``cfg.cached_views`` = K augmented views of every item, each
    view's augmentation seeded by (seed, view, index) so that a resumed or distributed run sees the
    same features. None when ``stop`` was set before the last batch."""
    if not model.frozen_image_side:
        raise InputError(f"cached_views needs a method without visual prompts (CoOp, KgCoOp, CoCoOp); "
                         f"{model.cfg.method!r} learns inside the image tower")
    views, n = cfg.cached_views, len(items)
    dataset = _AugmentedDataset(items, model.train_transform(cfg.min_crop_scale))
    keys = [(i, derive_seed(cfg.seed, -2, v, i)) for v in range(views) for i in range(n)]
    loader = DataLoader(dataset, batch_sampler=[keys[k:k + cfg.eval_batch_size] for k in range(0, len(keys), cfg.eval_batch_size)],
                        num_workers=_workers(cfg.num_workers), pin_memory=model.device.type == "cuda",
                        generator=_loader_generator(derive_seed(cfg.seed, -2, -1)))
    out, done = [], 0
    was_training = model.training
    model.eval()
    try:
        for images, _ in loader:
            if stop is not None and stop.is_set():
                return None
            with _autocast(model.device, cfg.precision):
                out.append(model.encode_image(images.to(model.device, non_blocking=True)).features.float())
            done += len(images)
            if progress is not None:
                progress({"type": "features", "done": done, "total": len(keys)})
    finally:
        model.train(was_training)
    return torch.cat(out).view(views, n, -1)


def train(
    model: PMPOModel,
    items: Sequence[Datum],
    classnames: Sequence[str],
    cfg: TrainConfig,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: Callable[[dict], None] | None = None,
    stop: threading.Event | None = None,
) -> TrainResult:
    """Train ``model``'s prompts on ``items`` (labels index ``classnames``) and return the history.

    With ``out_dir``: ``metrics.jsonl`` (step and epoch lines), and after every epoch
    ``last.safetensors`` (the prompt checkpoint) and ``train_state.safetensors`` (prompts,
    optimizer state, epoch) written atomically. ``resume=True`` continues from
    ``train_state.safetensors`` when it exists (else starts fresh). ``stop`` is checked between
    steps; ``progress`` gets a dict every step (on the main process).
    """
    cfg.validate()
    names = _check_items(items, classnames, "train on")
    params = model.learnable_parameters()
    if not params:
        raise InputError(f"method {model.cfg.method!r} has no learnable prompts; evaluate it without training")
    dinfo = pdist.info()
    device = model.device
    autocast = _autocast(device, cfg.precision)
    out = Path(out_dir) if out_dir is not None else None
    state_path = out / TRAIN_STATE if out else None
    ckpt_path = out / LAST_CHECKPOINT if out else None
    fingerprint = data_fingerprint(items, names)

    optimizer = _build_optimizer(params, cfg)
    start_epoch, global_step, history = 0, 0, []
    aggregate: dict[str, torch.Tensor] | None = None  # running GPA sum of the prompts (PromptSRC)
    epoch_weights = gpa_weights(cfg)
    if resume and state_path is not None and state_path.is_file():
        start_epoch, global_step, history, aggregate = _restore(state_path, model, optimizer, cfg, fingerprint)
    if out is not None and dinfo.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if start_epoch:
            _trim_metrics(out / METRICS, start_epoch)
        else:
            (out / METRICS).write_text("", encoding="utf-8")

    objective: nn.Module = _PromptObjective(model)
    if dinfo.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        objective = DDP(objective, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    dataset = _AugmentedDataset(items, model.train_transform(cfg.min_crop_scale))
    steps_per_epoch = len(plan_epoch(len(items), cfg, 0, dinfo.rank, dinfo.world_size))
    total_steps = steps_per_epoch * cfg.epochs
    show_bar = progress is None and dinfo.is_main and sys.stderr.isatty()

    t_start, images_seen, stopped = time.perf_counter(), 0, False
    features = None
    if cfg.cached_views and start_epoch < cfg.epochs:
        features = cached_image_features(model, items, cfg, progress if dinfo.is_main else None, stop)
        stopped = features is None
    labels_of = torch.tensor([d.label for d in items], dtype=torch.long)
    model.train()
    for epoch in range(start_epoch, cfg.epochs if not stopped else start_epoch):
        lr = lr_at(cfg, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        steps = plan_epoch(len(items), cfg, epoch, dinfo.rank, dinfo.world_size)
        if features is None:
            batches = iter(DataLoader(
                dataset, batch_sampler=[mb for s in steps for mb in s.micro], num_workers=_workers(cfg.num_workers),
                pin_memory=device.type == "cuda", generator=_loader_generator(derive_seed(cfg.seed, epoch, -1)),
            ))
        else:  # one cached view per image, drawn by the image's sample seed of this epoch
            batches = iter([(features[torch.tensor([seed % cfg.cached_views for _, seed in mb]), torch.tensor([i for i, _ in mb])],
                             labels_of[[i for i, _ in mb]]) for s in steps for mb in s.micro])
        bar = None
        if show_bar:
            from tqdm import tqdm

            bar = tqdm(total=len(steps), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, file=sys.stderr)
        epoch_stats = torch.zeros(3, dtype=torch.float64)  # loss·n, correct, n
        t_epoch = time.perf_counter()
        step_rows = []
        for s, step in enumerate(steps):
            if stop is not None and stop.is_set():
                stopped = True
                break
            optimizer.zero_grad(set_to_none=True)
            stats = torch.zeros(3, dtype=torch.float64, device=device)
            for j, weight in enumerate(step.weights):
                images, labels = next(batches)
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                vision = VisionOutput(images, None, 0) if features is not None else None
                last = j == len(step.weights) - 1
                sync = objective.no_sync() if dinfo.enabled and not last else nullcontext()
                with sync:
                    with autocast:
                        result = objective(None if vision is not None else images, labels, names, vision=vision)
                    loss = result["loss"].float()
                    (loss * weight * dinfo.world_size).backward()
                stats[0] += loss.detach().double() * len(labels)
                stats[1] += (result["logits"].detach().argmax(-1) == labels).sum()
                stats[2] += len(labels)
            pdist.all_reduce_sum(stats)
            step_loss = float(stats[0] / stats[2])
            if not math.isfinite(step_loss):
                last_good = str(ckpt_path) if ckpt_path is not None and epoch > 0 and ckpt_path.is_file() else "none (no epoch finished yet)"
                raise NonFiniteLossError(
                    f"loss became {step_loss} at epoch {epoch + 1} step {s + 1}; last good checkpoint: {last_good}. "
                    "Lower the learning rate (--lr) or check the data"
                )
            optimizer.step()
            global_step += 1
            epoch_stats += stats.cpu()
            images_seen += step.global_size
            acc = 100.0 * float(stats[1] / stats[2])
            if bar is not None:
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
                bar.update(1)
            if dinfo.is_main:
                if progress is not None:
                    progress({"type": "step", "epoch": epoch + 1, "epochs": cfg.epochs, "step": global_step, "epoch_step": s + 1,
                              "total_steps": total_steps, "loss": step_loss, "lr": lr, "acc": acc})
                if global_step % cfg.log_every == 0:
                    elapsed = time.perf_counter() - t_epoch
                    step_rows.append({"type": "step", "epoch": epoch + 1, "step": global_step, "loss": step_loss,
                                      "lr": lr, "acc": acc, "images_per_s": (s + 1) * step.global_size / max(elapsed, 1e-9)})
        if bar is not None:
            bar.close()
        if stopped:
            break
        elapsed = time.perf_counter() - t_epoch
        row = {
            "type": "epoch", "epoch": epoch + 1, "step": global_step,
            "loss": float(epoch_stats[0] / epoch_stats[2]), "acc": 100.0 * float(epoch_stats[1] / epoch_stats[2]),
            "lr": lr, "images_per_s": float(epoch_stats[2]) / max(elapsed, 1e-9),
        }
        history.append(row)
        if epoch_weights is not None:
            aggregate = _aggregate(aggregate, model.prompts.state_dict(), epoch_weights[epoch])
            if epoch == cfg.epochs - 1:  # the run ends with the aggregated prompts (saved below)
                model.prompts.load_state_dict(aggregate)
        if progress is None and dinfo.is_main:  # the command line: one line per epoch, on a TTY or in a log
            print(f"epoch {epoch + 1}/{cfg.epochs}: loss {row['loss']:.4f}, train acc {row['acc']:.1f} %, lr {lr:.2e}, "
                  f"{row['images_per_s']:.1f} images/s", file=sys.stderr, flush=True)
        if out is not None and dinfo.is_main:
            _write_jsonl(out / METRICS, step_rows + [row])
            save_train_state(state_path, model, optimizer, epoch + 1, global_step, cfg, fingerprint, history, aggregate)
            save_checkpoint(model, ckpt_path, epoch=str(epoch + 1), train_config=json.dumps(cfg.to_dict()))
        pdist.barrier()
    model.eval()
    wall = time.perf_counter() - t_start
    epochs_run = len(history) - start_epoch
    return TrainResult(
        history=history, epochs_run=epochs_run, start_epoch=start_epoch, wall_time_s=wall,
        images_per_s=images_seen / wall if images_seen else 0.0, stopped=stopped,
        checkpoint=str(ckpt_path) if ckpt_path is not None and ckpt_path.is_file() else None,
    )


def _aggregate(total: dict[str, torch.Tensor] | None, state: dict[str, torch.Tensor],
               weight: float) -> dict[str, torch.Tensor]:
    """total + weight · state, in fp32 (a new dict: the running sum is never aliased to the prompts)."""
    return {k: weight * v.detach().float() + (0 if total is None else total[k]) for k, v in state.items()}


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: PMPOModel,
    items: Sequence[Datum],
    classnames: Sequence[str],
    batch_size: int = 64,
    num_workers: int = 0,
    precision: str = "auto",
    templates: Sequence[str] | None = None,
) -> EvalResult:
    """Top-1 accuracy (percent) with the eval transform; class weights computed once.
    ``templates`` replaces the model's prior templates for this evaluation only (a target
    dataset's own template in cross-dataset transfer).

    Under torchrun each process takes every K-th image and the per-class counts are summed,
    so the result is the same as one process's.
    """
    names = _check_items(items, classnames, "evaluate")
    dinfo = pdist.info()
    device = model.device
    was_training = model.training
    model.eval()
    shard = list(items)[dinfo.rank::dinfo.world_size]
    counts = torch.zeros(2, len(names), dtype=torch.float64, device=device)  # correct, total
    start = time.perf_counter()
    with _autocast(device, precision):
        weights = model.class_weights(names, templates)
    if shard:
        loader = DataLoader(ImageDataset(shard, model.eval_transform()), batch_size=batch_size,
                            num_workers=_workers(num_workers), pin_memory=device.type == "cuda",
                            generator=_loader_generator(0))  # nothing random: only keeps the global generator untouched
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with _autocast(device, precision):
                logits = model.logits_from(model.encode_image(images), weights)
            correct = (logits.argmax(-1) == labels).double()
            counts[0].index_add_(0, labels, correct)
            counts[1].index_add_(0, labels, torch.ones_like(correct))
    pdist.all_reduce_sum(counts)
    elapsed = time.perf_counter() - start
    model.train(was_training)
    correct, total = counts.cpu()
    n = int(total.sum())
    per_class = {names[c]: 100.0 * float(correct[c] / total[c]) for c in range(len(names)) if total[c] > 0}
    return EvalResult(
        accuracy=100.0 * float(correct.sum() / max(n, 1)), per_class=per_class, n=n,
        images_per_s=n / max(elapsed, 1e-9),
    )


__all__ = [
    "EvalResult", "NonFiniteLossError", "TrainConfig", "TrainResult", "cached_image_features", "evaluate", "gpa_weights", "load_train_config",
    "load_train_preset", "lr_at", "plan_epoch", "train", "train_preset_path",
]
