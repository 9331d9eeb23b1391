"""``pmpo bench`` on a tiny model: a complete table with finite ratios; text gradient checkpointing.

No timing assertions: speed on a shared CI machine is noise. What is checked is that every row is
measured, every ratio is a finite positive number, the exactness columns are small, and that
gradient checkpointing of the text tower leaves the gradients unchanged.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from pmpo import PMPOConfig, build_model, load_backbone
from pmpo.bench import BenchConfig, bench_classnames, format_markdown, minimal_parts, naive_text_features, run_bench
from pmpo.cli import main
from pmpo.errors import InputError


@pytest.fixture(scope="module")
def backbone(tiny_model):
    return load_backbone(tiny_model)


def test_bench_cli_prints_complete_table(tiny_model, tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    code = main([
        "bench", "--model", tiny_model, "--device", "cpu", "--batch", "2", "--classes", "3",
        "--text-classes", "5,12", "--naive-max-chunks", "0", "--repeats", "1", "--warmup", "0",
        "--memory-classes", "6", "--memory-batch", "2", "--quiet", "--json", str(out_json),
    ])
    assert code == 0
    printed = capsys.readouterr().out
    for label in ("open_clip encode_image (floor)", "PMPO inference, cached class weights",
                  "PMPO training step", "CoOp training step", "MaPLe training step",
                  "N = 4 × C = 5", "N = 4 × C = 12", "| plain | 6 | 2 | 4 |", "| text grad checkpointing | 6 | 2 | 4 |"):
        assert label in printed, label
    assert "nan" not in printed.lower() and "inf " not in printed.lower()

    result = json.loads(out_json.read_text())
    assert [r["case"] for r in result["rows"]] == ["floor", "infer:pmpo", "train:pmpo", "part_image:pmpo",
                                                   "part_text:pmpo", "train:coop", "train:maple",
                                                   "part_image:maple", "part_text:maple"]
    for method in ("pmpo", "maple"):  # the waste ratio: step against the sum of its two parts, timed alone
        parts = result["checks"][f"parts:{method}"]
        assert parts["parts_vs_step"] == pytest.approx(parts["parts_ms"] / parts["step_ms"]) and parts["parts_ms"] > 0
    assert "training step vs its minimal parts" in printed
    for row in result["rows"]:
        assert math.isfinite(row["images_per_s"]) and row["images_per_s"] > 0
        assert math.isfinite(row["vs_floor"]) and row["vs_floor"] > 0
    assert result["rows"][0]["vs_floor"] == pytest.approx(1.0)
    assert {"target", "meets_target"} <= set(result["rows"][1]) and {"target", "meets_target"} <= set(result["rows"][2])
    for t in result["text"]:
        assert math.isfinite(t["speedup"]) and t["speedup"] > 0
        assert t["naive_chunks_timed"] == t["naive_chunks_total"] == 4  # --naive-max-chunks 0: all timed
        assert t["batched_tokens"] < t["naive_tokens"] == 77  # truncation really happens
        assert t["max_abs_diff"] < 1e-4  # naive full-length and batched truncated passes agree
    assert [m["grad_checkpointing"] for m in result["memory"]] == [False, True]
    for mem in result["memory"]:
        assert "error" not in mem, mem
        assert mem["peak_bytes"] > 0 and math.isfinite(mem["step_s"])
    assert result["checks"]["training_attention_fused"], result["checks"]
    assert result["checks"]["cached_vs_fresh_max_abs_diff"] < 1e-5


def test_bench_scaling_rows_and_naive_sampling(tiny_model):
    cfg = BenchConfig(model=tiny_model, device="cpu", batch=2, classes=2, n_prompts=2, text_classes=(6,),
                      naive_chunk=2, naive_max_chunks=2, repeats=1, warmup=0, memory=False, scaling=True,
                      train_methods=())
    result = run_bench(cfg)
    assert [(s["axis"], s["value"]) for s in result.scaling] == [
        ("classes", 1), ("classes", 2), ("classes", 20), ("prompts", 1), ("prompts", 2), ("prompts", 4),
        ("images", 1), ("images", 2), ("images", 4)]
    assert all(s["train_step_s"] > 0 and s["class_weights_s"] > 0 for s in result.scaling)
    text = result.text[0]
    assert (text["naive_chunks_timed"], text["naive_chunks_total"]) == (2, 6)  # 2 prompts × 3 chunks of 2
    table = format_markdown(result)
    assert "scaling (PMPO)" in table and "timed on 2 of its 6" in table


def test_naive_text_pass_matches_batched(backbone):
    model = build_model(PMPOConfig(method="pmpo", model=backbone.model_name, pretrained="none", n_prompts=3),
                        backbone=backbone)
    names = bench_classnames(7)
    with torch.no_grad():
        naive, ran, total = naive_text_features(model, names, chunk=3)
        batched = model.prompt_features(names)
    assert ran == total == 9
    assert (naive - batched.reshape(-1, batched.shape[-1])).abs().max() < 1e-5


def test_bench_classnames_unique_and_mixed_lengths():
    names = bench_classnames(1500)
    assert len(set(names)) == 1500
    assert min(len(n.split()) for n in names) == 1 and max(len(n.split()) for n in names) >= 4
    with pytest.raises(InputError):
        bench_classnames(0)


def test_bench_rejects_bad_options(tiny_model, capsys):
    assert main(["bench", "--model", tiny_model, "--batch", "0", "--device", "cpu"]) == 1
    assert "--batch must be >= 1" in capsys.readouterr().err
    assert main(["bench", "--model", tiny_model, "--methods", "pmpo,nope", "--device", "cpu"]) == 1
    assert "unknown training method" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["pmpo", "maple"])
def test_text_grad_checkpointing_gives_equal_gradients(backbone, method):
    """Recomputing text blocks in backward must not change a single gradient (deep prompts included)."""
    names = ["cat", "dog", "small red bird"]
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 2])
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build_model(PMPOConfig(method=method, model=backbone.model_name, pretrained="none",
                                       consistency_weight=1.0), backbone=backbone).train()
        model.text.grad_checkpointing = ckpt
        out = model.loss(images, labels, names)
        out["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in model.prompts.named_parameters() if p.grad is not None})
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys() and "ctx" in plain
    if method == "maple":
        assert "deep_ctx" in plain  # deep text prompts are spliced between checkpointed blocks
    for name in plain:
        assert plain[name].abs().sum() > 0, name
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6, rtol=1e-5), name


def test_grad_checkpointing_inactive_without_grad(backbone):
    model = build_model(PMPOConfig(method="pmpo", model=backbone.model_name, pretrained="none"), backbone=backbone)
    model.text.grad_checkpointing = True
    with torch.no_grad():
        with_flag = model.prompt_features(["cat", "dog"])
    model.text.grad_checkpointing = False
    with torch.no_grad():
        without = model.prompt_features(["cat", "dog"])
    assert torch.equal(with_flag, without)


def test_minimal_parts_do_the_steps_gradient_work(backbone):
    """The parts are a floor only if they do the step's unavoidable work: the image part must send
    gradients back to the prompt tokens through the vision tower, the text part through the text tower."""
    model = build_model(PMPOConfig(method="pmpo", model=backbone.model_name, n_prompts=2), backbone=backbone).train()
    size = backbone.image_size
    image, text = minimal_parts(model, torch.randn(2, 3, size, size), ["cat", "dog", "tree frog"], torch.device("cpu"),
                                "fp32")
    image()
    coupling_grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and "couplings" in n]
    assert coupling_grads and all(g is not None and g.abs().sum() > 0 for g in coupling_grads)
    text()
    assert model.prompts.ctx.grad is not None and model.prompts.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if p.requires_grad and "couplings" in n)
