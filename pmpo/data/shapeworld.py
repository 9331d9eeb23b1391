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
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from pmpo.data.types import DatasetSplits, Datum

__all__ = [
    "SHAPES", "COLOURS", "COLOUR_RGB", "SIZES", "FILLS", "POSITIONS", "STYLES",
    "IMAGE_SIZE", "ObjectAttrs", "Render", "Sample", "SceneMasks", "render", "render_scene", "sample_objects",
    "sample_scene", "make_caption", "generate", "class_combos", "class_names",
    "CLASS_COMBOS", "base_new_split", "sample_class_scene", "generate_eval_samples", "generate_eval_set",
    "build_shapeworld_splits", "TEMPLATES", "DOWNSTREAM_SHIFT",
]

IMAGE_SIZE = 64

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "cross", "diamond", "heart")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "pink")
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 75, 220),
    "yellow": (240, 215, 30),
    "purple": (135, 50, 185),
    "orange": (250, 130, 20),
    "cyan": (30, 205, 215),
    "pink": (250, 120, 195),
}
SIZES: tuple[str, ...] = ("small", "large")
FILLS: tuple[str, ...] = ("solid", "striped", "outline", "dotted")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
STYLES: tuple[str, ...] = ("pretrain", "downstream", "sketch")

TEMPLATES: list[str] = ["a photo of a {}."]

# Words used in captions (the test suite parses captions with these tables).
FILL_WORD = {"solid": "solid", "striped": "striped", "outline": "outlined", "dotted": "dotted"}
POSITION_PHRASE = {
    "left": "on the left", "right": "on the right", "top": "at the top",
    "bottom": "at the bottom", "center": "in the center",
}
_POS_XY = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25),
           "bottom": (0.5, 0.75), "center": (0.5, 0.5)}
# Radius as a fraction of the image side.
_RADIUS = {"small": (0.10, 0.13), "large": (0.19, 0.23)}
# Pairs of positions used by two-object scenes (objects never overlap).
_PAIRS = (("left", "right"), ("top", "bottom"))

# Knobs of the "downstream" rendering shift.  Tuned for the shipped checkpoint on a separate
# validation draw (generate_eval_set(seed=999, n_per_class=6)), never on the test split of
# build_shapeworld_splits nor on the reported seed-1234 set.  The stronger first setting
# (p_textured_bg 0.7, bg_saturation 0.75, up to 4 distractors, noise 14, rotation 30,
# colour jitter 35) pushed the small model close to colour-only guessing.  The 12-layer model
# (docs/SHAPEWORLD.md, "Swapped names, marker words and a context ceiling") is pretrained and
# checked under a milder geometry (rotation 20 -> 8 degrees, position jitter 0.10 -> 0.04): with
# the old geometry a supervised 2-layer ViT fed 154 k labelled downstream renders stayed at
# chance on shape (tools/shape_legibility.py; backgrounds, distractors and noise are not what
# hides it).  Measured on fresh renders, never on a test split.
DOWNSTREAM_SHIFT: dict[str, float] = {
    "p_textured_bg": 0.4,       # else a plain random colour
    "bg_saturation": 0.4,       # max saturation of background colours (0..1)
    "n_distractors_max": 2,     # grey distractor shapes (0..max)
    "rotation_deg": 8.0,        # +- rotation of the main object
    "pos_jitter": 0.04,         # +- fraction of side
    "size_jitter": 0.25,        # relative radius jitter
    "colour_jitter": 20.0,      # +- per channel on the object colour
    "noise_sigma": 8.0,         # gaussian pixel noise (max, uniform in [0.3, 1] x)
    "contrast_min": 0.65,       # global contrast in [contrast_min, 1]
}


