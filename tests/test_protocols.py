"""Protocols (DESIGN.md §3) on tiny image trees, and result tables."""

from __future__ import annotations

import csv
import io
import json

import pytest
from test_engine import make_colour_tree

from pmpo import PMPOConfig
from pmpo.data import harmonic_mean
from pmpo.engine import TrainConfig
from pmpo.errors import InputError
from pmpo.protocols import read_finished, run_protocol
from pmpo.reference import base2new_reference
from pmpo.results import aggregate, build_tables, dataset_average, load_results, render


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_colour_tree(tmp_path_factory.mktemp("colours"))


def cfg(tiny_model, method):
    return PMPOConfig(method=method, model=tiny_model, pretrained="none")


def fast(**kw):
    return TrainConfig(**{"epochs": 1, "batch_size": 4, "lr": 0.01, "warmup_epochs": 0, "num_workers": 0, **kw})


def test_base2new_run_writes_a_complete_result(tiny_model, tree, tmp_path):
    out = tmp_path / "run"
    r = run_protocol("base2new", "imagefolder", tree, cfg(tiny_model, "coop"), fast(), out, shots=2, seed=3)
    saved = json.loads((out / "result.json").read_text())
    assert saved["accuracy"] == r["accuracy"]
    for key in ("method", "dataset", "protocol", "seed", "shots", "config", "train", "accuracy", "targets",
                "per_class", "wall_time_s", "images_per_s", "versions", "git_commit", "backbone"):
        assert key in saved, key
    assert (saved["protocol"], saved["seed"], saved["shots"], saved["train"]["seed"]) == ("base2new", 3, 2, 3)
    acc = saved["accuracy"]
    assert acc["all"] is None and acc["hm"] == pytest.approx(harmonic_mean(acc["base"], acc["new"]))
    # base = first ceil(4/2) labels (blue, green), new = the rest, each scored among its own classes
    assert set(saved["per_class"]["base"]) == {"blue", "green"} and set(saved["per_class"]["new"]) == {"red", "yellow"}
    assert saved["n_train"] == 2 * 2 and saved["n_test"] == {"base": 4, "new": 4}
    assert set(saved["versions"]) >= {"pmpo", "torch", "open_clip", "python"}
    assert (out / "last.safetensors").is_file() and (out / "metrics.jsonl").is_file()
    assert list((out / "fewshot").rglob("shot_2-seed_3.json"))  # the sampled shots are recorded
    # resuming a finished run returns it untouched
    mtime = (out / "result.json").stat().st_mtime_ns
    assert run_protocol("base2new", "imagefolder", tree, cfg(tiny_model, "coop"), fast(), out, shots=2, seed=3,
                        resume=True) == saved
    assert (out / "result.json").stat().st_mtime_ns == mtime


def test_same_seed_same_result_and_zero_shot_cross_dataset(tiny_model, tree, tmp_path):
    # zero-shot: nothing to train; the targets are scored with their own class lists
    target = tmp_path / "target.csv"
    rows = ["path,label"] + [f"{p},{p.parent.name}" for p in sorted((tree / "test").rglob("*.png"))
                             if p.parent.name in ("red", "blue")]
    target.write_text("\n".join(rows))
    a = run_protocol("cross_dataset", "imagefolder", tree, cfg(tiny_model, "zeroshot"), fast(), tmp_path / "a",
                     shots=2, seed=1, targets=["csv"], target_root=target)
    assert a["accuracy"]["all"] is not None and list(a["targets"]) == ["csv-target"]
    assert set(a["per_class"]["csv-target"]) == {"red", "blue"} and a["history"] == []
    assert (tmp_path / "a" / "last.safetensors").is_file()
    b = run_protocol("cross_dataset", "imagefolder", tree, cfg(tiny_model, "zeroshot"), fast(), tmp_path / "b",
                     shots=2, seed=1, targets=["csv"], target_root=target)
    assert a["targets"] == b["targets"] and a["accuracy"] == b["accuracy"]
    with pytest.raises(InputError, match="unknown protocol"):
        run_protocol("b2n", "imagefolder", tree, cfg(tiny_model, "zeroshot"), fast(), tmp_path / "c")
    assert read_finished(tmp_path / "c") is None


