"""Recipes as the authors ran them (docs/RECIPES.md), and MaPLe's exact prompt construction."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from test_engine import make_colour_tree

from pmpo import PMPOConfig, build_model, load_backbone, load_checkpoint, save_checkpoint
from pmpo.cli import main
from pmpo.commands.recipe import recipe_table
from pmpo.errors import InputError
from pmpo.io import atomic_save_safetensors
from pmpo.recipes import resolve_recipe

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def backbone(tiny_model):
    return load_backbone(tiny_model)


def make(backbone, method, **kw):
    return build_model(PMPOConfig(method=method, model=backbone.model_name, pretrained="none", **kw), backbone=backbone)


# --- the recipes ----------------------------------------------------------------------------------

def test_recipes_doc_is_the_resolved_table():
    doc = (REPO / "docs" / "RECIPES.md").read_text()
    table = recipe_table()
    assert table in doc, "docs/RECIPES.md is stale: regenerate its table with `pmpo recipe --table`"
    # nine methods (zero-shot, CoOp, CoCoOp, KgCoOp, VPT, IVLP, MaPLe, PromptSRC, PMPO) x four protocols
    assert len(table.splitlines()) == 2 + 9 * 4


@pytest.mark.parametrize("protocol", ["cross_dataset", "domain_generalization"])
def test_maple_transfer_recipe_is_its_cross_dataset_config(protocol):
    r = resolve_recipe("maple", protocol, "imagenet")
    assert (r.model.text_depth, r.model.partition, r.model.n_ctx) == (3, [[0, 2]], 2)
    assert (r.train.epochs, r.train.batch_size, r.train.lr) == (2, 4, 0.0026)
    b2n = resolve_recipe("maple", "base2new", "dtd")
    assert (b2n.model.text_depth, b2n.model.partition, b2n.train.lr, b2n.train.epochs) == (9, [[0, 8]], 0.0035, 5)


def test_coop_recipes_per_protocol_shots_and_dataset():
    for k, epochs in {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}.items():
        r = resolve_recipe("coop", "fewshot", "eurosat", k)
        assert r.train.epochs == epochs and (r.train.batch_size, r.train.lr) == (32, 0.002)
        assert (r.model.n_ctx, r.model.ctx_init) == (16, "")  # M = 16 random vectors
        assert resolve_recipe("coop", "fewshot", "imagenet", k).train.epochs == 50
    xd = resolve_recipe("coop", "cross_dataset", "imagenet")
    assert (xd.train.epochs, xd.train.batch_size, xd.train.lr, xd.model.n_ctx, xd.model.ctx_init) == (
        50, 32, 0.002, 4, "a photo of a")
    assert resolve_recipe("coop", "base2new", "imagenet").train.epochs == 50
    assert resolve_recipe("coop", "base2new", "dtd").train.epochs == 200
    kg = resolve_recipe("kgcoop", "base2new", "imagenet")
    assert (kg.train.epochs, kg.train.batch_size, kg.model.consistency_weight) == (100, 128, 8.0)


def test_templates_dataset_own_method_own_then_explicit():
    assert resolve_recipe("zeroshot", "base2new", "eurosat").templates == ["a centered satellite photo of {}."]
    assert resolve_recipe("coop", "base2new", "dtd").templates == ["{} texture."]  # CoOp's prior
    kg = resolve_recipe("kgcoop", "base2new", "dtd")  # KgCoOp's own DTD prior
    assert kg.templates == ["a photo of a {}, a type of texture."] and "datasets.dtd" in kg.templates_from
    user = resolve_recipe("pmpo", "fewshot", "imagefolder")
    assert user.templates == ["a photo of a {}."] and user.templates_from == "method preset"
    mine = resolve_recipe("zeroshot", "cross_dataset", "imagenet", model_options={"templates": ["art of a {}."]})
    assert mine.templates == ["art of a {}."] and not mine.target_templates
    assert resolve_recipe("zeroshot", "cross_dataset", "imagenet").target_templates


def test_explicit_options_win_and_bad_ones_are_named(tmp_path):
    r = resolve_recipe("maple", "cross_dataset", "imagenet", model_options={"text_depth": 5},
                       train_options={"lr": 0.01, "epochs": None})
    assert (r.model.text_depth, r.train.lr, r.train.epochs) == (5, 0.01, 2)
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: pmpo\nn_promts: 2\n")
    with pytest.raises(InputError, match="n_promts"):
        resolve_recipe("pmpo", "base2new", config_file=bad)
    with pytest.raises(InputError, match="unknown protocol"):
        resolve_recipe("pmpo", "b2n")


def test_recipe_command_prints_what_train_records(tiny_model, tmp_path, capsys):
    assert main(["recipe", "--method", "coop", "--protocol", "fewshot", "--dataset", "eurosat", "--shots", "1",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["train"]["epochs"] == 50 and data["model"]["n_ctx"] == 16
    assert data["templates"] == ["a centered satellite photo of {}."]
    assert "vit_b16" in data["references"]["train"]
    assert main(["recipe", "--method", "maple", "--protocol", "cross_dataset"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"text_depth: 3\b", out) and "lr: 0.0026" in out

    tree = make_colour_tree(tmp_path / "colours")
    run = tmp_path / "runs"
    assert main(["train", "--dataset", "imagefolder", "--root", str(tree), "--protocol", "fewshot", "--shots", "2",
                 "--method", "coop", "--out", str(run), "--epochs", "1", "--batch-size", "4", "--num-workers", "0",
                 "--template", "a drawing of a {}.", "--model", tiny_model, "--pretrained", "none",
                 "--device", "cpu"]) == 0
    result = json.loads(next(run.rglob("result.json")).read_text())
    assert result["recipe"]["model"]["n_ctx"] == 16 and result["config"]["n_ctx"] == 16  # CoOp's few-shot M
    assert result["templates"]["train"] == ["a drawing of a {}."] == result["recipe"]["templates"]
    assert result["recipe"]["templates_from"] == "options"


# --- MaPLe's prompt construction -----------------------------------------------------------------

def test_maple_text_prompt_keeps_the_init_tail(backbone):
    model = make(backbone, "maple")
    tokens = model.prompt_tokens(["red car"])[0, 0]
    phrase = backbone.tokenizer(["a photo of a red car."])[0]
    assert torch.equal(tokens[3:], phrase[3:])  # "[SOS] c1 c2 of a red car . [EOT]"
    assert not torch.equal(tokens[1:3], phrase[1:3])  # the two context slots
    off = make(backbone, "maple", frozen_init_tail=False).prompt_tokens(["red car"])[0, 0]
    assert torch.equal(off, backbone.tokenizer(["X X red car."])[0])
    assert make(backbone, "pmpo").prompt_tokens(["cat"]).shape[0] == 1  # M = 4: no tail, shared tokens


def test_maple_prompt_with_its_init_context_is_the_init_phrase(backbone):
    """With the context at its init ("a photo") and no deep prompts, MaPLe's prompted sequence is
    exactly "a photo of a {c}." -- so its feature equals open_clip's encode_text of that text."""
    model = make(backbone, "maple", text_depth=1)
    names = ["cat", "small bird"]
    with torch.no_grad():
        prompted = model.prompt_features(names)[0]
        plain = F.normalize(model.clip.encode_text(backbone.tokenizer([f"a photo of a {n}." for n in names])), dim=-1)
    torch.testing.assert_close(prompted, plain, atol=1e-5, rtol=1e-5)


