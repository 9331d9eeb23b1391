"""The command line end to end on tiny data: train → eval → table, errors, sweep, torchrun DDP."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_engine import make_colour_tree

from pmpo.cli import main

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_colour_tree(tmp_path_factory.mktemp("colours"))


def model_args(tiny_model):
    return ["--model", tiny_model, "--pretrained", "none", "--device", "cpu"]


FAST = ["--epochs", "2", "--batch-size", "4", "--lr", "0.01", "--warmup-epochs", "0", "--num-workers", "0"]


def test_train_eval_table(tiny_model, tree, tmp_path, capsys):
    run = tmp_path / "runs"
    assert main(["train", "--dataset", "imagefolder", "--root", str(tree), "--protocol", "base2new", "--shots", "2",
                 "--method", "pmpo", "--out", str(run), *FAST, *model_args(tiny_model)]) == 0
    folder = run / "base2new" / "imagefolder" / "pmpo" / "shots_2" / "seed_1"
    result = json.loads((folder / "result.json").read_text())
    assert result["train"]["epochs"] == 2 and len(result["history"]) == 2
    err = capsys.readouterr().err
    assert "epoch 1/2: loss" in err and "epoch 2/2: loss" in err  # per-epoch progress, also without a TTY
    assert "shots asked" not in err  # every class has its 2 shots
    assert main(["train", "--dataset", "imagefolder", "--root", str(tree), "--protocol", "base2new", "--shots", "500",
                 "--method", "coop", "--out", str(tmp_path / "many"), *FAST, "--epochs", "1", *model_args(tiny_model)]) == 0
    assert "note: 500 shots asked, but" in capsys.readouterr().err
    assert main(["predict", str(next(tree.rglob("*.png"))), "--classes", "red, blue", *model_args(tiny_model)]) == 0
    assert "untrained initialisation" in capsys.readouterr().err  # no --checkpoint: said, not silent
    assert main(["eval", "--checkpoint", str(folder / "last.safetensors"), "--dataset", "imagefolder", "--root",
                 str(tree), "--subsample", "new", "--json", "--device", "cpu"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["accuracy"] == pytest.approx(result["accuracy"]["new"])  # the same model, the same numbers
    assert main(["table", str(run), "--reference"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\| imagefolder-colours\d* \| pmpo \| 1 \|", out) and "PMPO (paper)" in out
    assert main(["table", str(run), "--format", "latex"]) == 0 and r"\toprule" in capsys.readouterr().out


def test_errors_are_one_line_with_exit_code_1(tiny_model, tmp_path, capsys):
    code = main(["train", "--dataset", "dtd", "--root", str(tmp_path / "missing"), *model_args(tiny_model)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("pmpo train: error: dtd: data root not found")
    assert main(["table", str(tmp_path)]) == 1
    assert "no result.json files found" in capsys.readouterr().err
    (tmp_path / "s.yaml").write_text("protocol: base2new\ndatasets: [dtd]\n")
    assert main(["sweep", str(tmp_path / "s.yaml")]) == 1
    assert "'root' is required" in capsys.readouterr().err


def test_help_has_examples(capsys):
    for cmd in ("train", "eval", "table", "sweep"):
        with pytest.raises(SystemExit) as exc:
            main([cmd, "--help"])
        assert exc.value.code == 0 and "example" in capsys.readouterr().out


def test_sweep_skips_finished_and_resumes_broken_runs(tiny_model, tree, tmp_path, capsys):
    sweep = tmp_path / "tiny.yaml"
    sweep.write_text(f"""
