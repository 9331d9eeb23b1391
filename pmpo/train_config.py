"""What one training run is: :class:`TrainConfig` (optimizer, schedule, batch, epochs, precision,
augmentation), the shipped recipes per protocol (``pmpo/configs/train/``), and the schedule's
maths (learning rate per epoch, PromptSRC's Gaussian prompt aggregation weights).

Plain data and arithmetic, no torch: the engine (:mod:`pmpo.engine`) runs a config; the CLI, the
sweeps and the app build one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import CONFIG_DIR
from .errors import InputError
from .io import read_yaml_mapping

TRAIN_CONFIG_DIR = CONFIG_DIR / "train"
OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
# Options that change neither the maths nor the data order; a resumed run may change them.
RESUME_FREE = ("num_workers", "eval_batch_size", "log_every")

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
            (self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}"),
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
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
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


# The options a run may override on the command line (`pmpo train`, `pmpo recipe`, sweeps), with what
# their flag says; the flags are generated from this and the fields' types. The rest (RECIPE_ONLY): the
# seed has its own flag; log_every and the GPA shape belong to the recipe files.
OPTION_HELP: dict[str, str | None] = {
    "epochs": None,
    "batch_size": "global batch: images per optimizer step over all processes",
    "lr": None,
    "optimizer": None,
    "momentum": None,
    "weight_decay": None,
    "scheduler": "after warm-up, stepped per epoch",
    "warmup_epochs": None,
    "warmup_lr": None,
    "grad_accum": "micro-batches per step (same result, less memory)",
    "precision": None,
    "num_workers": "DataLoader workers per process",
    "eval_batch_size": None,
    "min_crop_scale": "smallest area fraction of the train crop (default 0.08, CoOp's protocol)",
    "cached_views": "methods without visual prompts (CoOp, KgCoOp, CoCoOp): encode this many augmented views of "
                    "every image once, then every step is a text pass (default 0: fresh augmentations every step, "
                    "as the authors' code; not their protocol, see docs/RECIPES.md)",
}
RECIPE_ONLY = ("seed", "log_every", "gpa_mean", "gpa_std")
OPTION_CHOICES = {"optimizer": OPTIMIZERS, "scheduler": SCHEDULERS, "precision": PRECISIONS}


def option_type(name: str) -> type:
    """The Python type of TrainConfig option ``name`` (from its default)."""
    return type(getattr(TrainConfig(), name))


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
