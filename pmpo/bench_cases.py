"""What ``pmpo bench`` times: its configuration, the timing discipline (interleaved rounds,
medians after warm-up) and the cases themselves (a model per method, one training step, the naive
open_clip-style text pass, the attention kernels in use). Used by the benchmark (:mod:`pmpo.bench`)
and by its memory child (:mod:`pmpo.bench_memory`)."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .backbone import Backbone
from .cache import TensorCache
from .config import PMPOConfig, list_methods
from .device import autocast
from .errors import InputError
from .model import PMPOModel, build_model

DTYPES = ("fp32", "bf16")
# Full ImageNet-scale rows (text at C = 1000, memory at C = 1000) on GPU; on CPU a ViT-B/16 run with
# them takes ~15 min, so there the defaults are smaller and the full rows are asked for explicitly.
DEVICE_DEFAULTS: dict[str, dict[str, Any]] = {
    "cuda": {"batch": 32, "text_classes": (100, 1000), "memory_classes": 1000, "naive_max_chunks": None},
    "cpu": {"batch": 4, "text_classes": (100,), "memory_classes": 100, "naive_max_chunks": 1},
}
TRAIN_METHODS = ("pmpo", "coop", "maple")
TARGETS = {"infer": 0.9, "train": 0.35, "text": 3.0}  # issue 7: PMPO vs floor, batched vs naive text

# Class names for timing: real-looking, unique, of mixed token lengths (1-5 words, like
# ImageNet's), so that truncation is measured on realistic sequence lengths, not on "class 17".
_NOUNS = (
    "cat", "dog", "tench", "goldfish", "great white shark", "tiger shark", "hammerhead", "electric ray",
    "stingray", "rooster", "hen", "ostrich", "brambling", "goldfinch", "house finch", "junco",
    "indigo bunting", "american robin", "bulbul", "jay", "magpie", "chickadee", "water ouzel", "kite",
    "bald eagle", "vulture", "great grey owl", "fire salamander", "common newt", "eft",
    "spotted salamander", "axolotl", "bullfrog", "tree frog", "tailed frog", "loggerhead turtle",
    "leatherback turtle", "mud turtle", "terrapin", "box turtle", "banded gecko", "common iguana",
    "american chameleon", "whiptail lizard", "agama", "frilled lizard", "alligator lizard",
    "gila monster", "green lizard", "african chameleon", "komodo dragon", "african crocodile",
    "greater swiss mountain dog", "american staffordshire terrier", "three-toed sloth", "sports car",
)
_ADJECTIVES = (
    "", "small", "large", "red", "striped", "spotted", "wild", "young", "old", "northern",
    "southern", "toy", "dark", "pale", "giant", "dwarf", "long-haired", "short-tailed",
)


def bench_classnames(n: int) -> list[str]:
    """``n`` unique class names (adjective × noun, then a numbered suffix beyond the pool)."""
    if n < 1:
        raise InputError(f"number of classes must be >= 1, got {n}")
    names = []
    for i in range(n):
        adjective, noun = divmod(i, len(_NOUNS))
        name = _NOUNS[noun]
        if adjective % len(_ADJECTIVES):
            name = f"{_ADJECTIVES[adjective % len(_ADJECTIVES)]} {name}"
        if adjective >= len(_ADJECTIVES):
            name = f"{name} {adjective // len(_ADJECTIVES)}"
        names.append(name)
    return names


@dataclass
class BenchConfig:
    """What to measure. Sizes of the towers always come from the backbone."""

    model: str = "ViT-B-16-quickgelu"
    pretrained: str = "none"
    # ``None`` fields get device defaults (see :data:`DEVICE_DEFAULTS`): the full ImageNet-scale
    # rows take minutes on a 2-core CPU, seconds on a GPU.
    batch: int | None = None
    n_prompts: int = 4
    classes: int = 50  # classes in the inference and training rows
    text_classes: tuple[int, ...] | None = None
    naive_chunk: int = 100  # sequences per naive text call (a prompt's C sequences, chunked)
    naive_max_chunks: int | None = -1  # time at most this many naive calls per size and scale; None: all; -1: device default
    device: str = "cpu"
    dtype: str = "fp32"
    repeats: int = 3
    warmup: int = 1
    compile: bool = False
    memory: bool = True
    memory_classes: int | None = None
    memory_batch: int = 4
    memory_repeats: int = 1
    scaling: bool = False
    train_methods: tuple[str, ...] = TRAIN_METHODS
    infer_methods: tuple[str, ...] = ("pmpo",)  # inference rows (PMPO's carries the target)
    memory_infer_methods: tuple[str, ...] = ()  # peak memory of one inference batch, per method
    train_memory: bool = True  # the PMPO training-step memory rows (with and without checkpointing)
    # Methods whose training step is also timed against the sum of its minimal parts, each alone in
    # the same rounds: the prompted image pass with input gradients, and the N·C truncated text
    # sequences forward + backward. step / sum of parts measures what the step wastes beyond them.
    parts_methods: tuple[str, ...] = ("pmpo", "maple")
    seed: int = 0

    def resolved(self, device: torch.device) -> BenchConfig:
        """This config with the device defaults filled in."""
        defaults = DEVICE_DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
        filled = {k: v for k, v in defaults.items() if getattr(self, k) == (-1 if k == "naive_max_chunks" else None)}
        return dataclasses.replace(self, device=str(device), **filled)

    def validate(self) -> None:
        for name in ("batch", "classes", "repeats", "naive_chunk", "memory_classes", "memory_batch"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.n_prompts < 1:
            raise InputError(f"--n-prompts must be >= 1, got {self.n_prompts}")
        if self.warmup < 0:
            raise InputError(f"--warmup must be >= 0, got {self.warmup}")
        if self.dtype not in DTYPES:
            raise InputError(f"--dtype must be one of {DTYPES}, got {self.dtype!r}")
        if any(c < 1 for c in self.text_classes):
            raise InputError(f"--text-classes must be positive, got {list(self.text_classes)}")
        methods = [m for m in list_methods() if m != "zeroshot"]
        for what, chosen in (("training", self.train_methods), ("inference", self.infer_methods),
                             ("memory", self.memory_infer_methods)):
            unknown = [m for m in chosen if m not in methods]
            if unknown:
                raise InputError(f"unknown {what} method(s) {unknown}; choose from {', '.join(methods)}")


# --- timing ---------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(
    cases: dict[str, Callable[[], None]], repeats: int, warmup: int, device: torch.device,
    log: Callable[[str], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Run every case once per round, rounds ``warmup + repeats`` times; median of timed rounds.

    Interleaving spreads load spikes of a shared machine over all cases instead of one.
    """
    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(warmup + repeats):
        for name, fn in cases.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            elapsed = time.perf_counter() - start
            if round_ >= warmup:
                times[name].append(elapsed)
        if log:
            tag = "warm-up" if round_ < warmup else f"repeat {round_ - warmup + 1}/{repeats}"
            log(f"  round {round_ + 1}/{warmup + repeats} ({tag}) done")
    return {name: {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "n": len(ts)}
            for name, ts in times.items()}


