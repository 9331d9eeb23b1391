"""Drawing ShapeWorld scenes: shape geometry, fills, backgrounds per style, and the render with
its ground-truth masks (:mod:`pmpo.data.shapeworld`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from pmpo.data.shapeworld_world import (
    _POS_XY,
    _RADIUS,
    COLOUR_RGB,
    DOWNSTREAM_SHIFT,
    IMAGE_SIZE,
    SHAPES,
    STYLES,
    ObjectAttrs,
    SceneMasks,
)

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
