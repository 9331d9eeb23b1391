"""ShapeWorld: a procedural vision-language world for offline CLIP pretraining and
prompt-learning benchmarks.

Everything here is deterministic given a seed and needs no files.  Images are small RGB
uint8 arrays (64 px by default) of one or more coloured shapes with attributes

    shape     circle square triangle star hexagon cross diamond heart
    colour    red green blue yellow purple orange cyan pink
    size      small large
    fill      solid striped outline dotted
    position  left right top bottom center

and a caption that always names the attributes it mentions correctly.

Three rendering styles:

* ``"pretrain"``   clean-ish: neutral plain / gradient / lightly noisy backgrounds.
* ``"downstream"`` a rendering shift: coloured and textured backgrounds, grey distractor
  shapes, rotation / position / size jitter, colour jitter and pixel noise.
* ``"sketch"``     held out (domain generalisation only): jittered coloured outlines, no
  fill, on white / paper-noise backgrounds.

Public API
----------
``render_scene(objects, style, rng)``          -> uint8 array (H, W, 3)
``sample_scene(rng, style=..., ...)``          -> :class:`Sample`
``generate(n, seed, style=..., ...)``          -> list[:class:`Sample`]
``class_names()`` / ``CLASS_COMBOS``            the 64 colour x shape classes (label order)
``base_new_split()``                            label ids of the base / new halves
``generate_eval_set(seed, n_per_class, style)`` fixed labelled evaluation images
``build_shapeworld_splits(root, ...)``         PNG dataset on disk -> ``DatasetSplits``
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from pmpo.data.shapeworld_render import Render, render, render_scene

# The vocabulary and the renderer, re-exported: `shapeworld` is the world's one public face.
from pmpo.data.shapeworld_world import (
    _PAIRS,
    COLOUR_RGB,
    COLOURS,
    DOWNSTREAM_SHIFT,
    FILL_WORD,
    FILLS,
    IMAGE_SIZE,
    POSITION_PHRASE,
    POSITIONS,
    SHAPES,
    SIZES,
    STYLES,
    TEMPLATES,
    ObjectAttrs,
    Sample,
    SceneMasks,
)
from pmpo.data.types import DatasetSplits, Datum

__all__ = [
    "SHAPES", "COLOURS", "COLOUR_RGB", "SIZES", "FILLS", "POSITIONS", "STYLES",
    "IMAGE_SIZE", "ObjectAttrs", "Render", "Sample", "SceneMasks", "render", "render_scene", "sample_objects",
    "sample_scene", "make_caption", "generate", "class_combos", "class_names",
    "CLASS_COMBOS", "base_new_split", "sample_class_scene", "generate_eval_samples", "generate_eval_set",
    "build_shapeworld_splits", "TEMPLATES", "DOWNSTREAM_SHIFT",
]

# --------------------------------------------------------------------------------------
# captions
# --------------------------------------------------------------------------------------

_SINGLE_TEMPLATES = (
    "a photo of a {c} {s}.",
    "a {c} {s}.",
    "{c} {s}",
    "a {z} {c} {s}",
    "a {z} {c} {s} {p}",
    "a {f} {c} {s}",
    "a {z} {f} {c} {s}",
    "a {c} {s} {p}",
    "a drawing of a {c} {s} {p}",
    "a photo of a {z} {f} {c} {s} {p}.",
    "a picture of a {f} {c} {s}",
    "an image of a {z} {c} {s}",
    "a {c} {s} shape",
    "a photo of a {z} {c} {s}.",
    "a {z} {f} {c} {s} {p}",
)
_PAIR_TEMPLATES = (
    "a {c1} {s1} and a {c2} {s2}",
    "a {c1} {s1} {p1} and a {c2} {s2} {p2}",
    "a photo of a {z1} {c1} {s1} and a {z2} {c2} {s2}.",
    "{c1} {s1} and {c2} {s2}",
    "a {f1} {c1} {s1} and a {f2} {c2} {s2}",
    "a drawing of a {c1} {s1} {p1} and a {c2} {s2} {p2}",
)
_SKETCH_PREFIXES = ("a sketch of a", "a drawing of a", "a line drawing of a")
_ARTICLE_RE = re.compile(r"\ba (?=[aeiou])")


def _fix_articles(text: str) -> str:
    return _ARTICLE_RE.sub("an ", text)


def _fields(o: ObjectAttrs, suffix: str = "") -> dict[str, str]:
    return {"c" + suffix: o.colour, "s" + suffix: o.shape, "z" + suffix: o.size,
            "f" + suffix: FILL_WORD[o.fill], "p" + suffix: POSITION_PHRASE[o.position]}


def make_caption(objects: Sequence[ObjectAttrs], rng: np.random.Generator, style: str = "pretrain",
                 template: int | None = None) -> str:
    """A caption consistent with ``objects`` (one or two).  ``template`` picks a phrasing."""
    if len(objects) == 1:
        o = objects[0]
        if style == "sketch" and template is None and rng.random() < 0.5:
            pre = _SKETCH_PREFIXES[int(rng.integers(len(_SKETCH_PREFIXES)))]
            return _fix_articles(f"{pre} {o.colour} {o.shape}")
        k = int(rng.integers(len(_SINGLE_TEMPLATES))) if template is None else template
        text = _SINGLE_TEMPLATES[k].format(**_fields(o))
        if style == "sketch":  # "solid"/"striped"/... would be wrong for outline drawings
            text = text.replace(FILL_WORD[o.fill] + " ", "")
    elif len(objects) == 2:
        k = int(rng.integers(len(_PAIR_TEMPLATES))) if template is None else template
        text = _PAIR_TEMPLATES[k].format(**_fields(objects[0], "1"), **_fields(objects[1], "2"))
        if style == "sketch":
            for o in objects:
                text = text.replace(FILL_WORD[o.fill] + " ", "", 1)
    else:
        parts = [f"a {o.colour} {o.shape}" for o in objects]
        text = ", ".join(parts[:-1]) + " and " + parts[-1]
    return _fix_articles(" ".join(text.split()))


# --------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------

def sample_objects(rng: np.random.Generator, n_objects: int = 1, style: str = "pretrain") -> list[ObjectAttrs]:
    """Random attributes for ``n_objects`` (1 or 2) non-overlapping objects."""
    if n_objects == 1:
        positions = [POSITIONS[int(rng.integers(len(POSITIONS)))]]
    elif n_objects == 2:
        positions = list(_PAIRS[int(rng.integers(len(_PAIRS)))])
        if rng.random() < 0.5:
            positions.reverse()
    else:
        raise ValueError("n_objects must be 1 or 2")
    objs = []
    for p in positions:
        fill = "outline" if style == "sketch" else FILLS[int(rng.integers(len(FILLS)))]
        objs.append(ObjectAttrs(shape=SHAPES[int(rng.integers(len(SHAPES)))],
                                colour=COLOURS[int(rng.integers(len(COLOURS)))],
                                size=SIZES[int(rng.integers(len(SIZES)))], fill=fill, position=p))
    return objs


def sample_scene(rng: np.random.Generator, style: str = "pretrain", p_two: float = 0.25,
                 size: int = IMAGE_SIZE) -> Sample:
    """A random captioned scene: one object, or two with probability ``p_two``."""
    n = 2 if rng.random() < p_two else 1
    objs = sample_objects(rng, n, style)
    r = render(objs, style, rng, size=size)
    caption = make_caption(objs, rng, style)
    return Sample(image=r.image, objects=objs, caption=caption, style=style, background=r.background,
                  n_distractors=r.n_distractors, masks=r.masks)


def generate(n: int, seed: int, style: str = "pretrain", p_two: float = 0.25,
             size: int = IMAGE_SIZE) -> list[Sample]:
    """``n`` captioned scenes; identical for identical arguments."""
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, style, p_two, size) for _ in range(n)]


# --------------------------------------------------------------------------------------
# classification task: 64 colour x shape classes
# --------------------------------------------------------------------------------------

def class_combos() -> list[tuple[str, str]]:
    """(colour, shape) per label id.

    Labels 0..31 are the "checkerboard" half (colour_idx + shape_idx even), 32..63 the
    other half, each ordered by (colour, shape).  With CoOp's base-to-new rule (sorted
    label ids, first half base) every colour and every shape occurs in both halves, so new
    classes are reachable only compositionally.
    """
    even = [(c, s) for ci, c in enumerate(COLOURS) for si, s in enumerate(SHAPES) if (ci + si) % 2 == 0]
    odd = [(c, s) for ci, c in enumerate(COLOURS) for si, s in enumerate(SHAPES) if (ci + si) % 2 == 1]
    return even + odd


CLASS_COMBOS: list[tuple[str, str]] = class_combos()


def class_names() -> list[str]:
    return [f"{c} {s}" for c, s in CLASS_COMBOS]


def base_new_split() -> tuple[list[int], list[int]]:
    n = len(CLASS_COMBOS)
    k = (n + 1) // 2
    return list(range(k)), list(range(k, n))


def sample_class_scene(label: int, rng: np.random.Generator, style: str = "downstream",
                       size: int = IMAGE_SIZE) -> Sample:
    """One image of class ``label``: a single main object (random size / fill / position)."""
    colour, shape = CLASS_COMBOS[label]
    fill = "outline" if style == "sketch" else FILLS[int(rng.integers(len(FILLS)))]
    obj = ObjectAttrs(shape=shape, colour=colour, size=SIZES[int(rng.integers(len(SIZES)))],
                      fill=fill, position=POSITIONS[int(rng.integers(len(POSITIONS)))])
    r = render([obj], style, rng, size=size)
    return Sample(image=r.image, objects=[obj], caption=make_caption([obj], rng, style), style=style,
                  background=r.background, n_distractors=r.n_distractors, label=label, masks=r.masks)


def _rng_for(seed: int, *keys: str | int) -> np.random.Generator:
    ints = [int(seed)] + [int(hashlib.sha256(str(k).encode()).hexdigest()[:8], 16) for k in keys]
    return np.random.default_rng(ints)


def generate_eval_samples(seed: int = 1234, n_per_class: int = 10, style: str = "downstream",
                          size: int = IMAGE_SIZE, labels: Sequence[int] | None = None) -> list[Sample]:
    """The scenes of :func:`generate_eval_set` as :class:`Sample` objects (with their masks).

    ``labels`` keeps only those classes; the others are still drawn, so every kept image is the
    same as in the full set."""
    rng = _rng_for(seed, "eval", style)
    keep = set(range(len(CLASS_COMBOS)) if labels is None else labels)
    out = []
    for label in range(len(CLASS_COMBOS)):
        for _ in range(n_per_class):
            sample = sample_class_scene(label, rng, style, size)
            if label in keep:
                out.append(sample)
    return out


def generate_eval_set(seed: int = 1234, n_per_class: int = 10, style: str = "downstream",
                      size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Fixed labelled evaluation images: ``(images uint8 (N, H, W, 3), labels int64 (N,))``.

    Class-major order (all images of label 0, then label 1, ...), one rng seeded with
    ``(seed, hash(style))`` drawing every image in that order.
    """
    samples = generate_eval_samples(seed, n_per_class, style, size)
    return np.stack([s.image for s in samples]), np.array([s.label for s in samples], dtype=np.int64)


