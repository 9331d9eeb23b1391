"""The child interpreter of ``pmpo verify``: THEIR trainer and OUR engine for one method, step by step.

Run as ``python -m pmpo.verify_child --child PAYLOAD`` by :func:`pmpo.verify.run_method`; it puts the
method's reference checkout and its Dassl first on ``sys.path``, so ``clip``, ``trainers`` and
``dassl`` are theirs. Their trainer class is instantiated without Dassl's data manager (no dataset
on disk): ``build_model`` runs as written, with their ``clip._download`` answering with a file that
holds our backbone's state dict, and every step is their ``forward_backward``. Ours is
``pmpo.engine.train`` on the same batches: its image loader is pointed at the preprocessed tensors,
and after each of our steps (its progress callback) their trainer takes the same step.

Shims, active only while their code runs (none changes their arithmetic):
  * their hard-coded CUDA moves (``Tensor.cuda``/``Module.cuda``, in PromptSRC, KgCoOp and VPT) go to the
    run's one device;
  * ``.half()``: with ``their_fp16_casts="round"`` (default) a float32 tensor is rounded to fp16
    values and kept float32, so each cast their code makes still rounds, but their fp32 path does
    not crash where it mixes dtypes (MaPLe's ``proj.half()``, PromptSRC's fp16 frozen image encoder
    and ``fixed_embeddings.half()``); ``"off"`` makes it the identity, which measures what their
    casts cost;
  * Dassl's warm-up scheduler passes ``verbose`` to ``LRScheduler.__init__``, which recent torch no
    longer takes: it is accepted and dropped (globally in this child; our engine has no scheduler).
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .children import child_main
from .errors import InputError, PMPOError
from .reference_bench import _check_sizes
from .verify import (
    EXTRA_PACKAGES,
    SPECS,
    MethodSpec,
    Sizes,
    VerifyConfig,
    child_paths,
    our_model_overrides,
    our_train_overrides,
    summarize,
    tensor_diff,
    their_opts,
    update_rel_diff,
)

# --- their runtime ------------------------------------------------------------------------------

class TheirRuntime:
    """The shims above, as a re-entrant context; counts their fp16 casts of float32 tensors."""

    def __init__(self, device, fp16_casts: str):
        self.device, self.fp16_casts, self.half_casts = device, fp16_casts, 0

    @contextlib.contextmanager
    def __call__(self):
        import torch

        saved = (torch.Tensor.cuda, torch.nn.Module.cuda, torch.Tensor.half)
        original_half = torch.Tensor.half
        runtime = self

        def half(tensor, *args, **kwargs):
            if tensor.dtype != torch.float32:
                return original_half(tensor, *args, **kwargs)
            runtime.half_casts += 1
            return original_half(tensor, *args, **kwargs).to(torch.float32) if runtime.fp16_casts == "round" else tensor

        if self.device.type == "cpu":
            torch.Tensor.cuda = lambda t, *a, **k: t.to(self.device)
            torch.nn.Module.cuda = lambda m, *a, **k: m.to(self.device)
        torch.Tensor.half = half
        try:
            yield
        finally:
            torch.Tensor.cuda, torch.nn.Module.cuda, torch.Tensor.half = saved


def scheduler_compat() -> None:
    """Let Dassl's ``_BaseWarmupScheduler`` call ``LRScheduler.__init__(optimizer, last_epoch, verbose)``."""
    from torch.optim import lr_scheduler

    init = lr_scheduler.LRScheduler.__init__
    if "verbose" in inspect.signature(init).parameters:
        return

    def compat(self, optimizer, last_epoch=-1, verbose=None):
        init(self, optimizer, last_epoch)

    lr_scheduler.LRScheduler.__init__ = compat


def their_extend_cfg(train_py: Path) -> Callable:
    """``extend_cfg`` from their ``train.py``, read from the file (importing train.py would import every
    dataset and trainer of the repository)."""
    tree = ast.parse(train_py.read_text(encoding="utf-8"))
    fns = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "extend_cfg"]
    if not fns:
        raise InputError(f"{train_py} has no extend_cfg(): not the train.py of a supported reference checkout")
    namespace: dict[str, Any] = {}
    exec(compile(ast.Module(body=fns, type_ignores=[]), str(train_py), "exec"), namespace)
    return namespace["extend_cfg"]


def set_opts(their_cfg, opts: list[Any]) -> None:
    """Apply ``KEY VALUE`` pairs to their (unfrozen) yacs config; a key their config lacks is an error."""
    for key, value in zip(opts[::2], opts[1::2]):
        node = their_cfg
        *path, last = key.split(".")
        for part in path:
            node = getattr(node, part)
        if last not in node:
            raise PMPOError(f"their config has no {key}: not the reference version this check was written for")
        node[last] = value


