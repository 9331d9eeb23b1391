"""The core model: exactness against open_clip, presets, partitions, training hygiene, checkpoints."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from pmpo import PMPOConfig, build_model, list_methods, load_backbone, load_checkpoint, save_checkpoint
from pmpo.attention import block_with_attention
from pmpo.cache import TensorCache
from pmpo.errors import BackboneLoadError, CheckpointError, InputError
from pmpo.prompts import resolve_partition

CLASSES = ["cat", "dog", "red car", "small bird"]


@pytest.fixture(scope="module")
def backbone(tiny_model):
    return load_backbone(tiny_model)


def make(backbone, method="pmpo", **kw):
    return build_model(PMPOConfig(method=method, model=backbone.model_name, pretrained="none", **kw), backbone=backbone)


def images(n=3, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- exactness against open_clip ---------------------------------------------------------------

def test_zero_shot_matches_open_clip(backbone):
    model = make(backbone, "zeroshot")
    x = images()
    with torch.no_grad():
        ours = model(x, CLASSES)
        clip = backbone.clip
        img = F.normalize(clip.encode_image(x), dim=-1)
        txt = F.normalize(clip.encode_text(backbone.tokenizer([f"a photo of a {c}." for c in CLASSES])), dim=-1)
        ref = clip.logit_scale.exp() * img @ txt.t()
    assert (ours - ref).abs().max() < 1e-4


def test_truncated_text_encoder_matches_encode_text(backbone):
    model = make(backbone, "zeroshot")
    tokens = backbone.tokenizer(["a photo of a dog.", "x", "a much longer sentence about a very small red bird in a tree."])
    with torch.no_grad():
        ours = model.text.encode_tokens(tokens)
        ref = backbone.clip.encode_text(tokens)
    assert (ours - ref).abs().max() < 1e-5
    # the truncation really happens: the longest sequence here is far below 77 tokens
    assert int(model.text.eot_positions(tokens).max()) + 1 < 20


def test_attention_path_matches_block_forward(backbone):
    block = backbone.clip.visual.transformer.resblocks[0]
    x = torch.randn(2, 7, backbone.clip.visual.class_embedding.shape[0])
    with torch.no_grad():
        ours, probs = block_with_attention(block, x)
        ref = block(x)
    assert (ours - ref).abs().max() < 1e-5
    assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[:-1]), atol=1e-5)


def test_attention_maps_do_not_change_features(backbone):
    model = make(backbone, "pmpo").eval()
    x = images()
    with torch.no_grad():
        (plain,) = model.encode_image(x)
        (mapped,) = model.encode_image(x, return_attention=True)
    assert (plain.features - mapped.features).abs().max() < 1e-5
    layers = model.vision.n_layers
    assert len(mapped.attentions) == layers
    n_tokens = mapped.n_tokens + model.cfg.n_ctx  # equal partition: one segment active per layer
    assert mapped.attentions[0].shape == (3, 4, n_tokens, n_tokens)


def test_alpha_one_gives_prior_exactly(backbone):
    model = make(backbone, "pmpo", alpha=1.0)
    with torch.no_grad():
        cw = model.class_weights(CLASSES)
        prior = model.prior_features(CLASSES)
    assert torch.equal(cw.weights, prior)


def test_no_prompts_equals_zero_shot(backbone):
    x = images()
    pmpo0 = make(backbone, "pmpo", n_prompts=0, visual_prompts=False)
    zs = make(backbone, "zeroshot")
    with torch.no_grad():
        assert torch.equal(pmpo0(x, CLASSES), zs(x, CLASSES))


# --- presets and partitions -------------------------------------------------------------------

@pytest.mark.parametrize("method", ["zeroshot", "coop", "cocoop", "kgcoop", "vpt", "ivlp", "maple", "promptsrc", "pmpo"])
def test_every_preset_builds_and_runs(backbone, method):
    assert method in list_methods()
    model = make(backbone, method)
    logits = model(images(2), CLASSES)
    assert logits.shape == (2, len(CLASSES)) and torch.isfinite(logits).all()


def test_maple_parameter_count_at_vit_b16_sizes():
    """MaPLe's design: 2 ctx tokens, deep text prompts in 8 more layers, 9 couplings 512→768."""
    from pmpo.prompts import PromptLearner

    cfg = PMPOConfig(method="maple")
    learner = PromptLearner(cfg, 512, 768, 12, lambda phrase: torch.zeros(4, 512))
    expected = 2 * 512 + 8 * 2 * 512 + 9 * (512 * 768 + 768)
    assert sum(p.numel() for p in learner.parameters()) == expected == 3_555_072
    assert learner.segments == [(0, 8)] and len(learner.couplings) == 9
    # As MaPLe: the deep couplings (layers 1-8) are copies of one Linear, the layer-0 one is its own.
    deep = [c.weight for c in learner.couplings[1:]]
    assert all(torch.equal(w, deep[0]) for w in deep) and not torch.equal(learner.couplings[0].weight, deep[0])
    assert len({id(w) for w in deep}) == 8  # copies, not one shared module: they train apart


