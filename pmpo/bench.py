"""Side-by-side speed and memory measurements against the floor set by the frozen CLIP.

Prompt learning freezes the whole CLIP, so the cheapest possible inference is one plain
image-encoder pass per image (open_clip's ``encode_image``: *the floor*), and a training step
cannot cost much less than one forward plus one input-gradient backward through the image
tower plus the text side. This module measures, in one process, on one backbone and one batch:

* the floor, inference of PMPO (and of any other method asked for: CoOp with cached class
  weights, CoCoOp with its per-image ones), and one training step (forward, backward, optimiser
  step) of PMPO, CoOp and MaPLe (or any method asked for), as images/s;
* the text side: an open_clip-style pass (each prompt's C sequences separately, full 77 tokens)
  against our single batched, truncated pass, with the largest feature difference between them;
* the peak memory of one training step at ImageNet scale, in a fresh subprocess (process RSS
  on CPU, ``torch.cuda.max_memory_allocated`` on GPU), with and without text-tower gradient
  checkpointing; optionally the peak memory of one inference batch per method (CoCoOp's per-image
  class weights against CoOp's cached ones);
* optionally how step cost grows with classes, prompts and images (``scaling``).

Timings interleave the cases round by round (a noisy, shared machine slows all cases alike),
exclude warm-up rounds, and report medians. Weights do not change speed, so the default
backbone is random-init ViT-B/16 and no download is ever needed.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from .backbone import Backbone, load_backbone
from .config import PMPOConfig, list_methods, method_title
from .device import resolve_device
from .errors import InputError, PMPOError
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

    def resolved(self, device: torch.device) -> "BenchConfig":
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


def autocast(device: torch.device, dtype: str):
    """bf16 autocast (CUDA, or CPU where it is supported); fp32 runs as is."""
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


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
    """One full optimisation step as a closure: forward (text + image), backward, SGD step."""

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            loss = model.loss(images, labels, classnames)["loss"]
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


# --- memory (subprocess) ----------------------------------------------------------------------------

def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Linux lets a process reset its own peak RSS (VmHWM) by writing 5 to clear_refs."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def memory_step(cfg: BenchConfig, grad_checkpointing: bool, method: str = "pmpo", infer: bool = False
                ) -> dict[str, Any]:
    """Peak memory of one training step of ``method`` (or, with ``infer``, of one inference batch with
    the class weights already cached where the method can cache them), measured in *this* process
    (run it in a fresh one).

    CPU: the rise of the process's peak RSS over its RSS just before the step (model loaded,
    batch built). GPU: ``max_memory_allocated`` over ``memory_allocated`` before the step.
    """
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    backbone = load_backbone(cfg.model, cfg.pretrained, device=device)
    model = _make_model(cfg, method, backbone, device).train(not infer)
    model.text.grad_checkpointing = grad_checkpointing
    names = bench_classnames(cfg.memory_classes)
    size = backbone.image_size
    images = torch.randn(cfg.memory_batch, 3, size, size, device=device)
    labels = torch.arange(cfg.memory_batch, device=device) % len(names)
    optimizer = torch.optim.SGD(model.learnable_parameters(), lr=1e-3, momentum=0.9)
    with torch.no_grad():
        model.prior_features(names)  # frozen and cached in real training too: not part of a step
        if infer:
            model.class_weights(names)  # evaluation computes them once per class list

    def infer_step() -> None:
        with torch.no_grad(), autocast(device, cfg.dtype):
            model(images, names)

    step = infer_step if infer else train_step(model, optimizer, images, labels, names, device, cfg.dtype)
    gc.collect()
    result: dict[str, Any] = {"classes": cfg.memory_classes, "batch": cfg.memory_batch, "n_prompts": cfg.n_prompts,
                              "grad_checkpointing": grad_checkpointing, "device": str(device), "method": method,
                              "kind": "infer" if infer else "train"}
    peaks, seconds = [], []
    for _ in range(cfg.memory_repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        else:
            base = (_proc_status_kib("VmRSS") or 0) * 1024
            if not _reset_peak_rss():
                import resource

                base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        start = time.perf_counter()
        step()
        _sync(device)
        seconds.append(time.perf_counter() - start)
        if device.type == "cuda":
            peaks.append(torch.cuda.max_memory_allocated(device) - base)
            result["measure"] = "torch.cuda.max_memory_allocated increase"
        else:
            hwm = _proc_status_kib("VmHWM")
            if hwm is None:
                import resource

                hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peaks.append(hwm * 1024 - base)
            result["measure"] = "peak RSS increase (VmHWM after clear_refs)"
    result["peak_bytes"] = max(peaks)
    result["step_s"] = statistics.median(seconds)
    return result


def _memory_budget_bytes() -> int | None:
    """80% of MemAvailable: the child may not push a shared machine into the OOM killer."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 * 8 // 10
    except OSError:
        return None
    return None


