"""Our CoOp and MaPLe against their authors' code, timed side by side on the same sizes.

``pmpo bench`` compares us with plain open_clip, which bounds the waste but does not say whether we
beat what researchers run today. This module builds the *reference* models from a user's checkouts
of KaiyangZhou/CoOp (with KaiyangZhou/Dassl.pytorch) and muzairkhattak/multimodal-prompt-learning
(MaPLe): their ``CustomCLIP`` from ``trainers/coop.py`` / ``trainers/maple.py`` over their own
``clip.model.build_model``, fed the state dict of our random-init open_clip backbone (same sizes,
same weights, nothing downloaded). It then times inference and one training step of theirs and of
ours (the ``coop`` / ``maple`` presets set to their sizes), interleaved in the same rounds, at the
same batch, class count and precision, and reports theirs_time / ours_time (>= 1: we are faster).

Their code is never vendored and never imported into this process: each reference runs in a child
interpreter that puts its checkout (and Dassl) on ``sys.path``. The two repositories ship different
top-level ``clip`` and ``trainers`` packages, so CoOp and MaPLe each get their own child.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .children import child_main, run_child
from .config import method_title
from .errors import InputError
from .io import git_head

METHODS = ("coop", "maple")
PRECISIONS = ("auto", "fp32", "fp16")
# Packages their imports need beyond ours (Dassl imports all of them when ``dassl.engine`` loads).
EXTRA_PACKAGES = ("yacs", "gdown", "tabulate", "tensorboard", "wilds", "ftfy", "regex")


@dataclass(frozen=True)
class ReferenceRepo:
    """One reference repository: where to get it and the files that say a folder is a checkout of it."""

    key: str
    name: str
    folder: str  # its folder name under ``--reference DIR`` (the name ``git clone`` gives it)
    markers: tuple[str, ...]

    @property
    def url(self) -> str:
        return f"https://github.com/{self.name}.git"

    @property
    def flag(self) -> str:
        return f"--reference-{self.key}"


REPOS: dict[str, ReferenceRepo] = {
    "coop": ReferenceRepo("coop", "KaiyangZhou/CoOp", "CoOp",
                          ("trainers/coop.py", "clip/model.py", "configs/trainers/CoOp/vit_b16.yaml")),
    "dassl": ReferenceRepo("dassl", "KaiyangZhou/Dassl.pytorch", "Dassl.pytorch",
                           ("dassl/engine/trainer.py", "dassl/config/defaults.py", "dassl/optim/optimizer.py")),
    "maple": ReferenceRepo("maple", "muzairkhattak/multimodal-prompt-learning", "multimodal-prompt-learning",
                           ("trainers/maple.py", "clip/model.py",
                            "configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml")),
    # Used by ``pmpo verify`` (pmpo/verify.py): PromptSRC's trainer, and KgCoOp's with the Dassl it ships.
    "promptsrc": ReferenceRepo("promptsrc", "muzairkhattak/PromptSRC", "PromptSRC",
                               ("trainers/promptsrc.py", "clip/model.py",
                                "configs/trainers/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml")),
    "kgcoop": ReferenceRepo("kgcoop", "htyao89/KgCoOp", "KgCoOp",
                            ("KgCoOp/trainers/kgcoop.py", "KgCoOp/clip/model.py",
                             "KgCoOp/configs/trainers/KgCoOp/vit_b16_ep100_ctxv1.yaml",
                             "Dassl.ProGrad.pytorch/dassl/engine/trainer.py")),
}
# Their trainer config per method: the yaml their scripts pass, and the trainer module.
THEIR_CONFIG = {"coop": "configs/trainers/CoOp/vit_b16.yaml",
                "maple": "configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml"}


def _get_it(repo: ReferenceRepo) -> str:
    return f"get it with: git clone {repo.url}"


def validate_checkout(key: str, path: str | Path, how: str | None = None) -> Path:
    """``path`` as a resolved checkout of ``REPOS[key]``, or an error saying what is missing and how to get it."""
    repo = REPOS[key]
    how = how or repo.flag
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise InputError(f"{how} {folder}: no such directory (a checkout of {repo.name}; {_get_it(repo)})")
    missing = [m for m in repo.markers if not (folder / m).is_file()]
    if missing:
        raise InputError(f"{how} {folder} is not a checkout of {repo.name}: missing {', '.join(missing)} "
                         f"({_get_it(repo)})")
    return folder.resolve()


def resolve_checkouts(root: str | Path | None = None, coop: str | Path | None = None,
                      dassl: str | Path | None = None, maple: str | Path | None = None) -> dict[str, Path]:
    """The checkouts to compare against, validated: ``{"coop"?, "maple"?, "dassl"}``.

    ``root`` is a folder holding all three under their clone names (CoOp, Dassl.pytorch,
    multimodal-prompt-learning); explicit paths win over it. Without ``root`` only the methods whose
    checkout is given are compared, and Dassl is required with either (their trainers import it).
    """
    given = {"coop": coop, "dassl": dassl, "maple": maple}
    out: dict[str, Path] = {}
    for key, path in given.items():
        if path is not None:
            out[key] = validate_checkout(key, path)
        elif root is not None:
            out[key] = validate_checkout(key, Path(root).expanduser() / REPOS[key].folder,
                                         how=f"--reference {root}: expected {REPOS[key].folder}/ inside, but")
    if not any(m in out for m in METHODS):
        raise InputError("no reference checkout given: use --reference DIR (holding CoOp, Dassl.pytorch and "
                         "multimodal-prompt-learning) or --reference-coop / --reference-maple PATH; "
                         + "; ".join(f"{REPOS[k].name}: git clone {REPOS[k].url}" for k in ("coop", "dassl", "maple")))
    if "dassl" not in out:
        raise InputError(f"their trainers import Dassl: also give --reference-dassl PATH ({_get_it(REPOS['dassl'])})")
    return out


checkout_commit = git_head  # the reference checkout's HEAD, recorded beside every comparison


# --- what is matched: the configuration plumbing ------------------------------------------------------

@dataclass
class ReferenceBenchConfig:
    """One side-by-side run. Sizes of both towers come from ``model`` (ours), theirs are built to match."""

    checkouts: dict[str, str] = field(default_factory=dict)
    model: str = "ViT-B-16-quickgelu"
    pretrained: str = "none"
    batch: int = 4
    classes: int = 50
    device: str = "cpu"
    precision: str = "auto"  # auto: fp32 on CPU, their fp16 path (our fp16 autocast) on CUDA
    repeats: int = 3
    warmup: int = 1
    threads: int | None = None  # torch threads in the children (None: torch's default)
    coop_n_ctx: int = 16  # CoOp's few-shot setting (train.py: N_CTX 16, random init; scripts/coop/main.sh)
    maple_n_ctx: int = 2  # MaPLe's config (vit_b16_c2_ep5_batch4_2ctx.yaml)
    maple_depth: int = 9
    seed: int = 0

    @property
    def methods(self) -> list[str]:
        return [m for m in METHODS if m in self.checkouts]

    def resolved_precision(self) -> str:
        if self.precision == "auto":
            return "fp16" if self.device.startswith("cuda") else "fp32"
        return self.precision

    def validate(self) -> None:
        for name in ("batch", "classes", "repeats", "coop_n_ctx", "maple_n_ctx", "maple_depth"):
            if getattr(self, name) < 1:
                raise InputError(f"{name.replace('_', ' ')} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise InputError(f"--warmup must be >= 0, got {self.warmup}")
        if self.precision not in PRECISIONS:
            raise InputError(f"--reference-precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not self.methods:
            raise InputError("no reference method to compare (give --reference-coop and/or --reference-maple)")


def their_trainer_node(cfg: ReferenceBenchConfig, method: str) -> tuple[str, dict[str, Any]]:
    """The ``cfg.TRAINER.<X>`` node their ``train.py:extend_cfg`` adds, with our sizes: (name, values).

    Applied after merging their trainer yaml, so these values win over it (MaPLe's yaml sets them too).
    """
    prec = cfg.resolved_precision()
    if method == "coop":
        return "COOP", {"N_CTX": cfg.coop_n_ctx, "CSC": False, "CTX_INIT": "", "PREC": prec,
                        "CLASS_TOKEN_POSITION": "end"}
    return "MAPLE", {"N_CTX": cfg.maple_n_ctx, "CTX_INIT": "a photo of a", "PREC": prec,
                     "PROMPT_DEPTH": cfg.maple_depth}


def maple_design_details(n_ctx: int) -> dict[str, Any]:
    """What their ``trainers/maple.py:load_clip_to_cpu`` passes to their ``clip.build_model``."""
    return {"trainer": "MaPLe", "vision_depth": 0, "language_depth": 0, "vision_ctx": 0, "language_ctx": 0,
            "maple_length": n_ctx}


def our_overrides(cfg: ReferenceBenchConfig, method: str) -> dict[str, Any]:
    """Our preset's fields set to their sizes. Our CoOp preset is the base-to-new one (M = 4 from
    "a photo of a"); their default is N_CTX 16 random init, which is our ``fewshot`` protocol."""
    if method == "coop":
        return {"n_ctx": cfg.coop_n_ctx, "ctx_init": ""}
    return {"n_ctx": cfg.maple_n_ctx, "ctx_init": "a photo of a", "text_depth": cfg.maple_depth,
            "partition": [[0, cfg.maple_depth - 1]]}


def build_their_cfg(cfg: ReferenceBenchConfig, method: str, image_size: int):
    """Their yacs cfg: Dassl's defaults + the trainer node + their trainer yaml + our sizes (child only)."""
    from dassl.config import get_cfg_default
    from yacs.config import CfgNode

    node_name, values = their_trainer_node(cfg, method)
    their = get_cfg_default()
    setattr(their.TRAINER, node_name, CfgNode(dict(values)))
    their.merge_from_file(str(Path(cfg.checkouts[method]) / THEIR_CONFIG[method]))
    for key, value in values.items():
        setattr(getattr(their.TRAINER, node_name), key, value)
    their.INPUT.SIZE = (image_size, image_size)
    their.DATALOADER.TRAIN_X.BATCH_SIZE = cfg.batch
    return their