# --- the cases ------------------------------------------------------------------------------------

def _make_model(cfg: BenchConfig, method: str, backbone: Backbone, device: torch.device, **overrides: Any) -> PMPOModel:
    fields = dict(method=method, model=backbone.model_name, pretrained=cfg.pretrained)
    if method == "pmpo":
        fields["n_prompts"] = cfg.n_prompts
    fields.update(overrides)
    return build_model(PMPOConfig(**fields), device=device, backbone=backbone)


def compile_model(model: PMPOModel) -> None:
    """``torch.compile`` the two towers' forwards (the prompt learner stays eager: it is tiny)."""
    model.vision.forward = torch.compile(model.vision.forward)
    model.text.forward = torch.compile(model.text.forward, dynamic=True)


def train_step(model: PMPOModel, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
               classnames: Sequence[str], device: torch.device, dtype: str) -> Callable[[], None]:
    """One full optimisation step as a closure: forward (text + image), backward, SGD step. The
    frozen text features are computed here, once, into the step's cache, as a training run keeps
    them (the engine's run-long cache): they are not part of a step."""
    cache = TensorCache()
    with torch.no_grad():
        model.prior_features(classnames, cache=cache)
        if model.cfg.uses_teacher:
            model.teacher_text_features(classnames, cache)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            loss = model.loss(images, labels, classnames, cache=cache)["loss"]
        loss.backward()
        optimizer.step()

    return step


def naive_text_features(model: PMPOModel, classnames: Sequence[str], chunk: int, max_chunks: int | None = None
                        ) -> tuple[torch.Tensor, int, int]:
    """The open_clip/CoOp way: per prompt, C full-length (77-token) sequences through
    ``transformer`` (in chunks of ``chunk``), pooled at EOT. No truncation, no batching over prompts.

    Returns (features of the chunks run [k, chunk', D], chunks run, chunks in the full pass).
    Every chunk has the same shape and cost, so a run limited to ``max_chunks`` times exactly
    the work of a full pass divided by ``total / run``.
    """
    text, prompts = model.text, model.prompts
    tower = text.tower
    n, m = prompts.n_prompts, prompts.n_ctx
    placeholder = " ".join(["X"] * m)
    tokens = text.tokenize([f"{placeholder} {name}." for name in classnames])
    eot = text.eot_positions(tokens)
    embedded = text.embed(tokens)
    starts = [(i, s) for i in range(n) for s in range(0, len(classnames), chunk)]
    run = starts if max_chunks is None else starts[:max_chunks]
    outs = []
    for i, s in run:
        x = embedded[s:s + chunk].clone()
        x[:, 1:1 + m] = prompts.ctx[i].to(x.dtype)
        x = x + tower.positional_embedding.to(x.dtype)
        x = tower.transformer(x, attn_mask=tower.attn_mask)
        x = tower.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot[s:s + chunk]]
        proj = tower.text_projection
        if proj is not None:
            pooled = proj(pooled) if isinstance(proj, torch.nn.Linear) else pooled @ proj
        outs.append(F.normalize(pooled.float(), dim=-1))
    return torch.cat(outs), len(run), len(starts)


def attention_kernels(model: PMPOModel, dtype: str) -> list[str]:
    """Autograd nodes of a prompt-aware vision block when gradients flow to its input.

    That is the training situation (frozen weights, learnable prompt tokens in the input): the
    block's own ``nn.MultiheadAttention`` is called with ``need_weights=False`` and should record
    a fused ``scaled_dot_product_attention`` backward node, not softmax + two batched matmuls.
    """
    device = model.device
    block = model.vision.visual.transformer.resblocks[0]
    x = torch.randn(1, 8, model.vision.width, device=device, requires_grad=True)
    with autocast(device, dtype):
        y = block(x) if model.vision.batch_first else block(x.transpose(0, 1))
    seen, stack, names = set(), [y.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return sorted(n for n in names if "Attention" in n or "Softmax" in n or n.startswith("Bmm"))
