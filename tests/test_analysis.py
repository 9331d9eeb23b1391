"""The analysis toolkit: each analysis end-to-end on the tiny model, and the numbers behind the figures."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pmpo import PMPOConfig, build_model, load_backbone, save_checkpoint
from pmpo.cli import main as cli_main
from pmpo.data import shapeworld as sw

CLASSES = ["red circle", "blue square", "green triangle"]


@pytest.fixture(scope="module")
def backbone(tiny_model):
    return load_backbone(tiny_model)


def make(backbone, method="pmpo", **kw):
    return build_model(PMPOConfig(method=method, model=backbone.model_name, pretrained="none", **kw), backbone=backbone).eval()


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    """An imagefolder dataset (train/test × 3 classes) of ShapeWorld renders at 32 px."""
    root = tmp_path_factory.mktemp("shapes")
    labels = {name: sw.class_names().index(name) for name in CLASSES}
    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("test", 5)):
        for name, label in labels.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                sw.sample_class_scene(label, rng, "downstream", 32).pil().save(folder / f"{i}.png")
    return root


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def model_args(tiny_model, out: Path) -> list[str]:
    return ["--model", tiny_model, "--pretrained", "none", "--device", "cpu", "--out", str(out)]


def assert_outputs(out: Path, *stems: str, csvs: tuple[str, ...] = ()) -> None:
    for stem in stems:
        for ext in ("png", "pdf"):
            path = out / f"{stem}.{ext}"
            assert path.is_file() and path.stat().st_size > 1000, path
        assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-"
    for name in csvs:
        rows = read_csv(out / name)
        assert rows, name


# --- attention atlas --------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    {},
    {"partition": "all"},
    {"partition": "second-half", "visual_mode": "carry"},
    {"visual_pass": "per_prompt"},
])
def test_attention_rows_and_rollout_rows_sum_to_one(backbone, kw):
    from pmpo.analysis import attention_atlas as aa

    model = make(backbone, **kw)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    n_layers = model.vision.n_layers
    with torch.no_grad():
        views = model.encode_image(x, return_attention=True)
    for i, view in enumerate(views):
        rows = aa.cls_attention(view)
        assert len(rows) == n_layers
        for r in rows:
            assert torch.allclose(r.sum(-1), torch.ones(2), atol=1e-5)
        layouts = aa.slot_layouts(model, n_layers, i if len(views) > 1 else None)
        # slot owners match the tokens the forward pass really had at every layer
        assert [len(l.owners) + view.n_tokens for l in layouts] == [a.shape[-1] for a in view.attentions]
        flow, owners = aa.attention_rollout(view.attentions, layouts, view.n_tokens)
        assert torch.allclose(flow.sum(-1), torch.ones(flow.shape[:2]), atol=1e-5)
        assert (flow >= 0).all()
        assert flow.shape[-1] == view.n_tokens + len(owners)


def test_rollout_matches_abnar_zuidema_without_prompts(backbone):
    """No prompts: rollout = product of (0.5·A + 0.5·I) over layers, first layer rightmost."""
    from pmpo.analysis import attention_atlas as aa

    model = make(backbone, "zeroshot")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        (out,) = model.encode_image(x, return_attention=True)
    flow, owners = aa.attention_rollout(out.attentions, aa.slot_layouts(model, model.vision.n_layers), out.n_tokens)
    expected = torch.eye(out.n_tokens).expand(2, -1, -1)
    for a in out.attentions:
        expected = (0.5 * a.mean(1) + 0.5 * torch.eye(out.n_tokens)) @ expected
    assert owners == []
    assert torch.allclose(flow, expected, atol=1e-5)


def test_rollout_gives_prompts_no_mass_when_nobody_attends_to_them():
    from pmpo.analysis.attention_atlas import SlotLayout, attention_rollout

    n_tokens, k, layers = 3, 2, 3
    attns = []
    for _ in range(layers):
        a = torch.rand(1, 2, n_tokens + k, n_tokens + k)
        a[..., n_tokens:] = 0  # no token reads the prompt slots
        attns.append(a / a.sum(-1, keepdim=True))
    layouts = [SlotLayout(True, [0, 0]), SlotLayout(True, [1, 1]), SlotLayout(False, [1, 1])]
    flow, owners = attention_rollout(attns, layouts, n_tokens)
    assert owners == [0, 0, 1, 1]
    assert torch.allclose(flow[0, :n_tokens, n_tokens:], torch.zeros(n_tokens, 2 * k))
    plain = torch.eye(n_tokens)
    for a in attns:  # the image tokens' sub-graph is then closed: plain rollout on it
        plain = (0.5 * a[0].mean(0)[:n_tokens, :n_tokens] + 0.5 * torch.eye(n_tokens)) @ plain
    assert torch.allclose(flow[0, :n_tokens, :n_tokens], plain, atol=1e-6)


def test_prompt_mass_follows_the_partition(backbone):
    from pmpo.analysis import attention_atlas as aa

    model = make(backbone)  # equal partition of 12 layers into 4 segments
    x = torch.randn(2, 3, 32, 32)
    result = aa.analyse(model, x, CLASSES)
    for p, (a, b) in enumerate(model.prompts.segments):
        present = [l for l, v in enumerate(result.mass[p]) if v is not None]
        assert present == list(range(a, b + 1))
        assert all(0 <= result.mass[p][l][0] <= 1 for l in present)
    # with one prompt per layer, its mass is everything the CLS row does not spend on image tokens
    with torch.no_grad():
        (out,) = model.encode_image(x, return_attention=True)
    rows = aa.cls_attention(out)
    layer = model.prompts.segments[2][0]
    expected = (1 - rows[layer][:, : out.n_tokens].sum(-1)).mean()
    assert abs(result.mass[2][layer][0] - float(expected)) < 1e-5
    assert result.maps.shape == (2, 4, *model.vision.grid_size)


def test_attention_atlas_cli(tiny_model, image_root, tmp_path):
    out = tmp_path / "atlas"
    code = cli_main(["analyze", "attention_atlas", *model_args(tiny_model, out),
                     "--dataset", "imagefolder", "--root", str(image_root), "--per-class", "2", "--rows", "3"])
    assert code == 0
    assert_outputs(out, "attention_atlas", "attention_prompt_mass",
                   csvs=("attention_maps.csv", "attention_prompt_mass.csv", "attention_rollout_sources.csv"))
    sources = read_csv(out / "attention_rollout_sources.csv")
    assert len(sources) == 6
    for row in sources:
        shares = [float(v) for k, v in row.items() if k not in ("image", "path")]
        assert abs(sum(shares) - 1) < 1e-4
    maps = read_csv(out / "attention_maps.csv")
    rollout = [float(r["attention"]) for r in maps if r["map"] == "rollout" and r["image"] == "0"]
    patches = float(sources[0]["patches"])
    assert abs(sum(rollout) - patches) < 1e-4
    assert {r["map"] for r in maps} == {"P1: L0–2", "P2: L3–5", "P3: L6–8", "P4: L9–11", "rollout"}


def test_attention_atlas_on_unprompted_model_uses_layer_groups(tiny_model, image_root, tmp_path):
    from pmpo.analysis import attention_atlas

    out = tmp_path / "zs"
    images = [str(next((image_root / "test" / c).iterdir())) for c in CLASSES]
    code = attention_atlas.main([*model_args(tiny_model, out), "--method", "zeroshot", "--images", *images,
                                 "--classes", ",".join(CLASSES), "--groups", "3"])
    assert code == 0
    maps = read_csv(out / "attention_maps.csv")
    assert {r["map"] for r in maps} == {"L0–3", "L4–7", "L8–11", "rollout"}
    assert read_csv(out / "attention_prompt_mass.csv") == []


# --- prompt words -----------------------------------------------------------------------------------

def test_prompt_words_reads_init_phrase_back(backbone, tiny_model, tmp_path):
    """Context initialised from "a photo of a": position 2 of every prompt is nearest to "photo"."""
    from pmpo.analysis import prompt_words

    ckpt = tmp_path / "prompts.safetensors"
    save_checkpoint(make(backbone, n_prompts=2, n_ctx=4), ckpt)
    out = tmp_path / "words"
    code = prompt_words.main(["--checkpoint", str(ckpt), "--device", "cpu", "--out", str(out), "--top-k", "3"])
    assert code == 0
    assert_outputs(out, "prompt_words", csvs=("prompt_words.csv",))
    rows = read_csv(out / "prompt_words.csv")
    assert len(rows) == 2 * 4 * 2 * 3  # prompts × positions × metrics × k
    top = {(r["prompt"], r["position"], r["metric"]): r for r in rows if r["rank"] == "1"}
    for prompt in ("1", "2"):
        for position, word in (("1", "a"), ("2", "photo"), ("3", "of"), ("4", "a")):
            cos, euc = top[(prompt, position, "cosine")], top[(prompt, position, "euclidean")]
            assert cos["token"] == word and euc["token"] == word
            assert float(cos["score"]) > 0.9999 and float(euc["score"]) < 1e-4
    # ranks are ordered: cosine descending, distance ascending
    for metric, sign in (("cosine", -1), ("euclidean", 1)):
        scores = [float(r["score"]) for r in rows if r["metric"] == metric and r["prompt"] == "1" and r["position"] == "2"]
        assert scores == sorted(scores, key=lambda s: sign * s)
    md = (out / "prompt_words.md").read_text()
    assert md.startswith("| prompt | layer | ctx 1 |") and "`photo` (1.00) / `photo` (0.00)" in md


def test_nearest_tokens_moves_with_the_vector(backbone):
    from pmpo.analysis.prompt_words import nearest_tokens

    model = make(backbone)
    vocab = model.text.token_embedding_matrix.detach()
    target = int(model.text.tokenize(["dog"])[0, 1])
    v = vocab[target].clone()[None] * 3.0  # cosine is scale-free, Euclidean is not
    cos_s, cos_i = nearest_tokens(v, vocab, 1, "cosine", chunk=1000)
    assert int(cos_i[0, 0]) == target and model.text.decode([target]) == ["dog"]
    _, euc_i = nearest_tokens(v, vocab, 1, "euclidean", chunk=1000)
    brute = int(torch.cdist(v, vocab).argmin())
    assert int(euc_i[0, 0]) == brute


def test_prompt_words_refuses_models_without_prompts(tiny_model, tmp_path, capsys):
    code = cli_main(["analyze", "prompt_words", "--method", "zeroshot", *model_args(tiny_model, tmp_path / "x")])
    assert code == 1
    err = capsys.readouterr().err
    assert "pmpo analyze: error:" in err and "no learned prompts" in err and "Traceback" not in err


# --- prompt geometry --------------------------------------------------------------------------------

def test_similarity_matrix_and_spread(backbone):
    from pmpo.analysis.prompt_geometry import class_embeddings, class_spread, similarity_matrix

    model = make(backbone, ctx_init=["a photo of a", "a drawing of a", "", "an image of"])
    names, emb = class_embeddings(model, CLASSES)
    assert names == ["prior", "P1", "P2", "P3", "P4"] and emb.shape[:2] == (5, 3)
    sim = similarity_matrix(emb)
    assert np.allclose(sim, sim.T, atol=1e-6) and np.allclose(np.diag(sim), 1, atol=1e-5)
    manual = float(sum(torch.dot(emb[1, c], emb[3, c]) for c in range(3)) / 3)
    assert abs(sim[1, 3] - manual) < 1e-5
    spread, to_prior = class_spread(emb)
    assert spread.shape == (3,) and (spread > 0).all() and (to_prior >= -1e-6).all()
    same, _ = class_spread(torch.stack([emb[0], emb[1], emb[1]]))  # identical prompts: no spread
    assert np.allclose(same, 0, atol=1e-6)


def test_prompt_geometry_cli(tiny_model, tmp_path):
    from pmpo.analysis import prompt_geometry

    out = tmp_path / "geo"
    code = prompt_geometry.main([*model_args(tiny_model, out), "--classes", ",".join(CLASSES + ["cat", "dog"]),
                                 "--projection", "pca"])
    assert code == 0
    assert_outputs(out, "prompt_similarity", "prompt_spread", "prompt_umap",
                   csvs=("prompt_similarity.csv", "prompt_spread.csv", "prompt_umap.csv"))
    sim = read_csv(out / "prompt_similarity.csv")
    assert [r["row"] for r in sim] == ["prior", "P1", "P2", "P3", "P4"]
    assert all(abs(float(r[r["row"]]) - 1) < 1e-4 for r in sim)
    assert len(read_csv(out / "prompt_umap.csv")) == 5 * 5


# --- embedding clusters -----------------------------------------------------------------------------

def test_embedding_clusters_silhouette_is_sklearns(backbone, tiny_model, image_root, tmp_path):
    from sklearn.metrics import silhouette_score

    from pmpo.analysis import embedding_clusters
    from pmpo.analysis.common import image_tensor
    from pmpo.data import build_dataset

    model = make(backbone)
    ckpt = tmp_path / "pmpo.safetensors"
    save_checkpoint(model, ckpt)  # the command must see these (randomly initialised) couplings
    out = tmp_path / "clusters"
    code = cli_main(["analyze", "embedding_clusters", "--checkpoint", str(ckpt), "--device", "cpu", "--out", str(out),
                     "--dataset", "imagefolder", "--root", str(image_root), "--per-class", "4", "--projection", "pca"])
    assert code == 0
    assert_outputs(out, "embedding_clusters", csvs=("embedding_clusters.csv", "embedding_silhouette.csv"))
    scores = {r["method"]: float(r["silhouette"]) for r in read_csv(out / "embedding_silhouette.csv")}
    assert all(-1 <= s <= 1 for s in scores.values())
    splits = build_dataset("imagefolder", image_root)
    items = [d for c in range(3) for d in [t for t in splits.test if t.label == c][:4]]
    x = image_tensor(items, model.eval_transform())
    labels = np.array([d.label for d in items])
    zs = model.plain_image_features(x).numpy()
    ours = embedding_clusters.prompted_features(model, x).numpy()
    assert abs(scores["zero-shot CLIP"] - silhouette_score(zs, labels, metric="cosine")) < 1e-5
    assert abs(scores["pmpo"] - silhouette_score(ours, labels, metric="cosine")) < 1e-5
    coords = read_csv(out / "embedding_clusters.csv")
    assert len(coords) == 12 and all(np.isfinite(float(r["model_x"])) for r in coords)


def test_embedding_clusters_need_labels(tiny_model, image_root, tmp_path, capsys):
    images = [str(p) for p in sorted((image_root / "test" / CLASSES[0]).iterdir())[:2]]
    code = cli_main(["analyze", "embedding_clusters", *model_args(tiny_model, tmp_path / "x"),
                     "--images", *images, "--classes", ",".join(CLASSES)])
    assert code == 1
    assert "clusters need a class per image" in capsys.readouterr().err


def test_analyze_command_lists_every_analysis():
    from pmpo import analysis
    from pmpo.commands import analyze

    assert analyze.ANALYSES == analysis.ANALYSES
    for name in analysis.ANALYSES:
        module = analysis.get(name)
        assert callable(module.run) and callable(module.add_arguments) and module.DESCRIPTION


# --- ablations --------------------------------------------------------------------------------------

def write_result(folder: Path, name: str, seed: int, accuracy: dict, config: dict, protocol="base2new",
                 dataset="shapeworld_downstream", method="pmpo", targets=None) -> Path:
    """A result.json as pmpo.protocols.run_protocol writes it (the fields tables and plots read)."""
    from pmpo.protocols import RESULT_FILE, RESULT_FORMAT

    folder.mkdir(parents=True, exist_ok=True)
    acc = {"base": None, "new": None, "hm": None, "all": None, **accuracy}
    if acc["base"] is not None and acc["new"] is not None:
        acc["hm"] = 2 * acc["base"] * acc["new"] / (acc["base"] + acc["new"])
    data = {"format": RESULT_FORMAT, "name": name, "method": method, "dataset": dataset, "protocol": protocol,
            "seed": seed, "shots": 16, "config": config, "train": {}, "accuracy": acc, "targets": targets or {}}
    path = folder / RESULT_FILE
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


BASE_CFG = {"method": "pmpo", "n_prompts": 4, "partition": "equal", "coupling": "per_prompt", "alpha": 0.2}


def synthetic_sweep(root: Path) -> dict:
    """base + n_prompts ∈ {1, 8} + partition=all, two seeds each; returns the accuracies written."""
    runs = {
        "base": (BASE_CFG, [(80.0, 70.0), (82.0, 72.0)]),
        "n_prompts=1": ({**BASE_CFG, "n_prompts": 1, "alpha": 0.5}, [(78.0, 66.0), (76.0, 68.0)]),
        "n_prompts=8": ({**BASE_CFG, "n_prompts": 8, "alpha": 1 / 9}, [(83.0, 69.0), (85.0, 67.0)]),
        "partition=all": ({**BASE_CFG, "partition": "all"}, [(79.0, 71.0), (79.0, 73.0)]),
    }
    for name, (cfg, seeds) in runs.items():
        for seed, (b, n) in enumerate(seeds, start=1):
            write_result(root / name / f"seed_{seed}", name, seed, {"base": b, "new": n}, cfg)
    return runs


def test_ablation_plot_from_result_files(tmp_path):
    from pmpo.analysis import ablations

    runs = synthetic_sweep(tmp_path / "runs")
    write_result(tmp_path / "runs" / "other", "coop", 1, {"base": 1.0, "new": 1.0}, BASE_CFG)  # not an ablation run
    out = tmp_path / "fig"
    assert ablations.main(["plot", str(tmp_path / "runs"), "--out", str(out)]) == 0
    assert_outputs(out, "ablations", csvs=("ablations.csv",))
    rows = read_csv(out / "ablations.csv")
    assert [(r["factor"], r["value"]) for r in rows] == [
        ("n_prompts", "1"), ("n_prompts", "4"), ("n_prompts", "8"), ("partition", "all"), ("partition", "equal")]
    by = {(r["factor"], r["value"]): r for r in rows}
    assert by[("n_prompts", "4")]["is_base"] == "True" and by[("partition", "equal")]["variant"] == "base"
    base_mean = np.mean([b for b, _ in runs["n_prompts=8"][1]])
    new_mean = np.mean([n for _, n in runs["n_prompts=8"][1]])
    r8 = by[("n_prompts", "8")]
    assert abs(float(r8["base_mean"]) - base_mean) < 1e-4 and abs(float(r8["new_mean"]) - new_mean) < 1e-4
    assert abs(float(r8["base_std"]) - np.std([83.0, 85.0], ddof=0)) < 1e-4
    # HM of the seed-averaged accuracies (DESIGN.md §3), not the mean of per-seed HMs
    assert abs(float(r8["hm_mean"]) - 2 * base_mean * new_mean / (base_mean + new_mean)) < 1e-4
    # a factor with no runs is an error a user can act on
    assert ablations.main(["plot", str(tmp_path / "runs"), "--factors", "coupling", "--out", str(out)]) == 1


def test_ablation_plot_names_runs_of_any_sweep_by_their_one_changed_option(tmp_path, capsys):
    """--base: runs named their own way (as the ShapeWorld benchmark's pmpo-n1, pmpo-no-prior) are
    placed by the one prompt option that differs from the base run's config."""
    from pmpo.analysis import ablations

    root = tmp_path / "runs"
    accs = [(80.0, 70.0), (82.0, 72.0)]
    runs = {"pmpo": BASE_CFG,
            "pmpo-n1": {**BASE_CFG, "n_prompts": 1, "alpha": 0.5},        # alpha follows N: one change
            "pmpo-no-prior": {**BASE_CFG, "alpha": 0.0},
            "pmpo-two-things": {**BASE_CFG, "partition": "all", "coupling": "shared"},
            "pmpo-longer": BASE_CFG}                                       # same prompts, other recipe
    for name, cfg in runs.items():
        for seed, (b, n) in enumerate(accs, start=1):
            path = write_result(root / name / f"seed_{seed}", name, seed, {"base": b, "new": n}, cfg)
            if name == "pmpo-longer":
                data = json.loads(path.read_text())
                path.write_text(json.dumps({**data, "train": {"epochs": 20}}))
    out = tmp_path / "fig"
    assert ablations.main(["plot", str(root), "--base", "pmpo", "--out", str(out)]) == 0
    rows = read_csv(out / "ablations.csv")
    assert [(r["factor"], r["value"], r["variant"]) for r in rows] == [
        ("n_prompts", "1", "n_prompts=1"), ("n_prompts", "4", "base"),
        ("alpha", "0.0", "alpha=0.0"), ("alpha", "0.2", "base")]
    assert "left out (not one prompt option away from 'pmpo'): pmpo-longer, pmpo-two-things" in capsys.readouterr().err
    # without --base these names are not ablation runs; a --base that names no run says which exist
    assert ablations.main(["plot", str(root), "--out", str(out)]) == 1
    assert ablations.main(["plot", str(root), "--base", "nope", "--out", str(out)]) == 1
    assert "'nope': no run has that name (runs: pmpo, pmpo-longer, pmpo-n1" in capsys.readouterr().err


def test_ablation_sweep_runs_and_resumes(tiny_model, image_root, tmp_path, capsys):
    from pmpo.analysis import ablations

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(json.dumps({  # JSON is YAML
        "protocol": "base2new", "dataset": "imagefolder", "root": str(image_root), "shots": 2, "seeds": [1],
        "device": "cpu", "model": {"method": "pmpo", "model": tiny_model, "pretrained": "none", "n_prompts": 2},
        "train": {"epochs": 1, "batch_size": 4, "num_workers": 0},
        "factors": {"n_prompts": [1, 2]},
    }))
    out = tmp_path / "abl"
    assert ablations.main(["run", str(sweep), "--out", str(out)]) == 0
    first = {p: p.stat().st_mtime_ns for p in out.rglob("result.json")}
    assert sorted(p.parent.parent.name for p in first) == ["base", "n_prompts=1"]  # n_prompts=2 is the base
    rows = read_csv(out / "figures" / "ablations.csv")
    assert [(r["factor"], r["value"], r["is_base"]) for r in rows] == [("n_prompts", "1", "False"), ("n_prompts", "2", "True")]
    assert all(0 <= float(r["hm_mean"]) <= 100 for r in rows)
    capsys.readouterr()
    assert ablations.main(["run", str(sweep), "--out", str(out)]) == 0  # resumed: nothing rerun
    assert {p: p.stat().st_mtime_ns for p in out.rglob("result.json")} == first
    assert capsys.readouterr().err.count("done earlier, skipped") == 2


def test_ablation_sweep_rejects_unknown_factor(tmp_path, capsys):
    from pmpo.analysis import ablations

    sweep = tmp_path / "bad.yaml"
    sweep.write_text("protocol: base2new\ndataset: shapeworld\nfactors:\n  n_promptz: [1, 2]\n")
    assert ablations.main(["run", str(sweep), "--out", str(tmp_path / "o")]) == 1
    assert "factor 'n_promptz' is not a prompt option" in capsys.readouterr().err


def test_shipped_ablation_sweep_is_valid():
    from pmpo.analysis.ablations import load_sweep, variants

    sweep = load_sweep("shapeworld")
    names = [v.name for v in variants(sweep)]
    assert names[0] == "base" and len(names) == len(set(names))
    assert {"n_prompts", "partition", "coupling", "alpha"} <= set(sweep.factors)
    assert "alpha=0.333333" not in names  # alpha 1/(N+1) = 1/3 is the base: run once


# --- tables -----------------------------------------------------------------------------------------

def test_tables_from_result_files(tmp_path):
    from pmpo.analysis import tables

    res = tmp_path / "results"
    accs = {("pmpo", "dtd"): [(80.0, 60.0), (82.0, 62.0)], ("coop", "dtd"): [(81.0, 50.0), (83.0, 52.0)],
            ("pmpo", "eurosat"): [(90.0, 70.0), (92.0, 72.0)], ("coop", "eurosat"): [(95.0, 55.0), (95.0, 57.0)]}
    for (method, dataset), seeds in accs.items():
        for seed, (b, n) in enumerate(seeds, start=1):
            write_result(res / dataset / method / str(seed), method, seed, {"base": b, "new": n}, {}, dataset=dataset, method=method)
    write_result(res / "xd", "pmpo", 1, {"all": 70.0}, {}, protocol="cross_dataset", dataset="imagenet",
                 targets={"dtd": 40.0, "eurosat": 45.0})
    out = tmp_path / "tables"
    assert tables.main([str(res), "--reference", "--out", str(out)]) == 0
    assert_outputs(out, "table_base2new", "table_cross_dataset", csvs=("table_base2new.csv", "table_cross_dataset.csv"))
    md = (out / "table_base2new.md").read_text()
    assert "| dtd | pmpo | 2 | 81.00 ± 1.00 | **61.00 ± 1.00** |" in md
    assert "| dtd | coop | 2 | **82.00 ± 1.00** | 51.00 ± 1.00 |" in md
    assert "MaPLe (paper)" in md and "79.28" in md
    tex = (out / "table_base2new.tex").read_text()
    assert r"\toprule" in tex and r"\bottomrule" in tex and r"\textbf{61.00 $\pm$ 1.00}" in tex
    rows = read_csv(out / "table_base2new.csv")
    avg = next(r for r in rows if r["dataset"] == "average" and r["method"] == "pmpo")
    assert abs(float(avg["base_mean"]) - np.mean([81.0, 91.0])) < 1e-3
    xd = (out / "table_cross_dataset.md").read_text()
    assert "40.00" in xd and "42.50" in xd  # target accuracy and the targets' average


def test_table_bars_give_zero_shot_black_and_nine_methods_distinct_colours():
    from pmpo.analysis import style, tables
    from pmpo.results import Row

    names = ["zeroshot", "coop", "cocoop", "kgcoop", "vpt", "ivlp", "maple", "promptsrc", "pmpo"]
    rows = [Row("base2new", "d", n, 16, [1], {}) for n in names] + [Row("base2new", "d", "MaPLe (paper)", 16, [], {},
                                                                       reference="paper")]
    colours = tables.bar_colours(rows)
    assert colours[0] == style.PRIOR_COLOUR and colours[-1] == "#ffffff"
    assert len(set(colours[:9])) == 9


def test_tables_reject_missing_protocol(tmp_path, capsys):
    from pmpo.analysis import tables

    write_result(tmp_path / "r", "pmpo", 1, {"base": 1.0, "new": 2.0}, {})
    assert tables.main([str(tmp_path / "r"), "--protocol", "domain_generalization", "--out", str(tmp_path / "o")]) == 1
    assert "no results of protocol(s) domain_generalization" in capsys.readouterr().err