protocol: base2new
root: {tree}
out: {tmp_path / 'runs'}
shots: 2
seeds: [1]
datasets: [imagefolder]
methods: [zeroshot, {{name: coop-fast, method: coop}}]
model: {tiny_model}
pretrained: none
train: {{epochs: 1, batch_size: 4, lr: 0.01, warmup_epochs: 0, num_workers: 0}}
""")
    assert main(["sweep", str(sweep), "--device", "cpu"]) == 0
    assert "2 run(s) done, 0 already finished" in capsys.readouterr().err
    results = sorted((tmp_path / "runs").rglob("result.json"))
    assert len(results) == 2
    stamps = {p: p.stat().st_mtime_ns for p in results}
    coop = [p for p in results if "coop-fast" in str(p)][0]
    coop.unlink()  # a run that died after training, before writing its result
    assert main(["sweep", str(sweep), "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert "1 run(s) done, 1 already finished" in out.err and "coop-fast" in out.out
    zs = [p for p in results if "zeroshot" in str(p)][0]
    assert zs.stat().st_mtime_ns == stamps[zs]  # finished run untouched
    assert json.loads(coop.read_text())["history"]  # resumed from its training state, history kept
    assert main(["sweep", str(sweep), "--dry-run"]) == 0
    assert capsys.readouterr().out.count("done") == 2


def test_torchrun_two_processes_match_one(tiny_model, tree, tmp_path):
    """DDP over 2 CPU processes (gloo) trains the same prompts and scores the same accuracy."""
    common = ["train", "--dataset", "imagefolder", "--root", str(tree), "--protocol", "base2new", "--shots", "4",
              "--method", "pmpo", *FAST, "--batch-size", "8", *model_args(tiny_model)]
    assert main([*common, "--run-dir", str(tmp_path / "one")]) == 0
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pmpo",
         *common, "--run-dir", str(tmp_path / "two")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "result.json").read_text())
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["accuracy"] == pytest.approx(one["accuracy"], abs=1e-6)
    assert [h["loss"] for h in two["history"]] == pytest.approx([h["loss"] for h in one["history"]], abs=1e-4)
    a, b = load_file(str(tmp_path / "one" / "last.safetensors")), load_file(str(tmp_path / "two" / "last.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


def test_help_lists_every_command_without_importing_torch():
    code = ("import sys; from pmpo.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'LIGHT')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("LIGHT")
    for name in ("predict", "train", "eval", "table", "sweep", "bench", "analyze", "app"):
        assert name in proc.stdout


def test_results_get_the_users_file_mode(tmp_path):
    from pmpo.io import atomic_save_safetensors
    from pmpo.protocols import write_json_atomic

    for umask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):  # the umask when written counts
        old = os.umask(umask)
        try:
            write_json_atomic(tmp_path / "result.json", {"a": 1})
            atomic_save_safetensors({"x": torch.zeros(2)}, tmp_path / "prompts.safetensors", {})
        finally:
            os.umask(old)
        for name in ("result.json", "prompts.safetensors"):
            assert (tmp_path / name).stat().st_mode & 0o777 == mode, (name, oct(umask))  # mkstemp alone gives 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.safetensors", "result.json"]  # no temp files left


def test_importing_pmpo_changes_no_process_state():
    """Importing the library (and the analysis figures) sets no umask, matplotlib backend or
    environment variable: a host application's settings stay its own."""
    code = ("import os, sys; os.umask(0o027); import matplotlib; before = (dict(os.environ), matplotlib.rcParams['backend'])\n"
            "import pmpo.io, pmpo.engine, pmpo.backbone, pmpo.analysis.style, pmpo.app.state\n"
            "assert (dict(os.environ), matplotlib.rcParams['backend']) == before, 'changed'\n"
            "assert os.umask(0o022) == 0o027\nprint('OK')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "MPLBACKEND": "TkAgg"})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr


def test_app_command_forwards_every_option_to_the_app(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["app", "--help"])
    assert exit_.value.code == 0 and "--checkpoint" in capsys.readouterr().out  # the app's own options
    with pytest.raises(SystemExit):
        main(["table", "runs", "--no-such-option"])  # other commands still refuse unknown options
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_every_training_option_is_a_flag_or_named_recipe_only():
    """The training flags are generated from TrainConfig: a new option is either given a flag (with
    its type and choices) or listed as recipe-only, never silently missing from the command line."""
    import argparse
    import dataclasses

    from pmpo.commands.train import add_train_args
    from pmpo.train_config import OPTION_CHOICES, OPTION_HELP, RECIPE_ONLY, TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(OPTION_HELP) | set(RECIPE_ONLY) == fields and not set(OPTION_HELP) & set(RECIPE_ONLY)
    parser = argparse.ArgumentParser()
    add_train_args(parser)
    args = parser.parse_args(["--batch-size", "8", "--lr", "0.01", "--optimizer", "adamw", "--cached-views", "2"])
    assert (args.batch_size, args.lr, args.optimizer, args.cached_views) == (8, 0.01, "adamw", 2)
    assert args.epochs is None  # not given: the preset's
    with pytest.raises(SystemExit):
        parser.parse_args(["--optimizer", "rmsprop"])
    assert set(OPTION_CHOICES) <= set(OPTION_HELP)