def test_per_prompt_tails_differ_when_phrases_do(backbone):
    model = make(backbone, "pmpo", n_prompts=2, n_ctx=2, ctx_init=["a photo of a", "a drawing of the"])
    tokens = model.prompt_tokens(["cat"])
    assert tokens.shape[0] == 2 and not torch.equal(tokens[0], tokens[1])
    assert model.prompt_features(["cat", "dog"]).shape[:2] == (2, 2)


def test_layer0_visual_prompts_pass_ln_pre_like_mapLe(backbone):
    """Our order (ln_pre on patches, then on the appended prompts) equals MaPLe's (append, then ln_pre
    over the joint sequence), computed here by hand with open_clip's modules."""
    model = make(backbone, "maple", partition=[[0, 0]], text_depth=1)
    visual = model.vision.visual
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        raw = model.prompts.visual_schedule(model.vision.n_layers)[0]
        patches = visual.conv1(x).flatten(2).transpose(1, 2)
        cls = visual.class_embedding.expand(2, 1, -1)
        seq = torch.cat([cls, patches], 1) + visual.positional_embedding
        joint = visual.ln_pre(torch.cat([seq, raw.expand(2, -1, -1)], 1))  # MaPLe: concatenate, then ln_pre
        for block in visual.transformer.resblocks:
            joint = block(joint)
        pooled, _ = visual._pool(joint[:, :seq.shape[1]])
        expected = pooled @ visual.proj
        ours = model.encode_image(x)[0].features
        without = make(backbone, "maple", partition=[[0, 0]], text_depth=1, prompt_ln_pre=False)
        without.prompts.load_state_dict(model.prompts.state_dict())
        other = without.encode_image(x)[0].features
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(other, expected, atol=1e-4)


def test_checkpoints_from_before_the_options_keep_their_maths(backbone, tmp_path):
    model = make(backbone, "maple")
    path = tmp_path / "old.safetensors"
    save_checkpoint(model, path)
    with safe_open(str(path), framework="pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    cfg = json.loads(meta["config"])
    del cfg["frozen_init_tail"], cfg["prompt_ln_pre"]
    atomic_save_safetensors(tensors, path, {**meta, "config": json.dumps(cfg)})
    old = load_checkpoint(path, backbone=backbone)
    assert old.cfg.frozen_init_tail is False and old.cfg.prompt_ln_pre is False
    assert torch.equal(old.prompt_tokens(["cat"])[0, 0], backbone.tokenizer(["X X cat."])[0])  # as trained
