"""Shared fixtures: tiny random-init open_clip models saved and loaded through the real path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY_CFG = {
    "embed_dim": 32,
    # 12 layers on both towers, like ViT-B/16, so every preset (MaPLe: depth 9) fits unchanged.
    "vision_cfg": {"image_size": 32, "layers": 12, "width": 64, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 12},
}


def make_local_dir(folder: Path, cfg: dict, seed: int = 0) -> str:
    """Build a random-init CLIP with open_clip's own code and save it as a local-dir folder."""
    import open_clip

    from pmpo.backbone import save_local_dir

    torch.manual_seed(seed)
    clip = open_clip.model.CLIP(**cfg)
    return save_local_dir(clip, cfg, folder, {"size": cfg["vision_cfg"]["image_size"]})


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """``local-dir:`` spec of a tiny CLIP (vision width 64, text width 32, 12 layers each)."""
    return make_local_dir(tmp_path_factory.mktemp("tiny-clip"), TINY_CFG)


@pytest.fixture(scope="session")
def wide_model(tmp_path_factory) -> str:
    """Same depth as ``tiny_model`` but other widths: for checkpoint-mismatch tests."""
    cfg = {
        "embed_dim": 48,
        "vision_cfg": {**TINY_CFG["vision_cfg"], "width": 96},
        "text_cfg": {**TINY_CFG["text_cfg"], "width": 48},
    }
    return make_local_dir(tmp_path_factory.mktemp("wide-clip"), cfg, seed=1)