def test_pmpo_parameter_count(backbone):
    model = make(backbone, "pmpo")
    d_t, d_v = model.text.width, model.vision.width
    assert model.num_learnable() == 4 * 4 * d_t + 4 * (d_t * d_v + d_v)


@pytest.mark.parametrize(
    "spec,n,expected",
    [
        ("equal", 4, [(0, 2), (3, 5), (6, 8), (9, 11)]),
        ("equal", 5, [(0, 2), (3, 5), (6, 7), (8, 9), (10, 11)]),
        ("all", 3, [(0, 11)] * 3),
        ("first-half", 2, [(0, 2), (3, 5)]),
        ("second-half", 2, [(6, 8), (9, 11)]),
        ([[0, 1], [2, 11]], 2, [(0, 1), (2, 11)]),
    ],
)
def test_partitions(spec, n, expected):
    assert resolve_partition(spec, n, 12) == expected


def test_partition_errors():
    with pytest.raises(InputError):
        resolve_partition("equal", 13, 12)
    with pytest.raises(InputError):
        resolve_partition([[0, 12]], 1, 12)
    with pytest.raises(InputError):
        resolve_partition([[0, 3]], 2, 12)


@pytest.mark.parametrize("mode", ["replace", "carry"])
@pytest.mark.parametrize("visual_pass", ["single", "per_prompt"])
def test_schedule_shapes_and_segment_mapping(backbone, mode, visual_pass):
    model = make(backbone, "pmpo", visual_mode=mode, visual_pass=visual_pass, partition=[[0, 2], [3, 5], [6, 8], [9, 11]])
    layers, m, d_v = model.vision.n_layers, model.cfg.n_ctx, model.vision.width
    assert model.prompts.layer_segments(layers) == [[l // 3] for l in range(layers)]
    with torch.no_grad():
        single = model.prompts.visual_schedule(layers)
        injected = [l for l, s in enumerate(single) if s is not None]
        assert injected == (list(range(12)) if mode == "replace" else [0, 3, 6, 9])
        assert all(single[l].shape == (m, d_v) for l in injected)
        # layer 4 belongs to prompt 1: its tokens are coupling 1 applied to context 1
        ref = model.prompts.couplings[1](model.prompts.ctx[1])
        assert torch.equal(single[3], ref)
        alone = model.prompts.visual_schedule(layers, prompt=2)
        assert [l for l, s in enumerate(alone) if s is not None] == ([6, 7, 8] if mode == "replace" else [6])
        out = model.encode_image(images(2))
    assert len(out) == (4 if visual_pass == "per_prompt" else 1)
    assert all(view.features.shape == (2, model.vision.output_dim) for view in out)
    assert model(images(2), CLASSES).shape == (2, 4)


def test_overlapping_segments_concatenate_tokens(backbone):
    model = make(backbone, "pmpo", partition="all", n_prompts=2)
    with torch.no_grad():
        sched = model.prompts.visual_schedule(model.vision.n_layers)
    assert all(s.shape[0] == 2 * model.cfg.n_ctx for s in sched)


def test_carry_rejects_partial_overlap(backbone):
    with pytest.raises(InputError):
        make(backbone, "pmpo", n_prompts=2, visual_mode="carry", partition=[[0, 5], [3, 8]])


def test_visual_prompts_change_features_only_where_expected(backbone):
    model = make(backbone, "pmpo")
    x = images(2)
    with torch.no_grad():
        prompted = model.encode_image(x)[0].features
        plain = model.vision(x).features
        assert not torch.allclose(prompted, plain)
        for coupling in model.prompts.couplings:  # zero prompt tokens still take part in attention
            torch.nn.init.zeros_(coupling.weight)
            torch.nn.init.zeros_(coupling.bias)
        assert not torch.allclose(model.encode_image(x)[0].features, plain)


# --- training hygiene -------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["coop", "maple", "pmpo"])
def test_only_learnable_tensors_change(backbone, method):
    model = make(backbone, method, aux_weight=0.5, consistency_weight=1.0)
    frozen = {k: v.clone() for k, v in model.clip.state_dict().items()}
    learn = {k: v.clone() for k, v in model.prompts.state_dict().items()}
    opt = torch.optim.SGD(model.learnable_parameters(), lr=0.1)
    model.train()
    out = model.loss(images(4), torch.tensor([0, 1, 2, 3]), CLASSES)
    out["loss"].backward()
    opt.step()
    for k, v in model.clip.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    changed = [k for k, v in model.prompts.state_dict().items() if not torch.equal(v, learn[k])]
    assert "ctx" in changed
    assert all(not p.requires_grad for p in model.clip.parameters())
    assert not model.clip.training


def test_the_model_keeps_no_cache_and_the_callers_cache_holds_frozen_features_only(backbone):
    model = make(backbone, "promptsrc").eval()
    before = {k: v for k, v in vars(model).items() if not k.startswith("_")}
    cache = TensorCache()
    with torch.no_grad():
        first = model.class_weights(CLASSES, cache=cache)
        again = model.class_weights(CLASSES, cache=cache)
    assert cache.hits == 1 and torch.equal(again.prior, first.prior)  # the frozen prior comes from the cache
    assert again.prompts is not first.prompts and torch.equal(again.weights, first.weights)  # prompts recomputed
    opt = torch.optim.SGD(model.learnable_parameters(), lr=1.0)
    model.loss(images(2), torch.tensor([0, 1]), CLASSES, cache=cache)["loss"].backward()
    assert len(cache) == 2  # prior and PromptSRC's teacher: nothing that depends on the prompts
    opt.step()
    with torch.no_grad():
        second = model.class_weights(CLASSES, cache=cache)
    assert not torch.allclose(second.weights, first.weights) and torch.equal(second.prior, first.prior)
    # Nothing was stored on the model: its attributes are the ones it was built with.
    assert {k: v for k, v in vars(model).items() if not k.startswith("_")} == before


def test_classname_validation(backbone):
    model = make(backbone, "coop")
    for bad in ([], ["cat", ""], ["cat", "Cat"], "cat,dog"):
        with pytest.raises(InputError):
            model(images(1), bad)


def test_ctx_initialised_from_phrase(backbone):
    model = make(backbone, "coop")
    emb = model._phrase_embeddings("a photo of a")
    assert torch.equal(model.prompts.ctx[0].detach(), emb)
    # per-prompt phrases
    model = make(backbone, "pmpo", n_prompts=2, ctx_init=["a photo of a", "a drawing of a"])
    assert torch.equal(model.prompts.ctx[1].detach(), model._phrase_embeddings("a drawing of a"))


# --- checkpoints ------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["coop", "maple", "pmpo"])
def test_save_load_identical_logits(backbone, tmp_path, method):
    model = make(backbone, method).eval()
    torch.nn.init.normal_(model.prompts.ctx, std=0.5)  # not the init: the checkpoint must carry it
    path = tmp_path / "p.safetensors"
    save_checkpoint(model, path, note="test")
    loaded = load_checkpoint(path).eval()
    x = images(2)
    with torch.no_grad():
        assert torch.equal(model(x, CLASSES), loaded(x, CLASSES))
        other = ["plane", "ship", "tree"]  # class-agnostic
        assert torch.equal(model(x, other), loaded(x, other))
    assert loaded.cfg == model.cfg


def test_checkpoint_holds_only_learnable_tensors(backbone, tmp_path):
    model = make(backbone, "pmpo")
    path = tmp_path / "p.safetensors"
    save_checkpoint(model, path)
    with safe_open(str(path), framework="pt") as fh:
        keys = set(fh.keys())
        meta = fh.metadata()
    backbone_keys = set(model.clip.state_dict())
    assert not keys & backbone_keys and not any(k.startswith(("visual.", "transformer.")) for k in keys)
    assert keys == set(model.prompts.state_dict())
    n_bytes = model.num_learnable() * 4
    assert n_bytes <= path.stat().st_size <= n_bytes + 16_384  # tensors + header/metadata
    cfg = json.loads(meta["config"])
    for field in ("method", "model", "pretrained", "n_prompts", "n_ctx", "partition", "visual_mode",
                  "visual_pass", "ctx_init", "templates", "alpha"):
        assert field in cfg
    assert meta["pmpo_version"] and json.loads(meta["backbone"])["vision_width"] == 64



def test_checkpoint_names_a_shipped_model_by_name_and_any_other_folder_by_path(backbone, tmp_path):
    """What a checkpoint records must load on another machine: the shipped model by its bare name
    (its folder differs between a checkout, a wheel and a Space), a user's folder by its path."""
    from pmpo.backbone import OFFLINE_MODEL, OFFLINE_MODEL_NAME, portable_model_name, resolve_model_name

    assert portable_model_name(OFFLINE_MODEL) == OFFLINE_MODEL_NAME
    assert resolve_model_name(portable_model_name(OFFLINE_MODEL)) == OFFLINE_MODEL
    elsewhere = f"local-dir:{tmp_path / OFFLINE_MODEL_NAME}"  # same folder name, not the shipped folder
    for name in (backbone.model_name, "ViT-B-16-quickgelu", elsewhere):
        assert portable_model_name(name) == name
    path = tmp_path / "p.safetensors"
    save_checkpoint(make(backbone, "coop"), path)
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    assert json.loads(meta["backbone"])["model"] == json.loads(meta["config"])["model"] == backbone.model_name
    assert load_checkpoint(path).backbone.model_name == backbone.model_name

def test_checkpoint_on_other_width_fails_clearly(backbone, tmp_path, wide_model):
    model = make(backbone, "pmpo")
    path = tmp_path / "p.safetensors"
    save_checkpoint(model, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, model=wide_model)
    msg = str(err.value)
    assert backbone.model_name in msg and wide_model in msg and "64" in msg and "96" in msg


def test_non_safetensors_is_refused(tmp_path):
    bad = tmp_path / "evil.safetensors"
    torch.save({"ctx": torch.zeros(2)}, bad)  # a pickle in disguise
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors")


# --- backbone loading -------------------------------------------------------------------------

def test_weights_file_loads_through_open_clip(tmp_path, tiny_model, backbone):
    """A bare weights file + a model config: the path users take with downloaded .safetensors."""
    import open_clip
    from conftest import TINY_CFG

    name = "pmpo-test-tiny"
    (tmp_path / f"{name}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    weights = tiny_model.split(":", 1)[1] + "/open_clip_model.safetensors"
    loaded = load_backbone(name, weights)
    x = images(1)
    with torch.no_grad():
        assert torch.equal(loaded.clip.encode_image(x), backbone.clip.encode_image(x))


def test_bad_backbone_inputs_give_clear_errors(tmp_path):
    with pytest.raises(BackboneLoadError, match="no open_clip_config.json"):
        load_backbone(f"local-dir:{tmp_path}")
    with pytest.raises(BackboneLoadError, match="unknown open_clip model"):
        load_backbone("ViT-Nope-99")
    with pytest.raises(BackboneLoadError, match="not found"):
        load_backbone("ViT-B-16-quickgelu", str(tmp_path / "missing.safetensors"))
    with pytest.raises(BackboneLoadError, match="neither a weights file nor a pretrained tag"):
        load_backbone("ViT-B-16-quickgelu", "no-such-tag")


def test_hub_tag_without_network_fails_fast(monkeypatch, tmp_path):
    """No network (as on CI): a hub tag fails within seconds and says what to do."""
    from pmpo import backbone as bb

    monkeypatch.setattr(bb, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # nothing cached
    start = time.monotonic()
    with pytest.raises(BackboneLoadError) as err:
        load_backbone("ViT-B-16-quickgelu", "openai")
    assert time.monotonic() - start < 30
    assert "local-dir:" in str(err.value) and "--pretrained" in str(err.value)


def test_hub_tag_without_network_loads_the_cached_file_without_flipping_offline_mode(monkeypatch, tmp_path):
    """Offline, a cached tag loads from its file: huggingface_hub's process-wide offline flag and the
    environment stay as they were (other threads, e.g. the app's, share them)."""
    import open_clip
    from huggingface_hub import constants

    from pmpo import backbone as bb

    snapshot = tmp_path / "models--timm--vit_base_patch16_clip_224.openai" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    (snapshot / "open_clip_model.safetensors").write_bytes(b"not really weights")
    assert bb.cached_tag_file("ViT-B-16-quickgelu", "openai", str(tmp_path)) == str(snapshot / "open_clip_model.safetensors")
    assert bb.cached_tag_file("ViT-B-16-quickgelu", "laion400m_e32", str(tmp_path)) is None

    seen = {}

    def fake_create(model, **kwargs):
        seen.update(kwargs, offline=constants.HF_HUB_OFFLINE, env=dict(os.environ))
        raise RuntimeError("stop here")

    monkeypatch.setattr(bb, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(open_clip, "create_model_and_transforms", fake_create)
    offline, env = constants.HF_HUB_OFFLINE, dict(os.environ)
    with pytest.raises(BackboneLoadError, match="stop here"):
        load_backbone("ViT-B-16-quickgelu", "openai", cache_dir=str(tmp_path))
    assert seen["pretrained"] == str(snapshot / "open_clip_model.safetensors")
    assert seen["force_preprocess_cfg"]["interpolation"] == "bicubic"  # the tag's preprocessing still applies
    assert seen["offline"] == offline and seen["env"] == env
    assert offline == constants.HF_HUB_OFFLINE and dict(os.environ) == env


def test_openai_weights_get_quick_gelu():
    from pmpo.backbone import _needs_quick_gelu

    with pytest.warns(UserWarning, match="QuickGELU"):
        assert _needs_quick_gelu("ViT-B-16", "openai", None) is True
    assert _needs_quick_gelu("ViT-B-16-quickgelu", "openai", None) is False
    assert _needs_quick_gelu("ViT-B-16", "laion2b_s34b_b88k", None) is False
    assert _needs_quick_gelu("ViT-B-16", "openai", False) is False


def test_loss_keeps_the_deprecated_vision_keyword(backbone):
    model = make(backbone, "coop")
    x, labels = images(2), torch.tensor([0, 1])
    with torch.no_grad():
        views = model.encode_image(x)
        with pytest.warns(DeprecationWarning, match="views="):
            old = model.loss(None, labels, CLASSES, vision=views[0])["loss"]
        new = model.loss(None, labels, CLASSES, views=views)["loss"]
    assert torch.equal(old, new)
