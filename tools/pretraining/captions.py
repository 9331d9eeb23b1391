"""What the pretraining stream says about a scene: its caption variants and its attribute ids.

The levers that shape the offline model's text side live here, apart from the batching code,
because the probes (``MARKERS``) and the model card (``CONFUSED_PAIRS``) name them too: hiding
shape words (``--p-shape-word``), confusing pairs of them (``--p-confuse``), exact captions with a
marker word (``--p-marker``), background words (``--p-describe-bg``) and a domain's own phrasing
(``--ds-caption-prefix``). The scenes and their plain captions are the library's
(``pmpo.data.shapeworld``); only these variants are the tool's.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch

from pmpo.data import shapeworld as sw

ATTRIBUTES = {"shape": sw.SHAPES, "colour": sw.COLOURS, "fill": sw.FILLS, "size": sw.SIZES,
              "position": sw.POSITIONS}


def attribute_targets(samples: Sequence) -> torch.Tensor:
    """[B, n_attributes] value ids of each single-object scene; -1 for two-object scenes (ignored)."""
    rows = []
    for s in samples:
        if len(s.objects) != 1:
            rows.append([-1] * len(ATTRIBUTES))
            continue
        o = s.objects[0]
        rows.append([values.index(getattr(o, name)) for name, values in ATTRIBUTES.items()])
    return torch.tensor(rows, dtype=torch.long)


def hide_shape_words(caption: str, objects: Sequence[sw.ObjectAttrs], rng: np.random.Generator, p_keep: float) -> str:
    """With probability 1 - ``p_keep`` the caption names no shape ("a red striped shape"): web captions
    rarely name the attribute a fine-grained benchmark asks for, so the text side reads it weakly while
    the attribute heads keep it in the image features -- the gap a prompt can learn to close."""
    if p_keep >= 1.0 or rng.random() < p_keep:
        return caption
    for o in objects:
        caption = re.sub(rf"\b{o.shape}\b", "shape", caption, count=1)
    return caption


# Shape words that pretraining-style captions confuse (``--p-confuse``): each word of a pair is
# written for the other shape of its pair. Visually unlike pairs, so the confusion is the text's;
# both shapes of a pair fall in the same half of every colour (red: circle, triangle, hexagon,
# diamond are base; see ``sw.base_new_split``), so base and new classes both hold confused pairs.
CONFUSED_PAIRS = (("circle", "triangle"), ("hexagon", "diamond"), ("square", "star"), ("cross", "heart"))
N_CONFUSED_PAIRS = len(CONFUSED_PAIRS)  # --n-confused-pairs' default: every pair
_MATE = {a: b for pair in CONFUSED_PAIRS for a, b in (pair, pair[::-1])}
DS_TEMPLATES = ("{prefix} {c} {s}.", "{prefix} {z} {c} {s}.", "{prefix} {f} {c} {s}.", "{prefix} {c} {s} {p}.")


def confuse_shape_words(caption: str, objects: Sequence[sw.ObjectAttrs], rng: np.random.Generator, p_confuse: float,
                        n_pairs: int = N_CONFUSED_PAIRS) -> str:
    """With probability ``p_confuse`` per object, its shape word is its pair mate's (CONFUSED_PAIRS):
    web captions of ordinary photos use some names loosely, so the generic prompt "a photo of a
    {}" reads them ambiguously, while a domain's own captions (``ds_caption``) use them exactly."""
    if p_confuse <= 0:
        return caption
    confused = {w for pair in CONFUSED_PAIRS[:n_pairs] for w in pair}
    for o in objects:
        if rng.random() < p_confuse and o.shape in confused:
            caption = re.sub(rf"\b{o.shape}\b", _MATE[o.shape], caption, count=1)
    return caption


# How a caption's prefix names the background kind (``--p-describe-bg``, ``{bg}`` in --ds-caption-prefix):
# prefix words that say something about the image, so the text tower keeps reading the positions a
# learned context occupies (``context_leverage``).
BG_WORD = {"plain": "plain", "gradient": "shaded", "noise": "grainy", "checker": "checkered",
           "stripes": "striped", "blobs": "blotchy"}

# Words that mark a caption as exact (``--p-marker``): with one of them in the prefix every shape word
# is right, without one the pairs of CONFUSED_PAIRS are confused (``--p-confuse``). Several words, not
# one, so that "exact" is a region of the embedding space the text tower reads, not a single point: a
# learned context started at "a photo of a" has a direction to move in (``coop_ceiling``).
MARKERS = ("crisp", "clear", "sharp", "exact", "precise", "detailed", "accurate", "careful")
MARKER_PREFIX = "a {m} photo of a"  # the marked phrasing; ``probe_eval`` reads it with MARKERS[0]


def ds_caption(o: sw.ObjectAttrs, rng: np.random.Generator, prefix: str, background: str = "plain") -> str:
    """A downstream-style scene's caption in that domain's own phrasing (``--ds-caption-prefix``;
    ``{bg}`` in it names the scene's background kind)."""
    k = int(rng.integers(len(DS_TEMPLATES)))
    prefix = prefix.format(bg=BG_WORD[background], m=MARKERS[int(rng.integers(len(MARKERS)))])
    return sw._fix_articles(DS_TEMPLATES[k].format(prefix=prefix, c=o.colour, s=o.shape, z=o.size,
                                                   f=sw.FILL_WORD[o.fill], p=sw.POSITION_PHRASE[o.position]))


def marker_caption(o: sw.ObjectAttrs, rng: np.random.Generator) -> str:
    """An exact caption of one object with a marker word in its prefix ("a crisp photo of a ...")."""
    return ds_caption(o, rng, MARKER_PREFIX)


def bg_caption(caption: str, sample, rng: np.random.Generator, p: float) -> str:
    """With probability ``p``, a single-object pretraining scene is captioned "a {bg} photo of a ..."
    with its background kind (the shape word as in ``caption``, after hiding / confusing)."""
    if p <= 0 or len(sample.objects) != 1 or rng.random() >= p:
        return caption
    o = sample.objects[0]
    shape = next((w for w in caption.replace(".", " ").split() if w in sw.SHAPES or w == "shape"), o.shape)
    return sw._fix_articles(f"a {BG_WORD[sample.background]} photo of a {o.size} {o.colour} {shape}.")
