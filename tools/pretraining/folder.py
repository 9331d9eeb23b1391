"""A stage's folder: open_clip's ``local-dir:`` model, the attribute heads beside it, its fixed evaluation.

A stage folder is both what ships (checkpoints/shapeworld-clip) and what the next stage starts
from (``--init``), so writing and reading it are kept together. The model and its config are
written by the library (``pmpo.backbone.save_local_dir``); the heads files are the tool's own,
since open_clip and the library know nothing of them.
"""
from __future__ import annotations

from pathlib import Path

import open_clip
import torch

from pmpo.backbone import save_local_dir
from pmpo.data import shapeworld as sw

from .model import PREPROCESS_CFG

HEADS_FILE = "pretrain_attribute_heads.safetensors"  # kept beside a stage, not used by open_clip
TEXT_HEADS_FILE = "pretrain_text_heads.safetensors"   # the same for the text-side heads
CONFIG_FILE = "open_clip_config.json"  # what save_local_dir writes beside open_clip_model.safetensors
EVAL_SETS = [  # (name, style, seed, n_per_class)
    ("downstream", "downstream", 1234, 10),
    ("sketch", "sketch", 1234, 10),
    ("pretrain", "pretrain", 1234, 10),
]


def save_folder(model: torch.nn.Module, out: Path, model_cfg: dict, heads: torch.nn.Module | None = None,
                text_heads: torch.nn.Module | None = None) -> None:
    """open_clip's ``local-dir:`` folder (fp16 weights + config), plus the attribute heads beside it
    when given, so that a later stage (``--init``) continues with them."""
    from safetensors.torch import save_file
    out.mkdir(parents=True, exist_ok=True)
    if heads is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}, str(out / HEADS_FILE))
    if text_heads is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in text_heads.state_dict().items()},
                  str(out / TEXT_HEADS_FILE))
    save_local_dir(model, model_cfg, out, PREPROCESS_CFG, dtype=torch.float16)  # the training model stays fp32


def load_heads(folder: Path, heads: torch.nn.Module, text_heads: torch.nn.Module | None) -> None:
    """Continue a stage's heads from ``folder`` where it kept them. Heads new in this stage (the
    uncaptioned ones of --separate-heads) stay fresh; text heads load only when this stage has them."""
    from safetensors.torch import load_file
    if (folder / HEADS_FILE).is_file():
        heads.load_state_dict(load_file(str(folder / HEADS_FILE)), strict=False)  # new heads stay fresh
    if text_heads is not None and (folder / TEXT_HEADS_FILE).is_file():
        text_heads.load_state_dict(load_file(str(folder / TEXT_HEADS_FILE)))


def evaluate_folder(out: Path) -> dict:
    """Zero-shot accuracy of the saved folder, loaded as any user loads it, on the fixed EVAL_SETS."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    res = {}
    for name, style, seed, n in EVAL_SETS:
        r = sw.evaluate_zero_shot(model, preprocess, tokenizer, style=style, seed=seed, n_per_class=n)
        res[name] = {k: round(v, 2) for k, v in r.items()}
        res[name]["eval_set"] = {"function": "pmpo.data.shapeworld.generate_eval_set", "style": style,
                                 "seed": seed, "n_per_class": n, "template": sw.TEMPLATES[0]}
    return res
