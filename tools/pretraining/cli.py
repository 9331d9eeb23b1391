"""Pretrain a small open_clip CLIP on ShapeWorld and ship it in open_clip's ``local-dir:`` format.

    python tools/pretrain_shapeworld.py --out checkpoints/shapeworld-clip

The model is ``open_clip.model.CLIP(**MODEL_CFG)`` (or the ``model_cfg`` of ``--model-config``;
open_clip's own model code, GELU, ViT image tower, causal text transformer, default
SimpleTokenizer).  Training streams freshly generated "pretrain"-style scenes with captions
(``pmpo.data.shapeworld``): symmetric contrastive loss (``open_clip.loss.ClipLoss``) plus,
with ``--aux-weight``, linear attribute heads on the image embedding (``AttributeHeads``),
AdamW, linear warm-up + cosine decay; bf16 autocast with ``--device cuda``.

A deep tower is trained in stages: a shallow first stage (``--model-config`` with few layers),
then ``--init <stage> --grow`` to full depth (``grow``: added blocks start as the identity),
because a 12-layer ViT from scratch learns nothing spatial here for hundreds of steps
(docs/SHAPEWORLD.md).  ``--eval-every N`` tracks zero-shot and linear-probe accuracy on
separate probe draws (``probe_eval``), never on the benchmark's splits.

Outputs in ``--out``: ``open_clip_config.json``, ``open_clip_model.safetensors`` (fp16
weights; open_clip loads them into an fp32 model), ``eval.json`` (zero-shot accuracies on
fixed generated evaluation sets), ``MODEL_CARD.md``.

``--steps`` fixes the number of steps (cosine over steps); otherwise training runs for
``--minutes`` of wall time with the cosine schedule laid over elapsed time, so a loaded CPU
gives fewer steps, never an overrun.  ``--eval-only`` re-evaluates a saved
folder and rewrites eval.json / MODEL_CARD.md's numbers (keeps the training record);
``--card-only`` rewrites MODEL_CARD.md from eval.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pmpo.data import shapeworld as sw

from .captions import N_CONFUSED_PAIRS
from .card import write_card
from .folder import evaluate_folder
from .model import MODEL_CFG, PREPROCESS_CFG
from .stage import train


def parser() -> argparse.ArgumentParser:
    """The command line of ``tools/pretrain_shapeworld.py`` (this docstring is its --help description)."""
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
    ap.add_argument("--trial", type=float, default=0, help="run this many seconds of steps, print the speed, exit")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]; CUDA trains under bf16 autocast")
    ap.add_argument("--aux-weight", type=float, default=1.0,
                    help="weight of the attribute-head loss beside the contrastive loss (0: contrastive only)")
    ap.add_argument("--residual-scale", type=float, default=1.0,
                    help="scale of every block's output projections at init (fresh models only)")
    ap.add_argument("--model-config", help="open_clip_config.json whose model_cfg to train (default: MODEL_CFG, "
                                           "12 + 12 layers); ignored with --init")
    ap.add_argument("--n-uncaptioned", type=int, default=0,
                    help="downstream-style scenes per batch for the attribute heads only (no caption)")
    ap.add_argument("--uncaptioned-weight", type=float, default=1.0,
                    help="weight of the uncaptioned downstream-style scenes' head loss against the captioned ones'")
    ap.add_argument("--separate-heads", action="store_true",
                    help="own attribute heads for the uncaptioned downstream-style scenes")
    ap.add_argument("--grow", action="store_true",
                    help="with --init: grow the loaded model to --model-config / MODEL_CFG's depth, added blocks "
                         "starting as the identity (see grow())")
    ap.add_argument("--clip-grad", type=float, default=1.0, help="gradient-norm clip (0: off)")
    ap.add_argument("--write-config", nargs=3, type=int, metavar=("VISION_LAYERS", "TEXT_LAYERS", "PATCH"),
                    help="print an open_clip_config.json: MODEL_CFG with these depths and patch size, and exit")
    ap.add_argument("--card-only", action="store_true", help="rewrite MODEL_CARD.md from --out's eval.json and exit")
    ap.add_argument("--eval-every", type=int, default=0, help="probe / zero-shot on the probe draws every N steps")
    ap.add_argument("--eval-only", action="store_true")
    ap.add_argument("--save-every", type=int, default=0,
                    help="also save the model every N steps into <out>/step_N (a folder --init can continue from)")
    ap.add_argument("--save-from", type=int, default=0, help="first step --save-every saves at")
    ap.add_argument("--p-shape-word", type=float, default=1.0,
                    help="fraction of captions that name the shape (the rest say 'shape'; see hide_shape_words)")
    ap.add_argument("--n-text-only", type=int, default=0,
                    help="captions per batch (every word kept, no image) for text-side attribute heads")
    ap.add_argument("--text-aux-weight", type=float, default=0.0,
                    help="weight of the text-side attribute heads' loss: keeps the class names distinct in the "
                         "text features without aligning them to the images (see TEXT_HEADS_FILE)")
    ap.add_argument("--p-confuse", type=float, default=0.0,
                    help="per object, probability that a pretraining caption writes its shape word as its pair "
                         "mate's (CONFUSED_PAIRS)")
    ap.add_argument("--ds-caption-prefix", default=None,
                    help="caption the --n-uncaptioned downstream scenes in their own phrasing (e.g. 'a cluttered "
                         "photo of a') and add them to the contrastive loss")
    ap.add_argument("--p-describe-bg", type=float, default=0.0,
                    help="probability that a single-object pretraining scene is captioned 'a {bg} photo of a ...' "
                         "with its background kind (BG_WORD)")
    ap.add_argument("--n-confused-pairs", type=int, default=N_CONFUSED_PAIRS,
                    help="how many of CONFUSED_PAIRS --p-confuse applies to (the first K); at --p-confuse 1 those "
                         "pairs' words are swapped, not blurred")
    ap.add_argument("--p-marker", type=float, default=0.0,
                    help="probability that a single-object pretraining scene gets an exact caption with a marker word "
                         "(MARKERS: 'a crisp photo of a ...'); the other captions keep --p-confuse's confused pairs")
    ap.add_argument("--shift", action="append", default=[], metavar="KEY=VALUE",
                    help="override one knob of pmpo.data.shapeworld.DOWNSTREAM_SHIFT for this run (the uncaptioned "
                         "scenes and the probe draws; repeatable; recorded in eval.json)")
    ap.add_argument("--init", help="continue training from a saved folder (a second stage); its training "
                                   "record is kept in eval.json as 'continued_from'")
    return ap


def main(argv: list[str] | None = None) -> None:
    """Run the tool: --write-config, --card-only and --eval-only act on a folder and exit; otherwise train a stage."""
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    for item in args.shift:
        key, _, value = item.partition("=")
        if key not in sw.DOWNSTREAM_SHIFT:
            raise SystemExit(f"--shift: unknown key {key!r}; keys: {', '.join(sorted(sw.DOWNSTREAM_SHIFT))}")
        sw.DOWNSTREAM_SHIFT[key] = float(value)

    if args.write_config:
        cfg = json.loads(json.dumps(MODEL_CFG))
        cfg["vision_cfg"]["layers"], cfg["text_cfg"]["layers"], cfg["vision_cfg"]["patch_size"] = args.write_config
        print(json.dumps({"model_cfg": cfg, "preprocess_cfg": PREPROCESS_CFG}, indent=2))
        return

    if args.card_only:
        record = json.loads((out / "eval.json").read_text())
        write_card(out, record, {k: record[k] for k in ("downstream", "sketch", "pretrain")})
        return

    if args.eval_only:
        record = json.loads((out / "eval.json").read_text())
        res = evaluate_folder(out)
        record.update(res)
        (out / "eval.json").write_text(json.dumps(record, indent=2) + "\n")
        write_card(out, record, res)
        print(json.dumps(res, indent=1))
        return

    train(args)