# --------------------------------------------------------------------------------------
# on-disk splits
# --------------------------------------------------------------------------------------

_MANIFEST = "manifest.json"
_FORMAT_VERSION = 1


def _shift_fingerprint() -> str:
    return hashlib.sha256(json.dumps(DOWNSTREAM_SHIFT, sort_keys=True).encode()).hexdigest()[:12]


def build_shapeworld_splits(root: str | Path, style: str = "downstream", n_train_per_class: int = 16,
                            n_val_per_class: int = 4, n_test_per_class: int = 25, seed: int = 0,
                            size: int = IMAGE_SIZE):
    """Render the 64-class colour x shape task to PNGs under ``root/shapeworld/<style>/`` and
    return a :class:`pmpo.data.types.DatasetSplits`.

    Files: ``<split>/<label:02d>_<colour>_<shape>/<index:04d>.png`` and a ``manifest.json``
    recording the parameters; a second call with the same parameters re-uses the files.
    Each split draws from its own rng ``(seed, split, style)``.
    """
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}")
    counts = {"train": int(n_train_per_class), "val": int(n_val_per_class), "test": int(n_test_per_class)}
    out_dir = Path(root) / "shapeworld" / style
    params = {"format_version": _FORMAT_VERSION, "style": style, "seed": int(seed), "size": int(size),
              "counts": counts, "classnames": class_names(),
              "shift": _shift_fingerprint() if style == "downstream" else None}
    names = class_names()

    def rel(split: str, label: int, i: int) -> str:
        c, s = CLASS_COMBOS[label]
        return f"{split}/{label:02d}_{c}_{s}/{i:04d}.png"

    manifest_path = out_dir / _MANIFEST
    up_to_date = False
    if manifest_path.is_file():
        try:
            up_to_date = json.loads(manifest_path.read_text())["params"] == params
        except (ValueError, KeyError):
            up_to_date = False
    if up_to_date:
        up_to_date = all((out_dir / rel(sp, lab, i)).is_file()
                         for sp, n in counts.items() for lab in range(len(names)) for i in range(n))
    if not up_to_date:
        if manifest_path.exists():
            manifest_path.unlink()
        for split, n in counts.items():
            rng = _rng_for(seed, split, style)
            for label in range(len(names)):
                for i in range(n):
                    p = out_dir / rel(split, label, i)
                    p.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(sample_class_scene(label, rng, style, size).image, "RGB").save(p, optimize=False)
        out_dir.mkdir(parents=True, exist_ok=True)
        manifest_path.write_text(json.dumps({"params": params}, indent=1))

    splits = {sp: [Datum(path=str(out_dir / rel(sp, lab, i)), label=lab, classname=names[lab])
                   for lab in range(len(names)) for i in range(n)]
              for sp, n in counts.items()}
    return DatasetSplits(name=f"shapeworld_{style}", classnames=list(names), train=splits["train"],
                         val=splits["val"], test=splits["test"], templates=list(TEMPLATES))


