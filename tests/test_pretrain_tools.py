"""The offline model's pretraining tool: growing a trained shallow CLIP deeper is exact, and the
attribute targets the auxiliary heads learn from match the rendered scenes."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tool():
    """The package behind tools/pretrain_shapeworld.py (tools/pretraining), imported as the launcher does."""
    if str(REPO / "tools") not in sys.path:
        sys.path.insert(0, str(REPO / "tools"))
    import pretraining

    return pretraining


def test_launcher_runs_the_package(tool):
    """tools/pretrain_shapeworld.py, the documented command, is a thin launcher of the package's main."""
    launcher = _load_tool("pretrain_shapeworld")
    assert launcher.main is tool.main is tool.cli.main


def _cfg(vision_layers: int, text_layers: int) -> dict:
    return {"embed_dim": 32, "quick_gelu": False,
            "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": vision_layers, "head_width": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": text_layers}}


def test_grow_keeps_every_output_and_adds_identity_blocks(tool):
    import open_clip

    torch.manual_seed(0)
    shallow = tool.build_model(_cfg(2, 3))
    with torch.no_grad():  # make the shallow blocks non-trivial, as after training
        for p in shallow.parameters():
            p.add_(0.05 * torch.randn_like(p))
    deep = tool.grow(shallow, _cfg(12, 9))
    assert len(deep.visual.transformer.resblocks) == 12 and len(deep.transformer.resblocks) == 9
    shallow.eval(), deep.eval()
    images = torch.randn(3, 3, 32, 32)
    text = open_clip.tokenize(["a red circle", "a photo of a blue star."])
    with torch.no_grad():
        assert torch.allclose(shallow.encode_image(images), deep.encode_image(images), atol=1e-5)
        assert torch.allclose(shallow.encode_text(text), deep.encode_text(text), atol=1e-5)
    # First and last shallow blocks sit at the ends; an added block is the identity.
    assert torch.equal(deep.visual.transformer.resblocks[11].attn.in_proj_weight,
                       shallow.visual.transformer.resblocks[1].attn.in_proj_weight)
    added = deep.visual.transformer.resblocks[5]
    assert not added.attn.out_proj.weight.any() and not added.mlp.c_proj.weight.any()
    with pytest.raises(ValueError, match="only depth"):
        tool.grow(shallow, {**_cfg(12, 9), "vision_cfg": {**_cfg(12, 9)["vision_cfg"], "width": 64}})



def test_stage_folder_ships_fp16_weights_and_leaves_the_training_model_fp32(tool, tmp_path):
    """A stage folder is what ships: fp16 weights, a config file ending in a newline, and an open_clip
    ``local-dir:`` model that loads back to the same outputs; the model still training stays fp32."""
    import open_clip
    from safetensors import safe_open

    torch.manual_seed(0)
    cfg = _cfg(2, 2)
    model = tool.build_model(cfg)
    tool.save_folder(model, tmp_path, cfg)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with safe_open(str(tmp_path / "open_clip_model.safetensors"), framework="pt") as fh:
        dtypes = {fh.get_tensor(k).dtype for k in fh.keys()}
    assert torch.float16 in dtypes and torch.float32 not in dtypes
    assert (tmp_path / tool.folder.CONFIG_FILE).read_text().endswith("}\n")
    loaded = open_clip.create_model(f"local-dir:{tmp_path}").eval()
    model.eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model.half().float().encode_image(images)
        assert torch.allclose(loaded.encode_image(images), want, atol=1e-5)

def test_attribute_targets_follow_the_scene(tool):
    from pmpo.data import shapeworld as sw

    rng = np.random.default_rng(0)
    one = sw.sample_scene(rng, p_two=0.0)
    two = sw.sample_scene(rng, p_two=1.0)
    targets = tool.attribute_targets([one, two])
    o = one.objects[0]
    assert targets[0].tolist() == [sw.SHAPES.index(o.shape), sw.COLOURS.index(o.colour), sw.FILLS.index(o.fill),
                                   sw.SIZES.index(o.size), sw.POSITIONS.index(o.position)]
    assert targets[1].tolist() == [-1] * 5  # two objects: no single answer, ignored by the heads


def test_uncaptioned_scenes_get_their_own_heads(tool):

    mean, std = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    x, captions, targets, text_only, _ = tool.make_batch(0, 0, 8, 0.0, mean, std, n_uncaptioned=4)
    assert text_only == []
    assert x.shape[0] == 12 and len(captions) == 8 and targets.shape == (12, 5)
    heads = tool.AttributeHeads(16, separate_uncaptioned=True)
    feats = torch.randn(12, 16, requires_grad=True)
    loss, accs = heads.loss(feats, targets, n_captioned=8)
    loss.backward()
    assert torch.isfinite(loss) and {"shape", "ds_shape"} <= set(accs)
    assert heads.uncaptioned["shape"].weight.grad is not None and heads.heads["shape"].weight.grad is not None
    shared = tool.AttributeHeads(16)
    _, accs = shared.loss(feats.detach(), targets, n_captioned=8)
    assert "ds_shape" in accs and shared.uncaptioned is None


def test_hidden_shape_words_leave_every_other_attribute(tool):
    from pmpo.data import shapeworld as sw

    rng = np.random.default_rng(3)
    hidden = kept = 0
    for _ in range(200):
        s = sw.sample_scene(rng, p_two=0.5)
        out = tool.hide_shape_words(s.caption, s.objects, rng, 0.25)
        assert all(o.colour in out for o in s.objects)  # only the shape word ever goes
        if out == s.caption:
            kept += 1
        else:
            hidden += 1
            assert not any(re.search(rf"\b{o.shape}\b", out) for o in s.objects) and "shape" in out
    assert 20 < kept < 90 and hidden > 110  # about a quarter keep it
    assert tool.hide_shape_words("a red circle.", [sw.ObjectAttrs("circle", "red")], rng, 1.0) == "a red circle."


def test_card_commands_name_every_non_default_data_option(tool):
    """The model card's regenerate commands must carry a stage's data and loss options, or the
    documented command trains a different model."""
    shift = dict(tool.DEFAULT_SHIFT, rotation_deg=tool.DEFAULT_SHIFT["rotation_deg"] + 1.5)
    stage = {"n_uncaptioned": 64, "separate_heads": True, "uncaptioned_weight": 3.0, "p_shape_word": 0.06,
             "shift": shift}
    args = tool.data_args(stage).split()
    assert args[:6] == ["--n-uncaptioned", "64", "--separate-heads", "--uncaptioned-weight", "3", "--p-shape-word"]
    assert args[6] == "0.06"
    assert args[7:] == ["--shift", f"rotation_deg={shift['rotation_deg']:g}"]  # unchanged knobs are not repeated
    assert tool.data_args({"n_uncaptioned": 0, "p_shape_word": 1.0, "shift": dict(tool.DEFAULT_SHIFT)}) == ""


def test_text_only_captions_name_every_attribute_and_leave_the_image_stream_alone(tool):
    """The text-side heads' captions are drawn after everything else, so a run without them
    renders bit-identical batches; each names its object's shape even when the paired captions hide it."""
    from pmpo.data import shapeworld as sw

    mean, std = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    x0, caps0, t0, _, _ = tool.make_batch(3, 5, 8, 0.0, mean, std, n_uncaptioned=2, p_shape_word=0.0)
    x1, caps1, t1, text_only, text_targets = tool.make_batch(3, 5, 8, 0.0, mean, std, n_uncaptioned=2,
                                                             p_shape_word=0.0, n_text_only=6)
    assert torch.equal(x0, x1) and caps0 == caps1 and torch.equal(t0, t1)
    assert not any(s in c.split() for c in caps1 for s in sw.SHAPES)  # paired captions: shape hidden
    assert len(text_only) == 6 and text_targets.shape == (6, 5)
    for caption, row in zip(text_only, text_targets.tolist()):
        assert sw.SHAPES[row[0]] in caption and sw.COLOURS[row[1]] in caption


def test_confused_words_swap_within_pairs_and_domain_captions_stay_exact(tool):
    """--p-confuse 1 writes every pairable shape word as its mate's; the downstream scenes' own
    captions (--ds-caption-prefix) join the contrastive batch and name their true shape."""
    from pmpo.data import shapeworld as sw

    mean, std = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    _, plain, _, _, _ = tool.make_batch(2, 1, 8, 0.0, mean, std)
    x, caps, targets, _, _ = tool.make_batch(2, 1, 8, 0.0, mean, std, n_uncaptioned=3, p_confuse=1.0,
                                             ds_prefix="a cluttered photo of a")
    assert x.shape[0] == 11 and len(caps) == 11 and targets.shape == (11, 5)
    for before, after, row in zip(plain, caps[:8], targets[:8].tolist()):
        shape = sw.SHAPES[row[0]]
        assert after == before.replace(shape, tool.captions._MATE[shape], 1)
    for caption, row in zip(caps[8:], targets[8:].tolist()):
        assert caption.startswith("a cluttered photo of a") and sw.SHAPES[row[0]] in caption
        assert tool.captions._MATE[sw.SHAPES[row[0]]] not in caption
    assert sorted(tool.captions._MATE) == sorted(sw.SHAPES) and all(tool.captions._MATE[tool.captions._MATE[s]] == s for s in sw.SHAPES)


@pytest.fixture(scope="module")
def recipe_tool():
    return _load_tool("shapeworld_recipe")


def test_recipe_check_refuses_a_shift_without_its_own_root(recipe_tool, capsys):
    """A changed DOWNSTREAM_SHIFT renders other images: cached ones under the default root would be
    silently reused, so the tool asks for a fresh root, and names the valid knobs on a typo."""
    from pmpo.data import shapeworld as sw

    before = dict(sw.DOWNSTREAM_SHIFT)
    assert recipe_tool.main(["--shift", "rotation_deg=8"]) == 1
    assert "give a fresh --root" in capsys.readouterr().err
    assert recipe_tool.main(["--shift", "rotation=8", "--root", "/nonexistent"]) == 1
    err = capsys.readouterr().err
    assert "unknown key 'rotation'" in err and "rotation_deg" in err
    assert before == sw.DOWNSTREAM_SHIFT


def test_context_leverage_measures_how_much_a_context_moves_the_class_features(tool):
    import open_clip

    torch.manual_seed(0)
    model = open_clip.model.CLIP(**_cfg(2, 2)).eval()
    text = open_clip.tokenize(["a photo of a red circle.", "a photo of a blue star."])
    with torch.no_grad():
        same = tool.encode_text_truncated(model, text, model.token_embedding(text))
        assert torch.allclose(same, tool.encode_text_truncated(model, text), atol=1e-6)
    assert tool.context_leverage(model, text, n_ctx=0) == pytest.approx(1.0, abs=1e-6)  # nothing moved
    assert tool.context_leverage(model, text) < 0.999  # an untrained tower reads its context positions


def test_coop_ceiling_starts_at_zero_shot_and_fits_what_a_context_can_fit(tool):
    """With no steps the ceiling is the plain "a photo of a {}." zero-shot accuracy (the context is
    spliced in exactly); with steps it fits separable features at least as well, and the towers'
    weights and grad flags come back untouched."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.model.CLIP(**_cfg(2, 2)).eval()
    text = open_clip.tokenize([f"a photo of a {n}." for n in ("red circle", "blue star", "green cross")])
    with torch.no_grad():
        tf = torch.nn.functional.normalize(model.encode_text(text).float(), dim=-1)
    # image features near the class weights of a random permutation: zero-shot is poor, a context can help
    gen = torch.Generator().manual_seed(1)
    y = np.repeat(np.array([3, 5, 9]), 20)
    perm = torch.tensor([1, 2, 0]).repeat_interleave(20)
    f = torch.nn.functional.normalize(tf[perm] + 0.05 * torch.randn(60, tf.shape[1], generator=gen), dim=-1)
    zs = 100.0 * float((np.array([3, 5, 9])[(f @ tf.T).argmax(1).numpy()] == y).mean())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert tool.coop_ceiling(model, text, f, y, f, y, steps=0) == pytest.approx(zs)
    fitted = tool.coop_ceiling(model, text, f, y, f, y, steps=200, lr=0.05)
    assert fitted > zs + 30
    # KgCoOp's consistency term at a huge weight holds the class weights at the prior: no gain
    held = tool.coop_ceiling(model, text, f, y, f, y, steps=200, lr=0.05, consistency=1e4)
    assert held < fitted and held <= zs + 100 / 3
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.requires_grad for p in model.parameters())


def test_marker_captions_are_exact_and_the_others_keep_their_confused_words(tool):
    """--p-marker 1 with --p-confuse 1: every single-object scene gets a marked caption with its own
    shape word; with no markers every shape word is its pair mate's."""
    from pmpo.data import shapeworld as sw

    mean, std = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    for p_marker in (1.0, 0.0):
        _, caps, targets, _, _ = tool.make_batch(5, 3, 12, 0.0, mean, std, p_confuse=1.0, p_marker=p_marker)
        for caption, t in zip(caps, targets):
            shape = sw.SHAPES[int(t[0])]
            words = caption.replace(".", " ").split()
            if p_marker:
                assert words[1] in tool.MARKERS and words[2] == "photo" and shape in words
            else:
                assert not set(words) & set(tool.MARKERS) and tool.captions._MATE[shape] in words


def test_background_words_describe_the_rendered_scene(tool):
    """--p-describe-bg 1 captions every single-object pretraining scene with its own background kind,
    and a '{bg}' domain prefix names each downstream scene's background."""
    mean, std = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    _, caps, targets, _, _ = tool.make_batch(4, 2, 8, 0.0, mean, std, n_uncaptioned=4, p_describe_bg=1.0,
                                             ds_prefix="a {bg} cluttered photo of a")
    words = set(tool.BG_WORD.values())
    for caption in caps[:8]:
        assert caption.split()[1] in words and caption.split()[2] == "photo"
    for caption in caps[8:]:
        assert caption.split()[1] in words and "cluttered photo of" in caption
    from types import SimpleNamespace

    from pmpo.data import shapeworld as sw

    rng = np.random.default_rng(0)
    o = sw.sample_objects(rng, 1)[0]
    scene = SimpleNamespace(objects=[o], background="noise")
    assert tool.bg_caption(f"a {o.colour} {o.shape}", scene, rng, 1.0) == \
        sw._fix_articles(f"a grainy photo of a {o.size} {o.colour} {o.shape}.")
    assert tool.ds_caption(o, rng, "a {bg} cluttered photo of a", "checker").startswith("a checkered cluttered photo of")


def test_recipe_check_method_config_needs_key_value(recipe_tool, capsys):
    assert recipe_tool.main(["--method-config", "ctx_init"]) == 1
    assert "--method-config expects KEY=VALUE" in capsys.readouterr().err
