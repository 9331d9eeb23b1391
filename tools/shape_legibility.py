#!/usr/bin/env python
"""Can a small ViT read shape off the downstream renders at all? (a pretraining lever, measured)

    python tools/shape_legibility.py --layers 2 --patch 8 --steps 1200 --variant base

Trains a randomly initialised open_clip VisionTransformer (width 128) with a linear 64-way
colour x shape head *directly* on freshly rendered downstream-style class scenes (supervised,
AdamW 1e-3, batch 128, cosine) and prints the accuracy of the class, of its shape and of its
colour on 1,024 fresh renders of a separate draw (seed 999) every 200 steps. No contrastive
pretraining, no captions: an upper bound on what the features can learn from these images in
this many steps. ``--variant`` changes the rendering (never the benchmark's files):
``base`` today's DOWNSTREAM_SHIFT; ``nodis`` without grey distractors; ``easy`` without
distractors or textured backgrounds, little noise, large solid objects only.
One thread, so it can run beside other work.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from pmpo.data import shapeworld as sw

VARIANTS = ("base", "nodis", "easy", "pretrain")


def apply_variant(variant: str, overrides: list[str]) -> str:
    """Apply ``variant`` and ``KEY=VALUE`` overrides of DOWNSTREAM_SHIFT; return the style to render."""
    for item in overrides:
        key, _, value = item.partition("=")
        if key not in sw.DOWNSTREAM_SHIFT:
            raise SystemExit(f"unknown DOWNSTREAM_SHIFT key {key!r}; keys: {sorted(sw.DOWNSTREAM_SHIFT)}")
        sw.DOWNSTREAM_SHIFT[key] = float(value)
    if variant == "pretrain":
        return "pretrain"
    if variant in ("nodis", "easy"):
        sw.DOWNSTREAM_SHIFT["n_distractors_max"] = 0
    if variant == "easy":
        sw.DOWNSTREAM_SHIFT.update(p_textured_bg=0.0, noise_sigma=2.0)
        sw.SIZES, sw.FILLS = ("large",), ("solid",)
    return "downstream"


def batch(rng: np.random.Generator, n: int, mean: torch.Tensor, std: torch.Tensor, style: str = "downstream"):
    labels = rng.integers(len(sw.CLASS_COMBOS), size=n)
    images = np.stack([sw.sample_class_scene(int(label), rng, style).image for label in labels])
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    return x, torch.from_numpy(labels)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--variant", choices=VARIANTS, default="base")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one DOWNSTREAM_SHIFT knob (repeatable)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    style = apply_variant(args.variant, args.set)
    mean, std = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    vision = open_clip.model.VisionTransformer(image_size=sw.IMAGE_SIZE, patch_size=args.patch, width=128,
                                               layers=args.layers, heads=4, mlp_ratio=4.0, output_dim=128)
    head = torch.nn.Linear(128, len(sw.CLASS_COMBOS))
    opt = torch.optim.AdamW([*vision.parameters(), *head.parameters()], lr=1e-3, weight_decay=0.05)
    test_x, test_y = batch(np.random.default_rng(999), 1024, mean, std, style)
    shape_of = torch.tensor([sw.SHAPES.index(s) for _, s in sw.CLASS_COMBOS])
    colour_of = torch.tensor([sw.COLOURS.index(c) for c, _ in sw.CLASS_COMBOS])
    started = time.time()
    for step in range(args.steps):
        x, y = batch(np.random.default_rng([1, step]), 128, mean, std, style)
        for group in opt.param_groups:
            group["lr"] = 1e-3 * min(1.0, (step + 1) / 50) * 0.5 * (1 + np.cos(np.pi * step / args.steps))
        loss = F.cross_entropy(head(F.normalize(vision(x), dim=-1) * 10), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 200 == 0 or step == args.steps - 1:
            with torch.no_grad():
                pred = head(F.normalize(vision(test_x), dim=-1)).argmax(1)
            print(json.dumps({"layers": args.layers, "patch": args.patch, "variant": args.variant, "set": args.set, "step": step + 1,
                              "seconds": round(time.time() - started),
                              "class": round((pred == test_y).float().mean().item(), 3),
                              "shape": round((shape_of[pred] == shape_of[test_y]).float().mean().item(), 3),
                              "colour": round((colour_of[pred] == colour_of[test_y]).float().mean().item(), 3)}),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