# --------------------------------------------------------------------------------------
# zero-shot evaluation (plain open_clip encode_image / encode_text)
# --------------------------------------------------------------------------------------

def evaluate_zero_shot(model, preprocess, tokenizer, style: str = "downstream", seed: int = 1234,
                       n_per_class: int = 10, template: str = TEMPLATES[0], device="cpu",
                       batch_size: int = 256) -> dict[str, float]:
    """Zero-shot accuracy (%) of an open_clip model on ``generate_eval_set(seed, n_per_class, style)``.

    Images go through ``preprocess`` (the model's eval transform) as PIL images; class
    weights are ``encode_text(tokenizer([template.format(name) ...]))``.  Returns
    ``all`` (64-way), ``base`` / ``new`` (each among its own 32 classes, CoOp protocol) and
    ``hm`` (harmonic mean of base and new).
    """
    import torch

    images, labels = generate_eval_set(seed=seed, n_per_class=n_per_class, style=style)
    names = class_names()
    model.eval()
    with torch.no_grad():
        text = tokenizer([template.format(n) for n in names]).to(device)
        tf = model.encode_text(text, normalize=True).float()
        feats = []
        for i in range(0, len(images), batch_size):
            x = torch.stack([preprocess(Image.fromarray(a, "RGB")) for a in images[i:i + batch_size]]).to(device)
            feats.append(model.encode_image(x, normalize=True).float())
        imf = torch.cat(feats)
        logits = (imf @ tf.T).cpu()
    y = torch.from_numpy(labels)
    base, new = base_new_split()
    out = {"all": 100.0 * (logits.argmax(1) == y).float().mean().item()}
    for name, ids in (("base", base), ("new", new)):
        ids_t = torch.tensor(ids)
        sel = torch.isin(y, ids_t)
        sub = logits[sel][:, ids_t]
        target = y[sel] - ids[0]  # ids are contiguous
        out[name] = 100.0 * (sub.argmax(1) == target).float().mean().item()
    b, n = out["base"], out["new"]
    out["hm"] = 2 * b * n / (b + n) if b + n > 0 else 0.0
    return out
