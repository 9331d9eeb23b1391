"""``pmpo verify``: our training of each baseline, step by step against its authors' trainer.

``pmpo bench --reference`` shows that one forward pass of our CoOp and MaPLe gives their logits.
Training adds what a forward pass does not test: the optimiser, the warm-up and cosine schedule
Dassl builds from their yaml, each method's loss as their ``forward_backward`` computes it, and
PromptSRC's Gaussian prompt aggregation. This module runs, for each method, THEIR trainer
(``build_model`` and ``forward_backward`` of their trainer class, their config file, Dassl's
optimiser and scheduler) next to OUR ``pmpo.engine.train`` with the method's base-to-new preset,
both from the same learnable tensors and the same random-init CLIP weights (rounded through fp16,
run in fp32), fed the same preprocessed batches in the same order; after every optimiser step it
compares the loss, the learning rate, every learnable tensor and the logits of a fixed evaluation
batch.

Their code is never vendored and never imported into this process: each method runs in a child
interpreter (``pmpo.verify_child``) with its reference checkout and its Dassl on ``sys.path``.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .children import run_child
from .config import method_title
from .errors import InputError, PMPOError
from .reference_bench import EXTRA_PACKAGES, REPOS, checkout_commit, validate_checkout

TINY = "tiny"
# Their MaPLe and KgCoOp hard-code ViT-B/16's widths (text 512, vision 768), so the tiny model keeps
# them and saves on everything else: 32-pixel images (4 patches), 4 layers per tower.
TINY_CFG: dict[str, Any] = {
    "embed_dim": 512, "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 768, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 4},
}
THEIR_FP16_CASTS = ("round", "off")


@dataclass(frozen=True)
class MethodSpec:
    """Where a method's reference trainer lives and how its config is named."""

    method: str  # our preset
    repo: str  # key of REPOS holding the trainer
    code_root: str  # folder inside the checkout with train.py, trainers/ and clip/
    dassl: str  # key of REPOS, or "<repo>:<folder>" for a Dassl shipped inside the checkout
    trainer: str  # module under trainers/
    trainer_class: str
    config: str  # their trainer yaml, relative to code_root
    node: str  # cfg.TRAINER.<node>

    @property
    def label(self) -> str:
        return method_title(self.method)  # the preset's title, as every table names the method

    @property
    def trainer_file(self) -> str:
        return f"{self.code_root + '/' if self.code_root else ''}trainers/{self.trainer}.py"

    @property
    def config_file(self) -> str:  # relative to the checkout, as the table cites it
        return f"{self.code_root + '/' if self.code_root else ''}{self.config}"


SPECS: dict[str, MethodSpec] = {s.method: s for s in (
    MethodSpec("coop", "coop", "", "dassl", "coop", "CoOp", "configs/trainers/CoOp/vit_b16_ctxv1.yaml", "COOP"),
    MethodSpec("cocoop", "coop", "", "dassl", "cocoop", "CoCoOp",
               "configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml", "COCOOP"),
    MethodSpec("kgcoop", "kgcoop", "KgCoOp", "kgcoop:Dassl.ProGrad.pytorch", "kgcoop", "KgCoOp",
               "configs/trainers/KgCoOp/vit_b16_ep100_ctxv1.yaml", "COOP"),
    MethodSpec("maple", "maple", "", "dassl", "maple", "MaPLe",
               "configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml", "MAPLE"),
    MethodSpec("ivlp", "maple", "", "dassl", "independentVL", "IVLP",
               "configs/trainers/IVLP/vit_b16_c2_ep5_batch4_2+2ctx.yaml", "IVLP"),
    MethodSpec("vpt", "maple", "", "dassl", "vpt", "VPT", "configs/trainers/VPT/vit_b16_c2_ep5_batch4_4.yaml", "VPT"),
    MethodSpec("promptsrc", "promptsrc", "", "dassl", "promptsrc", "PromptSRC",
               "configs/trainers/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml", "PROMPTSRC"),
)}
METHODS = tuple(SPECS)