@dataclass(frozen=True)
class ObjectAttrs:
    shape: str
    colour: str
    size: str = "large"
    fill: str = "solid"
    position: str = "center"

    def __post_init__(self):
        for value, allowed, name in ((self.shape, SHAPES, "shape"), (self.colour, COLOURS, "colour"),
                                     (self.size, SIZES, "size"), (self.fill, FILLS, "fill"),
                                     (self.position, POSITIONS, "position")):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")

    @property
    def classname(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Sample:
    image: np.ndarray                      # (H, W, 3) uint8
    objects: list[ObjectAttrs]             # main objects (the caption mentions all of them)
    caption: str
    style: str = "pretrain"
    background: str = "plain"
    n_distractors: int = 0                 # grey distractors (never in the caption)
    label: int | None = None               # class id for classification samples
    masks: "SceneMasks | None" = None      # where each object and distractor is (ground truth)

    def pil(self) -> Image.Image:
        return Image.fromarray(self.image, "RGB")


# --------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------

def _unit_polygon(shape: str) -> np.ndarray:
    """Polygon vertices for a shape of radius ~1 centred at the origin (y points down)."""
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, 28, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], 1)
    if shape == "square":
        a = 0.8
        return np.array([[-a, -a], [a, -a], [a, a], [-a, a]])
    if shape == "triangle":
        t = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        p = np.stack([np.cos(t), np.sin(t)], 1)
        p[:, 1] += 0.2
        return p * 1.05
    if shape == "star":
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.05, 0.45)
        return np.stack([r * np.cos(t), r * np.sin(t) + 0.05], 1)
    if shape == "hexagon":
        t = np.arange(6) * np.pi / 3
        return np.stack([np.cos(t), np.sin(t)], 1) * 0.95
    if shape == "cross":
        a, b = 0.3, 0.9
        return np.array([[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a], [a, b], [-a, b],
                         [-a, a], [-b, a], [-b, -a], [-a, -a]])
    if shape == "diamond":
        return np.array([[0, -1.0], [0.6, 0], [0, 1.0], [-0.6, 0]])
    if shape == "heart":
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return np.stack([x, y + 2.5], 1) / 16.0
    raise ValueError(f"unknown shape {shape!r}")


_UNIT = {s: _unit_polygon(s) for s in SHAPES}


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float = 0.0) -> np.ndarray:
    p = _UNIT[shape]
    if rot:
        c, s = math.cos(rot), math.sin(rot)
        p = p @ np.array([[c, s], [-s, c]])
    return p * r + np.array([cx, cy])


def _fill_mask(poly: np.ndarray, size: int) -> np.ndarray:
    im = Image.new("L", (size, size), 0)
    ImageDraw.Draw(im).polygon([tuple(v) for v in poly.tolist()], fill=255)
    return np.asarray(im) > 0


def _line_mask(poly: np.ndarray, size: int, width: int) -> np.ndarray:
    im = Image.new("L", (size, size), 0)
    pts = [tuple(v) for v in poly.tolist()]
    ImageDraw.Draw(im).line(pts + [pts[0]], fill=255, width=width, joint="curve")
    return np.asarray(im) > 0


def _erode(m: np.ndarray, k: int) -> np.ndarray:
    for _ in range(k):
        e = m.copy()
        e[1:] &= m[:-1]
        e[:-1] &= m[1:]
        e[:, 1:] &= m[:, :-1]
        e[:, :-1] &= m[:, 1:]
        e[0, :] = e[-1, :] = False
        e[:, 0] = e[:, -1] = False
        m = e
    return m


_GRID_CACHE: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    if size not in _GRID_CACHE:
        yy, xx = np.mgrid[0:size, 0:size]
        _GRID_CACHE[size] = (yy, xx)
    return _GRID_CACHE[size]


