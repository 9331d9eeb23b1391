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
        drawn = target if style != "sketch" else target & (np.abs(pixels - pixels[~target].mean(0)).sum(-1) > 60)
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
    with pytest.raises(ValueError, match="differ"):
        patch_labels(target, distractor[:60], (8, 8))
    odd = patch_labels(target, distractor, (14, 14))  # ViT-B/16's grid on a 64-px scene
    assert odd.labels.shape == (14, 14) and 0 < odd.chance < 0.2


def test_model_attention_is_scored_per_layer_and_pass(tiny_model, tmp_path):
    from pmpo import PMPOConfig, build_model, load_backbone
    from pmpo.analysis.attention_truth import attention_scores, summarise
    from pmpo.cli import main

    backbone = load_backbone(tiny_model)
    model = build_model(PMPOConfig(method="pmpo", model=backbone.model_name, pretrained="none",
                                   visual_pass="per_prompt"), backbone=backbone)
    samples = sw.generate_eval_samples(5, 1, "downstream", labels=[0, 9, 40])
    rows = attention_scores(model, samples, batch_size=2)
    layers = model.vision.n_layers
    passes = 1 + model.prompts.n_prompts  # zero-shot + one pass per prompt
    assert len(rows) == 3 * (layers + 2) * passes  # per layer, rollout, patch-text
    for r in rows:
        parts = r["target"] + r["distractors"] + r["rest"] + r["prompts"]
        assert parts == pytest.approx(1.0) and all(0 <= r[k] <= 1 for k in ("target", "pointing", "chance"))
        if r["pass"].startswith("zero-shot"):
            assert r["prompts"] == 0.0
    prompted = [r for r in rows if r["pass"] == "prompt 1 pass" and r["layer"] == 0 and r["kind"] == "attention"]
    assert all(r["prompts"] > 0 for r in prompted) and prompted[0]["prompts_in_layer"] == "1"
    rollout = [r for r in rows if r["kind"] == "rollout" and r["pass"] == "prompt 1 pass"]
    assert all(r["prompts"] > 0 for r in rollout)  # prompt tokens are sources of the rollout
    assert all(r["prompts"] == 0 for r in rows if r["kind"] == "patch-text")
    assert len(summarise(rows)) == (layers + 2) * passes
    from pmpo.analysis.attention_truth import segment_summary

    assert len(segment_summary(rows, model.prompts.segments)) == passes * len(model.prompts.segments)

    coop = build_model(PMPOConfig(method="coop", model=backbone.model_name, pretrained="none"), backbone=backbone)
    assert {r["pass"] for r in attention_scores(coop, samples[:1])} == {"zero-shot (no prompts)", "prompted (text only)"}

    out = tmp_path / "truth"
    assert main(["analyze", "attention_truth", "--model", tiny_model, "--pretrained", "none", "--device", "cpu",
                 "--method", "maple", "--per-class", "1", "--max-classes", "4", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= {"attention_truth.csv", "attention_truth_per_image.csv",
                                                 "attention_truth_segments.csv", "attention_truth.png",
                                                 "attention_truth.pdf"}
