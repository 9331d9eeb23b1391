"""``pmpo verify``: our training of each baseline against its authors' trainer, step by step.

Their code is never part of this repository, so most tests check what does not need it: the errors for
missing checkouts, the settings both sides get, the comparison arithmetic, the shims their code runs
under, the mapping of their learnable tensors onto ours, and the step-pairing loop itself (driven by a
stand-in "their trainer" built from our own model). The comparison with the real trainers needs the
checkouts (``$PMPO_REFERENCE_DIR``, by default ``../refs`` beside the repository) and is skipped without.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from pmpo.cli import main
from pmpo.errors import InputError, PMPOError
from pmpo.reference_bench import REPOS
from pmpo.verify import (
    METHODS,
    SPECS,
    Sizes,
    VerifyConfig,
    child_paths,
    format_markdown,
    gpa_settings,
    needed_checkouts,
    our_model_overrides,
    our_train_overrides,
    resolve_reference,
    summarize,
    tensor_diff,
    their_opts,
    update_rel_diff,
)
from pmpo.verify_child import (
    TheirRuntime,
    compare_training,
    learnable_pairs,
    our_tensor,
    scheduler_compat,
    set_opts,
    their_extend_cfg,
)

REFS = Path(os.environ.get("PMPO_REFERENCE_DIR", Path(__file__).resolve().parents[1].parent / "refs"))
GET_REFS = "; ".join(f"git clone {REPOS[k].url}" for k in ("coop", "dassl", "kgcoop", "maple", "promptsrc"))


def fake_checkout(folder: Path, key: str) -> Path:
    for marker in REPOS[key].markers:
        (folder / marker).parent.mkdir(parents=True, exist_ok=True)
        (folder / marker).write_text("")
    return folder


# --- (a) checkouts and clear errors ----------------------------------------------------------------

def test_each_method_needs_its_trainer_repo_and_its_dassl(tmp_path):
    assert needed_checkouts(["coop", "cocoop"]) == ["coop", "dassl"]
    assert needed_checkouts(["kgcoop"]) == ["kgcoop"]  # KgCoOp ships its own Dassl (Dassl.ProGrad.pytorch)
    assert needed_checkouts(["maple", "ivlp", "vpt", "promptsrc"]) == ["maple", "dassl", "promptsrc"]
    assert set(needed_checkouts(METHODS)) == {"coop", "dassl", "kgcoop", "maple", "promptsrc"}
    code, dassl = child_paths(SPECS["kgcoop"], {"kgcoop": str(tmp_path / "KgCoOp")})
    assert (code, dassl) == (str(tmp_path / "KgCoOp" / "KgCoOp"), str(tmp_path / "KgCoOp" / "Dassl.ProGrad.pytorch"))
    code, dassl = child_paths(SPECS["promptsrc"], {"promptsrc": "/r/PromptSRC", "dassl": "/r/Dassl.pytorch"})
    assert (code, dassl) == ("/r/PromptSRC", "/r/Dassl.pytorch")


def test_missing_checkouts_are_named_with_the_command_to_get_them(tmp_path):
    with pytest.raises(InputError) as err:
        resolve_reference(tmp_path / "nowhere", METHODS)
    assert all(REPOS[k].url in str(err.value) for k in ("coop", "dassl", "kgcoop", "maple", "promptsrc"))
    fake_checkout(tmp_path / "CoOp", "coop")
    fake_checkout(tmp_path / "Dassl.pytorch", "dassl")
    assert set(resolve_reference(tmp_path, ["coop", "cocoop"])) == {"coop", "dassl"}  # only what is asked for
    with pytest.raises(InputError) as err:
        resolve_reference(tmp_path, ["coop", "promptsrc", "kgcoop"])
    msg = str(err.value)
    assert "expected PromptSRC/ inside" in msg and "git clone https://github.com/muzairkhattak/PromptSRC.git" in msg
    assert "expected KgCoOp/ inside" in msg and "git clone https://github.com/htyao89/KgCoOp.git" in msg
    assert "KaiyangZhou/CoOp.git" not in msg


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["verify", "--reference", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pmpo verify: error: --reference") and "git clone" in err[0]
    assert main(["verify", "--reference", str(tmp_path), "--methods", "coop,pmpo"]) == 1
    assert "unknown method(s) pmpo" in capsys.readouterr().err
    assert main(["verify", "--reference", str(tmp_path), "--steps", "3", "--steps-per-epoch", "3"]) == 1
    assert "at least 2 epochs" in capsys.readouterr().err


def test_config_rounds_steps_up_to_whole_epochs():
    cfg = VerifyConfig(steps=10, steps_per_epoch=3)
    assert (cfg.epochs, cfg.total_steps) == (4, 12)
    cfg.validate()
    for bad in (dict(tolerance=0), dict(their_fp16_casts="fp8"), dict(methods=()), dict(batch=0)):
        with pytest.raises(InputError):
            VerifyConfig(**bad).validate()


# --- (b) both sides get the same settings ----------------------------------------------------------

def test_depths_and_schedule_are_the_same_on_both_sides():
    from pmpo import PMPOConfig

    sizes = Sizes(text_layers=4, vision_layers=4)
    for method in METHODS:
        opts = dict(zip(*[iter(their_opts(SPECS[method], sizes, epochs=4, batch=2))] * 2))
        node = f"TRAINER.{SPECS[method].node}."
        assert opts[node + "PREC"] == "fp32" and opts["OPTIM.MAX_EPOCH"] == 4
        assert opts["DATALOADER.TRAIN_X.BATCH_SIZE"] == 2
        ours = PMPOConfig(method=method, **our_model_overrides(method, sizes))
        assert our_train_overrides(method, 4, 2)["epochs"] == 4 and our_train_overrides(method, 4, 2)["batch_size"] == 2
        if method in ("maple",):
            assert opts[node + "PROMPT_DEPTH"] == ours.text_depth == 3 and ours.partition == [[0, 2]]
        if method == "promptsrc":
            assert opts[node + "PROMPT_DEPTH_TEXT"] == opts[node + "PROMPT_DEPTH_VISION"] == ours.text_depth == 3
            assert (opts[node + "GPA_MEAN"], opts[node + "GPA_STD"]) == gpa_settings(4)
            train = our_train_overrides(method, 4, 2)
            assert (train["gpa_mean"], train["gpa_std"]) == gpa_settings(4)
        if method == "ivlp":
            assert opts[node + "PROMPT_DEPTH_TEXT"] == ours.text_depth == 4 and ours.partition == "all"
        if method == "vpt":
            assert opts[node + "PROMPT_DEPTH_VISION"] == 4 and ours.partition == "all"


def test_scaled_gpa_gives_several_epochs_weight():
    from pmpo.engine import TrainConfig, gpa_weights

    mean, std = gpa_settings(4)
    weights = gpa_weights(TrainConfig(epochs=4, gpa_mean=mean, gpa_std=std))
    assert sum(w > 0.05 for w in weights) >= 3  # not just the last epoch: the aggregation acts
    their = [math.exp(-0.5 * ((e - mean) / std) ** 2) for e in range(1, 5)]  # trainers/promptsrc.py get_gauss
    assert weights == pytest.approx([w / sum(their) for w in their])


# --- (c) the comparison arithmetic --------------------------------------------------------------------

def test_tensor_and_update_differences():
    t = torch.tensor([1.0, -2.0, 4.0])
    assert tensor_diff(t, t.clone()) == (0.0, 0.0)
    abs_diff, rel = tensor_diff(t, t + torch.tensor([0.0, 0.00390625, 0.0]))  # 2^-8: exact in float32
    assert abs_diff == 0.00390625 and rel == 0.00390625 / 4
    with pytest.raises(PMPOError, match="shape mismatch"):
        tensor_diff(t, t[:2])
    t0 = torch.zeros(3)
    assert update_rel_diff(t, t * 1.01, t0, t0) == pytest.approx(0.01, rel=1e-4)  # Δ differs by 1 %
    assert update_rel_diff(t0, t0, t0, t0) == 0.0 and update_rel_diff(t0, t, t0, t0) == math.inf


def test_summary_takes_the_worst_step():
    steps = [{"step": i, "param_rel": r, "param_abs": r / 10, "logit_abs": 2 * r, "loss_theirs": 1.0, "loss_ours": 1.0 + r,
              "lr_theirs": 0.1, "lr_ours": 0.1} for i, r in enumerate((1e-7, 3e-4, 2e-6), start=1)]
    row = summarize("coop", steps, 5e-3)
    assert row["steps"] == 3 and row["max_param_rel_diff"] == 3e-4 and row["max_logit_abs_diff"] == 6e-4
    assert row["max_loss_abs_diff"] == pytest.approx(3e-4) and row["max_lr_abs_diff"] == 0.0
    assert row["final_update_rel_diff"] == 5e-3


def test_markdown_table_row():
    row = summarize("coop", [{"param_rel": 2e-7, "param_abs": 1e-8, "logit_abs": 1e-6, "loss_theirs": 1, "loss_ours": 1,
                              "lr_theirs": 1e-5, "lr_ours": 1e-5}], 4e-6)
    row |= {"label": "CoOp", "reference": "KaiyangZhou/CoOp", "commit": "ff61507" + "0" * 33, "ok": True, "batch": 32,
            "trainer_file": "trainers/coop.py", "config_file": "configs/trainers/CoOp/vit_b16_ctxv1.yaml",
            "notes": ["batch 32 on both sides"]}
    result = {"config": {**VerifyConfig().__dict__, "epochs": 4, "total_steps": 12}, "methods": [row], "wall_s": 3.0}
    text = format_markdown(result)
    assert "| CoOp | KaiyangZhou/CoOp@ff61507 | trainers/coop.py, configs/trainers/CoOp/vit_b16_ctxv1.yaml | 1 | 32 | " \
           "2.0e-07 | 4.0e-06 |" in text and "| yes |" in text
    assert "- CoOp: batch 32 on both sides" in text


# --- (d) the shims their code runs under ---------------------------------------------------------------

def test_their_fp16_casts_round_or_vanish_and_are_undone_after():
    x = torch.tensor([1.0 + 2 ** -12, 3.0], requires_grad=True)  # 1 + 2^-12 is not an fp16 value
    runtime = TheirRuntime(torch.device("cpu"), "round")
    with runtime():
        y = x.half()
        lin = nn.Linear(2, 2).half()  # MaPLe's proj.half(): stays float32, values rounded
        moved = torch.ones(2).cuda()  # their hard-coded .cuda() on a CPU machine
    assert y.dtype == torch.float32 and y[0].item() == 1.0 and lin.weight.dtype == torch.float32
    assert moved.device.type == "cpu" and runtime.half_casts >= 3
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0]  # the cast passes gradients
    with TheirRuntime(torch.device("cpu"), "off")():
        assert torch.equal(x.detach().half(), x.detach())
    assert x.detach().half().dtype == torch.float16  # restored outside
    if not torch.cuda.is_available():
        with pytest.raises((AssertionError, RuntimeError)):
            torch.ones(1).cuda()


def test_scheduler_compat_accepts_dassls_verbose_argument(monkeypatch):
    from torch.optim import lr_scheduler

    monkeypatch.setattr(lr_scheduler.LRScheduler, "__init__", lr_scheduler.LRScheduler.__init__)

    class Warmup(lr_scheduler.LRScheduler):  # as Dassl's _BaseWarmupScheduler calls its parent
        def __init__(self, optimizer):
            super().__init__(optimizer, -1, False)

        def get_lr(self):
            return [1e-5 for _ in self.base_lrs]

    scheduler_compat()
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    assert Warmup(opt).get_last_lr() == [1e-5]


def test_their_extend_cfg_and_opts(tmp_path):
    pytest.importorskip("yacs")
    from yacs.config import CfgNode

    (tmp_path / "train.py").write_text(
        "import this_package_does_not_exist\n"  # never imported: only extend_cfg is read
        "def extend_cfg(cfg):\n    from yacs.config import CfgNode as CN\n    cfg.TRAINER.X = CN()\n"
        "    cfg.TRAINER.X.PREC = 'fp16'\n")
    cfg = CfgNode({"TRAINER": CfgNode(), "OPTIM": CfgNode({"MAX_EPOCH": 5})})
    their_extend_cfg(tmp_path / "train.py")(cfg)
    set_opts(cfg, ["TRAINER.X.PREC", "fp32", "OPTIM.MAX_EPOCH", 4])
    assert cfg.TRAINER.X.PREC == "fp32" and cfg.OPTIM.MAX_EPOCH == 4
    with pytest.raises(PMPOError, match="has no OPTIM.LRR"):
        set_opts(cfg, ["OPTIM.LRR", 1.0])
    (tmp_path / "other.py").write_text("x = 1\n")
    with pytest.raises(InputError, match="no extend_cfg"):
        their_extend_cfg(tmp_path / "other.py")


# --- (e) their tensors onto ours ---------------------------------------------------------------------

def _ours(tiny_model: str, method: str, **overrides):
    from pmpo import PMPOConfig
    from pmpo.model import build_model

    return build_model(PMPOConfig(method=method, model=tiny_model, pretrained="none", **overrides))


def test_their_names_map_onto_views_of_our_parameters(tiny_model):
    maple = _ours(tiny_model, "maple", text_depth=3, partition=[[0, 2]])
    p = maple.prompts
    assert our_tensor("prompt_learner.ctx", p).shape == p.ctx.shape[1:]
    assert our_tensor("prompt_learner.compound_prompts_text.1", p).data_ptr() == p.deep_ctx[0, 1].data_ptr()
    assert our_tensor("prompt_learner.proj.weight", p) is p.couplings[0].weight
    assert our_tensor("prompt_learner.compound_prompt_projections.1.bias", p) is p.couplings[2].bias
    ivlp = _ours(tiny_model, "ivlp", text_depth=4, partition="all").prompts
    with torch.no_grad():
        our_tensor("image_encoder.transformer.resblocks.3.VPT_shallow", ivlp).fill_(7.0)  # a view: writes land in ours
        our_tensor("text_encoder.transformer.resblocks.2.VPT_shallow", ivlp).fill_(5.0)
    assert float(ivlp.visual_ctx[ivlp.visual_rows[(0, 3)]].detach().mean()) == 7.0
    assert float(ivlp.deep_ctx[0, 1].detach().mean()) == 5.0
    assert our_tensor("image_encoder.VPT", ivlp).data_ptr() == ivlp.visual_ctx[ivlp.visual_rows[(0, 0)]].data_ptr()
    cocoop = _ours(tiny_model, "cocoop").prompts
    assert our_tensor("prompt_learner.meta_net.linear2.weight", cocoop) is cocoop.meta_net.linear2.weight
    with pytest.raises(PMPOError, match="no counterpart"):
        our_tensor("prompt_learner.bias_vectors", cocoop)
    with pytest.raises(PMPOError, match="no counterpart"):
        our_tensor("prompt_learner.compound_prompts_text.0", cocoop)  # CoCoOp has no deep prompts


class _Named(nn.Module):
    """A module whose parameters carry the given dotted names (their trainers' naming)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self._names = list(tensors)
        for i, t in enumerate(tensors.values()):
            self.register_parameter(f"p{i}", nn.Parameter(t.clone()))

    def named_parameters(self, *args, **kwargs):
        return iter(zip(self._names, list(self._parameters.values())))


def test_learnable_pairs_must_cover_all_of_ours(tiny_model):
    ours = _ours(tiny_model, "cocoop")
    mine = {"prompt_learner.ctx": ours.prompts.ctx[0]}
    mine |= {f"prompt_learner.meta_net.{n}": p for n, p in ours.prompts.meta_net.named_parameters()}
    assert len(learnable_pairs(_Named(mine), ours)) == 5
    del mine["prompt_learner.meta_net.linear2.bias"]
    with pytest.raises(PMPOError, match="we learn"):
        learnable_pairs(_Named(mine), ours)
    mine["prompt_learner.meta_net.linear2.bias"] = torch.zeros(3)
    with pytest.raises(PMPOError, match=r"their prompt_learner.meta_net.linear2.bias is \(3,\)"):
        learnable_pairs(_Named(mine), ours)


# --- (f) the step-pairing loop, with a stand-in for their trainer ----------------------------------------

class _TwinTrainer:
    """Dassl's trainer interface over a second copy of our CoOp: plain SGD with Dassl's per-epoch schedule
    (``lr_scale`` ≠ 1 makes it a wrong trainer that the comparison must catch)."""

    def __init__(self, twin, names, tcfg, lr_scale: float = 1.0):
        from pmpo.engine import lr_at

        self.twin, self.names, self.tcfg, self.lr_at, self.scale = twin, names, tcfg, lr_at, lr_scale
        self.model = _Named({"prompt_learner.ctx": twin.prompts.ctx[0].detach()})
        self.optim = torch.optim.SGD(self.model.parameters(), lr=1.0, momentum=tcfg.momentum,
                                     weight_decay=tcfg.weight_decay)

    def set_model_mode(self, mode="train"):
        pass

    def get_current_lr(self):
        return self.scale * self.lr_at(self.tcfg, self.epoch)

    def forward_backward(self, batch):
        from torch.func import functional_call

        for group in self.optim.param_groups:
            group["lr"] = self.get_current_lr()
        loss = functional_call(_LossOf(self.twin), {"m.prompts.ctx": self.model.p0[None]},
                               (batch["img"], batch["label"], self.names))
        self.optim.zero_grad()
        loss.backward()
        self.optim.step()
        return {"loss": loss.item()}

    def model_inference(self, images):
        from torch.func import functional_call

        return functional_call(_Forward(self.twin, self.names), {"m.prompts.ctx": self.model.p0[None]}, (images,))


class _LossOf(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, images, labels, names):
        return self.m.loss(images, labels, names)["loss"]


class _Forward(nn.Module):
    def __init__(self, m, names):
        super().__init__()
        self.m, self.names = m, names

    def forward(self, images):
        return self.m(images, self.names)


@pytest.mark.parametrize("lr_scale", [1.0, 2.0])
def test_step_pairing_agrees_with_an_identical_trainer_and_catches_a_wrong_one(tiny_model, lr_scale):
    from pmpo.engine import load_train_preset

    cfg = VerifyConfig(methods=("coop",), steps=4, steps_per_epoch=2, classes=3, eval_images=2)
    names = ["red circle", "blue star", "green square"]
    tcfg = load_train_preset("coop", "base2new", epochs=cfg.epochs, batch_size=2, precision="fp32", num_workers=0)
    ours, twin = _ours(tiny_model, "coop"), _ours(tiny_model, "coop")
    with torch.no_grad():
        twin.prompts.ctx.normal_(std=0.5)  # their initial tensors: ours must start from them
    trainer = _TwinTrainer(twin, names, tcfg, lr_scale)
    row = compare_training(SPECS["coop"], cfg, trainer, ours, names, tcfg, 32, TheirRuntime(torch.device("cpu"), "round"),
                           lambda _m: None)
    assert row["steps"] == 4 and [s["step"] for s in row["per_step"]] == [0, 1, 2, 3, 4]
    assert [s["lr_ours"] for s in row["per_step"][1:]] == [1e-5, 1e-5, 0.002, 0.002]  # warm-up, then cosine
    assert row["initial_logit_abs_diff"] < 1e-5  # same starting tensors
    if lr_scale == 1.0:
        assert row["max_param_rel_diff"] < 1e-5 and row["max_loss_abs_diff"] < 1e-5 and row["max_lr_abs_diff"] == 0
        assert row["final_update_rel_diff"] < 1e-3
    else:
        assert row["max_lr_abs_diff"] == pytest.approx(0.002) and row["final_update_rel_diff"] > 0.3
    from pmpo import engine

    assert engine.load_image.__module__ == "pmpo.data.loader"  # the loader hook is undone
    assert "train_transform" not in ours.__dict__


# --- (g) against the real trainers ------------------------------------------------------------------------

def _have_refs() -> bool:
    try:
        resolve_reference(REFS, METHODS)
    except InputError:
        return False
    return True


HAVE_PACKAGES = all(importlib.util.find_spec(p) for p in ("yacs", "gdown", "tabulate", "tensorboard", "wilds"))
needs_refs = pytest.mark.skipif(
    not (_have_refs() and HAVE_PACKAGES),
    reason=f"needs the reference checkouts in {REFS} (or $PMPO_REFERENCE_DIR): {GET_REFS}; and pip install yacs gdown "
           "tabulate tensorboard wilds")


@needs_refs
def test_all_seven_methods_train_as_their_authors_trainers():
    from pmpo.verify import run_verify

    result = run_verify(VerifyConfig(reference=str(REFS), steps=4, steps_per_epoch=2, classes=3), quiet=True)
    rows = {r["method"]: r for r in result["methods"]}
    assert list(rows) == list(METHODS) and result["all_ok"]
    for method, r in rows.items():
        assert r["steps"] == 4 and r["max_param_rel_diff"] <= 1e-3, method
        assert r["max_lr_abs_diff"] < 1e-12 and r["max_loss_abs_diff"] < 1e-3, method
        if (REFS / REPOS[SPECS[method].repo].folder / ".git").exists():
            assert len(r["commit"]) == 40, method
    for method in ("coop", "cocoop", "kgcoop"):  # no fp16 casts in their fp32 path: float rounding only
        assert rows[method]["max_param_rel_diff"] < 1e-5 and rows[method]["max_logit_abs_diff"] < 1e-4, method


@needs_refs
def test_without_their_fp16_casts_maple_agrees_to_float_rounding(tmp_path):
    from dataclasses import replace

    from pmpo.verify import make_tiny_model, run_method

    cfg = VerifyConfig(reference=str(REFS), methods=("maple",), steps=4, steps_per_epoch=2, classes=3,
                       their_fp16_casts="off", checkouts=resolve_reference(REFS, ("maple",)))
    row = run_method(replace(cfg, model=make_tiny_model(tmp_path / "tiny")), "maple", quiet=True)
    assert row["max_param_rel_diff"] < 1e-5 and row["max_logit_abs_diff"] < 1e-4
