"""CoCoOp, VPT, IVLP and PromptSRC as options of the one PMPOModel (issue 13).

Parameter counts are those the reference implementations create at ViT-B/16 sizes (text width
d_t = 512, vision width d_v = 768, 12 layers per tower, image feature D = 512); each test states the
arithmetic and the reference file it comes from.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_engine import colours  # noqa: F401  (fixture)

from pmpo import PMPOConfig, build_model, load_backbone, load_checkpoint, save_checkpoint
from pmpo.engine import TrainConfig, gpa_weights, train
from pmpo.errors import InputError
from pmpo.prompts import PromptLearner
from pmpo.recipes import resolve_recipe

CLASSES = ["cat", "dog", "red car", "small bird"]
NEW_METHODS = ("cocoop", "vpt", "ivlp", "promptsrc")


@pytest.fixture(scope="module")
def backbone(tiny_model):
    return load_backbone(tiny_model)


def make(backbone, method, seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(PMPOConfig(method=method, model=backbone.model_name, pretrained="none", **kw), backbone=backbone)


def images(n=3, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def vit_b16_learner(cfg: PMPOConfig) -> PromptLearner:
    """The learnable part at ViT-B/16 sizes, built without any CLIP weights."""
    return PromptLearner(cfg, 512, 768, 12, lambda phrase: torch.zeros(4, 512), image_dim=512)


def count(learner: PromptLearner) -> int:
    return sum(p.numel() for p in learner.parameters())


# --- parameter counts at ViT-B/16 sizes, from the reference code ------------------------------------

def test_vpt_parameter_count_at_vit_b16_sizes():
    """multimodal-prompt-learning VPT (configs/trainers/VPT/vit_b16_c2_ep5_batch4_4.yaml: N_CTX_VISION 8,
    PROMPT_DEPTH_VISION 12): clip/model.py creates `VPT` [8, 768] at the input and one `VPT_shallow`
    [8, 768] in each of blocks 1..11 -> 12 x 8 x 768 = 73,728; nothing on the text side."""
    learner = vit_b16_learner(PMPOConfig(method="vpt"))
    assert count(learner) == 12 * 8 * 768 == 73_728
    assert learner.ctx is None and learner.deep_ctx is None and len(learner.couplings) == 0
    assert learner.segments == [(0, 11)]


def test_ivlp_parameter_count_at_vit_b16_sizes():
    """multimodal-prompt-learning IVLP (vit_b16_c2_ep5_batch4_2+2ctx.yaml: N_CTX 2 + 2, depth 12 + 12):
    trainers/independentVL.py's ctx [2, 512] and 11 text `VPT_shallow` [2, 512] (blocks 1..11), the
    vision `VPT` [2, 768] and 11 vision `VPT_shallow` [2, 768]:
    12 x 2 x 512 + 12 x 2 x 768 = 12,288 + 18,432 = 30,720; no coupling."""
    learner = vit_b16_learner(PMPOConfig(method="ivlp"))
    assert count(learner) == 12 * 2 * 512 + 12 * 2 * 768 == 30_720
    assert len(learner.couplings) == 0 and learner.visual_ctx.shape == (12, 2, 768)


def test_promptsrc_parameter_count_at_vit_b16_sizes():
    """PromptSRC (vit_b16_c2_ep20_batch4_4+4ctx.yaml: N_CTX 4 + 4, depth 9 + 9), IVLP prompts:
    9 x 4 x 512 + 9 x 4 x 768 = 18,432 + 27,648 = 46,080 (the paper's "46K"). Cross-dataset / DG
    (..._cross_datasets.yaml, depth 3 + 3): 3 x 4 x 512 + 3 x 4 x 768 = 6,144 + 9,216 = 15,360."""
    assert count(vit_b16_learner(PMPOConfig(method="promptsrc"))) == 9 * 4 * 512 + 9 * 4 * 768 == 46_080
    xd = resolve_recipe("promptsrc", "cross_dataset", "imagenet").model
    assert count(vit_b16_learner(xd)) == 3 * 4 * 512 + 3 * 4 * 768 == 15_360


def test_cocoop_parameter_count_at_vit_b16_sizes():
    """CoOp/trainers/cocoop.py: ctx [4, 512] and meta_net Linear(512, 512 // 16) -> ReLU -> Linear(32, 512):
    4 x 512 + (512 x 32 + 32) + (32 x 512 + 512) = 2,048 + 16,416 + 16,896 = 35,360."""
    learner = vit_b16_learner(PMPOConfig(method="cocoop"))
    assert count(learner) == 4 * 512 + (512 * 32 + 32) + (32 * 512 + 512) == 35_360
    assert learner.meta_net.linear1.weight.shape == (32, 512)


# --- the losses ---------------------------------------------------------------------------------------

def test_promptsrc_with_zero_extra_weights_is_ivlp(backbone):
    """Same prompts (IVLP with PromptSRC's 4 + 4 tokens, depth 9): with its three weights at zero
    PromptSRC's loss is IVLP's, bit for bit; with them on, each term adds weight x value."""
    zero = dict(text_l1_weight=0.0, image_l1_weight=0.0, logit_kl_weight=0.0)
    src = make(backbone, "promptsrc", **zero)
    ivlp = make(backbone, "ivlp", n_ctx=4, n_ctx_vision=4, text_depth=9, partition=[[0, 8]])
    ivlp.prompts.load_state_dict(src.prompts.state_dict())
    x, y = images(4), torch.tensor([0, 1, 2, 3])
    a, b = src.loss(x, y, CLASSES), ivlp.loss(x, y, CLASSES)
    assert torch.equal(a["loss"], b["loss"]) and set(a) == set(b) == {"logits", "ce", "loss"}

    full = make(backbone, "promptsrc")
    full.prompts.load_state_dict(src.prompts.state_dict())
    out = full.loss(x, y, CLASSES)
    expected = out["ce"] + 25 * out["text_l1"] + 10 * out["image_l1"] + 1 * out["logit_kl"]
    torch.testing.assert_close(out["loss"], expected)
    assert torch.equal(out["ce"], a["ce"]) and all(float(out[k].detach()) > 0 for k in ("text_l1", "image_l1", "logit_kl"))


def test_promptsrc_terms_are_the_reference_formulas(backbone):
    """L1 means over elements; KL(zero-shot || prompted) sums over the logits and divides by their
    number; the frozen text side is normalise(mean of unnormalised template features)."""
    model = make(backbone, "promptsrc")
    x, y = images(2), torch.tensor([0, 3])
    out = model.loss(x, y, CLASSES)
    with torch.no_grad():
        templates = ["a photo of a {}.", "a bad photo of a {}."]
        model.cfg.teacher_templates = templates
        feats = model.clip.encode_text(backbone.tokenizer([t.format(c) for t in templates for c in CLASSES]))
        teacher = F.normalize(feats.view(2, len(CLASSES), -1).mean(0), dim=-1)
        torch.testing.assert_close(model.teacher_text_features(CLASSES), teacher, atol=1e-5, rtol=1e-5)
    model.cfg.teacher_templates = "imagenet"
    with torch.no_grad():
        teacher = model.teacher_text_features(CLASSES)
        text = model.prompt_features(CLASSES)[0]
        plain = F.normalize(model.clip.encode_image(x), dim=-1)
        prompted = F.normalize(model.encode_image(x)[0].features, dim=-1)
        logits = model.logit_scale * prompted @ text.t()
        zs = model.logit_scale * plain @ teacher.t()
        p_zs = zs.softmax(-1)
        kl = (p_zs * (p_zs.log() - logits.log_softmax(-1))).sum() / logits.numel()
    torch.testing.assert_close(out["text_l1"], (text - teacher).abs().mean(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["image_l1"], (prompted - plain).abs().mean(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["logit_kl"], kl, atol=1e-6, rtol=1e-4)


def test_promptsrc_terms_work_with_pmpo(backbone):
    model = make(backbone, "pmpo", text_l1_weight=1.0, image_l1_weight=1.0, logit_kl_weight=1.0)
    out = model.loss(images(2), torch.tensor([0, 1]), CLASSES)
    assert {"text_l1", "image_l1", "logit_kl"} <= set(out) and torch.isfinite(out["loss"])


# --- CoCoOp ---------------------------------------------------------------------------------------------

def test_cocoop_with_zero_meta_net_is_coop(backbone):
    """A zero meta-net adds exactly 0.0 to every context token, so CoCoOp computes CoOp's prompts.
    Its per-image path batches B x C text sequences and takes per-image dot products, where CoOp runs
    C sequences and one matrix product: the same sums, grouped differently by the kernels (measured:
    <= 2e-7), so logits, loss and gradients are compared at float32 rounding, not bit for bit."""
    cocoop, coop = make(backbone, "cocoop"), make(backbone, "coop")
    coop.prompts.ctx.data.copy_(cocoop.prompts.ctx.data)
    torch.nn.init.zeros_(cocoop.prompts.meta_net.linear2.weight)
    torch.nn.init.zeros_(cocoop.prompts.meta_net.linear2.bias)
    x, y = images(3), torch.tensor([0, 1, 2])
    with torch.no_grad():
        f = F.normalize(cocoop.encode_image(x)[0].features, dim=-1)
        assert torch.equal(cocoop.prompts.context_shift(f), torch.zeros(3, cocoop.text.width))
        torch.testing.assert_close(cocoop.eval()(x, CLASSES), coop.eval()(x, CLASSES), atol=1e-6, rtol=1e-6)
    a, b = cocoop.loss(x, y, CLASSES)["loss"], coop.loss(x, y, CLASSES)["loss"]
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    a.backward()
    b.backward()
    scale = float(coop.prompts.ctx.grad.abs().max())  # a gradient sums many rounded terms
    torch.testing.assert_close(cocoop.prompts.ctx.grad, coop.prompts.ctx.grad, atol=1e-4 * scale, rtol=1e-4)


def test_cocoop_batched_text_pass_equals_the_per_image_loop(backbone):
    """One text call over B x C sequences gives what CoCoOp's Python loop over images gives."""
    model = make(backbone, "cocoop").eval()
    torch.nn.init.normal_(model.prompts.meta_net.linear2.weight, std=0.5)
    # the tiny model's meta-net has 2 hidden ReLUs: keep them alive so the shift depends on the image
    torch.nn.init.constant_(model.prompts.meta_net.linear1.bias, 1.0)
    x = images(3)
    with torch.no_grad():
        f = F.normalize(model.encode_image(x)[0].features, dim=-1)
        shift = model.prompts.context_shift(f)
        batched = model.prompt_features(CLASSES, shift)  # [B, N, C, D]
        ctx = model.prompts.ctx.data.clone()
        looped = []
        for b in range(3):
            model.prompts.ctx.data.copy_(ctx + shift[b])
            looped.append(model.prompt_features(CLASSES))
        model.prompts.ctx.data.copy_(ctx)
        logits = model(x, CLASSES)
        by_loop = torch.stack([model.logit_scale * f[b] @ looped[b][0].t() for b in range(3)])
    assert batched.shape == (3, 1, len(CLASSES), f.shape[-1])
    torch.testing.assert_close(batched, torch.stack(looped), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logits, by_loop, atol=1e-5, rtol=1e-5)
    # the weights really depend on the image, and the chunked (no-grad) pass is the same as one call
    assert not torch.allclose(batched[0], batched[1])
    from pmpo import model as model_module

    chunk = model_module.CONDITIONAL_TEXT_CHUNK
    model_module.CONDITIONAL_TEXT_CHUNK = len(CLASSES)  # one image per call
    try:
        with torch.no_grad():
            torch.testing.assert_close(model.prompt_features(CLASSES, shift), batched, atol=1e-6, rtol=1e-5)
    finally:
        model_module.CONDITIONAL_TEXT_CHUNK = chunk


def test_meta_net_needs_text_and_single_pass(backbone):
    with pytest.raises(InputError, match="single"):
        PMPOConfig(method="pmpo", meta_net=True, visual_pass="per_prompt")
    with pytest.raises(InputError, match="n_ctx_vision"):
        PMPOConfig(method="maple", n_ctx_vision=4)  # a coupling maps 2 text tokens to 2 visual ones
    with pytest.raises(InputError, match="independent"):
        PMPOConfig(method="coop", n_ctx=0)


# --- VPT / IVLP construction ---------------------------------------------------------------------------

def test_vpt_classifies_with_the_frozen_prompt_and_its_own_tokens(backbone):
    model = make(backbone, "vpt").eval()
    x = images(2)
    with torch.no_grad():
        cw = model.class_weights(CLASSES)
        assert cw.prompts is None and torch.equal(cw.weights, model.prior_features(CLASSES))
        schedule = model.prompts.visual_schedule(model.vision.n_layers)
        assert all(s.shape == (8, model.vision.width) for s in schedule)
        assert not torch.equal(schedule[0], schedule[1])  # own tokens per layer
        assert not torch.allclose(model(x, CLASSES), model.zero_shot_logits(x, CLASSES))
    r = resolve_recipe("vpt", "base2new", "dtd")
    assert r.templates == ["a photo of a {}."] and not r.target_templates  # trainers/vpt.py, every dataset


def test_ivlp_visual_tokens_do_not_depend_on_the_text(backbone):
    model = make(backbone, "ivlp")
    layers = model.vision.n_layers
    with torch.no_grad():
        before = [s.clone() for s in model.prompts.visual_schedule(layers)]
        model.prompts.ctx.add_(1.0)
        model.prompts.deep_ctx.add_(1.0)
        after = model.prompts.visual_schedule(layers)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    tokens = model.prompt_tokens(["red car"])[0, 0]
    assert torch.equal(tokens[3:], backbone.tokenizer(["a photo of a red car."])[0][3:])  # "c1 c2 of a"


# --- checkpoints and frozen CLIP ------------------------------------------------------------------------

def _perturb(model) -> None:
    with torch.no_grad():
        for p in model.learnable_parameters():
            p.add_(0.3 * torch.randn_like(p))


@pytest.mark.parametrize("method", NEW_METHODS)
def test_save_load_identical_logits(backbone, tmp_path, method):
    model = make(backbone, method).eval()
    _perturb(model)
    path = tmp_path / f"{method}.safetensors"
    save_checkpoint(model, path)
    loaded = load_checkpoint(path, backbone=backbone).eval()
    x = images(2)
    with torch.no_grad():
        assert torch.equal(model(x, CLASSES), loaded(x, CLASSES))
        assert torch.equal(model(x, ["plane", "ship", "tree"]), loaded(x, ["plane", "ship", "tree"]))
    assert loaded.cfg == model.cfg
    assert set(loaded.prompts.state_dict()) == set(model.prompts.state_dict())


@pytest.mark.parametrize("method", NEW_METHODS)
def test_frozen_clip_is_bit_identical_after_a_step(backbone, method):
    model = make(backbone, method)
    if model.prompts.meta_net is not None:  # the tiny model's meta-net has 32 // 16 = 2 ReLU units: keep them on
        torch.nn.init.constant_(model.prompts.meta_net.linear1.bias, 1.0)
    frozen = {k: v.clone() for k, v in model.clip.state_dict().items()}
    learn = {k: v.clone() for k, v in model.prompts.state_dict().items()}
    opt = torch.optim.SGD(model.learnable_parameters(), lr=0.1)
    model.train()
    model.loss(images(4), torch.tensor([0, 1, 2, 3]), CLASSES)["loss"].backward()
    opt.step()
    for k, v in model.clip.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    changed = {k for k, v in model.prompts.state_dict().items() if not torch.equal(v, learn[k])}
    assert changed == set(learn), set(learn) - changed  # every learnable tensor gets a gradient
    assert all(not p.requires_grad for p in model.clip.parameters()) and not model.clip.training


# --- Gaussian prompt aggregation ---------------------------------------------------------------------------

def test_gpa_weights_are_the_normalised_gaussian():
    w = gpa_weights(TrainConfig(epochs=20, gpa_mean=15, gpa_std=1))
    dens = [math.exp(-0.5 * (e - 15) ** 2) for e in range(1, 21)]
    assert w == pytest.approx([d / sum(dens) for d in dens]) and sum(w) == pytest.approx(1.0)
    assert max(range(20), key=w.__getitem__) == 14  # epoch 15
    assert gpa_weights(TrainConfig(epochs=5)) is None


def test_gpa_run_ends_with_the_weighted_prompts_and_resumes(backbone, colours, tmp_path):  # noqa: F811
    base = dict(epochs=3, batch_size=8, lr=0.05, warmup_epochs=0, num_workers=0, log_every=1)
    ends = {}

    def record(model):
        def progress(p):
            if p["epoch_step"] == p["total_steps"] // 3:
                ends[p["epoch"]] = {k: v.detach().clone() for k, v in model.prompts.state_dict().items()}
        return progress

    plain = make(backbone, "ivlp")
    train(plain, colours.train, colours.classnames, TrainConfig(**base), progress=record(plain))
    assert sorted(ends) == [1, 2, 3]
    cfg = TrainConfig(**base, gpa_mean=2, gpa_std=1)
    w = gpa_weights(cfg)
    gpa = make(backbone, "ivlp")
    train(gpa, colours.train, colours.classnames, cfg, out_dir=tmp_path / "full")
    for k, v in gpa.prompts.state_dict().items():
        expected = sum(w[e] * ends[e + 1][k] for e in range(3))
        torch.testing.assert_close(v, expected, atol=1e-6, rtol=1e-5)

    class Killed(Exception):
        pass

    def kill(p):
        if p["epoch"] == 3:
            raise Killed

    with pytest.raises(Killed):
        train(make(backbone, "ivlp"), colours.train, colours.classnames, cfg, out_dir=tmp_path / "killed", progress=kill)
    resumed = make(backbone, "ivlp", seed=1)
    train(resumed, colours.train, colours.classnames, cfg, out_dir=tmp_path / "killed", resume=True)
    for a, b in zip(gpa.learnable_parameters(), resumed.learnable_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    last = load_checkpoint(tmp_path / "full" / "last.safetensors", backbone=backbone)
    assert all(torch.equal(a, b) for a, b in zip(gpa.learnable_parameters(), last.learnable_parameters()))


def test_promptsrc_recipes():
    b2n = resolve_recipe("promptsrc", "base2new", "dtd")
    assert (b2n.train.epochs, b2n.train.lr, b2n.train.batch_size, b2n.train.gpa_mean, b2n.train.gpa_std) == (
        20, 0.0025, 4, 15, 1)
    assert (b2n.model.text_depth, b2n.model.partition, b2n.model.text_l1_weight, b2n.model.image_l1_weight) == (
        9, [[0, 8]], 25.0, 10.0)
    xd = resolve_recipe("promptsrc", "cross_dataset", "imagenet")
    assert (xd.model.text_depth, xd.train.gpa_mean, xd.train.gpa_std) == (3, 6, 10)
    assert resolve_recipe("promptsrc", "fewshot", "eurosat").train.gpa_mean == 45
    assert resolve_recipe("promptsrc", "fewshot", "imagenet").train.gpa_mean == 30
    co = resolve_recipe("cocoop", "base2new", "imagenet")
    assert (co.train.epochs, co.train.batch_size, co.train.lr, co.model.meta_net) == (10, 1, 0.002, True)
    assert resolve_recipe("vpt", "base2new").train.lr == 0.0025 and resolve_recipe("ivlp", "base2new").train.lr == 0.0035


def test_recipe_command_and_reference_rows(capsys):
    from pmpo.cli import main
    from pmpo.config import list_methods
    from pmpo.reference import base2new_reference
    from pmpo.results import reference_rows

    assert main(["recipe", "--method", "promptsrc", "--protocol", "fewshot", "--dataset", "dtd", "--json"]) == 0
    import json

    data = json.loads(capsys.readouterr().out)
    assert (data["train"]["gpa_mean"], data["train"]["gpa_std"], data["train"]["epochs"]) == (45, 5, 50)
    assert data["model"]["coupling"] == "independent" and "PromptSRC" in data["references"]["model"]
    refs = {r.label: r for r in base2new_reference()}
    assert (refs["CoCoOp"].base, refs["CoCoOp"].new, refs["CoCoOp"].hm) == (80.47, 71.69, 75.83)
    assert (refs["PromptSRC"].base, refs["PromptSRC"].new, refs["PromptSRC"].hm) == (84.26, 76.10, 79.97)
    assert refs["CoCoOp"].method == "cocoop" and refs["PromptSRC"].method == "promptsrc"
    assert all(r.method in list_methods() for r in refs.values())
    labels = [r.name for r in reference_rows()]
    assert "CoCoOp (paper)" in labels and "PromptSRC (paper)" in labels
