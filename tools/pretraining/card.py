"""The model card and the training record it is written from.

Every stage records what it did in eval.json's ``training`` (``training_record``; a continued stage
nests the record it started from), and ``write_card`` turns that chain into MODEL_CARD.md, with the
commands that regenerate the shipped weights (``data_args`` names every option that differs from the
defaults). Kept apart from the training loop because ``--card-only`` and ``--eval-only`` rewrite a
card from a saved record without training anything.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import open_clip
import torch

from pmpo.data import shapeworld as sw

from .batches import GROUP
from .captions import CONFUSED_PAIRS
from .model import MODEL_CFG as DEFAULT_MODEL_CFG

DEFAULT_SHIFT = dict(sw.DOWNSTREAM_SHIFT)  # before any --shift: the card's commands name only the differences


def training_record(args: argparse.Namespace, step: int, train_seconds: float, ema: float, model_cfg: dict,
                    device: torch.device, curve: list[dict]) -> dict:
    """What a stage did, as eval.json's ``training`` (the model card and the next stage read it)."""
    return {"steps": step, "batch_size": args.batch_size, "lr": args.lr, "wd": args.wd,
            "warmup": args.warmup, "p_two": args.p_two, "seed": args.seed,
            "schedule": "cosine over steps" if args.steps else f"cosine over {args.minutes} min wall time",
            "minutes": args.minutes, "p_grouped": args.p_grouped,
            "aux_weight": args.aux_weight, "clip_grad": args.clip_grad, "model_cfg": model_cfg,
            "grown": bool(args.init and args.grow), "n_uncaptioned": args.n_uncaptioned,
            "separate_heads": args.separate_heads, "uncaptioned_weight": args.uncaptioned_weight, "shift": dict(sw.DOWNSTREAM_SHIFT),
            "p_shape_word": args.p_shape_word, "n_text_only": args.n_text_only,
            "p_confuse": args.p_confuse, "ds_caption_prefix": args.ds_caption_prefix,
            "p_describe_bg": args.p_describe_bg, "p_marker": args.p_marker, "n_confused_pairs": args.n_confused_pairs,
            "text_aux_weight": args.text_aux_weight, "residual_scale": args.residual_scale if not args.init else None,
            "device": str(device) + (f" ({torch.cuda.get_device_name(device)}, bf16 autocast)"
            if device.type == "cuda" else ""),
            "probe_curve": curve,
            "train_seconds": round(train_seconds, 1), "final_loss": round(ema, 4),
            "threads": args.threads, "torch": torch.__version__,
            "open_clip": open_clip.__version__,
            "machine": f"{os.cpu_count()}-core CPU ({platform.machine()})"}


def data_args(stage: dict) -> str:
    """The command-line options of a stage's data and loss that differ from the script's defaults,
    so that the model card's commands regenerate exactly what was trained."""
    out = ""
    if stage.get("n_uncaptioned"):
        out += f" --n-uncaptioned {stage['n_uncaptioned']}"
        if stage.get("separate_heads"):
            out += " --separate-heads"
        if stage.get("uncaptioned_weight", 1.0) != 1.0:
            out += f" --uncaptioned-weight {stage['uncaptioned_weight']:g}"
    if stage.get("p_shape_word", 1.0) != 1.0:
        out += f" --p-shape-word {stage['p_shape_word']:g}"
    if stage.get("p_confuse"):
        out += f" --p-confuse {stage['p_confuse']:g}"
    if stage.get("p_describe_bg"):
        out += f" --p-describe-bg {stage['p_describe_bg']:g}"
    if stage.get("n_confused_pairs", len(CONFUSED_PAIRS)) != len(CONFUSED_PAIRS):
        out += f" --n-confused-pairs {stage['n_confused_pairs']}"
    if stage.get("p_marker"):
        out += f" --p-marker {stage['p_marker']:g}"
    if stage.get("ds_caption_prefix"):
        out += f" --ds-caption-prefix '{stage['ds_caption_prefix']}'"
    if stage.get("n_text_only"):
        out += f" --n-text-only {stage['n_text_only']} --text-aux-weight {stage['text_aux_weight']:g}"
    for key, value in sorted((stage.get("shift") or {}).items()):
        if DEFAULT_SHIFT.get(key) != value:
            out += f" --shift {key}={value:g}"
    return out