@dataclass
class VerifyConfig:
    """One verification run; every method gets the same schedule length and class list."""

    reference: str = ""
    methods: tuple[str, ...] = METHODS
    steps: int = 12  # at least; rounded up to whole epochs
    steps_per_epoch: int = 3
    classes: int = 4
    eval_images: int = 4
    batch: int | None = None  # None: the method's own batch (our preset's, checked against their yaml)
    model: str = TINY
    pretrained: str = "none"
    seed: int = 0
    threads: int | None = 1
    tolerance: float = 1e-3
    their_fp16_casts: str = "round"
    checkouts: dict[str, str] = field(default_factory=dict)  # filled by resolve_reference

    @property
    def epochs(self) -> int:
        return math.ceil(self.steps / self.steps_per_epoch)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def validate(self) -> None:
        unknown = [m for m in self.methods if m not in SPECS]
        if unknown:
            raise InputError(f"unknown method(s) {', '.join(unknown)}; choose from {','.join(METHODS)}")
        if not self.methods:
            raise InputError(f"no method to verify; choose from {','.join(METHODS)}")
        for name in ("steps", "steps_per_epoch", "classes", "eval_images"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.batch is not None and self.batch < 1:
            raise InputError(f"--batch must be >= 1, got {self.batch}")
        if self.epochs < 2:
            raise InputError(f"--steps {self.steps} with {self.steps_per_epoch} steps per epoch is one epoch: the run must "
                             "cover at least 2 epochs to cross the warm-up → cosine boundary")
        if not (self.tolerance > 0 and math.isfinite(self.tolerance)):
            raise InputError(f"--tolerance must be a positive number, got {self.tolerance}")
        if self.their_fp16_casts not in THEIR_FP16_CASTS:
            raise InputError(f"--their-fp16-casts must be one of {THEIR_FP16_CASTS}, got {self.their_fp16_casts!r}")


# --- checkouts ----------------------------------------------------------------------------------

def needed_checkouts(methods: tuple[str, ...] | list[str]) -> list[str]:
    """The REPOS keys the methods need (their trainer repository and its Dassl), in a stable order."""
    keys: list[str] = []
    for m in methods:
        spec = SPECS[m]
        for key in (spec.repo, spec.dassl.split(":")[0]):
            if key not in keys:
                keys.append(key)
    return keys


def resolve_reference(root: str | Path, methods: tuple[str, ...] | list[str]) -> dict[str, str]:
    """The checkouts the methods need inside ``root`` (their ``git clone`` folder names), validated;
    every missing one is named with the command that gets it, in one error."""
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise InputError(f"--reference {root}: no such directory (a folder holding the reference checkouts: "
                         + "; ".join(f"git clone {REPOS[k].url}" for k in needed_checkouts(methods)) + ")")
    found, problems = {}, []
    for key in needed_checkouts(methods):
        try:
            found[key] = str(validate_checkout(key, folder / REPOS[key].folder,
                                               how=f"--reference {root}: expected {REPOS[key].folder}/ inside, but"))
        except InputError as exc:
            problems.append(str(exc))
    if problems:
        raise InputError("; ".join(problems))
    return found


def child_paths(spec: MethodSpec, checkouts: dict[str, str]) -> tuple[str, str]:
    """(their code folder, their Dassl folder) for the child's ``sys.path``."""
    code = Path(checkouts[spec.repo]) / spec.code_root if spec.code_root else Path(checkouts[spec.repo])
    repo, _, inner = spec.dassl.partition(":")
    dassl = Path(checkouts[repo]) / inner if inner else Path(checkouts[repo])
    return str(code), str(dassl)


# --- both sides' settings ------------------------------------------------------------------------

@dataclass(frozen=True)
class Sizes:
    """What the backbone allows: prompt depths are set from its layer count on both sides."""

    text_layers: int
    vision_layers: int

    @property
    def all_layers(self) -> int:  # IVLP's and VPT's "12 of 12"
        return min(self.text_layers, self.vision_layers)

    @property
    def most_layers(self) -> int:  # MaPLe's and PromptSRC's "9 of 12": all but the last, so one is carried
        return max(1, self.all_layers - 1)


def gpa_settings(epochs: int) -> tuple[float, float]:
    """PromptSRC's GPA (mean 15, std 1 over 20 epochs) scaled to a short run: mean at 3/4 of the
    epochs, std 1, so that several epochs get weight and the aggregation visibly acts."""
    return 0.75 * epochs, 1.0


def their_opts(spec: MethodSpec, sizes: Sizes, epochs: int, batch: int) -> list[Any]:
    """``KEY VALUE`` pairs merged after their yaml (as their scripts pass opts): our sizes, fp32, the
    short schedule. Learning rate, momentum, weight decay and warm-up stay as their files say."""
    n = f"TRAINER.{spec.node}."
    opts: list[Any] = [n + "PREC", "fp32", "OPTIM.MAX_EPOCH", epochs, "DATALOADER.TRAIN_X.BATCH_SIZE", batch,
                       "DATASET.NAME", "ImageNet"]
    if spec.method == "coop":
        opts += [n + "N_CTX", 4, n + "CSC", False, n + "CLASS_TOKEN_POSITION", "end"]
    elif spec.method == "kgcoop":  # scripts/base2new_train.sh: NCTX 4, CSC False, WEIGHT 8.0, CTP end
        opts += [n + "N_CTX", 4, n + "CSC", False, n + "W", 8.0, n + "CLASS_TOKEN_POSITION", "end"]
    elif spec.method == "maple":
        opts += [n + "PROMPT_DEPTH", sizes.most_layers]
    elif spec.method == "ivlp":
        opts += [n + "PROMPT_DEPTH_TEXT", sizes.all_layers, n + "PROMPT_DEPTH_VISION", sizes.all_layers]
    elif spec.method == "vpt":
        opts += [n + "PROMPT_DEPTH_VISION", sizes.all_layers]
    elif spec.method == "promptsrc":
        mean, std = gpa_settings(epochs)
        opts += [n + "PROMPT_DEPTH_TEXT", sizes.most_layers, n + "PROMPT_DEPTH_VISION", sizes.most_layers,
                 n + "GPA_MEAN", mean, n + "GPA_STD", std]
    return opts


def our_model_overrides(method: str, sizes: Sizes) -> dict[str, Any]:
    """Our preset's fields that depend on the backbone's depth (everything else is the preset's)."""
    if method == "maple":
        d = sizes.most_layers
        return {"text_depth": d, "partition": [[0, d - 1]]}
    if method == "promptsrc":
        d = sizes.most_layers
        return {"text_depth": d, "partition": [[0, d - 1]]}
    if method == "ivlp":
        return {"text_depth": sizes.all_layers, "partition": "all"}
    return {}


def our_train_overrides(method: str, epochs: int, batch: int) -> dict[str, Any]:
    """Our training preset with the short schedule; fp32 and no loader workers (the batches are given)."""
    out: dict[str, Any] = {"epochs": epochs, "batch_size": batch, "precision": "fp32", "num_workers": 0}
    if method == "promptsrc":
        out["gpa_mean"], out["gpa_std"] = gpa_settings(epochs)
    return out


# --- the tiny backbone ---------------------------------------------------------------------------

def make_tiny_model(folder: str | Path, seed: int = 0) -> str:
    """A random-init CLIP of ``TINY_CFG`` saved as a local-dir model (``local-dir:PATH``)."""
    import open_clip
    import torch

    from .backbone import save_local_dir

    torch.manual_seed(seed)
    clip = open_clip.model.CLIP(**TINY_CFG)
    return save_local_dir(clip, TINY_CFG, folder, {"size": TINY_CFG["vision_cfg"]["image_size"]})


# --- comparison helpers (used by the child; plain torch, tested without the checkouts) ------------

def tensor_diff(theirs, ours) -> tuple[float, float]:
    """(max |theirs − ours|, that over max |theirs|): the relative difference of one tensor."""
    t, o = theirs.detach().float().cpu(), ours.detach().float().cpu()
    if t.shape != o.shape:
        raise PMPOError(f"shape mismatch: theirs {tuple(t.shape)} vs ours {tuple(o.shape)}")
    diff = float((t - o).abs().max()) if t.numel() else 0.0
    scale = float(t.abs().max()) if t.numel() else 0.0
    return diff, diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)


