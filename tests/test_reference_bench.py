"""``pmpo bench --reference...``: our CoOp/MaPLe timed next to the authors' code.

Their code is never part of this repository, so most tests check what does not need it: the
messages for a missing or wrong checkout (what is missing, how to get it), and the plumbing from
arguments to the configuration of both sides. The end-to-end runs need real checkouts (in
``$PMPO_REFERENCE_DIR``, by default ``../refs`` beside the repository) and their pip packages;
without them they are skipped. No timing is asserted: speed on a shared machine is noise.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
from pathlib import Path

import pytest

from pmpo.cli import build_parser, main
from pmpo.commands.bench import reference_config
from pmpo.errors import InputError
from pmpo.reference_bench import (
    REPOS,
    ReferenceBenchConfig,
    checkout_commit,
    format_reference_markdown,
    maple_design_details,
    our_overrides,
    resolve_checkouts,
    run_method,
    run_reference_bench,
    their_trainer_node,
    validate_checkout,
)

REFS = Path(os.environ.get("PMPO_REFERENCE_DIR", Path(__file__).resolve().parents[1].parent / "refs"))


def fake_checkout(folder: Path, key: str) -> Path:
    """A folder with the marker files of ``REPOS[key]`` (empty): enough for the path checks."""
    for marker in REPOS[key].markers:
        (folder / marker).parent.mkdir(parents=True, exist_ok=True)
        (folder / marker).write_text("")
    return folder


@pytest.fixture
def fake_refs(tmp_path) -> Path:
    for key in ("coop", "dassl", "maple"):
        fake_checkout(tmp_path / REPOS[key].folder, key)
    return tmp_path


# --- (a) clear errors ---------------------------------------------------------------------------------

def test_missing_path_says_what_and_how_to_get_it(tmp_path):
    with pytest.raises(InputError) as err:
        validate_checkout("coop", tmp_path / "nowhere")
    msg = str(err.value)
    assert "--reference-coop" in msg and "no such directory" in msg and "KaiyangZhou/CoOp" in msg
    assert "git clone https://github.com/KaiyangZhou/CoOp.git" in msg


def test_not_a_checkout_names_the_missing_files(tmp_path):
    (tmp_path / "trainers").mkdir()
    (tmp_path / "trainers" / "coop.py").write_text("")
    with pytest.raises(InputError) as err:
        validate_checkout("maple", tmp_path)
    msg = str(err.value)
    assert "is not a checkout of muzairkhattak/multimodal-prompt-learning" in msg
    assert "trainers/maple.py" in msg and "clip/model.py" in msg
    assert "git clone https://github.com/muzairkhattak/multimodal-prompt-learning.git" in msg


def test_reference_dir_needs_all_three(fake_refs):
    import shutil

    shutil.rmtree(fake_refs / "Dassl.pytorch")
    with pytest.raises(InputError) as err:
        resolve_checkouts(fake_refs)
    msg = str(err.value)
    assert "expected Dassl.pytorch/ inside" in msg and "git clone https://github.com/KaiyangZhou/Dassl.pytorch.git" in msg


def test_coop_without_dassl_and_nothing_at_all(fake_refs):
    with pytest.raises(InputError, match=r"--reference-dassl PATH .*Dassl\.pytorch\.git"):
        resolve_checkouts(coop=fake_refs / "CoOp")
    with pytest.raises(InputError) as err:
        resolve_checkouts(dassl=fake_refs / "Dassl.pytorch")
    assert all(REPOS[k].url in str(err.value) for k in ("coop", "dassl", "maple"))


def test_cli_error_is_one_line(tmp_path, capsys):
    code = main(["bench", "--reference-coop", str(tmp_path / "CoOp"), "--reference-dassl", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("pmpo bench: error: --reference-coop") and "git clone https://github.com/KaiyangZhou/CoOp.git" in err


# --- (b) plumbing ---------------------------------------------------------------------------------------

def _args(*argv: str):
    return build_parser(["bench"]).parse_args(["bench", *argv])


def test_cli_arguments_to_config(fake_refs):
    assert reference_config(_args()) is None  # no reference option: the plain bench
    cfg = reference_config(_args("--reference", str(fake_refs), "--device", "cpu", "--classes", "7",
                                 "--repeats", "2", "--warmup", "0", "--reference-maple-depth", "3"))
    assert cfg.methods == ["coop", "maple"]
    assert cfg.checkouts == {k: str((fake_refs / REPOS[k].folder).resolve()) for k in ("coop", "dassl", "maple")}
    assert (cfg.batch, cfg.classes, cfg.repeats, cfg.warmup, cfg.maple_depth) == (4, 7, 2, 0, 3)  # CPU batch 4
    assert cfg.resolved_precision() == "fp32"
    # Explicit paths win over the folder; MaPLe alone is fine.
    only = reference_config(_args("--reference-maple", str(fake_refs / "multimodal-prompt-learning"),
                                  "--reference-dassl", str(fake_refs / "Dassl.pytorch"), "--batch", "2"))
    assert only.methods == ["maple"] and only.batch == 2
    with pytest.raises(InputError, match="--reference-precision"):
        reference_config(_args("--reference", str(fake_refs), "--dtype", "bf16"))


def test_both_sides_get_the_same_sizes():
    cfg = ReferenceBenchConfig(checkouts={"coop": "x", "dassl": "y"})
    assert cfg.resolved_precision() == "fp32"
    assert ReferenceBenchConfig(device="cuda:0").resolved_precision() == "fp16"  # their fp16 path on GPU
    assert their_trainer_node(cfg, "coop") == ("COOP", {"N_CTX": 16, "CSC": False, "CTX_INIT": "", "PREC": "fp32",
                                                        "CLASS_TOKEN_POSITION": "end"})
    assert our_overrides(cfg, "coop") == {"n_ctx": 16, "ctx_init": ""}
    assert their_trainer_node(cfg, "maple") == ("MAPLE", {"N_CTX": 2, "CTX_INIT": "a photo of a", "PREC": "fp32",
                                                          "PROMPT_DEPTH": 9})
    assert our_overrides(cfg, "maple") == {"n_ctx": 2, "ctx_init": "a photo of a", "text_depth": 9,
                                           "partition": [[0, 8]]}
    assert maple_design_details(2) == {"trainer": "MaPLe", "vision_depth": 0, "language_depth": 0, "vision_ctx": 0,
                                       "language_ctx": 0, "maple_length": 2}
    from pmpo import PMPOConfig

    for method in ("coop", "maple"):  # our presets accept the overrides
        PMPOConfig(method=method, **our_overrides(cfg, method))
    with pytest.raises(InputError):
        ReferenceBenchConfig(checkouts={"coop": "x", "dassl": "y"}, precision="fp8").validate()
    with pytest.raises(InputError, match="no reference method"):
        ReferenceBenchConfig(checkouts={"dassl": "y"}).validate()


def test_checkout_commit(tmp_path):
    assert checkout_commit(tmp_path) is None
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True, env=env)
    subprocess.run(["git", "-C", str(tmp_path), "commit", "-q", "--allow-empty", "-m", "x"], check=True, env=env)
    commit = checkout_commit(tmp_path)
    assert commit is not None and len(commit) == 40


def test_markdown_reports_theirs_over_ours():
    timing = lambda s: {"median_s": s, "min_s": s, "max_s": s, "n": 1}  # noqa: E731
    result = {
        "config": {"model": "m", "pretrained": "none", "device": "cpu", "precision": "fp32", "batch": 4, "classes": 50,
                   "repeats": 5, "warmup": 1},
        "machine": {"cpu": "x", "threads": 2, "torch": "2"},
        "checkouts": {"coop": {"repo": "KaiyangZhou/CoOp", "commit": "ff61507" + "0" * 33}},
        "methods": [{"label": "CoOp", "ratios": {"infer": 2.0, "infer_uncached": 1.25, "train": 0.5},
                     "timings": {"theirs:infer": timing(1.0), "ours:infer": timing(0.5), "ours:infer_uncached": timing(0.8),
                                 "theirs:train": timing(1.0), "ours:train": timing(2.0)},
                     "their_settings": {"TRAINER.COOP.N_CTX": 16, "OPTIM": "sgd"}, "our_settings": {"n_ctx": 16},
                     "learnable": {"theirs": 8192, "ours": 8192}, "max_abs_logit_diff": 1e-7,
                     "our_activation": "QuickGELU"}],
        "wall_s": 1.0,
    }
    text = format_reference_markdown(result)
    assert "KaiyangZhou/CoOp@ff61507" in text
    assert "| CoOp inference (ours: cached class weights) | 1000 | 500 | 2.00× |" in text
    assert "| CoOp training step (fwd + CE + bwd + SGD) | 1000 | 2000 | 0.50× |" in text
    assert "8,192 / 8,192" in text and "our backbone uses GELU" not in text


# --- (c) end to end, with real checkouts ------------------------------------------------------------------

def _have_checkouts() -> bool:
    try:
        resolve_checkouts(REFS)
    except InputError:
        return False
    return True


HAVE_REFS = _have_checkouts()
HAVE_PACKAGES = all(importlib.util.find_spec(p) for p in ("yacs", "gdown", "tabulate", "tensorboard", "wilds"))
needs_refs = pytest.mark.skipif(not (HAVE_REFS and HAVE_PACKAGES),
                                reason=f"needs the reference checkouts in {REFS} (or $PMPO_REFERENCE_DIR) and their "
                                       "pip packages (yacs gdown tabulate tensorboard wilds); see docs/PERFORMANCE.md")

# Tiny, but with ViT-B/16's widths: their MaPLe hard-codes 512 (text) and 768 (vision).
REF_TINY_CFG = {
    "embed_dim": 512, "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 768, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 2},
}


@pytest.fixture(scope="module")
def ref_tiny_model(tmp_path_factory) -> str:
    from conftest import make_local_dir

    return make_local_dir(tmp_path_factory.mktemp("ref-tiny-clip"), REF_TINY_CFG)


def _tiny_cfg(model: str, methods: tuple[str, ...]) -> ReferenceBenchConfig:
    found = resolve_checkouts(REFS)
    return ReferenceBenchConfig(checkouts={k: str(v) for k, v in found.items() if k in (*methods, "dassl")},
                                model=model, batch=2, classes=2, repeats=1, warmup=0, maple_depth=2, threads=1)


def _check_method(r: dict, method: str) -> None:
    assert r["method"] == method and r["precision"] == "fp32"
    for key in ("infer", "infer_uncached", "train"):
        assert math.isfinite(r["ratios"][key]) and r["ratios"][key] > 0
    assert r["learnable"]["theirs"] == r["learnable"]["ours"] > 0  # same learnable sizes on both sides
    assert r["our_activation"] == "QuickGELU"


@needs_refs
def test_end_to_end_coop_through_the_parent(ref_tiny_model):
    result = run_reference_bench(_tiny_cfg(ref_tiny_model, ("coop",)), quiet=True)
    assert [r["method"] for r in result["methods"]] == ["coop"]
    r = result["methods"][0]
    _check_method(r, "coop")
    assert r["their_settings"]["TRAINER.COOP.N_CTX"] == 16 and r["learnable"]["ours"] == 16 * 512
    assert r["max_abs_logit_diff"] < 1e-4  # same weights and prompts: the same function
    assert result["checkouts"]["coop"]["repo"] == "KaiyangZhou/CoOp"
    assert "CoOp training step" in format_reference_markdown(result)


@needs_refs
def test_end_to_end_maple(ref_tiny_model):
    r = run_method(_tiny_cfg(ref_tiny_model, ("maple",)), "maple", quiet=True)
    _check_method(r, "maple")
    assert r["their_settings"]["TRAINER.MAPLE.PROMPT_DEPTH"] == 2
    # Their fp32 path still rounds the visual prompt tokens to fp16 (`.half()` in their clip/model.py).
    assert r["max_abs_logit_diff"] < 1e-3
