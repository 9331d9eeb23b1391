"""Ground-truth masks of ShapeWorld scenes, and attention scored against them (issue: attention truth)."""

from __future__ import annotations

import numpy as np
import pytest

from pmpo.analysis.attention_truth import DISTRACTOR, REST, TARGET, patch_labels, score_map
from pmpo.data import shapeworld as sw


@pytest.mark.parametrize("style", sw.STYLES)
def test_masks_agree_with_the_rendered_pixels(style):
    rng = np.random.default_rng(7)
    palette = np.array([sw.COLOUR_RGB[c] for c in sw.COLOURS], dtype=float)
    for i in range(24):
        obj = sw.ObjectAttrs(sw.SHAPES[i % 8], sw.COLOURS[(i * 3) % 8], size="large", fill="solid",
                             position=sw.POSITIONS[i % 5])
        r = sw.render([obj], style, rng)
        target = r.masks.target
        pixels = r.image.astype(float)
        drawn = target if style != "sketch" else target & (np.abs(pixels - pixels[~target].mean((0))).sum(-1) > 60)
        median = np.median(pixels[drawn], axis=0)  # noise, jitter and contrast aside: the object's colour
        assert np.abs(palette - median).sum(-1).argmin() == sw.COLOURS.index(obj.colour), (style, obj, median)
        # ...and its region is where the object is: the mask is the polygon, inside the image.
        assert 0 < target.mean() < 0.5
        assert not (r.masks.distractor & target).any()  # objects are drawn over distractors
        assert len(r.masks.distractors) == r.n_distractors
    s = sw.sample_class_scene(5, rng, "downstream")
    assert s.masks is not None and s.masks.target.shape == s.image.shape[:2]


def test_masks_do_not_change_the_images():
    """Computing masks draws no random numbers: the same seeds give today's images."""
    a = sw.generate_eval_set(seed=3, n_per_class=1)[0]
    rng = sw._rng_for(3, "eval", "downstream")
    b = np.stack([sw.sample_class_scene(label, rng).image for label in range(64)])
    assert np.array_equal(a, b)
    assert np.array_equal(sw.render_scene([sw.ObjectAttrs("star", "red")], "downstream", np.random.default_rng(1)),
                          sw.render([sw.ObjectAttrs("star", "red")], "downstream", np.random.default_rng(1)).image)


def test_scores_are_exact_on_synthetic_maps():
    target = np.zeros((64, 64), bool)
    target[8:24, 8:24] = True  # patches (1..2, 1..2) of an 8x8 grid of 8-px patches
    distractor = np.zeros_like(target)
    distractor[40:44, 40:44] = True
    labels = patch_labels(target, distractor, (8, 8))
    assert (labels.labels == TARGET).sum() == 4 and (labels.labels == DISTRACTOR).sum() == 1
    on_target = (labels.labels == TARGET).astype(float)
    s = score_map(on_target, labels)
    assert s.target == 1.0 and s.pointing == 1.0 and s.distractors == s.rest == s.prompts == 0.0
    uniform = score_map(np.ones((8, 8)), labels)
    assert uniform.target == pytest.approx(4 / 64) == pytest.approx(uniform.chance)
    mixed = score_map(np.random.default_rng(0).random((8, 8)), labels, prompt_attention=0.3)
    parts = (mixed.target, mixed.distractors, mixed.rest, mixed.prompts)
    assert all(0.0 <= p <= 1.0 for p in parts) and sum(parts) == pytest.approx(1.0)
    off = np.zeros((8, 8))
    off[7, 7] = 1.0
    assert score_map(off, labels).pointing == 0.0 and (labels.labels[7, 7] == REST)
    with pytest.raises(ValueError, match="grid"):
        patch_labels(target[:60], distractor[:60], (8, 8))