def update_rel_diff(theirs, ours, theirs0, ours0) -> float:
    """max |Δtheirs − Δours| / max |Δtheirs| since the start: how differently the two *trained*
    (stricter than :func:`tensor_diff`, which the unchanged initial values dominate)."""
    dt = theirs.detach().float().cpu() - theirs0
    do = ours.detach().float().cpu() - ours0
    scale = float(dt.abs().max())
    diff = float((dt - do).abs().max())
    return diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)


def summarize(method: str, steps: list[dict[str, Any]], final_update: float) -> dict[str, Any]:
    """The row of one method from its per-step records (max over steps of each difference)."""
    def worst(key: str) -> float:
        return max((s[key] for s in steps), default=0.0)

    return {
        "method": method, "steps": len(steps),
        "max_param_rel_diff": worst("param_rel"), "max_param_abs_diff": worst("param_abs"),
        "max_loss_abs_diff": max((abs(s["loss_theirs"] - s["loss_ours"]) for s in steps), default=0.0),
        "max_logit_abs_diff": worst("logit_abs"),
        "max_lr_abs_diff": max((abs(s["lr_theirs"] - s["lr_ours"]) for s in steps), default=0.0),
        "final_update_rel_diff": final_update,
    }


# --- the parent ---------------------------------------------------------------------------------