def measure_memory(cfg: BenchConfig, grad_checkpointing: bool, timeout: float | None = None, method: str = "pmpo",
                   infer: bool = False) -> dict[str, Any]:
    """Run :func:`memory_step` in a fresh interpreter, so earlier work does not pollute its peak."""
    payload = json.dumps({"cfg": _cfg_dict(cfg), "grad_checkpointing": grad_checkpointing, "method": method,
                          "infer": infer})
    env = dict(os.environ)
    budget = _memory_budget_bytes() if cfg.device == "cpu" or not cfg.device.startswith("cuda") else None
    if budget:
        env["PMPO_BENCH_MEMORY_LIMIT"] = str(budget)
    proc = subprocess.run([sys.executable, "-m", "pmpo.bench", "--memory-child", payload], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=os.path.dirname(os.path.dirname(__file__)))
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {"classes": cfg.memory_classes, "batch": cfg.memory_batch, "n_prompts": cfg.n_prompts,
            "grad_checkpointing": grad_checkpointing, "error": tail, "limit_bytes": budget, "method": method,
            "kind": "infer" if infer else "train"}


def _child_main(payload: str) -> int:
    data = json.loads(payload)
    cfg = BenchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data["cfg"].items()})
    torch.set_num_threads(torch.get_num_threads())
    limit = os.environ.get("PMPO_BENCH_MEMORY_LIMIT")
    if limit and cfg.device == "cpu":
        import resource

        # Cap the address space at what is mapped now plus the budget: an over-large step then
        # fails with an allocation error in this child instead of starving the machine.
        now = (_proc_status_kib("VmSize") or 0) * 1024
        cap = now + int(limit) + (4 << 30)  # + slack for code and thread arenas mapped later
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    try:
        print(json.dumps(memory_step(cfg, data["grad_checkpointing"], data.get("method", "pmpo"),
                                     data.get("infer", False))))
    except (MemoryError, RuntimeError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"out of memory within the budget: {message}", file=sys.stderr)
        return 3
    return 0