def _apply_fill(mask: np.ndarray, fill: str, rng: np.random.Generator, size: int) -> np.ndarray:
    if fill == "solid" or not mask.any():
        return mask
    ring = mask & ~_erode(mask, 2 if size >= 48 else 1)
    if fill == "outline":
        return ring
    yy, xx = _grid(size)
    if fill == "striped":
        period = int(rng.integers(4, 6))
        orient = int(rng.integers(3))
        coord = (yy, xx, xx + yy)[orient]
        pattern = (coord % period) < (period // 2)
    else:  # dotted
        period = 4
        oy, ox = rng.integers(0, period, size=2)
        pattern = (((yy + oy) % period) < 2) & (((xx + ox) % period) < 2)
    return ring | (mask & pattern)


# --------------------------------------------------------------------------------------
# backgrounds
# --------------------------------------------------------------------------------------

def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array([r, g, b]) * 255.0


def _neutral(rng: np.random.Generator) -> np.ndarray:
    g = rng.uniform(20, 245)
    return np.clip(g + rng.uniform(-12, 12, 3), 0, 255)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int = 3) -> np.ndarray:
    low = rng.random((cells, cells, channels), dtype=np.float32)
    im = Image.fromarray((low * 255).astype(np.uint8).squeeze(), "RGB" if channels == 3 else "L")
    return np.asarray(im.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0


def _background(style: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    yy, xx = _grid(size)
    if style == "pretrain":
        kind = ("plain", "gradient", "noise")[int(rng.choice(3, p=[0.5, 0.3, 0.2]))]
        c1 = _neutral(rng)
        if kind == "plain":
            bg = np.broadcast_to(c1, (size, size, 3)).astype(np.float32)
        elif kind == "gradient":
            c2 = _neutral(rng)
            t = ((xx, yy)[int(rng.integers(2))] / (size - 1)).astype(np.float32)[..., None]
            bg = c1 * (1 - t) + c2 * t
        else:
            bg = np.broadcast_to(c1, (size, size, 3)) + rng.normal(0, 10, (size, size, 3))
        return bg.astype(np.float32), kind
    if style == "sketch":
        paper = rng.uniform(225, 255) + rng.uniform(-6, 6, 3)
        if rng.random() < 0.5:
            return np.broadcast_to(paper, (size, size, 3)).astype(np.float32), "white"
        bg = paper + rng.normal(0, 6, (size, size, 1)) + 12 * (_smooth_noise(rng, size, 6, 1)[..., None] - 0.5)
        return bg.astype(np.float32), "paper"
    # downstream: saturated colours, textures
    sh = DOWNSTREAM_SHIFT

    def rand_colour():
        return _hsv_to_rgb(rng.random(), rng.uniform(0, sh["bg_saturation"]), rng.uniform(0.2, 1.0))

    if rng.random() >= sh["p_textured_bg"]:
        return np.broadcast_to(rand_colour(), (size, size, 3)).astype(np.float32), "plain"
    kind = ("gradient", "checker", "stripes", "blobs", "noise")[int(rng.integers(5))]
    c1, c2 = rand_colour(), rand_colour()
    if kind == "gradient":
        t = ((xx + yy) / (2 * size - 2) if rng.random() < 0.5 else yy / (size - 1)).astype(np.float32)[..., None]
        bg = c1 * (1 - t) + c2 * t
    elif kind == "checker":
        p = int(rng.integers(4, 12))
        t = (((xx // p) + (yy // p)) % 2).astype(np.float32)[..., None]
        bg = c1 * (1 - t) + c2 * t
    elif kind == "stripes":
        p = int(rng.integers(3, 10))
        coord = (xx, yy, xx + yy, xx - yy + size)[int(rng.integers(4))]
        t = ((coord // p) % 2).astype(np.float32)[..., None]
        bg = c1 * (1 - t) + c2 * t
    elif kind == "blobs":
        bg = _smooth_noise(rng, size, int(rng.integers(3, 8))) * 255.0
        bg = 0.5 * bg + 0.5 * c1
    else:
        bg = c1 + rng.normal(0, 35, (size, size, 3))
    return bg.astype(np.float32), kind


# --------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------

def _object_colour(colour: str, rng: np.random.Generator, jitter: float) -> np.ndarray:
    base = np.array(COLOUR_RGB[colour], dtype=np.float32)
    if jitter:
        base = base + rng.uniform(-jitter, jitter, 3) + rng.uniform(-jitter, jitter) * 0.5
    return np.clip(base, 0, 255)


@dataclass
class SceneMasks:
    """Pixel masks (H, W) bool of a rendered scene, the ground truth of where things are.

    ``objects[i]`` is the region of main object i (its whole polygon, whatever its fill: a striped
    circle occupies its disc); ``distractors[j]`` the visible part of grey distractor j (objects are
    drawn over distractors)."""

    objects: list[np.ndarray]
    distractors: list[np.ndarray]

    @property
    def target(self) -> np.ndarray:
        """Union of the main objects (the one object of a classification scene)."""
        out = np.zeros_like(self.objects[0]) if self.objects else np.zeros((0, 0), bool)
        for m in self.objects:
            out = out | m
        return out

    @property
    def distractor(self) -> np.ndarray:
        out = np.zeros_like(self.target)
        for m in self.distractors:
            out = out | m
        return out


@dataclass
class Render:
    image: np.ndarray
    background: str
    n_distractors: int
    masks: SceneMasks


def render_scene(objects: Sequence[ObjectAttrs], style: str = "pretrain",
                 rng: np.random.Generator | None = None, size: int = IMAGE_SIZE,
                 n_distractors: int | None = None, return_background: bool = False):
    """Render ``objects`` in ``style`` and return an (H, W, 3) uint8 array.

    ``n_distractors`` (downstream style only) adds that many small grey shapes that the
    caption never mentions; ``None`` draws a random number.  With ``return_background``
    the background kind is returned too: ``(image, background_kind, n_distractors)``.
    :func:`render` gives the same image with its masks.
    """
    r = render(objects, style, rng, size, n_distractors)
    if return_background:
        return r.image, r.background, r.n_distractors
    return r.image


def render(objects: Sequence[ObjectAttrs], style: str = "pretrain", rng: np.random.Generator | None = None,
           size: int = IMAGE_SIZE, n_distractors: int | None = None) -> Render:
    """The scene of :func:`render_scene` and its :class:`SceneMasks` (the masks draw no random
    numbers, so images are identical to render_scene's for the same rng state)."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")
    rng = rng if rng is not None else np.random.default_rng()
    img, bg_kind = _background(style, rng, size)
    img = np.array(img, dtype=np.float32, copy=True)
    sh = DOWNSTREAM_SHIFT
    downstream = style == "downstream"

    n_dis = 0
    object_masks: list[np.ndarray] = []
    distractor_masks: list[np.ndarray] = []
    if downstream:
        n_dis = int(rng.integers(0, int(sh["n_distractors_max"]) + 1)) if n_distractors is None else n_distractors
        occupied = [(_POS_XY[o.position][0] * size, _POS_XY[o.position][1] * size) for o in objects]
        for _ in range(n_dis):
            for _try in range(6):
                cx, cy = rng.uniform(0.08, 0.92, 2) * size
                if all((cx - ox) ** 2 + (cy - oy) ** 2 > (0.22 * size) ** 2 for ox, oy in occupied):
                    break
            r = rng.uniform(0.06, 0.10) * size
            poly = _polygon(SHAPES[int(rng.integers(len(SHAPES)))], cx, cy, r, rng.uniform(0, 2 * np.pi))
            m = _fill_mask(poly, size)
            g = rng.uniform(60, 200)
            img[m] = g + rng.uniform(-6, 6, 3)
            distractor_masks = [d & ~m for d in distractor_masks] + [m]  # later ones cover earlier ones

    for o in objects:
        fx, fy = _POS_XY[o.position]
        lo, hi = _RADIUS[o.size]
        r = rng.uniform(lo, hi) * size
        if style == "pretrain":
            jit, rot, cj = 0.04, rng.uniform(-0.15, 0.15), 12.0
        elif downstream:
            jit, rot, cj = sh["pos_jitter"], math.radians(rng.uniform(-sh["rotation_deg"], sh["rotation_deg"])), sh["colour_jitter"]
            r *= 1 + rng.uniform(-sh["size_jitter"], sh["size_jitter"]) * 0.5
        else:  # sketch
            jit, rot, cj = 0.05, rng.uniform(-0.3, 0.3), 15.0
        cx = (fx + rng.uniform(-jit, jit)) * size
        cy = (fy + rng.uniform(-jit, jit)) * size
        poly = _polygon(o.shape, cx, cy, r, rot)
        col = _object_colour(o.colour, rng, cj)
        if style == "sketch":
            poly = poly + rng.normal(0, 0.035 * r, poly.shape)
            m = _line_mask(poly, size, int(rng.integers(1, 3)))
            region = _fill_mask(poly, size) | m
        else:
            region = _fill_mask(poly, size)
            m = _apply_fill(region, o.fill, rng, size)
        img[m] = col
        object_masks.append(region)
        distractor_masks = [d & ~region for d in distractor_masks]

    if style == "pretrain":
        if rng.random() < 0.3:
            img += rng.normal(0, rng.uniform(2, 8), img.shape)
    elif downstream:
        c = rng.uniform(sh["contrast_min"], 1.0)
        img = (img - 128.0) * c + 128.0 + rng.uniform(-20, 20)
        img += rng.normal(0, sh["noise_sigma"] * rng.uniform(0.3, 1.0), img.shape)
    else:
        img += rng.normal(0, 3, img.shape)
    out = np.clip(img, 0, 255).astype(np.uint8)
    return Render(out, bg_kind, n_dis, SceneMasks(object_masks, distractor_masks))


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