# --- the child: their model and ours, timed in the same rounds --------------------------------------

def _precision_context(device, precision: str):
    """Ours runs fp32, or fp16 autocast where their path casts CLIP to fp16."""
    from .device import autocast

    return autocast(device, precision)


def _their_clip(method: str, state_dict: dict, cfg: ReferenceBenchConfig, precision: str):
    """Their ``clip.model.build_model`` on our backbone's state dict (it converts to fp16, as for real
    weights), then ``.float()`` for fp32 as their trainers' ``build_model`` does."""
    their_model = importlib.import_module("clip.model")
    state = {k: v.detach().float().cpu().clone() for k, v in state_dict.items()}
    clip = their_model.build_model(state, maple_design_details(cfg.maple_n_ctx)) if method == "maple" \
        else their_model.build_model(state)
    return clip.float() if precision == "fp32" else clip


def _check_sizes(method: str, clip) -> None:
    """Their code derives text heads as width // 64 and MaPLe hard-codes ViT-B/16's widths."""
    if not all(hasattr(clip, a) for a in ("token_embedding", "transformer", "ln_final")) or \
            not hasattr(clip.visual, "conv1"):
        raise InputError("their build_model reads OpenAI's CLIP layout: use an open_clip ViT CLIP such as "
                         "ViT-B-16-quickgelu (not a custom-text or timm tower)")
    text_width = clip.token_embedding.weight.shape[1]
    vision_width = clip.visual.conv1.out_channels
    heads = clip.transformer.resblocks[0].attn.num_heads
    if heads != text_width // 64:
        raise InputError(f"their build_model uses text width // 64 = {text_width // 64} heads; this backbone has "
                         f"{heads}: use a model with 64-wide text heads")
    if method == "maple" and (text_width, vision_width) != (512, 768):
        raise InputError(f"their MaPLe code hard-codes text width 512 and vision width 768 (ViT-B/16); this "
                         f"backbone has {text_width} and {vision_width}")


