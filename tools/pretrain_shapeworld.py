#!/usr/bin/env python
"""Pretrain a small open_clip CLIP on ShapeWorld and ship it in open_clip's ``local-dir:`` format.

    python tools/pretrain_shapeworld.py --out checkpoints/shapeworld-clip

The model is ``open_clip.model.CLIP(**MODEL_CFG)`` (open_clip's own model code, GELU, ViT
image tower, causal text transformer, default SimpleTokenizer).  Training streams freshly
generated "pretrain"-style scenes with captions (``pmpo.data.shapeworld``), symmetric
contrastive loss (``open_clip.loss.ClipLoss``), AdamW, linear warm-up + cosine decay.

Outputs in ``--out``: ``open_clip_config.json``, ``open_clip_model.safetensors`` (fp16
weights; open_clip loads them into an fp32 model), ``eval.json`` (zero-shot accuracies on
fixed generated evaluation sets), ``MODEL_CARD.md``.

``--steps`` fixes the number of steps (cosine over steps); otherwise training runs for
``--minutes`` of wall time with the cosine schedule laid over elapsed time, so a loaded CPU
gives fewer steps, never an overrun.  ``--eval-only`` re-evaluates a saved
folder and rewrites eval.json / MODEL_CARD.md's numbers (keeps the training record).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import threading
import queue
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np
import torch
import torch.nn.functional as F

import open_clip
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from pmpo.data import shapeworld as sw

MODEL_CFG = {
    "embed_dim": 128,
    "quick_gelu": False,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 192, "layers": 4, "head_width": 48,
                   "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3,
                 "mlp_ratio": 4.0},
}
PREPROCESS_CFG = {"mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD),
                  "interpolation": "bicubic", "resize_mode": "shortest", "size": 64}
EVAL_SETS = [  # (name, style, seed, n_per_class)
    ("downstream", "downstream", 1234, 10),
    ("sketch", "sketch", 1234, 10),
    ("pretrain", "pretrain", 1234, 10),
]


# ----------------------------------------------------------------------------- data

class CaptionTokens:
    """open_clip.tokenize with a cache (the caption vocabulary of ShapeWorld is finite)."""

    def __init__(self):
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            for c, t in zip(missing, open_clip.tokenize(missing)):
                self.cache[c] = t
        return torch.stack([self.cache[c] for c in captions])


GROUP = 4  # contrast groups: GROUP single-object scenes that differ only in shape (or only in colour)


def _group(rng: np.random.Generator, vary: str) -> list:
    """GROUP scenes sharing size, fill, position and colour (vary="shape") or shape
    (vary="colour"), so that within a batch the varied attribute is the only cue that tells
    their captions apart: hard negatives that make shape (and colour) learned early."""
    base = sw.sample_objects(rng, 1, "pretrain")[0]
    pool = sw.SHAPES if vary == "shape" else sw.COLOURS
    values = rng.choice(len(pool), size=GROUP, replace=False)
    template = int(rng.integers(len(sw._SINGLE_TEMPLATES)))
    out = []
    for v in values:
        o = sw.ObjectAttrs(**{**base.__dict__, vary: pool[int(v)]})
        image, bg, _ = sw.render_scene([o], "pretrain", rng, return_background=True)
        out.append(sw.Sample(image=image, objects=[o], caption=sw.make_caption([o], rng, template=template),
                             background=bg))
    return out


def make_batch(seed: int, step: int, batch_size: int, p_two: float, mean: torch.Tensor, std: torch.Tensor,
               p_grouped: float = 0.0):
    """A fraction ``p_grouped`` of the batch comes in hard-negative groups (half varying shape,
    half colour), the rest are independent random scenes (two objects with prob. ``p_two``)."""
    rng = np.random.default_rng([seed, step])
    n_groups = int(batch_size * p_grouped) // GROUP
    samples = []
    for g in range(n_groups):
        samples += _group(rng, "shape" if g % 2 == 0 else "colour")
    samples += [sw.sample_scene(rng, "pretrain", p_two=p_two) for _ in range(batch_size - len(samples))]
    x = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float().div_(255)
    x = (x - mean) / std
    return x, [s.caption for s in samples]


class Prefetcher:
    """Renders batches in a background thread (numpy / PIL release the GIL for much of it)."""

    def __init__(self, seed, batch_size, p_two, mean, std, p_grouped=0.0, start_step=0, depth=3):
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.args = (seed, batch_size, p_two, mean, std, p_grouped)
        self.step = start_step
        self.stop = False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        seed, bs, p_two, mean, std, p_grouped = self.args
        while not self.stop:
            self.q.put(make_batch(seed, self.step, bs, p_two, mean, std, p_grouped))
            self.step += 1

    def get(self):
        return self.q.get()


# ----------------------------------------------------------------------------- model

def encode_text_truncated(model, text: torch.Tensor) -> torch.Tensor:
    """Exactly ``model.encode_text`` (causal mask, EOT pooling) on ``text[:, :L]`` with
    ``L = last EOT position + 1`` over the batch: tokens after the EOT never influence it."""
    L = int(text.argmax(dim=-1).max()) + 1
    text = text[:, :L]
    x = model.token_embedding(text) + model.positional_embedding[:L]
    x = model.transformer(x, attn_mask=model.attn_mask[:L, :L])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0]), text.argmax(dim=-1)]
    if isinstance(model.text_projection, torch.nn.Linear):
        return model.text_projection(x)
    return x @ model.text_projection


def build_model() -> torch.nn.Module:
    return open_clip.model.CLIP(**MODEL_CFG)


def param_groups(model, wd):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embedding" in n or "logit_scale" in n else decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step, total, base_lr, warmup):
    if step < warmup:
        return base_lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


# ----------------------------------------------------------------------------- save / eval

def save_folder(model, out: Path):
    from safetensors.torch import save_file
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(out / "open_clip_model.safetensors"))
    (out / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": MODEL_CFG, "preprocess_cfg": PREPROCESS_CFG}, indent=2) + "\n")


def evaluate_folder(out: Path) -> dict:
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    res = {}
    for name, style, seed, n in EVAL_SETS:
        r = sw.evaluate_zero_shot(model, preprocess, tokenizer, style=style, seed=seed, n_per_class=n)
        res[name] = {k: round(v, 2) for k, v in r.items()}
        res[name]["eval_set"] = {"function": "pmpo.data.shapeworld.generate_eval_set", "style": style,
                                 "seed": seed, "n_per_class": n, "template": sw.TEMPLATES[0]}
    return res


def write_card(out: Path, record: dict, res: dict):
    n_params = record["n_params"]
    size_mb = (out / "open_clip_model.safetensors").stat().st_size / 2 ** 20
    d, s, p = res["downstream"], res["sketch"], res["pretrain"]
    tr = record["training"]
    stages = []  # oldest first: each stage's record nests the one it continued from
    t = tr
    while t is not None:
        stages.insert(0, t)
        t = t.get("continued_from")
    lines = [
        "# ShapeWorld-CLIP (tiny, synthetic)",
        "",
        "**A synthetic-domain model, not a substitute for real CLIP weights.** It was pretrained",
        "only on procedurally generated ShapeWorld images (coloured geometric shapes) so that the",
        "project has an offline default backbone and a benchmark where prompt learning can be",
        "shown to learn. It knows nothing about natural images; numbers obtained with it are not",
        "comparable to any number in the PMPO / CoOp / MaPLe papers.",
        "",
        "Load with open_clip (no network needed):",
        "",
        "```python",
        "model, _, preprocess = open_clip.create_model_and_transforms('local-dir:checkpoints/shapeworld-clip')",
        "tokenizer = open_clip.get_tokenizer('local-dir:checkpoints/shapeworld-clip')",
        "```",
        "",
        "## Architecture",
        "",
        f"`open_clip.model.CLIP(**model_cfg)` with the `model_cfg` of `open_clip_config.json`: ViT image tower "
        f"(64 px, patch 8, width {MODEL_CFG['vision_cfg']['width']}, {MODEL_CFG['vision_cfg']['layers']} layers, "
        f"{MODEL_CFG['vision_cfg']['width'] // MODEL_CFG['vision_cfg']['head_width']} heads), causal text transformer "
        f"(context 77, vocab 49408, width {MODEL_CFG['text_cfg']['width']}, {MODEL_CFG['text_cfg']['layers']} layers, "
        f"{MODEL_CFG['text_cfg']['heads']} heads), embed dim {MODEL_CFG['embed_dim']}, GELU (not QuickGELU), "
        f"open_clip's default SimpleTokenizer. {n_params / 1e6:.2f} M parameters; weights stored in fp16 "
        f"({size_mb:.1f} MiB), loaded into fp32 by open_clip. Preprocess: resize shortest side to 64 (bicubic), "
        "center crop, OpenAI CLIP mean/std.",
        "",
        "## Training",
        "",
        f"- Data: a fresh stream of `pmpo.data.shapeworld` scenes in the `pretrain` style (neutral plain / "
        "gradient / noisy backgrounds); 8 shapes x 8 colours x 2 sizes x 4 fills x 5 positions, every colour x "
        "shape combination appears; captions in 15 single-object and 6 two-object phrasings (including "
        "`a photo of a {colour} {shape}.`), always consistent with the rendered attributes. "
        + (f"{int(round(100 * tr.get('p_grouped', 0)))}% of each batch is hard-negative groups of {GROUP} "
           "single-object scenes that share every attribute but the shape (or the colour); the rest are independent scenes, "
           if tr.get("p_grouped", 0) else "Independent scenes, ")
        + f"{int(round(100 * tr['p_two']))}% of them with two objects. Batch b is drawn from "
        f"`np.random.default_rng([{tr['seed']}, b])` (`make_batch` in `tools/pretrain_shapeworld.py`).",
        f"- Objective: symmetric contrastive loss (`open_clip.loss.ClipLoss`), learnable logit scale "
        "(init 1/0.07, clamped at 100).",
        f"- Optimiser: AdamW lr {tr['lr']}, betas (0.9, 0.98), weight decay {tr['wd']} (not on gains, biases, "
        f"embeddings, logit scale), {tr['warmup']} warm-up steps then {tr.get('schedule', 'cosine')} to 0.",
        f"- {tr['steps']} steps x batch {tr['batch_size']} = {tr['steps'] * tr['batch_size']:,} images, "
        f"{tr['train_seconds'] / 60:.1f} min on {tr['machine']} (torch {tr['torch']}, {tr['threads']} threads). "
        f"Final training loss {tr['final_loss']:.3f}.",
    ] + ([
        "- Earlier stages (each started from the previous stage's weights; this run continued from the last): "
        + "; ".join(
            f"stage {i + 1}: {t['steps']} steps x batch {t['batch_size']}, lr {t['lr']}, "
            f"{int(round(100 * t.get('p_grouped', 0)))}% hard-negative groups, seed {t['seed']}, "
            f"{t['train_seconds'] / 60:.1f} min"
            for i, t in enumerate(stages[:-1])
        )
        + f". In total {sum(t['steps'] for t in stages):,} steps, "
        f"{sum(t['train_seconds'] for t in stages) / 60:.1f} min.",
    ] if len(stages) > 1 else []) + [
        "- Text encoding during training truncates token sequences after the last EOT, which is exact",
        "  for a causal, EOT-pooled text transformer; evaluation uses plain `encode_text`.",
        "",
        "## Zero-shot accuracy",
        "",
        "Plain open_clip `encode_image` / `encode_text`, template `a photo of a {}.`, over the 64",
        "colour x shape classes (`pmpo.data.shapeworld.class_names()`). Evaluation set:",
        "`generate_eval_set(seed=1234, n_per_class=10, style=...)` (640 images, one main object per image;",
        "in the downstream style with grey distractors and cluttered backgrounds). Base = labels 0-31, new =",
        "labels 32-63 (each evaluated among its own 32 classes, the CoOp base-to-new protocol); the split is",
        "a checkerboard over colour x shape, so every colour and shape occurs in both halves.",
        "",
        "| eval set | all (64-way) | base | new | HM |",
        "|---|---|---|---|---|",
    ]
    for name, r in (("downstream", d), ("sketch (held-out style)", s), ("pretrain style", p)):
        lines.append(f"| {name} | {r['all']:.2f} | {r['base']:.2f} | {r['new']:.2f} | {r['hm']:.2f} |")
    lines += [
        "",
        "The same numbers are in `eval.json` (a test recomputes them).",
        "",
    ]
    if d["hm"] < 35:
        lines += [
            "**Limitation.** The model is under-trained: within a 32-class half, knowing only the colour",
            "gives 25 %, so these numbers mean it has learned colour well but shape only slightly. The",
            "project's target for the downstream HM (35-75 %) is not met by this CPU-budget run; a longer",
            "run of the same script (more `--steps`, or `--p-grouped 0.5` hard-negative groups) is the fix.",
            "",
        ]
    commands = [
        f"python tools/pretrain_shapeworld.py --out "
        f"{f'/tmp/stage{i + 1}' if i < len(stages) - 1 else 'checkpoints/shapeworld-clip'} "
        f"--steps {t['steps']} --batch-size {t['batch_size']} --lr {t['lr']} --warmup {t['warmup']} "
        f"--p-two {t['p_two']} --p-grouped {t.get('p_grouped', 0.0)} --seed {t['seed']}"
        + (f" --init /tmp/stage{i}" if i > 0 else "")
        for i, t in enumerate(stages)
    ]
    lines += [
        "## Regenerate",
        "",
        "```",
        *commands,
        "```",
        "",
        f"Schedule of the shipped run: {tr.get('schedule', 'cosine over steps')}. Without `--steps` the script",
        "lays the cosine over `--minutes` of wall time instead, so the step count then depends on how busy",
        "the CPU is (this run shared 2 cores with other jobs). The model is not bit-reproducible on CPU.",
        "",
    ]
    (out / "MODEL_CARD.md").write_text("\n".join(lines))


# ----------------------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="checkpoints/shapeworld-clip")
    ap.add_argument("--steps", type=int, default=None, help="fixed number of steps (default: fit --minutes)")
    ap.add_argument("--minutes", type=float, default=11.0, help="training time budget when --steps is not set")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--p-two", type=float, default=0.25)
    ap.add_argument("--p-grouped", type=float, default=0.0,
                    help="fraction of each batch drawn as hard-negative groups (shape- or colour-only differences)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trial", action="store_true", help="time 30 s of steps and exit")
    ap.add_argument("--eval-only", action="store_true")
    ap.add_argument("--init", help="continue training from a saved folder (a second stage); its training "
                                   "record is kept in eval.json as 'continued_from'")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)

    if args.eval_only:
        record = json.loads((out / "eval.json").read_text())
        res = evaluate_folder(out)
        record.update(res)
        (out / "eval.json").write_text(json.dumps(record, indent=2) + "\n")
        write_card(out, record, res)
        print(json.dumps(res, indent=1))
        return

    torch.manual_seed(args.seed)
    previous = None
    if args.init:
        previous = json.loads((Path(args.init) / "eval.json").read_text())["training"]
        model = open_clip.create_model(f"local-dir:{Path(args.init).resolve()}")
    else:
        model = build_model()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params / 1e6:.2f} M", flush=True)
    loss_fn = open_clip.loss.ClipLoss()
    opt = torch.optim.AdamW(param_groups(model, args.wd), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    mean = torch.tensor(PREPROCESS_CFG["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(PREPROCESS_CFG["std"]).view(1, 3, 1, 1)
    tok = CaptionTokens()
    pf = Prefetcher(args.seed, args.batch_size, args.p_two, mean, std, args.p_grouped)

    total = args.steps
    t0 = time.time()
    step, ema = 0, None
    model.train()
    while True:
        if total is not None and step >= total:
            break
        x, caps = pf.get()
        text = tok(caps)
        if args.steps is None:  # schedule over wall time: uses the whole budget whatever the CPU load
            frac = (time.time() - t0) / (args.minutes * 60)
            if frac >= 1.0:
                break
            lr = lr_at(step, args.warmup, args.lr, args.warmup) if step < args.warmup else \
                args.lr * 0.5 * (1 + math.cos(math.pi * frac))
        else:
            lr = lr_at(step, total, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        imf = F.normalize(model.encode_image(x), dim=-1)
        txf = F.normalize(encode_text_truncated(model, text), dim=-1)
        loss = loss_fn(imf, txf, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        el = time.time() - t0
        if step % 10 == 0 or step == 1:
            print(f"step {step}/{total} loss {loss.item():.3f} ema {ema:.3f} lr {lr:.2e} "
                  f"scale {model.logit_scale.exp().item():.1f} {el:.0f}s {step / el:.2f} it/s", flush=True)
        if args.trial and el > 30:
            print(f"TRIAL: {step} steps in {el:.1f}s = {step / el:.3f} steps/s at batch {args.batch_size}")
            pf.stop = True
            return
    train_seconds = time.time() - t0
    pf.stop = True
    print(f"trained {step} steps in {train_seconds:.0f}s", flush=True)

    save_folder(model, out)
    record = {
        "model": f"local-dir:{out}",
        "n_params": n_params,
        "training": {"steps": step, "batch_size": args.batch_size, "lr": args.lr, "wd": args.wd,
                     "warmup": args.warmup, "p_two": args.p_two, "seed": args.seed,
                     "schedule": "cosine over steps" if args.steps else f"cosine over {args.minutes} min wall time",
                     "minutes": args.minutes, "p_grouped": args.p_grouped,
                     "train_seconds": round(train_seconds, 1), "final_loss": round(ema, 4),
                     "threads": args.threads, "torch": torch.__version__,
                     "open_clip": open_clip.__version__,
                     "machine": f"{os.cpu_count()}-core CPU ({platform.machine()})"},
    }
    if previous is not None:
        record["training"]["continued_from"] = previous
    t1 = time.time()
    res = evaluate_folder(out)
    record.update(res)
    record["eval_seconds"] = round(time.time() - t1, 1)
    (out / "eval.json").write_text(json.dumps(record, indent=2) + "\n")
    write_card(out, record, res)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