def build_their_trainer(spec: MethodSpec, cfg: VerifyConfig, code: Path, sizes: Sizes, batch: int, names: list[str],
                        image_size: int, state_path: str, device, runtime: TheirRuntime):
    """Their trainer object after their ``build_model()``, and their yaml's batch size."""
    from dassl.config import get_cfg_default
    from dassl.engine.trainer import TrainerBase

    their = get_cfg_default()
    their_extend_cfg(code / "train.py")(their)
    their.merge_from_file(str(code / spec.config))
    yaml_batch = int(their.DATALOADER.TRAIN_X.BATCH_SIZE)
    set_opts(their, their_opts(spec, sizes, cfg.epochs, batch))
    their.INPUT.SIZE = (image_size, image_size)
    with runtime():
        module = importlib.import_module(f"trainers.{spec.trainer}")
        sys.modules["clip.clip"]._download = lambda *_a, **_k: state_path  # their load_clip_to_cpu reads our weights
        cls = getattr(module, spec.trainer_class)
        trainer = cls.__new__(cls)
        TrainerBase.__init__(trainer)  # what SimpleTrainer.__init__ does, minus the data manager and evaluator
        trainer.cfg, trainer.device = their, device
        trainer.dm = SimpleNamespace(dataset=SimpleNamespace(classnames=list(names)))
        trainer.start_epoch, trainer.max_epoch = 0, their.OPTIM.MAX_EPOCH
        trainer.check_cfg(their)
        trainer.build_model()
    return trainer, yaml_batch


# --- which tensor of ours is which tensor of theirs -----------------------------------------------

def our_tensor(name: str, prompts) -> Any:
    """Our tensor (a view into our parameters) that holds their learnable tensor ``name``."""
    rules: list[tuple[str, Callable[[re.Match], Any]]] = [
        (r"prompt_learner\.ctx", lambda m: prompts.ctx[0]),
        (r"prompt_learner\.meta_net\.(linear[12])\.(weight|bias)", lambda m: getattr(getattr(prompts.meta_net, m[1]), m[2])),
        (r"prompt_learner\.compound_prompts_text\.(\d+)", lambda m: prompts.deep_ctx[0, int(m[1])]),
        (r"prompt_learner\.proj\.(weight|bias)", lambda m: getattr(prompts.couplings[0], m[1])),
        (r"prompt_learner\.compound_prompt_projections\.(\d+)\.(weight|bias)",
         lambda m: getattr(prompts.couplings[int(m[1]) + 1], m[2])),
        (r"text_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow", lambda m: prompts.deep_ctx[0, int(m[1]) - 1]),
        (r"image_encoder\.VPT", lambda m: prompts.visual_ctx[prompts.visual_rows[(0, 0)]]),
        (r"image_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow",
         lambda m: prompts.visual_ctx[prompts.visual_rows[(0, int(m[1]))]]),
    ]
    for pattern, get in rules:
        match = re.fullmatch(pattern, name)
        if match:
            try:
                return get(match)
            except (AttributeError, IndexError, KeyError, TypeError) as exc:
                raise PMPOError(f"their learnable {name} has no counterpart in our model ({exc})") from exc
    raise PMPOError(f"their learnable {name} has no counterpart in our model")


def learnable_pairs(theirs, ours) -> list[tuple[str, Any, Callable[[], Any]]]:
    """(their name, their parameter, our view) for every tensor their trainer learns; both sides must
    learn the same number of values."""
    pairs = [(name, p, (lambda n=name: our_tensor(n, ours.prompts))) for name, p in theirs.named_parameters()
             if p.requires_grad]
    for name, p, get in pairs:
        if tuple(p.shape) != tuple(get().shape):
            raise PMPOError(f"their {name} is {tuple(p.shape)}, our counterpart {tuple(get().shape)}")
    theirs_n, ours_n = sum(p.numel() for _, p, _ in pairs), ours.num_learnable()
    if theirs_n != ours_n:
        raise PMPOError(f"they learn {theirs_n} values, we learn {ours_n}: the settings of the two sides differ")
    return pairs


# --- the run ------------------------------------------------------------------------------------