def _copy_prompts_into_ours(method: str, theirs, ours) -> None:
    """Give ours their initial prompt values, so one forward of each must produce the same logits."""
    import torch

    src, dst = theirs.prompt_learner, ours.prompts
    with torch.no_grad():
        dst.ctx[0].copy_(src.ctx.float())
        if method == "maple":
            for j, p in enumerate(src.compound_prompts_text):
                dst.deep_ctx[0, j].copy_(p.float())
            for mine, theirs_linear in zip(dst.couplings, [src.proj, *src.compound_prompt_projections]):
                mine.weight.copy_(theirs_linear.weight.float())
                mine.bias.copy_(theirs_linear.bias.float())


def child_run(payload: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """Build theirs and ours for one method in *this* process (a fresh child) and time them."""
    import torch
    import torch.nn.functional as F

    cfg = ReferenceBenchConfig(**payload["cfg"])
    method = payload["method"]
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    sys.path[:0] = [cfg.checkouts[method], cfg.checkouts["dassl"]]
    precision = cfg.resolved_precision()
    device = torch.device(cfg.device)

    from .backbone import load_backbone
    from .bench import bench_classnames, interleaved_medians
    from .cache import TensorCache
    from .config import PMPOConfig
    from .model import build_model

    torch.manual_seed(cfg.seed)
    backbone = load_backbone(cfg.model, cfg.pretrained, device=device)
    with torch.no_grad():
        # Their build_model loads any state dict into fp16 parameters (OpenAI's weights are fp16), so
        # round ours the same way first: then both sides hold identical weights (speed is unaffected).
        for p in backbone.clip.parameters():
            p.copy_(p.half().to(p.dtype))
    size = backbone.image_size
    with contextlib.redirect_stdout(sys.stderr):  # their constructors print; our stdout carries the result
        try:
            trainer = importlib.import_module(f"trainers.{method}")
            from dassl.optim import build_optimizer
        except ModuleNotFoundError as exc:
            raise InputError(f"their code needs the package {exc.name!r}: pip install "
                             f"{' '.join(EXTRA_PACKAGES)} (not part of our requirements)") from exc
        _check_sizes(method, backbone.clip)
        their_cfg = build_their_cfg(cfg, method, size)
        names = bench_classnames(cfg.classes)
        theirs = trainer.CustomCLIP(their_cfg, names, _their_clip(method, backbone.clip.state_dict(), cfg, precision))
    # As their trainers' build_model: everything but the prompt learner frozen, Dassl's optimiser on
    # the prompt learner (CoOp) or on the whole model (MaPLe, whose frozen parameters get no grads).
    for name, param in theirs.named_parameters():
        param.requires_grad_("prompt_learner" in name)
    if precision == "fp32" and method == "maple":
        # Deviation: their MultiModalPromptLearner calls self.proj.half() unconditionally, so their
        # fp32 path fails ("mat1 and mat2 must have the same dtype"); this one Linear is cast back.
        theirs.prompt_learner.proj.float()
    theirs.to(device)
    their_optim = build_optimizer(theirs.prompt_learner if method == "coop" else theirs, their_cfg.OPTIM)

    fields = dict(method=method, model=backbone.model_name, pretrained=cfg.pretrained, **our_overrides(cfg, method))
    ours_infer = build_model(PMPOConfig(**fields), device=device, backbone=backbone).eval()
    ours_train = build_model(PMPOConfig(**fields), device=device, backbone=backbone).train()
    for model in (ours_infer, ours_train):
        _copy_prompts_into_ours(method, theirs, model)
    o = their_cfg.OPTIM
    our_optim = torch.optim.SGD(ours_train.learnable_parameters(), lr=o.LR, momentum=o.MOMENTUM,
                                weight_decay=o.WEIGHT_DECAY, dampening=o.SGD_DAMPNING, nesterov=o.SGD_NESTEROV)

    images = torch.randn(cfg.batch, 3, size, size, device=device)
    labels = torch.arange(cfg.batch, device=device) % cfg.classes
    ctx = lambda: _precision_context(device, precision)  # noqa: E731

    # Agreement before any step: same weights and prompts must give the same logits.
    theirs.eval()
    with torch.no_grad():
        their_logits = theirs(images).float()
        # As a server and a training run keep them: the frozen prior once per class list, the class
        # weights of fixed prompts once. Training's prior is warmed in fp32, outside the timed step.
        infer_cache, train_cache = TensorCache(), TensorCache()
        with ctx():
            weights = ours_infer.class_weights(names, cache=infer_cache)
            our_logits = ours_infer.logits_from(ours_infer.encode_image(images), weights).float()
        ours_train.prior_features(names, cache=train_cache)

    def their_infer() -> None:
        theirs.eval()  # Dassl's test(): set_model_mode("eval"), then model(input) under no_grad
        with torch.no_grad():
            theirs(images)

    def our_infer() -> None:
        with torch.no_grad(), ctx():
            ours_infer.logits_from(ours_infer.encode_image(images), weights)

    def our_infer_uncached() -> None:  # the class weights again, the prior from the cache
        with torch.no_grad(), ctx():
            ours_infer.logits_from(ours_infer.encode_image(images), ours_infer.class_weights(names, cache=infer_cache))

    def their_step() -> None:
        theirs.train()  # their forward_backward, non-amp path
        if method == "coop":
            loss = F.cross_entropy(theirs(images), labels)
        else:
            loss = theirs(images, labels)  # their MaPLe CustomCLIP returns the CE loss in training mode
        their_optim.zero_grad()
        loss.backward()
        their_optim.step()

    def our_step() -> None:
        our_optim.zero_grad(set_to_none=True)
        with ctx():
            loss = ours_train.loss(images, labels, names, cache=train_cache)["loss"]
        loss.backward()
        our_optim.step()

    cases = {"theirs:infer": their_infer, "ours:infer": our_infer, "ours:infer_uncached": our_infer_uncached,
             "theirs:train": their_step, "ours:train": our_step}
    log(f"{method_title(method)}: {len(cases)} cases × ({cfg.warmup} warm-up + {cfg.repeats}) rounds, batch {cfg.batch}, "
        f"{cfg.classes} classes, {precision}")
    timed = interleaved_medians(cases, cfg.repeats, cfg.warmup, device, log)

    node_name, node = their_trainer_node(cfg, method)
    their_learnable = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    activation = type(backbone.clip.transformer.resblocks[0].mlp.gelu).__name__
    return {
        "method": method, "label": method_title(method), "precision": precision, "device": str(device),
        "their_settings": {f"TRAINER.{node_name}.{k}": v for k, v in node.items()} | {
            "config_file": THEIR_CONFIG[method], "OPTIM": f"{o.NAME} lr {o.LR} momentum {o.MOMENTUM} wd {o.WEIGHT_DECAY}"},
        "our_settings": {"method": method, **our_overrides(cfg, method)},
        "learnable": {"theirs": their_learnable, "ours": ours_train.num_learnable()},
        "max_abs_logit_diff": float((their_logits - our_logits).abs().max()),
        "logit_scale": float(ours_infer.logit_scale),
        "our_activation": activation,
        "timings": timed,
        "ratios": {
            "infer": timed["theirs:infer"]["median_s"] / timed["ours:infer"]["median_s"],
            "infer_uncached": timed["theirs:infer"]["median_s"] / timed["ours:infer_uncached"]["median_s"],
            "train": timed["theirs:train"]["median_s"] / timed["ours:train"]["median_s"],
        },
    }


# --- the parent -------------------------------------------------------------------------------------

def run_method(cfg: ReferenceBenchConfig, method: str, quiet: bool = False, timeout: float | None = None
               ) -> dict[str, Any]:
    """One reference method in a fresh interpreter (their ``clip``/``trainers`` packages clash)."""
    return run_child("pmpo.reference_bench", {"cfg": dataclasses.asdict(cfg), "method": method},
                     f"the {method_title(method)} reference run", quiet, timeout)


def run_reference_bench(cfg: ReferenceBenchConfig, log: Callable[[str], None] | None = None,
                        quiet: bool = False) -> dict[str, Any]:
    """Every requested reference method, each in its own child; the result as a JSON-able dict."""
    import torch

    from .bench import machine_info

    log = log or (lambda _msg: None)
    cfg.validate()
    if cfg.threads is None:
        cfg = dataclasses.replace(cfg, threads=torch.get_num_threads())
    started = time.perf_counter()
    result: dict[str, Any] = {
        "config": dataclasses.asdict(cfg) | {"precision": cfg.resolved_precision()},
        "machine": machine_info(torch.device(cfg.device)),
        "checkouts": {k: {"repo": REPOS[k].name, "path": p, "commit": checkout_commit(p)} for k, p in cfg.checkouts.items()},
        "methods": [],
    }
    for method in cfg.methods:
        log(f"reference {method_title(method)}: child process with {cfg.checkouts[method]} and {cfg.checkouts['dassl']}")
        result["methods"].append(run_method(cfg, method, quiet=quiet))
    if hasattr(os, "getloadavg"):
        result["machine"]["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    result["wall_s"] = time.perf_counter() - started
    return result


def format_reference_markdown(result: dict[str, Any]) -> str:
    """The side-by-side table (what ``pmpo bench --reference...`` prints and ``--markdown`` writes)."""
    c, m = result["config"], result["machine"]
    where = m.get("gpu") or f"{m['cpu']} ({m['threads']} threads)"
    commits = ", ".join(f"{v['repo']}@{(v['commit'] or 'unknown')[:7]}" for v in result["checkouts"].values())
    lines = [
        f"**Against the reference code** ({commits}): {c['model']} ({c['pretrained'] or 'none'}) sizes on "
        f"{c['device']} / {where}, {c['precision']}; batch {c['batch']}, {c['classes']} classes; median of "
        f"{c['repeats']} interleaved repeats after {c['warmup']} warm-up; torch {m['torch']}, load avg "
        f"{m.get('load_avg_start', '?')} → {m.get('load_avg_end', '?')}",
        "",
        "| case | theirs ms / batch | ours ms / batch | ours speed / theirs (theirs time / ours) |",
        "|---|---:|---:|---:|",
    ]
    for r in result["methods"]:
        t, q = r["timings"], r["ratios"]
        ms = lambda k: f"{1000 * t[k]['median_s']:.0f}"  # noqa: E731
        lines += [
            f"| {r['label']} inference (ours: cached class weights) | {ms('theirs:infer')} | {ms('ours:infer')} | "
            f"{q['infer']:.2f}× |",
            f"| {r['label']} inference (ours: class weights recomputed per batch, as theirs) | {ms('theirs:infer')} | "
            f"{ms('ours:infer_uncached')} | {q['infer_uncached']:.2f}× |",
            f"| {r['label']} training step (fwd + CE + bwd + SGD) | {ms('theirs:train')} | {ms('ours:train')} | "
            f"{q['train']:.2f}× |",
        ]
    lines += ["", "| method | their settings | our preset at their sizes | learnable (theirs / ours) | "
                  "max logit diff (same weights and prompts) |", "|---|---|---|---:|---:|"]
    for r in result["methods"]:
        theirs = ", ".join(f"{k.rsplit('.', 1)[-1]} {v!r}" for k, v in r["their_settings"].items()
                           if k.startswith("TRAINER."))
        ours = ", ".join(f"{k} {v!r}" for k, v in r["our_settings"].items())
        lines.append(f"| {r['label']} | {theirs}; {r['their_settings']['OPTIM']} | {ours} | "
                     f"{r['learnable']['theirs']:,} / {r['learnable']['ours']:,} | {r['max_abs_logit_diff']:.1e} |")
    if any(r["our_activation"] != "QuickGELU" for r in result["methods"]):
        lines += ["", "Note: our backbone uses GELU, their CLIP QuickGELU: use a -quickgelu model for a like-for-like run."]
    lines += ["", f"Wall time of this run: {result['wall_s']:.0f} s."]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        sys.exit(child_main(child_run, sys.argv[2]))
    print("usage: pmpo bench --reference ... (this module's own entry point is internal)", file=sys.stderr)
    sys.exit(2)
