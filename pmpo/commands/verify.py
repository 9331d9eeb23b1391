"""``pmpo verify``: each baseline's training, step by step, against its authors' trainer."""

from __future__ import annotations

import argparse
import json
import sys

from ..verify import METHODS, THEIR_FP16_CASTS, TINY, VerifyConfig, format_markdown, run_verify
from . import SUMMARIES

EXIT_DEVIATION = 3  # the run worked, but a method deviates beyond --tolerance


def _methods(value: str) -> tuple[str, ...]:
    return tuple(v.strip().lower() for v in value.split(",") if v.strip())


def register(sub: argparse._SubParsersAction) -> None:
    d = VerifyConfig()
    p = sub.add_parser(
        "verify",
        help=SUMMARIES["verify"],
        description=(
            "For each method, build the authors' model and training machinery (their trainer's build_model and "
            "forward_backward, their config, Dassl's optimiser and warm-up + cosine scheduler) and ours "
            "(pmpo.engine.train with the method's base-to-new preset) over the same random-init CLIP, start both "
            "from the same learnable tensors, feed both the same batches, and compare after every optimiser step "
            "the loss, the learning rate, every learnable tensor and the logits of a fixed evaluation batch. "
            "Their code runs in a child interpreter per method; nothing is downloaded. Exit status 3 when a method "
            "deviates beyond --tolerance. See docs/RECIPES.md."
        ),
        epilog="example: pmpo verify --reference ../refs --json > verify.json",
    )
    p.add_argument("--reference", metavar="DIR", required=True,
                   help="a folder holding the checkouts (git clone names): CoOp, Dassl.pytorch, KgCoOp, "
                        "multimodal-prompt-learning, PromptSRC")
    p.add_argument("--methods", type=_methods, default=d.methods,
                   help=f"comma-separated, from {','.join(METHODS)} (default: all)")
    p.add_argument("--steps", type=int, default=d.steps,
                   help=f"optimiser steps, rounded up to whole epochs of --steps-per-epoch (default: {d.steps})")
    p.add_argument("--steps-per-epoch", type=int, default=d.steps_per_epoch,
                   help=f"batches per epoch; the first epoch is the warm-up (default: {d.steps_per_epoch})")
    p.add_argument("--classes", type=int, default=d.classes, help=f"classes (default: {d.classes})")
    p.add_argument("--batch", type=int, default=None,
                   help="images per batch on both sides (default: each method's own, e.g. CoCoOp 1, KgCoOp 128)")
    p.add_argument("--model", default=d.model,
                   help=f"open_clip model name or local-dir:PATH; '{TINY}' (default) builds a random-init CLIP with "
                        "ViT-B/16's widths and 4 + 4 layers, fast on a CPU")
    p.add_argument("--pretrained", default=d.pretrained, help="pretrained tag or weights file (default: none)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of the model, images and prompts (default: {d.seed})")
    p.add_argument("--threads", type=int, default=d.threads, help=f"torch threads per child (default: {d.threads})")
    p.add_argument("--tolerance", type=float, default=d.tolerance,
                   help=f"largest accepted relative difference of a learnable tensor (default: {d.tolerance:g})")
    p.add_argument("--their-fp16-casts", choices=THEIR_FP16_CASTS, default=d.their_fp16_casts,
                   help="their explicit .half() casts in fp32 runs: 'round' (default) keeps them as fp16 roundings, "
                        "'off' makes them identities (measures what they cost)")
    p.add_argument("--json", dest="as_json", action="store_true", help="print the full result as JSON instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = VerifyConfig(
        reference=args.reference, methods=args.methods, steps=args.steps, steps_per_epoch=args.steps_per_epoch,
        classes=args.classes, batch=args.batch, model=args.model, pretrained=args.pretrained, seed=args.seed,
        threads=args.threads, tolerance=args.tolerance, their_fp16_casts=args.their_fp16_casts,
    )
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    result = run_verify(cfg, log=log, quiet=args.quiet)
    print(json.dumps(result, indent=2) if args.as_json else format_markdown(result))
    return 0 if result["all_ok"] else EXIT_DEVIATION