def child_run(payload: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """Both sides of one method in this (fresh) process; per-step differences and their maxima."""
    import torch

    cfg = VerifyConfig(**{**payload["cfg"], "methods": tuple(payload["cfg"]["methods"])})
    spec = SPECS[payload["method"]]
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    code, dassl = child_paths(spec, cfg.checkouts)
    sys.path[:0] = [code, dassl]
    scheduler_compat()
    device = torch.device("cpu")
    runtime = TheirRuntime(device, cfg.their_fp16_casts)

    from . import engine
    from .backbone import load_backbone
    from .bench import bench_classnames
    from .config import PMPOConfig
    from .model import build_model

    torch.manual_seed(cfg.seed)
    backbone = load_backbone(cfg.model, cfg.pretrained, device=device)
    with torch.no_grad():  # their build_model stores fp16 weights: round ours the same way, run both in fp32
        for p in backbone.clip.parameters():
            p.copy_(p.half().to(p.dtype))
    # Their build_model derives heads as width // 64; MaPLe and KgCoOp hard-code ViT-B/16's widths.
    _check_sizes("maple" if spec.method in ("maple", "kgcoop") else spec.method, backbone.clip)
    sizes = Sizes(len(backbone.clip.transformer.resblocks), len(backbone.clip.visual.transformer.resblocks))
    names = bench_classnames(cfg.classes)
    tcfg = engine.load_train_preset(spec.method, "base2new")
    batch = cfg.batch or tcfg.batch_size
    tcfg = engine.load_train_preset(spec.method, "base2new", **our_train_overrides(spec.method, cfg.epochs, batch))
    ours = build_model(PMPOConfig(method=spec.method, model=backbone.model_name, pretrained=cfg.pretrained,
                                  **our_model_overrides(spec.method, sizes)), device=device, backbone=backbone)

    with tempfile.TemporaryDirectory(prefix="pmpo-verify-weights-") as tmp, contextlib.redirect_stdout(sys.stderr):
        state_path = str(Path(tmp) / "clip.pt")
        torch.save({k: v.detach().float().cpu().clone() for k, v in backbone.clip.state_dict().items()}, state_path)
        try:
            trainer, yaml_batch = build_their_trainer(spec, cfg, Path(code), sizes, batch, names, backbone.image_size,
                                                      state_path, device, runtime)
        except ModuleNotFoundError as exc:
            raise InputError(f"their code needs the package {exc.name!r}: pip install {' '.join(EXTRA_PACKAGES)} "
                             "(not part of our requirements)") from exc
        row = compare_training(spec, cfg, trainer, ours, names, tcfg, backbone.image_size, runtime, log)
    if yaml_batch != batch:
        row["notes"].insert(0, f"batch {batch} on both sides (their yaml says {yaml_batch})")
    return row | {"their_settings": _their_summary(trainer.cfg, spec)}


def compare_training(spec: MethodSpec, cfg: VerifyConfig, trainer, ours, names: list[str], tcfg, size: int,
                     runtime: TheirRuntime, log: Callable[[str], None]) -> dict[str, Any]:
    """Train ours with ``pmpo.engine.train`` and step ``trainer`` (their Dassl trainer, or anything with its
    interface) on the same batches; compare after every step. ``ours`` starts from their learnable tensors."""
    import torch

    from . import engine
    from .data.datasets import Datum

    theirs = trainer.model
    pairs = learnable_pairs(theirs, ours)
    with torch.no_grad():
        for _, p, get in pairs:
            get().copy_(p.float())
    theirs0 = {n: p.detach().float().cpu().clone() for n, p, _ in pairs}
    ours0 = {n: get().detach().float().cpu().clone() for n, _, get in pairs}

    batch = tcfg.batch_size
    n = cfg.steps_per_epoch * batch
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    pool = torch.randn(n, 3, size, size, generator=generator)
    eval_images = torch.randn(cfg.eval_images, 3, size, size, generator=generator)
    labels = [i % len(names) for i in range(n)]
    items = [Datum(str(i), labels[i], names[labels[i]]) for i in range(n)]
    plans = [[[i for i, _ in mb] for st in engine.plan_epoch(n, tcfg, e) for mb in st.micro] for e in range(cfg.epochs)]
    loaded: list[int] = []

    def load(path: str):
        loaded.append(int(path))
        return pool[int(path)]

    def their_logits():
        trainer.set_model_mode("eval")  # as Dassl's test(): eval mode, model_inference under no_grad
        with torch.no_grad(), runtime():
            out = trainer.model_inference(eval_images).float()
        trainer.set_model_mode("train")
        return out

    def our_logits():
        was = ours.training
        ours.eval()
        with torch.no_grad():
            out = ours(eval_images, names).float()
        ours.train(was)
        return out

    def compare(record: dict[str, Any]) -> dict[str, Any]:
        worst = (0.0, 0.0, "")
        for name, p, get in pairs:
            abs_diff, rel = tensor_diff(p, get())
            worst = max(worst, (rel, abs_diff, name))
        record |= {"param_rel": worst[0], "param_abs": worst[1], "worst_tensor": worst[2],
                   "logit_abs": float((their_logits() - our_logits()).abs().max())}
        return record

    start = compare({"step": 0, "epoch": 0, "lr_theirs": 0.0, "lr_ours": 0.0, "loss_theirs": 0.0, "loss_ours": 0.0})
    records: list[dict[str, Any]] = []
    step_casts: list[int] = []  # float32 tensors their forward_backward cast with .half(), per step

    def after_our_step(event: dict[str, Any]) -> None:
        if event.get("type") != "step":
            return
        epoch, s = event["epoch"] - 1, event["epoch_step"] - 1
        idx = plans[epoch][s]
        if loaded[-len(idx):] != idx:
            raise PMPOError(f"our engine loaded images {loaded[-len(idx):]} at step {event['step']}, expected {idx}")
        trainer.epoch, trainer.batch_idx, trainer.num_batches = epoch, s, cfg.steps_per_epoch
        if s == 0:
            trainer.set_model_mode("train")  # what TrainerX.run_epoch does first
        lr = trainer.get_current_lr()
        batch_in = {"img": pool[idx], "label": torch.tensor([labels[i] for i in idx]),
                    "domain": torch.zeros(len(idx), dtype=torch.long)}
        casts = runtime.half_casts
        with runtime():
            summary = trainer.forward_backward(batch_in)
        step_casts.append(runtime.half_casts - casts)
        record = {"step": event["step"], "epoch": event["epoch"], "lr_theirs": float(lr), "lr_ours": float(event["lr"]),
                  "loss_theirs": float(summary["loss"]), "loss_ours": float(event["loss"])}
        # Their PromptSRC loads its aggregated prompts inside the last forward_backward; ours at the end
        # of the last epoch, after this callback: the last step is compared once train() has returned.
        records.append(record if event["step"] == cfg.total_steps else compare(record))
        log(f"{spec.label} step {event['step']}/{cfg.total_steps}: loss {record['loss_theirs']:.6f} / "
            f"{record['loss_ours']:.6f}")

    original_loader = engine.load_image
    engine.load_image = load  # our loader reads the preprocessed tensors, untransformed
    ours.train_transform = lambda *_a, **_k: (lambda x: x)
    try:
        engine.train(ours, items, names, tcfg, progress=after_our_step)
    finally:
        engine.load_image = original_loader
        del ours.train_transform
    compare(records[-1])

    final_update = max(update_rel_diff(p, get(), theirs0[n], ours0[n]) for n, p, get in pairs)
    notes = []
    if any(step_casts):
        how = "kept as fp16 roundings" if cfg.their_fp16_casts == "round" else "made identities"
        notes.append(f"their training step calls .half() on {max(step_casts)} float32 tensors "
                     f"({how}: --their-fp16-casts {cfg.their_fp16_casts})")
    if spec.method == "promptsrc":
        notes.append(f"GPA mean {tcfg.gpa_mean:g}, std {tcfg.gpa_std:g} over {cfg.epochs} epochs on both sides")
    return summarize(spec.method, records, final_update) | {
        "label": spec.label, "trainer_file": spec.trainer_file, "config_file": spec.config_file, "batch": batch,
        "epochs": cfg.epochs, "steps_per_epoch": cfg.steps_per_epoch, "classes": len(names),
        "learnable": sum(p.numel() for _, p, _ in pairs), "initial_logit_abs_diff": start["logit_abs"],
        "our_settings": {"lr": tcfg.lr, "momentum": tcfg.momentum, "weight_decay": tcfg.weight_decay,
                         "warmup_epochs": tcfg.warmup_epochs, "warmup_lr": tcfg.warmup_lr, "epochs": tcfg.epochs,
                         "batch_size": tcfg.batch_size},
        "notes": notes, "per_step": [start, *records],
    }


def _their_summary(their_cfg, spec: MethodSpec) -> dict[str, Any]:
    o = their_cfg.OPTIM
    node = getattr(their_cfg.TRAINER, spec.node)
    return {"OPTIM": {k: o[k] for k in ("NAME", "LR", "MOMENTUM", "WEIGHT_DECAY", "MAX_EPOCH", "LR_SCHEDULER",
                                        "WARMUP_EPOCH", "WARMUP_TYPE", "WARMUP_CONS_LR")},
            f"TRAINER.{spec.node}": {k: (list(v) if isinstance(v, tuple) else v) for k, v in node.items()}}


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        sys.exit(child_main(child_run, sys.argv[2], (FutureWarning, UserWarning)))
    print("usage: pmpo verify --reference DIR (this module's own entry point is internal)", file=sys.stderr)
    sys.exit(2)
