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

import hashlib
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import distributed as pdist
from .cache import TensorCache
from .checkpoint import save_checkpoint
from .data.datasets import Datum
from .data.loader import ImageDataset, load_image
from .device import autocast
from .encoders import VisionOutput
from .errors import InputError, PMPOError
from .model import PMPOModel, clean_classnames

# The run's configuration (re-exported: part of the engine's API) and its state on disk.
from .train_config import (
    OPTIMIZERS,
    PRECISIONS,
    SCHEDULERS,
    TrainConfig,
    gpa_weights,
    load_train_config,
    load_train_preset,
    lr_at,
    train_preset_path,
)
from .train_state import data_fingerprint, restore_train_state, save_train_state

LAST_CHECKPOINT = "last.safetensors"
TRAIN_STATE = "train_state.safetensors"
METRICS = "metrics.jsonl"


class NonFiniteLossError(PMPOError):
    """The training loss became NaN/inf; the last good checkpoint is left as it was."""


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
# Training
# --------------------------------------------------------------------------------------------


class _PromptObjective(nn.Module):
    """What DDP wraps: registers only the prompt learner, so DDP syncs (and broadcasts once) the
    learnable tensors alone. The loss is the model's bound method, a plain attribute: the frozen
    CLIP behind it is never broadcast and never in gradient buckets."""

    def __init__(self, model: PMPOModel, cache: TensorCache):
        super().__init__()
        self.prompts = model.prompts
        self.loss = model.loss
        self.cache = cache

    def forward(self, images: torch.Tensor | None, labels: torch.Tensor, classnames: Sequence[str],
                views: list[VisionOutput] | None = None) -> dict[str, torch.Tensor]:
        return self.loss(images, labels, classnames, views=views, cache=self.cache)


def _build_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _autocast(device: torch.device, precision: str):
    if precision == "bf16" and device.type != "cuda":
        raise InputError("precision bf16 needs a CUDA device; use fp32 or auto on CPU")
    use = device.type == "cuda" and (precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()))
    return autocast(device, "bf16" if use else "fp32")


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
                out.append(model.encode_image(images.to(model.device, non_blocking=True))[0].features.float())
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
        start_epoch, global_step, history, aggregate = restore_train_state(state_path, model, optimizer, cfg, fingerprint)
    if out is not None and dinfo.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if start_epoch:
            _trim_metrics(out / METRICS, start_epoch)
        else:
            (out / METRICS).write_text("", encoding="utf-8")

    # The frozen text features (prior, PromptSRC's teacher) of the run's class list: computed once.
    objective: nn.Module = _PromptObjective(model, TensorCache())
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
                views = [VisionOutput(images, None, 0)] if features is not None else None
                last = j == len(step.weights) - 1
                sync = objective.no_sync() if dinfo.enabled and not last else nullcontext()
                with sync:
                    with autocast:
                        result = objective(None if views is not None else images, labels, names, views=views)
                    loss = result["loss"].float()
                    (loss * weight * dinfo.world_size).backward()
                stats[0] += loss.detach().double() * len(labels)
                stats[1] += (result["logits"].detach().argmax(-1) == labels).sum()
                stats[2] += len(labels)
            pdist.all_reduce_sum(stats)
            step_loss = float(stats[0] / stats[2])
            if not math.isfinite(step_loss):
                finished = ckpt_path is not None and epoch > 0 and ckpt_path.is_file()
                last_good = str(ckpt_path) if finished else "none (no epoch finished yet)"
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
    "OPTIMIZERS", "PRECISIONS", "SCHEDULERS", "EvalResult", "NonFiniteLossError", "TrainConfig", "TrainResult",
    "cached_image_features", "evaluate", "gpa_weights", "load_train_config", "load_train_preset", "lr_at", "plan_epoch",
    "train", "train_preset_path",
]