def _cfg_dict(cfg: BenchConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# --- the benchmark --------------------------------------------------------------------------------

@dataclass
class BenchResult:
    config: dict[str, Any]
    machine: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)  # images/s rows (floor, inference, training)
    text: list[dict[str, Any]] = field(default_factory=list)  # naive vs batched per class count
    memory: list[dict[str, Any]] = field(default_factory=list)
    scaling: list[dict[str, Any]] = field(default_factory=list)
    checks: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
    }
    try:
        import open_clip

        info["open_clip"] = open_clip.__version__
    except (ImportError, AttributeError):
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if hasattr(os, "getloadavg"):
        info["load_avg_start"] = [round(v, 2) for v in os.getloadavg()]
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _image_rows(cfg: BenchConfig, backbone: Backbone, device: torch.device, log: Callable[[str], None]
                ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Floor, PMPO inference and the training steps, interleaved on one batch."""
    torch.manual_seed(cfg.seed)
    size = backbone.image_size
    images = torch.randn(cfg.batch, 3, size, size, device=device)
    names = bench_classnames(cfg.classes)
    labels = torch.arange(cfg.batch, device=device) % len(names)
    clip = backbone.clip

    encode = torch.compile(clip.encode_image) if cfg.compile else clip.encode_image
    infer_model = _make_model(cfg, "pmpo", backbone, device).eval()
    if cfg.compile:
        compile_model(infer_model)

    def floor() -> None:
        with torch.no_grad(), autocast(device, cfg.dtype):
            encode(images)

    def infer() -> None:
        with torch.no_grad(), autocast(device, cfg.dtype):
            infer_model(images, names)

    cases: dict[str, Callable[[], None]] = {"floor": floor, "infer:pmpo": infer}
    for method in cfg.infer_methods:
        if method != "pmpo":
            cases[f"infer:{method}"] = _infer_case(_make_model(cfg, method, backbone, device).eval(), images, names,
                                                   device, cfg.dtype)
    if "pmpo" not in cfg.infer_methods:
        del cases["infer:pmpo"]
    models = {}
    for method in cfg.train_methods:
        model = _make_model(cfg, method, backbone, device).train()
        if cfg.compile:
            compile_model(model)
        with torch.no_grad():
            model.prior_features(names)
        optimizer = torch.optim.SGD(model.learnable_parameters(), lr=1e-3, momentum=0.9)
        cases[f"train:{method}"] = train_step(model, optimizer, images, labels, names, device, cfg.dtype)
        models[method] = model
        if method in cfg.parts_methods and model.cfg.uses_text_prompts:
            cases[f"part_image:{method}"], cases[f"part_text:{method}"] = minimal_parts(model, images, names, device,
                                                                                        cfg.dtype)
    log(f"image side: {len(cases)} cases × ({cfg.warmup} warm-up + {cfg.repeats}) rounds, batch {cfg.batch}, "
        f"{cfg.classes} classes")
    timed = interleaved_medians(cases, cfg.repeats, cfg.warmup, device, log)

    # Exactness check next to the speed: PMPO's cached path must give the same logits as a fresh one.
    with torch.no_grad(), autocast(device, cfg.dtype):
        cached = infer_model(images, names).float()
        infer_model.clear_cache()
        fresh = infer_model(images, names).float()
    checks = {"cached_vs_fresh_max_abs_diff": float((cached - fresh).abs().max())}

    labels_of = {"floor": "open_clip encode_image (floor)"}
    for method in cfg.infer_methods:
        how = "per-image class weights" if PMPOConfig(method=method).uses_meta_net else "cached class weights"
        labels_of[f"infer:{method}"] = f"{method_title(method)} inference, {how}"
    for method in cfg.train_methods:
        labels_of[f"train:{method}"] = f"{method_title(method)} training step (fwd+bwd+SGD)"
        labels_of[f"part_image:{method}"] = f"{method_title(method)} part: prompted image pass, fwd + input-grad bwd"
        labels_of[f"part_text:{method}"] = f"{method_title(method)} part: N·C truncated text sequences, fwd + bwd"
    floor_s = timed["floor"]["median_s"]
    for method in cfg.train_methods:
        if f"part_text:{method}" in timed:
            parts_s = timed[f"part_image:{method}"]["median_s"] + timed[f"part_text:{method}"]["median_s"]
            checks[f"parts:{method}"] = {"parts_ms": 1000 * parts_s,
                                         "step_ms": 1000 * timed[f"train:{method}"]["median_s"],
                                         "parts_vs_step": parts_s / timed[f"train:{method}"]["median_s"]}
    rows = []
    for name, t in timed.items():
        kind, _, method = name.partition(":")
        row = {
            "case": name, "label": labels_of[name], "images_per_s": cfg.batch / t["median_s"],
            "ms_per_batch": 1000 * t["median_s"], "vs_floor": floor_s / t["median_s"], **t,
        }
        if kind == "train":
            row["learnable"] = models[method].num_learnable()
        target = TARGETS.get(kind) if name in ("infer:pmpo", "train:pmpo") else None
        if target is not None:
            row["target"] = target
            row["meets_target"] = row["vs_floor"] >= target
        rows.append(row)
    return rows, checks


def minimal_parts(model: PMPOModel, images: torch.Tensor, names: Sequence[str], device: torch.device, dtype: str
                  ) -> tuple[Callable[[], None], Callable[[], None]]:
    """The two things a prompt-learning step cannot avoid, as closures timed alone: (1) the prompted
    image pass with gradients flowing back to the prompt tokens, (2) the N·C prompted text sequences
    (truncated after the EOT) forward and backward. Their sum is a floor for the step built from the
    method's own work, so step time / sum says how much the step wastes beyond it (logits, loss,
    optimiser, glue)."""

    def image() -> None:
        model.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            out = model.encode_image(images)
            feats = torch.stack([o.features for o in out]) if isinstance(out, list) else out.features
        feats.float().sum().backward()

    def text() -> None:
        model.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            feats = model.prompt_features(names)
        feats.float().sum().backward()

    return image, text


def _infer_case(model: PMPOModel, images: torch.Tensor, names: list[str], device: torch.device, dtype: str
                ) -> Callable[[], None]:
    def infer() -> None:
        with torch.no_grad(), autocast(device, dtype):
            model(images, names)

    return infer


def _text_rows(cfg: BenchConfig, backbone: Backbone, device: torch.device, log: Callable[[str], None]
               ) -> list[dict[str, Any]]:
    """Naive full-length per-prompt text pass vs our batched truncated pass, forward, no grad."""
    model = _make_model(cfg, "pmpo", backbone, device).eval()
    if cfg.compile:
        compile_model(model)
    rows = []
    for c in cfg.text_classes:
        names = bench_classnames(c)
        info: dict[str, Any] = {}

        def naive() -> None:
            with torch.no_grad(), autocast(device, cfg.dtype):
                feats, ran, total = naive_text_features(model, names, cfg.naive_chunk, cfg.naive_max_chunks)
            info.update(ran=ran, total=total, feats=feats)

        def batched() -> None:
            with torch.no_grad(), autocast(device, cfg.dtype):
                info["batched"] = model.prompt_features(names)

        log(f"text side: C = {c}, N = {cfg.n_prompts}")
        timed = interleaved_medians({"naive": naive, "batched": batched}, cfg.repeats, cfg.warmup, device, log)
        # The naive chunks run are prompt-major, chunk-major: compare them to the batched features.
        ran_feats = info["feats"]
        reference = info["batched"].reshape(-1, info["batched"].shape[-1])[: ran_feats.shape[0]].float()
        tokens = model.text.tokenize([f"{' '.join(['X'] * model.prompts.n_ctx)} {n}." for n in names])
        scale = info["total"] / info["ran"]
        naive_s = timed["naive"]["median_s"] * scale
        batched_s = timed["batched"]["median_s"]
        rows.append({
            "classes": c, "n_prompts": cfg.n_prompts, "sequences": c * cfg.n_prompts,
            "naive_tokens": model.text.context_length,
            "batched_tokens": int(model.text.eot_positions(tokens).max()) + 1,
            "naive_s": naive_s, "batched_s": batched_s, "speedup": naive_s / batched_s,
            "naive_chunks_timed": info["ran"], "naive_chunks_total": info["total"],
            "max_abs_diff": float((ran_feats - reference).abs().max()),
            "target": TARGETS["text"], "meets_target": naive_s / batched_s >= TARGETS["text"],
            "naive": timed["naive"], "batched": timed["batched"],
        })
    return rows


def _scaling_rows(cfg: BenchConfig, backbone: Backbone, device: torch.device, log: Callable[[str], None]
                  ) -> list[dict[str, Any]]:
    """PMPO step costs at three sizes of classes, prompts and images (others at the defaults)."""
    sweeps = {
        "classes": sorted({max(1, cfg.classes // 10), cfg.classes, cfg.classes * 10}),
        "prompts": sorted({1, cfg.n_prompts, cfg.n_prompts * 2}),
        "images": sorted({max(1, cfg.batch // 2), cfg.batch, cfg.batch * 2}),
    }
    rows = []
    for axis, values in sweeps.items():
        for value in values:
            c = value if axis == "classes" else cfg.classes
            n = value if axis == "prompts" else cfg.n_prompts
            b = value if axis == "images" else cfg.batch
            sub = dataclasses.replace(cfg, n_prompts=n)
            size = backbone.image_size
            images = torch.randn(b, 3, size, size, device=device)
            names = bench_classnames(c)
            labels = torch.arange(b, device=device) % c
            model = _make_model(sub, "pmpo", backbone, device)
            with torch.no_grad():
                model.prior_features(names)
            optimizer = torch.optim.SGD(model.learnable_parameters(), lr=1e-3, momentum=0.9)
            step = train_step(model.train(), optimizer, images, labels, names, device, cfg.dtype)

            def weights() -> None:
                with torch.no_grad(), autocast(device, cfg.dtype):
                    model.prompt_features(names)

            def infer() -> None:
                with torch.no_grad(), autocast(device, cfg.dtype):
                    model.logits_from(model.encode_image(images), cached)

            with torch.no_grad():
                cached = model.class_weights(names)
            log(f"scaling: {axis} = {value} (C={c}, N={n}, B={b})")
            timed = interleaved_medians({"train": step, "text": weights, "infer": infer},
                                        cfg.repeats, cfg.warmup, device, log)
            rows.append({"axis": axis, "value": value, "classes": c, "n_prompts": n, "batch": b,
                         "train_step_s": timed["train"]["median_s"], "class_weights_s": timed["text"]["median_s"],
                         "infer_batch_s": timed["infer"]["median_s"],
                         "train_images_per_s": b / timed["train"]["median_s"]})
    return rows


def run_bench(cfg: BenchConfig, log: Callable[[str], None] | None = None) -> BenchResult:
    """Everything in one process and one backbone; memory in fresh subprocesses."""
    log = log or (lambda _msg: None)
    device = resolve_device(cfg.device)
    cfg = cfg.resolved(device)
    cfg.validate()
    started = time.perf_counter()
    result = BenchResult(config=_cfg_dict(cfg), machine=machine_info(device))
    backbone = load_backbone(cfg.model, cfg.pretrained, device=device)
    result.config["backbone"] = backbone.description
    result.config["text_width"] = backbone.clip.token_embedding.weight.shape[1] if hasattr(backbone.clip, "token_embedding") else None
    result.config["vision_width"] = backbone.clip.visual.class_embedding.shape[0]
    result.config["image_size"] = backbone.image_size

    result.rows, checks = _image_rows(cfg, backbone, device, log)
    result.checks.update(checks)
    probe = _make_model(cfg, "pmpo", backbone, device).train()
    result.checks["training_attention_ops"] = attention_kernels(probe, cfg.dtype)
    result.checks["training_attention_fused"] = any("ScaledDotProduct" in n for n in result.checks["training_attention_ops"])
    del probe
    if cfg.text_classes:
        result.text = _text_rows(cfg, backbone, device, log)
    if cfg.scaling:
        result.scaling = _scaling_rows(cfg, backbone, device, log)
    if cfg.memory:
        for ckpt in ((False, True) if cfg.train_memory else ()):
            log(f"memory: one PMPO step, C = {cfg.memory_classes}, N = {cfg.n_prompts}, batch {cfg.memory_batch}, "
                f"text grad checkpointing {'on' if ckpt else 'off'} (subprocess)")
            result.memory.append(measure_memory(cfg, ckpt))
        for method in cfg.memory_infer_methods:
            log(f"memory: one {method_title(method)} inference batch, C = {cfg.memory_classes}, batch {cfg.memory_batch} "
                "(subprocess)")
            result.memory.append(measure_memory(cfg, False, method=method, infer=True))
    if hasattr(os, "getloadavg"):
        result.machine["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    result.wall_s = time.perf_counter() - started
    return result


# --- reporting ------------------------------------------------------------------------------------

def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 / 10 else f"{n / 2**20:.0f} MiB"


def _mark(row: dict[str, Any]) -> str:
    if "meets_target" not in row:
        return ""
    return f"≥{row['target']:g}× {'yes' if row['meets_target'] else 'MISSED'}"


def format_markdown(result: BenchResult | dict[str, Any]) -> str:
    """The report as Markdown tables (what ``pmpo bench`` prints and ``--markdown`` writes)."""
    r = result.to_dict() if isinstance(result, BenchResult) else result
    c, m = r["config"], r["machine"]
    where = m.get("gpu") or f"{m['cpu']} ({m['threads']} threads)"
    lines = [
        f"**{c.get('backbone', c['model'])}** on {c['device']} / {where}, {c['dtype']}"
        f"{', torch.compile' if c['compile'] else ''}; batch {c['batch']}, {c['classes']} classes, "
        f"N = {c['n_prompts']}; median of {c['repeats']} interleaved repeats after {c['warmup']} warm-up; "
        f"torch {m['torch']}, load avg {m.get('load_avg_start', '?')} → {m.get('load_avg_end', '?')}",
        "",
        "| case | images/s | ms / batch | × floor | target |",
        "|---|---:|---:|---:|---|",
    ]
    for row in r["rows"]:
        lines.append(f"| {row['label']} | {row['images_per_s']:.2f} | {row['ms_per_batch']:.0f} | "
                     f"{row['vs_floor']:.2f} | {_mark(row)} |")
    parts = {k.split(":", 1)[1]: v for k, v in r["checks"].items() if k.startswith("parts:")}
    if parts:
        lines += ["", "| training step vs its minimal parts | parts: image + text (ms) | step (ms) | parts / step |",
                  "|---|---:|---:|---:|"]
        for method, p in parts.items():
            lines.append(f"| {method_title(method)} | {p['parts_ms']:.0f} | {p['step_ms']:.0f} | {p['parts_vs_step']:.2f} |")
        lines += ["", "Parts / step near 1: the step does little beyond the prompted image pass with input gradients "
                      "and the N·C text sequences forward + backward, each timed alone in the same rounds."]
    if r["text"]:
        lines += ["", "| text side (forward, no grad) | sequences | naive: s (tokens) | batched: s (tokens) "
                      "| speed-up | max abs diff | target |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for t in r["text"]:
            timed = "" if t["naive_chunks_timed"] == t["naive_chunks_total"] else \
                f" ¹"
            lines.append(f"| N = {t['n_prompts']} × C = {t['classes']} | {t['sequences']} | "
                         f"{t['naive_s']:.2f}{timed} ({t['naive_tokens']}) | {t['batched_s']:.2f} ({t['batched_tokens']}) | "
                         f"{t['speedup']:.1f}× | {t['max_abs_diff']:.1e} | {_mark(t)} |")
        partial = [t for t in r["text"] if t["naive_chunks_timed"] != t["naive_chunks_total"]]
        if partial:
            lines += ["", "¹ naive pass timed on " + ", ".join(
                f"{t['naive_chunks_timed']} of its {t['naive_chunks_total']} identical {c['naive_chunk']}-sequence calls"
                f" (C = {t['classes']})" for t in partial) + " and scaled to the full pass (use --naive-max-chunks 0 to time all)."]
    train_mem = [mem for mem in r["memory"] if mem.get("kind", "train") == "train"]
    infer_mem = [mem for mem in r["memory"] if mem.get("kind") == "infer"]
    if train_mem:
        lines += ["", "| one PMPO training step | classes | batch | N | peak memory | step s |", "|---|---:|---:|---:|---:|---:|"]
        for mem in train_mem:
            what = "text grad checkpointing" if mem["grad_checkpointing"] else "plain"
            peak = _gib(mem["peak_bytes"]) if "peak_bytes" in mem else f"failed: {mem['error']}"
            step = f"{mem['step_s']:.1f}" if "step_s" in mem else "—"
            lines.append(f"| {what} | {mem['classes']} | {mem['batch']} | {mem['n_prompts']} | {peak} | {step} |")
    if infer_mem:
        lines += ["", "| one inference batch | classes | batch | peak memory | per image | s / batch |",
                  "|---|---:|---:|---:|---:|---:|"]
        for mem in infer_mem:
            ok = "peak_bytes" in mem
            peak = _gib(mem["peak_bytes"]) if ok else f"failed: {mem['error']}"
            each = _gib(mem["peak_bytes"] / mem["batch"]) if ok else "—"
            step = f"{mem['step_s']:.2f}" if "step_s" in mem else "—"
            lines.append(f"| {method_title(mem['method'])} | {mem['classes']} | {mem['batch']} | {peak} | {each} | {step} |")
    if r["memory"]:
        measure = next((mem["measure"] for mem in r["memory"] if "measure" in mem), None)
        if measure:
            lines += ["", f"Memory: {measure}, measured in a fresh subprocess per row."]
    if r["scaling"]:
        lines += ["", "| scaling (PMPO) | C | N | B | train step s | train images/s | class weights s (no grad) "
                      "| inference s / batch |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for s in r["scaling"]:
            lines.append(f"| {s['axis']} | {s['classes']} | {s['n_prompts']} | {s['batch']} | {s['train_step_s']:.2f} | "
                         f"{s['train_images_per_s']:.2f} | {s['class_weights_s']:.3f} | {s['infer_batch_s']:.3f} |")
    ch = r["checks"]
    if ch:
        lines += [""]
        if "training_attention_ops" in ch:
            lines.append(f"Attention ops of a prompt-aware block with gradients flowing: "
                         f"{', '.join(ch['training_attention_ops']) or 'none'} "
                         f"({'fused SDPA' if ch['training_attention_fused'] else 'NOT fused'}).")
        if "cached_vs_fresh_max_abs_diff" in ch:
            lines.append(f"Cached vs freshly computed class weights: max logit difference "
                         f"{ch['cached_vs_fresh_max_abs_diff']:.1e}.")
    lines.append(f"Wall time of this run: {r['wall_s']:.0f} s.")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-child":
        try:
            sys.exit(_child_main(sys.argv[2]))
        except PMPOError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)
    print("usage: pmpo bench (this module's own entry point is internal)", file=sys.stderr)
    sys.exit(2)
