"""The pretraining stream: seeded batches of fresh ShapeWorld scenes, rendered ahead of the optimiser.

Batch ``b`` of a run depends only on ``(seed, b)`` (``np.random.default_rng([seed, b])``), so a
stage is reproducible whatever thread renders it and however fast the optimiser consumes it; the
order of the draws inside ``make_batch`` is part of that contract (the model card's commands
regenerate the shipped weights from it), so new draws go last.
"""
from __future__ import annotations

import queue
import threading
from types import SimpleNamespace

import numpy as np
import open_clip
import torch

from pmpo.data import shapeworld as sw

from .captions import N_CONFUSED_PAIRS, attribute_targets, bg_caption, confuse_shape_words, ds_caption, hide_shape_words, marker_caption

GROUP = 4  # contrast groups: GROUP single-object scenes that differ only in shape (or only in colour)

Batch = tuple[torch.Tensor, list[str], torch.Tensor, list[str], torch.Tensor]


class CaptionTokens:
    """open_clip.tokenize with a cache (the caption vocabulary of ShapeWorld is finite)."""

    def __init__(self) -> None:
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            for c, t in zip(missing, open_clip.tokenize(missing)):
                self.cache[c] = t
        return torch.stack([self.cache[c] for c in captions])


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
               p_grouped: float = 0.0, n_uncaptioned: int = 0, p_shape_word: float = 1.0, n_text_only: int = 0,
               p_confuse: float = 0.0, ds_prefix: str | None = None, p_describe_bg: float = 0.0,
               p_marker: float = 0.0, n_confused_pairs: int = N_CONFUSED_PAIRS) -> Batch:
    """A fraction ``p_grouped`` of the batch comes in hard-negative groups (half varying shape,
    half colour), the rest are independent random scenes (two objects with prob. ``p_two``).
    ``n_uncaptioned`` more single-object scenes in the *downstream* rendering style are appended
    for the attribute heads only (no caption: they never enter the contrastive loss), drawn from
    this stream's own rng, never from the benchmark's splits.
    ``n_text_only`` captions of further single-object scenes (every word kept, no image) are
    drawn last, for the text-side attribute heads (``--text-aux-weight``).
    Returns (images, captions of the first ``batch_size``, attribute targets of all,
    text-only captions, their attribute targets)."""
    rng = np.random.default_rng([seed, step])
    n_groups = int(batch_size * p_grouped) // GROUP
    samples = []
    for g in range(n_groups):
        samples += _group(rng, "shape" if g % 2 == 0 else "colour")
    samples += [sw.sample_scene(rng, "pretrain", p_two=p_two) for _ in range(batch_size - len(samples))]
    captions = [hide_shape_words(s.caption, s.objects, rng, p_shape_word) for s in samples]
    if p_confuse > 0:
        captions = [confuse_shape_words(c, s.objects, rng, p_confuse, n_confused_pairs)
                    for c, s in zip(captions, samples)]
    if p_marker > 0:  # exact captions, marked as such; the rest keep their (confused) words
        captions = [marker_caption(s.objects[0], rng) if len(s.objects) == 1 and rng.random() < p_marker else c
                    for c, s in zip(captions, samples)]
    if p_describe_bg > 0:
        captions = [bg_caption(c, s, rng, p_describe_bg) for c, s in zip(captions, samples)]
    ds = [sw.sample_scene(rng, "downstream", p_two=0.0) for _ in range(n_uncaptioned)]
    samples += ds
    if ds_prefix:  # the downstream scenes join the contrastive loss with their own domain's captions
        captions += [ds_caption(s.objects[0], rng, ds_prefix, s.background) for s in ds]
    x = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float().div_(255)
    x = (x - mean) / std
    text_objects = [sw.sample_objects(rng, 1, "pretrain") for _ in range(n_text_only)]
    text_only = [sw.make_caption(o, rng) for o in text_objects]
    text_targets = attribute_targets([SimpleNamespace(objects=o) for o in text_objects])
    return x, captions, attribute_targets(samples), text_only, text_targets


class Prefetcher:
    """Renders batches in a background thread (numpy / PIL release the GIL for much of it)."""

    def __init__(self, seed: int, batch_size: int, p_two: float, mean: torch.Tensor, std: torch.Tensor,
                 p_grouped: float = 0.0, n_uncaptioned: int = 0, start_step: int = 0, depth: int = 3,
                 p_shape_word: float = 1.0, n_text_only: int = 0, p_confuse: float = 0.0, ds_prefix: str | None = None,
                 p_describe_bg: float = 0.0, p_marker: float = 0.0, n_confused_pairs: int = N_CONFUSED_PAIRS):
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.args = (seed, batch_size, p_two, mean, std, p_grouped, n_uncaptioned, p_shape_word, n_text_only,
                     p_confuse, ds_prefix, p_describe_bg, p_marker, n_confused_pairs)
        self.step = start_step
        self.stop = False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        while not self.stop:
            self.q.put(make_batch(self.args[0], self.step, *self.args[1:]))
            self.step += 1

    def get(self) -> Batch:
        return self.q.get()
