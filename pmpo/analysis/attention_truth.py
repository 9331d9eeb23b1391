"""Attention scored against ground truth: how much of the CLS token's attention lands on the object.

A heatmap is an impression; ShapeWorld knows where every object is (``Sample.masks``), so a map
over the patch grid can be *scored*: the attention mass on the target's patches, on the grey
distractors' patches, on the rest of the image and on the prompt tokens, and whether the most
attended patch lies on the target (the pointing game). Chance is the target's share of the
patches: what a uniform map scores.

This module holds the scoring (model-independent, exact on synthetic maps); the per-layer,
per-prompt analysis over a model's attention builds on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["PatchLabels", "MapScores", "patch_labels", "score_map"]

TARGET, DISTRACTOR, REST = 0, 1, 2


@dataclass(frozen=True)
class PatchLabels:
    """Per patch of a ``rows x cols`` grid: TARGET if any target pixel falls in it, else DISTRACTOR if
    any distractor pixel does, else REST (so every patch has exactly one label)."""

    labels: np.ndarray  # [rows, cols] int

    @property
    def chance(self) -> float:
        """Share of patches on the target: the target mass of a uniform map."""
        return float((self.labels == TARGET).mean())


@dataclass(frozen=True)
class MapScores:
    target: float  # attention mass on target patches (fraction of the whole map, prompts included)
    distractors: float
    rest: float
    prompts: float
    pointing: float  # 1.0 if the most attended patch is a target patch, else 0.0
    chance: float  # target share of the patches


def patch_labels(target: np.ndarray, distractor: np.ndarray, grid: tuple[int, int]) -> PatchLabels:
    """Label each patch of ``grid`` from (H, W) bool masks; H and W must be multiples of the grid."""
    rows, cols = grid
    h, w = target.shape
    if h % rows or w % cols or distractor.shape != target.shape:
        raise ValueError(f"masks of shape {target.shape} / {distractor.shape} do not tile a {rows}x{cols} grid")

    def any_in_patch(mask: np.ndarray) -> np.ndarray:
        return mask.reshape(rows, h // rows, cols, w // cols).any(axis=(1, 3))

    labels = np.full((rows, cols), REST, dtype=np.int64)
    labels[any_in_patch(distractor)] = DISTRACTOR
    labels[any_in_patch(target)] = TARGET
    return PatchLabels(labels)


def score_map(patch_attention: np.ndarray, labels: PatchLabels, prompt_attention: float = 0.0) -> MapScores:
    """Score one attention map: ``patch_attention`` [rows, cols] >= 0 and ``prompt_attention`` (the mass
    on prompt tokens) are renormalised to sum to 1, so target + distractors + rest + prompts = 1."""
    a = np.asarray(patch_attention, dtype=np.float64)
    if a.shape != labels.labels.shape:
        raise ValueError(f"attention map {a.shape} does not match the patch grid {labels.labels.shape}")
    if (a < 0).any() or prompt_attention < 0:
        raise ValueError("attention must be non-negative")
    total = a.sum() + prompt_attention
    if total <= 0:
        raise ValueError("attention map sums to 0")
    a = a / total
    part = {k: float(a[labels.labels == k].sum()) for k in (TARGET, DISTRACTOR, REST)}
    peak = np.unravel_index(int(np.argmax(a)), a.shape)
    return MapScores(target=part[TARGET], distractors=part[DISTRACTOR], rest=part[REST],
                     prompts=float(prompt_attention / total),
                     pointing=float(labels.labels[peak] == TARGET), chance=labels.chance)