def run_method(cfg: VerifyConfig, method: str, quiet: bool = False, timeout: float | None = None) -> dict[str, Any]:
    """One method in a fresh interpreter (their ``clip``/``trainers``/``dassl`` packages clash)."""
    return run_child("pmpo.verify_child", {"cfg": dataclasses.asdict(cfg), "method": method},
                     f"the {SPECS[method].label} verification", quiet, timeout)


def check_packages() -> None:
    """Their imports need packages beyond ours: say which, before any child starts."""
    import importlib.util

    missing = [p for p in EXTRA_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise InputError(f"their code needs the package(s) {', '.join(missing)}: pip install {' '.join(EXTRA_PACKAGES)} "
                         "(not part of our requirements)")


def run_verify(cfg: VerifyConfig, log: Callable[[str], None] | None = None, quiet: bool = False) -> dict[str, Any]:
    """Every requested method, each in its own child; the result as a JSON-able dict."""
    import torch

    from .bench import machine_info

    log = log or (lambda _msg: None)
    cfg.validate()
    cfg = dataclasses.replace(cfg, checkouts=resolve_reference(cfg.reference, cfg.methods))
    check_packages()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pmpo-verify-") as tmp:
        run_cfg = cfg if cfg.model != TINY else dataclasses.replace(cfg, model=make_tiny_model(Path(tmp) / "tiny", cfg.seed))
        rows = []
        for method in cfg.methods:
            spec = SPECS[method]
            log(f"{spec.label}: their {spec.trainer_file} + {spec.config_file} vs our pmpo.engine.train "
                f"({cfg.total_steps} steps, {cfg.epochs} epochs)")
            row = run_method(run_cfg, method, quiet=quiet)
            repo = REPOS[spec.repo]
            row |= {"reference": repo.name, "commit": checkout_commit(cfg.checkouts[spec.repo]) or "unknown",
                    "ok": row["max_param_rel_diff"] <= cfg.tolerance}
            log(f"{spec.label}: max param rel diff {row['max_param_rel_diff']:.1e}, loss {row['max_loss_abs_diff']:.1e}, "
                f"logits {row['max_logit_abs_diff']:.1e}")
            rows.append(row)
    return {
        "config": dataclasses.asdict(cfg) | {"epochs": cfg.epochs, "total_steps": cfg.total_steps,
                                             "model_cfg": TINY_CFG if cfg.model == TINY else None},
        "machine": machine_info(torch.device("cpu")),
        "checkouts": {k: {"repo": REPOS[k].name, "path": p, "commit": checkout_commit(p) or "unknown"}
                      for k, p in cfg.checkouts.items()},
        "methods": rows,
        "all_ok": all(r["ok"] for r in rows),
        "wall_s": time.perf_counter() - started,
    }


def format_markdown(result: dict[str, Any]) -> str:
    """The table docs/RECIPES.md shows (one row per method)."""
    c = result["config"]
    layers = f"{TINY_CFG['vision_cfg']['layers']} + {TINY_CFG['text_cfg']['layers']}"
    model = f"tiny ({layers} layers, widths 768 / 512)" if c["model"] == TINY else c["model"]
    lines = [
        f"{c['total_steps']} optimiser steps ({c['epochs']} epochs × {c['steps_per_epoch']}: 1 warm-up epoch, then cosine), "
        f"{c['classes']} classes, model {model}, "
        f"fp32, their fp16 casts: {c['their_fp16_casts']}; tolerance {c['tolerance']:g} (relative, learnable tensors)",
        "",
        "| method | repository@commit | their trainer, config | steps | batch | max param rel diff | final update rel diff "
        "| max loss diff | max logit diff | max lr diff | within tolerance |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["methods"]:
        lines.append(
            f"| {r['label']} | {r['reference']}@{r['commit'][:7]} | {r['trainer_file']}, {r['config_file']} | {r['steps']} | "
            f"{r['batch']} | {r['max_param_rel_diff']:.1e} | {r['final_update_rel_diff']:.1e} | {r['max_loss_abs_diff']:.1e} | "
            f"{r['max_logit_abs_diff']:.1e} | {r['max_lr_abs_diff']:.1e} | {'yes' if r['ok'] else 'NO'} |")
    notes = [(r["label"], n) for r in result["methods"] for n in r.get("notes", [])]
    if notes:
        lines += ["", *[f"- {label}: {note}" for label, note in notes]]
    lines += ["", f"Wall time: {result['wall_s']:.0f} s."]
    return "\n".join(lines)
