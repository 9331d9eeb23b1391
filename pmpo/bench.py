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
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .backbone import Backbone, load_backbone

# The configuration and cases (re-exported: the benchmark's API) and the memory child.
from .bench_cases import (
    DEVICE_DEFAULTS,
    DTYPES,
    TARGETS,
    TRAIN_METHODS,
    BenchConfig,
    _make_model,
    attention_kernels,
    autocast,
    bench_classnames,
    compile_model,
    interleaved_medians,
    naive_text_features,
    train_step,
)
from .bench_memory import measure_memory
from .config import PMPOConfig, method_title
from .device import resolve_device
from .model import PMPOModel

__all__ = ["DEVICE_DEFAULTS", "DTYPES", "TARGETS", "TRAIN_METHODS", "BenchConfig", "BenchResult", "bench_classnames",
           "format_markdown", "machine_info", "minimal_parts", "naive_text_features", "run_bench"]


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

    cases: dict[str, Callable[[], None]] = {"floor": floor}
    for method in cfg.infer_methods:
        model = infer_model if method == "pmpo" else _make_model(cfg, method, backbone, device).eval()
        cases[f"infer:{method}"] = _infer_case(model, images, names, device, cfg.dtype)
    models = {}
    for method in cfg.train_methods:
        model = _make_model(cfg, method, backbone, device).train()
        if cfg.compile:
            compile_model(model)
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
        cached = infer_model.logits_from(infer_model.encode_image(images), infer_model.class_weights(names)).float()
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
            feats = torch.stack([o.features for o in model.encode_image(images)])
        feats.float().sum().backward()

    def text() -> None:
        model.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            feats = model.prompt_features(names)
        feats.float().sum().backward()

    return image, text


def _infer_case(model: PMPOModel, images: torch.Tensor, names: list[str], device: torch.device, dtype: str
                ) -> Callable[[], None]:
    """Inference as a server runs it: class weights computed once per class list (a meta-net's
    per-image text pass still runs in every call), then the image pass and the logits."""
    with torch.no_grad(), autocast(device, dtype):
        weights = model.class_weights(names)

    def infer() -> None:
        with torch.no_grad(), autocast(device, dtype):
            model.logits_from(model.encode_image(images), weights)

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
    result = BenchResult(config=dataclasses.asdict(cfg), machine=machine_info(device))
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
                " ¹"
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
