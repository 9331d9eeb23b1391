"""Model options (``--method``, ``--checkpoint``, ``--model``, ``--device``, ...) and loading a model from them.

Part of the library, not of the command line: ``pmpo predict`` / ``eval`` / ``train``, every
analysis (``python -m pmpo.analysis.<name>``) and the tools take exactly the same options, so the
parsing lives here, below all of them, and :mod:`pmpo.commands` only re-uses it. The heavy
modules (backbone loading, checkpoints, the model) are imported inside the functions, so that
building a parser -- ``pmpo --help`` -- does not import torch's models.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .backbone import LOCAL_DIR, OFFLINE_MODEL
from .config import PMPOConfig, list_methods
from .device import resolve_device
from .errors import BackboneLoadError, InputError

if TYPE_CHECKING:
    from .backbone import Backbone
    from .model import PMPOModel


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The ``model`` option group: a preset, a config file, a backbone, a checkpoint, a device."""
    group = parser.add_argument_group("model")
    group.add_argument("--method", default="pmpo", choices=list_methods(), help="method preset (default: pmpo)")
    group.add_argument("--config", help="YAML config file (options as in pmpo/configs/methods/*.yaml)")
    group.add_argument("--model", help="open_clip model name or local-dir:PATH (default: the preset's, ViT-B-16-quickgelu)")
    group.add_argument("--pretrained", help="pretrained tag (openai, laion2b_...) or weights file; 'none' = random init")
    group.add_argument("--checkpoint", help="prompt checkpoint (.safetensors) to load; its metadata names the backbone")
    group.add_argument("--offline", action="store_true", help=f"use the shipped offline model ({OFFLINE_MODEL})")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")


def config_from_args(args: argparse.Namespace) -> PMPOConfig:
    """The config the model options name: the preset of ``--method``, or ``--config``'s file,
    with ``--model`` / ``--pretrained`` / ``--offline`` on top."""
    model = OFFLINE_MODEL if getattr(args, "offline", False) else args.model
    overrides = {"method": args.method, "model": model, "pretrained": args.pretrained}
    if args.config:
        return PMPOConfig.from_yaml(args.config, **overrides)
    return PMPOConfig(**{k: v for k, v in overrides.items() if v is not None})


def offline_fallback(cfg: PMPOConfig, args: argparse.Namespace, device: torch.device,
                     exc: BackboneLoadError) -> Backbone:
    """The shipped offline backbone after ``cfg``'s *default* backbone failed to load with ``exc``.

    Only the default falls back (a machine without network can still run every command); a
    backbone the user named (--model, --pretrained, --config) must load or fail, so ``exc`` is
    raised again then. On fallback ``cfg`` is updated to name the backbone actually used.
    """
    from .backbone import load_backbone

    if args.model or args.pretrained or args.config or not Path(OFFLINE_MODEL[len(LOCAL_DIR):]).is_dir():
        raise exc
    print(f"note: {exc}\nnote: falling back to the shipped offline model {OFFLINE_MODEL} "
          "(a small synthetic-domain CLIP, not real CLIP weights)", file=sys.stderr)
    cfg.model, cfg.pretrained = OFFLINE_MODEL, "none"
    return load_backbone(cfg.model, cfg.pretrained, device=device, quick_gelu=cfg.quick_gelu)


def load_backbone_from_args(cfg: PMPOConfig, args: argparse.Namespace, device: torch.device) -> Backbone:
    """``cfg``'s backbone, or the shipped offline one when the default cannot load (see offline_fallback)."""
    from .backbone import load_backbone

    try:
        return load_backbone(cfg.model, cfg.pretrained, device=device, quick_gelu=cfg.quick_gelu)
    except BackboneLoadError as exc:
        return offline_fallback(cfg, args, device, exc)


def load_model_from_args(args: argparse.Namespace) -> PMPOModel:
    """The model the options describe: a checkpoint (backbone from its metadata) or a preset."""
    from .checkpoint import load_checkpoint
    from .model import build_model

    device = resolve_device(args.device)
    model_name = OFFLINE_MODEL if args.offline else args.model
    if args.checkpoint:
        model = load_checkpoint(args.checkpoint, device=device, model=model_name, pretrained=args.pretrained)
    else:
        cfg = config_from_args(args)
        model = build_model(cfg, device=device, backbone=load_backbone_from_args(cfg, args, device))
        if cfg.n_prompts > 0:
            print(f"note: no --checkpoint, so the {cfg.method} prompts are an untrained initialisation, not learned "
                  "ones; pass --checkpoint prompts.safetensors (pmpo train writes one), or --method zeroshot",
                  file=sys.stderr)
    print(f"loaded {model.cfg.method} on {model.backbone.description} [{device}]", file=sys.stderr)
    return model


def parse_classes(value: str) -> list[str]:
    """Classes from a comma-separated string, or from a file (one per line) given as @path."""
    if value.startswith("@"):
        try:
            with open(value[1:], encoding="utf-8") as fh:
                return [line.strip() for line in fh if line.strip()]
        except OSError as exc:
            raise InputError(f"cannot read class list {value[1:]}: {exc.strerror}") from exc
    return [c.strip() for c in value.split(",") if c.strip()]