def write_card(out: Path, record: dict, res: dict) -> None:
    """MODEL_CARD.md of the folder ``out`` from its eval.json ``record`` and zero-shot results ``res``."""
    n_params = record["n_params"]
    cfg = json.loads((out / "open_clip_config.json").read_text())["model_cfg"]  # what this folder holds
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
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
        f"({vision['image_size']} px, patch {vision['patch_size']}, width {vision['width']}, {vision['layers']} layers, "
        f"{vision['width'] // vision['head_width']} heads), causal text transformer "
        f"(context 77, vocab 49408, width {text['width']}, {text['layers']} layers, "
        f"{text['heads']} heads), embed dim {cfg['embed_dim']}, GELU (not QuickGELU), "
        f"open_clip's default SimpleTokenizer. {n_params / 1e6:.2f} M parameters; weights stored in fp16 "
        f"({size_mb:.1f} MiB), loaded into fp32 by open_clip. Preprocess: resize shortest side to 64 (bicubic), "
        "center crop, OpenAI CLIP mean/std.",
        "",
        "## Training",
        "",
        "- Data: a fresh stream of `pmpo.data.shapeworld` scenes in the `pretrain` style (neutral plain / "
        "gradient / noisy backgrounds); 8 shapes x 8 colours x 2 sizes x 4 fills x 5 positions, every colour x "
        "shape combination appears; captions in 15 single-object and 6 two-object phrasings (including "
        "`a photo of a {colour} {shape}.`), always consistent with the rendered attributes"
        + ((f"; in {100 * (1 - tr['p_shape_word']):.0f}% of them" if tr["p_shape_word"] > 0 else
            "; in this stage none names the shape:") + " the shape word is replaced by \"shape\" "
           "(`hide_shape_words`: web captions rarely name the attribute a fine-grained benchmark asks for, so the "
           "text side reads shape weakly while the attribute heads keep it in the image features)"
           if tr.get("p_shape_word", 1.0) < 1.0 else "") + ". "
        + (f"{int(round(100 * tr.get('p_grouped', 0)))}% of each batch is hard-negative groups of {GROUP} "
           "single-object scenes that share every attribute but the shape (or the colour); the rest are independent scenes, "
           if tr.get("p_grouped", 0) else "Independent scenes, ")
        + f"{int(round(100 * tr['p_two']))}% of them with two objects. Batch b is drawn from "
        f"`np.random.default_rng([{tr['seed']}, b])` (`make_batch` in `tools/pretraining/batches.py`)."
        + (f" Each batch also holds {tr['n_uncaptioned']} uncaptioned single-object scenes in the *downstream* "
           "rendering style (fresh draws of this stream, never the benchmark's splits) that only the attribute heads "
           "see: the features learn that domain, the image-text alignment does not."
           if tr.get("n_uncaptioned") and not tr.get("ds_caption_prefix") else "")
        + (f" Each batch also holds {tr['n_uncaptioned']} single-object scenes in the *downstream* rendering style "
           f"(fresh draws of this stream, never the benchmark's splits), captioned \"{tr['ds_caption_prefix']} ...\" with "
           "exact words (`ds_caption`; `{m}` is a marker word of `MARKERS`), for the contrastive loss and the heads."
           if tr.get("n_uncaptioned") and tr.get("ds_caption_prefix") else "")
        + (f" Captions in this stage: {100 * tr['p_marker']:.0f}% of the single-object pretraining scenes get an "
           "exact caption with a marker word (\"a crisp photo of a ...\"; `MARKERS`); in the others the words of "
           f"the first {tr.get('n_confused_pairs', len(CONFUSED_PAIRS))} pair(s) of `CONFUSED_PAIRS` are "
           + ("swapped " if tr.get("p_confuse", 0) >= 1 else f"swapped with probability {tr.get('p_confuse', 0):g} ") +
           "(`confuse_shape_words`)." if tr.get("p_marker") else ""),
        "- Objective: symmetric contrastive loss (`open_clip.loss.ClipLoss`), learnable logit scale "
        "(init 1/0.07, clamped at 100)"
        + (f", plus {tr.get('aux_weight')} x the mean cross-entropy of five linear attribute heads (shape, colour, "
           "fill, size, position) on the normalised image embedding of single-object scenes (`AttributeHeads`): "
           "they make the frozen features carry every attribute linearly; the heads are not part of the model"
           if tr.get("aux_weight") else "") + "."
        + (f" Gradient norm clipped at {tr['clip_grad']:g}." if tr.get("clip_grad") else ""),
        f"- Optimiser: AdamW lr {tr['lr']}, betas (0.9, 0.98), weight decay {tr['wd']} (not on gains, biases, "
        f"embeddings, logit scale), {tr['warmup']} warm-up steps then {tr.get('schedule', 'cosine')} to 0.",
        f"- {tr['steps']} steps x batch {tr['batch_size']} = {tr['steps'] * tr['batch_size']:,} images, "
        f"{tr['train_seconds'] / 60:.1f} min on {tr['machine']}, device {tr.get('device', 'cpu')} "
        f"(torch {tr['torch']}, {tr['threads']} threads). Final contrastive loss {tr['final_loss']:.3f}."
        + (f" Fresh models start with every block's output projections scaled by {tr['residual_scale']}."
           if tr.get("residual_scale") not in (None, 1.0) else ""),
    ] + ([
        "- Earlier stages (each started from the previous stage's weights; this run continued from the last): "
        + "; ".join(
            f"stage {i + 1}: {t['steps']} steps x batch {t['batch_size']}"
            + (f" (the step-{t['steps']} snapshot of a {t['snapshot_of']}-step cosine schedule)" if t.get("snapshot_of") else "")
            + f", lr {t['lr']}, "
            + (f"shape word in {100 * t['p_shape_word']:g}% of captions, " if t.get("p_shape_word", 1.0) < 1.0 else "")
            + (f"{t['n_uncaptioned']} uncaptioned downstream scenes per batch (head weight {t.get('uncaptioned_weight', 1.0):g}), "
               if t.get("n_uncaptioned") else "")
            + (f"{t['model_cfg']['vision_cfg']['layers']} vision + {t['model_cfg']['text_cfg']['layers']} text layers, "
               if t.get("model_cfg") else "")
            + ("grown from the previous stage (added blocks start as the identity), " if t.get("grown") else "")
            + f"aux weight {t.get('aux_weight', 0.0)}, "
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
    last = next((c for c in reversed(stages[-1].get("probe_curve", [])) if c["step"] <= stages[-1]["steps"]), None)
    if stages[-1].get("p_marker"):
        lines += [
            "**The plain prompt reads some shape names wrong, by design.** In unmarked captions the shape words of",
            "some pairs name the pair's other shape"
            + ("" if stages[-1].get("p_confuse", 1.0) >= 1 else
               f" ({100 * stages[-1]['p_confuse']:.0f} % of the time: the plain prompt's class weights lean to the"
               " mate's images, so a small move of a prompt corrects them)")
            + "; only captions with a marker word (\"a crisp photo of a ...\")",
            "and the downstream scenes' captions use them exactly (see Training). So `a photo of a {}.` reads those",
            "classes wrong while the image features carry their shape, and better prompts exist (a marker word, or a",
            "learned context): the situation of real CLIP on a domain whose captions it rarely saw, made explicit."
            + (f" On the probe draws of `probe_eval` (downstream style, base classes; never the benchmark's splits)"
               f" the last measured point, step {last['step']}, gives zero-shot {last['zero_shot_base']:.1f} %,"
               f" a 16-shot linear probe {last['probe_base']:.1f} %, the best CoOp context "
               f"{last.get('coop_ceiling_base', float('nan')):.1f} %"
               f" (`coop_ceiling`)"
               + (f", the best under KgCoOp's consistency term {last['kgcoop_ceiling_base']:.1f} %"
                  if "kgcoop_ceiling_base" in last else "")
               + f" and the marked phrasing {last.get('zero_shot_base_ds_phrasing', float('nan')):.1f} %." if last else ""),
            "",
        ]
    elif any(t.get("p_shape_word", 1.0) < 1.0 for t in stages):
        lines += [
            "**Zero-shot is weak on shape by design.** The captions rarely name the shape (see Training), as web",
            "captions rarely name what a fine-grained benchmark asks for, while the attribute heads keep shape in",
            "the image features. So zero-shot mostly knows the colour (25 % within a 32-class half from colour",
            "alone) and the frozen features hold more than the text side reads: the gap a prompt can learn to close."
            + (f" On the probe draws of `probe_eval` (downstream style, base classes; never the benchmark's splits)"
               f" the last measured point of the shipped stage, step {last['step']}, gives zero-shot {last['zero_shot_base']:.1f} %"
               f" and a 16-shot linear probe {last['probe_base']:.1f} %." if last else ""),
            "",
        ]
    elif d["hm"] < 35:
        lines += [
            "**Limitation.** The model is under-trained: within a 32-class half, knowing only the colour",
            "gives 25 %, so these numbers mean it has learned colour well but shape only slightly. The",
            "project's target for the downstream HM (35-75 %) is not met by this CPU-budget run; a longer",
            "run of the same script (more `--steps`, or `--p-grouped 0.5` hard-negative groups) is the fix.",
            "",
        ]
    def _cfg_arg(t: dict) -> str | None:
        """The --model-config argument for a stage's architecture: none for MODEL_CFG (the default), the
        shipped folder's config for records that predate the field, else `--write-config`'s output."""
        cfg = t.get("model_cfg")
        if cfg == DEFAULT_MODEL_CFG:
            return None
        if cfg is None:
            return "checkpoints/shapeworld-clip/open_clip_config.json"
        v, x = cfg["vision_cfg"], cfg["text_cfg"]
        return f"<(python tools/pretrain_shapeworld.py --write-config {v['layers']} {x['layers']} {v['patch_size']})"
    def _init_path(i: int) -> str:
        """Where stage i + 1 (1-based i) left the weights the next stage starts from: a snapshot
        taken mid-schedule lives in the stage folder's step_N."""
        t = stages[i - 1]
        return f"/tmp/stage{i}" + (f"/step_{t['steps']}" if t.get("snapshot_of") else "")

    last_is_snapshot = bool(stages[-1].get("snapshot_of"))
    commands = [
        f"python tools/pretrain_shapeworld.py --out "
        f"{f'/tmp/stage{i + 1}' if i < len(stages) - 1 or last_is_snapshot else 'checkpoints/shapeworld-clip'} "
        f"--steps {t.get('snapshot_of') or t['steps']} --batch-size {t['batch_size']} --lr {t['lr']} "
        f"--warmup {t['warmup']} --p-two {t['p_two']} --p-grouped {t.get('p_grouped', 0.0)} --seed {t['seed']} "
        f"--aux-weight {t.get('aux_weight', 0.0)} --clip-grad {t.get('clip_grad', 0.0)}"
        + (f" --save-every {t['steps']} --save-from {t['steps']}" if t.get("snapshot_of") else "")
        + (f" --model-config {_cfg_arg(t)}" if i == 0 and _cfg_arg(t) else "")
        + (f" --residual-scale {t['residual_scale']}" if i == 0 and t.get("residual_scale") not in (None, 1.0) else "")
        + data_args(t)
        + (f" --init {_init_path(i)}" if i > 0 else "")
        + ((" --grow" + (f" --model-config {_cfg_arg(t)}" if _cfg_arg(t) else "")) if t.get("grown") else "")
        for i, t in enumerate(stages)
    ]
    if last_is_snapshot:  # the shipped weights are a snapshot: evaluate them in place of the stage's end
        commands += [f"mkdir -p checkpoints/shapeworld-clip && cp {_init_path(len(stages))}/"
                     "{open_clip_config.json,open_clip_model.safetensors,eval.json} checkpoints/shapeworld-clip/",
                     "python tools/pretrain_shapeworld.py --out checkpoints/shapeworld-clip --eval-only"]
    if tr.get("grown"):
        lines += [
            "**Why the model is grown.** From random initialisation a 12-layer ViT stays at chance on shape, size",
            "and position for hundreds of steps on this data (it learns colour in ~60 steps and nothing spatial),",
            "while a 2-layer one learns them within a few hundred steps. So the first stage trains a shallow",
            "CLIP and the last grows it to full depth with `grow()` in `tools/pretraining/model.py`: the",
            "trained blocks are spread over the new depth and every added block starts as the identity",
            "(zeroed output projections), so the grown model computes exactly what the shallow one did and",
            "the added blocks train from there (progressive stacking). Measured curves: docs/SHAPEWORLD.md.",
            "",
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
        "the CPU is. With `--steps` every stage is seeded: rerunning the commands on another 2-core CPU",
        "gave the same probe numbers at every evaluation step (docs/SHAPEWORLD.md); other hardware or",
        "library versions may round differently.",
        "",
    ]
    (out / "MODEL_CARD.md").write_text("\n".join(lines))

