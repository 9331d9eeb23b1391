"""The offline ShapeWorld-CLIP's pretraining tool, as a package (``python tools/pretrain_shapeworld.py``).

It keeps only what the library does not have, one job per module: ``captions`` (caption variants
and attribute targets), ``batches`` (the seeded batch stream), ``model`` (architecture, growth,
attribute heads, optimiser groups and schedule), ``probes`` (lever measurements), ``folder`` (a
stage's saved folder and its fixed evaluation), ``card`` (training record and model card),
``stage`` (one stage's training loop) and ``cli`` (the command line). ShapeWorld itself, the truncated
text pass and open_clip's folder format are the library's (``pmpo.data.shapeworld``,
``pmpo.encoders.TextEncoder``, ``pmpo.backbone.save_local_dir``).
"""
from __future__ import annotations

from . import batches, captions, card, cli, folder, model, probes, stage
from .batches import GROUP, CaptionTokens, Prefetcher, make_batch
from .captions import (
    ATTRIBUTES,
    BG_WORD,
    CONFUSED_PAIRS,
    DS_TEMPLATES,
    MARKER_PREFIX,
    MARKERS,
    N_CONFUSED_PAIRS,
    attribute_targets,
    bg_caption,
    confuse_shape_words,
    ds_caption,
    hide_shape_words,
    marker_caption,
)
from .card import DEFAULT_SHIFT, data_args, training_record, write_card
from .cli import main, parser
from .folder import EVAL_SETS, HEADS_FILE, TEXT_HEADS_FILE, evaluate_folder, load_heads, save_folder
from .model import MODEL_CFG, PREPROCESS_CFG, AttributeHeads, build_model, encode_text_truncated, grow, lr_at, param_groups, text_encoder
from .probes import KGCOOP_LAMBDA, PROBE_TEST, PROBE_TRAIN, context_leverage, coop_ceiling, probe_draws, probe_eval
from .stage import train

__all__ = [
    "ATTRIBUTES", "BG_WORD", "CONFUSED_PAIRS", "DEFAULT_SHIFT", "DS_TEMPLATES", "EVAL_SETS", "GROUP", "HEADS_FILE",
    "KGCOOP_LAMBDA", "MARKERS", "MARKER_PREFIX", "MODEL_CFG", "N_CONFUSED_PAIRS", "PREPROCESS_CFG", "PROBE_TEST",
    "PROBE_TRAIN", "TEXT_HEADS_FILE", "AttributeHeads", "CaptionTokens", "Prefetcher", "attribute_targets", "batches",
    "bg_caption", "build_model", "captions", "card", "cli", "confuse_shape_words", "context_leverage", "coop_ceiling",
    "data_args", "ds_caption", "encode_text_truncated", "evaluate_folder", "folder", "grow", "hide_shape_words",
    "load_heads", "lr_at", "main", "make_batch", "marker_caption", "model", "param_groups", "parser", "probe_draws",
    "probe_eval", "probes", "save_folder", "stage", "text_encoder", "train", "training_record", "write_card",
]
