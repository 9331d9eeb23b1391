"""The pure parts of ``benchmarks/demo.py`` (the demo benchmark): statistics, the 1000-class list,
the /train contract check, the train-report parser and the Markdown table. No app is started here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("pmpo_demo_bench", ROOT / "benchmarks" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pure(bench):
    """The pure parts (benchmarks/demo_report.py), on the path that loading demo.py set."""
    import demo_report

    return demo_report


def test_summarize_and_ratio(bench, pure):
    assert pure.summarize([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert pure.summarize([4.0, 1.0])["median"] == 2.5
    assert pure.summarize([]) == {"median": None, "min": None, "max": None, "n": 0}
    assert pure.ratio(2.6, 2.0) == pytest.approx(1.3)
    assert pure.ratio(1.0, 0.0) is None and pure.ratio(None, 1.0) is None and pure.ratio(1.0, None) is None


def test_rows_check_their_targets(bench, pure):
    row = pure.make_row("Classify", [1.0, 3.0, 2.0], floor_s=1.6, floor_label="8 passes", target="≤ 1.3× floor",
                         limit_s=1.3 * 1.6)
    assert row["median"] == 2.0 and row["x_floor"] == pytest.approx(1.25) and row["ok"] is True
    assert pure.make_row("again", [0.5], limit_s=0.3)["ok"] is False
    assert pure.make_row("no target", [0.5])["ok"] is None
    assert pure.make_row("failed", [], limit_s=1.0, error="boom")["ok"] is False


def test_class_list_is_distinct_deterministic_and_new_per_variant(bench, pure):
    names = pure.class_list(1000)
    assert len(names) == 1000 and len(set(names)) == 1000
    assert names[0] == "class 0001 object" and names == pure.class_list(1000)
    lists = [set(pure.class_list(1000, v)) for v in range(25)]
    assert all(len(s) == 1000 for s in lists)
    assert len(set().union(*lists)) == 25 * 1000  # no name shared between variants: each list is new


def report(heldout, done=False, zero_shot=20.0, **kw):
    return {"phase": "done" if done else "train", "elapsed_s": 0.0, "eta_s": None, "zero_shot": zero_shot,
            "heldout": heldout, "done": done, "stopped": False, "checkpoint": "c.safetensors" if done else None,
            "images_per_s": 9.5, "n_train": 96, "n_heldout": 32, **kw}


def test_train_report_parser_finds_first_heldout_and_final(bench, pure):
    h1 = {"elapsed_s": 20.0, "step": 10, "epoch": 1.0, "zero_shot": 20.0, "trained": 30.0}
    h2 = {"elapsed_s": 55.0, "step": 40, "epoch": 4.0, "zero_shot": 20.0, "trained": 50.0}
    h3 = {"elapsed_s": 80.0, "step": 60, "epoch": 6.0, "zero_shot": 20.0, "trained": 70.0}
    events = [(0.5, report([])), (1.0, None), (3.0, {"__type__": "update"}), (12.0, report([])),
              (24.0, report([h1])), (58.0, report([h1, h2])), (85.0, report([h1, h2, h3])),
              (86.0, report([h1, h2, h3], done=True))]
    out = pure.parse_train_reports(events)
    assert out["n_reports"] == 6 and out["first_report_s"] == 0.5
    assert out["first_heldout_s"] == 24.0 and out["first_heldout"] == h1
    assert out["done_s"] == 86.0
    assert (out["zero_shot"], out["trained"], out["gain"]) == (20.0, 70.0, 50.0)
    assert out["best_gain_within_60s"] == 30.0  # the 70 % arrived after 60 s
    assert out["first_gain_15_s"] == 58.0  # h1 (+10) is not yet 15 points
    assert out["images_per_s"] == 9.5 and out["stopped"] is False and out["checkpoint"] == "c.safetensors"
    assert out["missing_keys"] == []


def test_train_report_parser_reads_json_text_and_missing_keys(bench, pure):
    import json

    out = pure.parse_train_reports([(1.0, json.dumps({"done": True, "heldout": []}))])
    assert out["done_s"] == 1.0 and out["first_heldout_s"] is None and out["gain"] is None
    assert "images_per_s" in out["missing_keys"]
    empty = pure.parse_train_reports([(1.0, "not json"), (2.0, [1, 2])])
    assert empty["n_reports"] == 0 and empty["done_s"] is None


def test_train_contract_check(bench, pure):
    good = {"parameters": [{"parameter_name": n} for n in pure.TRAIN_INPUTS], "returns": [{}] * 5}
    assert pure.check_train_contract(good) == []
    old = {"parameters": [{"parameter_name": n} for n in pure.TRAIN_INPUTS if n != "time_budget"], "returns": [{}] * 4}
    problems = pure.check_train_contract(old)
    assert len(problems) == 2 and "time_budget" in problems[0] and "4 outputs" in problems[1]
    assert pure.check_train_contract(None) == ["the app has no /train endpoint"]


def test_endpoint_kwargs_fill_page_defaults_and_refuse_unknown_names(bench, pure):
    endpoints = {"/classify": {"parameters": [
        {"parameter_name": "files", "parameter_has_default": False},
        {"parameter_name": "top_k", "parameter_has_default": True, "parameter_default": 3}]}}
    assert bench.endpoint_kwargs(endpoints, "/classify", {"files": ["a"]}) == {"files": ["a"], "top_k": 3}
    with pytest.raises(pure.BenchError, match="not images"):
        bench.endpoint_kwargs(endpoints, "/classify", {"images": []})
    with pytest.raises(pure.BenchError, match="no /embeddings"):
        bench.endpoint_kwargs(endpoints, "/embeddings", {})


def test_table_rendering(bench, pure):
    rows = [
        pure.make_row("Classify 8 new images × 8 classes", [1.2, 1.0, 1.4], floor_s=1.0, floor_label="8 passes",
                       target="≤ 1.3× floor", limit_s=1.3, rss_gib=1.5),
        pure.make_row("the same 8 images again", [0.5], floor_s=1.0, target="≤ 0.3 s", limit_s=0.3),
        pure.make_row("held-out", [], value_text="18.8 → 75.0 %", target="gain ≥ 15 points", ok=True),
        pure.make_row("broken | row", [], target="≤ 60 s", error="the app has no /train"),
    ]
    lines = pure.render_table(rows).splitlines()
    assert lines[0] == "| interaction | median s | min–max | floor s | × floor | peak RSS GiB | target |"
    assert lines[2] == "| Classify 8 new images × 8 classes | 1.20 | 1.00–1.40 | 1.00 (8 passes) | 1.20 | 1.50 | ≤ 1.3× floor ✓ |"
    assert lines[3].endswith("| 0.50 | — | ≤ 0.3 s ✗ |")
    assert "| 18.8 → 75.0 % | — |" in lines[4] and lines[4].endswith("gain ≥ 15 points ✓ |")
    assert lines[5].startswith("| broken / row |") and "**error:** the app has no /train" in lines[5]
    assert all(line.count("|") == 8 for line in lines)


def test_markdown_report_has_machine_header_and_a_table_per_backbone(bench, pure):
    result = {"date": "today", "repeats": 3, "timeout_s": 300,
              "machine": {"cpu_model": "Some CPU", "cores": 2, "load_before": [0.1, 0.2, 0.3],
                          "load_after": [1.0, 0.5, 0.4], "torch": "2.x", "threads": 2},
              "backbones": [{"label": "offline", "rows": [pure.make_row("x", [1.0])], "notes": ["n"], "errors": ["e"]},
                            {"label": "ViT-B/16", "rows": [], "notes": [], "errors": []}]}
    text = pure.render_markdown(result)
    assert "Some CPU, 2 cores" in text and "before 0.10/0.20/0.30, after 1.00/0.50/0.40" in text and "torch 2.x" in text
    assert "## offline" in text and "## ViT-B/16" in text and text.count("| interaction |") == 2
    assert "- n" in text and "**Error:** e" in text


def offline_model_present() -> bool:
    return (ROOT / "checkpoints" / "shapeworld-clip" / "open_clip_config.json").is_file()


@pytest.mark.skipif(not offline_model_present(), reason="the shipped offline ShapeWorld CLIP is not in this copy")
def test_whole_tool_against_the_offline_app(tmp_path):
    """``benchmarks/demo.py --backbone offline --skip-train --repeats 1`` end to end: the app starts,
    every inference row is measured against a floor, the JSON and the table are written, the app is
    stopped. About 35 s on an idle 2-core CPU (70-80 s when other work holds the cores)."""
    import json
    import subprocess

    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "demo.py"), "--backbone", "offline", "--skip-train",
                          "--repeats", "1", "--json", str(out_json), "--markdown", str(out_md)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    result = json.loads(out_json.read_text())
    (b,) = result["backbones"]
    assert run.returncode == 0 and not b["errors"], (b["errors"], run.stderr[-2000:])
    assert b["floor"]["batch8_s"]["median"] > 0 and b["floor"]["single_s"]["median"] > 0 and b["floor"]["text1000_s"] > 0
    rows = {r["interaction"].split(" (")[0]: r for r in b["rows"]}
    for name in ("Classify 8 new images × 8 classes", "the same 8 images again", "per-depth attention of 1 image",
                 "Classify 1 new image × a new 1000-class list"):
        assert rows[name]["n"] == 1 and rows[name]["median"] > 0 and rows[name]["x_floor"] > 0, rows[name]
        assert 0 < rows[name]["rss_gib"] < 16
    assert any(r["interaction"].startswith("Embeddings") and r["n"] == 1 for r in b["rows"])
    assert b["stop_s"] < 30 and "| interaction | median s |" in out_md.read_text()