# --- tables ------------------------------------------------------------------------------------


def fake(name, dataset, seed, base, new, protocol="base2new"):
    return {"format": "pmpo-result/1", "name": name, "method": name, "dataset": dataset, "protocol": protocol,
            "seed": seed, "shots": 16, "accuracy": {"base": base, "new": new, "hm": harmonic_mean(base, new), "all": None},
            "targets": {}, "_path": f"{name}/{dataset}/{seed}"}


RESULTS = [
    fake("pmpo", "dtd", 1, 80.0, 60.0), fake("pmpo", "dtd", 2, 82.0, 64.0),
    fake("pmpo", "eurosat", 1, 90.0, 70.0), fake("pmpo", "eurosat", 2, 92.0, 50.0),
    fake("coop", "dtd", 1, 85.0, 40.0), fake("coop", "eurosat", 1, 95.0, 45.0),
]


def test_aggregation_follows_the_papers():
    rows = {(r.dataset, r.name): r for r in aggregate(RESULTS)}
    dtd = rows["dtd", "pmpo"]
    assert dtd.seeds == [1, 2] and dtd.metrics["base"].mean == 81.0
    assert dtd.metrics["base"].std == pytest.approx(1.0)  # population std over seeds (ddof 0), as CoOp
    assert dtd.metrics["hm"].mean == pytest.approx(harmonic_mean(81.0, 62.0))  # HM of the averages
    avg = {r.name: r for r in dataset_average(list(rows.values()))}
    assert avg["pmpo"].metrics["base"].mean == pytest.approx((81.0 + 91.0) / 2)
    assert avg["pmpo"].metrics["new"].mean == pytest.approx((62.0 + 60.0) / 2)
    assert avg["pmpo"].metrics["hm"].mean == pytest.approx(harmonic_mean(86.0, 61.0))
    with pytest.raises(InputError, match="two results"):
        aggregate(RESULTS + [fake("pmpo", "dtd", 1, 1.0, 1.0)])


def test_renderers_bold_the_best_and_show_references(tmp_path):
    tables = build_tables(RESULTS, reference=True)
    md = render(tables, "md")
    assert "| dtd | pmpo | 2 | 81.00 ± 1.00 | **62.00 ± 2.00** |" in md
    assert "| dtd | coop | 1 | **85.00** | 40.00 |" in md
    assert "Average (2)" in md and "MaPLe (paper)" in md and "not directly comparable" in md
    for ref in base2new_reference():
        assert f"{ref.hm:.2f}" in md
    latex = render(tables, "latex")
    assert r"\toprule" in latex and r"\bottomrule" in latex and r"\textbf{85.00}" in latex and r"$\pm$" in latex
    rows = list(csv.DictReader(io.StringIO(render(tables, "csv"))))
    pm = [r for r in rows if r["dataset"] == "dtd" and r["method"] == "pmpo"][0]
    assert float(pm["base_mean"]) == 81.0 and float(pm["hm_mean"]) == pytest.approx(harmonic_mean(81.0, 62.0))
    # loading from folders, recursively; a broken file is a clear error
    for r in RESULTS[:2]:
        path = tmp_path / "runs" / r["_path"] / "result.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({k: v for k, v in r.items() if k != "_path"}))
    assert len(load_results([tmp_path / "runs"])) == 2
    (tmp_path / "runs" / "bad").mkdir()
    (tmp_path / "runs" / "bad" / "result.json").write_text("{")
    with pytest.raises(InputError, match="not valid JSON"):
        load_results([tmp_path / "runs"])
