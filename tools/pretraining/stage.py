"""One pretraining stage: build or continue the model, run the optimiser over the batch stream, save.

The loop itself (contrastive loss, attribute-head losses, learning rate per step or over wall
time, snapshots, the periodic probe) is the tool's; everything it steps through is imported:
the stream from ``batches``, the model pieces from ``model``, the folder from ``folder``, the
record from ``card``.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from pmpo.device import autocast

from .batches import CaptionTokens, Prefetcher
from .captions import MARKER_PREFIX
from .card import training_record, write_card
from .folder import evaluate_folder, load_heads, save_folder
from .model import MODEL_CFG, PREPROCESS_CFG, AttributeHeads, build_model, encode_text_truncated, grow, lr_at, param_groups, text_encoder
from .probes import probe_eval


def _stage_model(args: argparse.Namespace) -> tuple[torch.nn.Module, dict, dict | None]:
    """The model this stage trains, its model_cfg, and the training record of the stage it continues
    (None for a fresh model). Seeds torch's generator first: a fresh model's init draws from it."""
    model_cfg = json.loads(Path(args.model_config).read_text())["model_cfg"] if args.model_config else MODEL_CFG
    if args.init and not args.grow:  # a plain continuation keeps the loaded architecture
        model_cfg = json.loads((Path(args.init) / "open_clip_config.json").read_text())["model_cfg"]
    torch.manual_seed(args.seed)
    previous = None
    if args.init:
        previous = json.loads((Path(args.init) / "eval.json").read_text())["training"]
        model = open_clip.create_model(f"local-dir:{Path(args.init).resolve()}")
        if args.grow:
            model = grow(model, model_cfg)
    else:
        model = build_model(model_cfg, args.residual_scale)
    return model, model_cfg, previous


def _lr(args: argparse.Namespace, step: int, total: int | None, elapsed: float) -> float | None:
    """This step's learning rate; None once a wall-time schedule (no --steps) has used its --minutes."""
    if args.steps is None:  # schedule over wall time: uses the whole budget whatever the CPU load
        frac = elapsed / (args.minutes * 60)
        if frac >= 1.0:
            return None
        return lr_at(step, args.warmup, args.lr, args.warmup) if step < args.warmup else \
            args.lr * 0.5 * (1 + math.cos(math.pi * frac))
    return lr_at(step, total, args.lr, args.warmup)


def train(args: argparse.Namespace) -> None:
    """Train one stage into ``--out`` (see the CLI's description), then evaluate it and write its card."""
    out = Path(args.out)
    device = torch.device(args.device)
    model, model_cfg, previous = _stage_model(args)
    model.to(device)
    heads = AttributeHeads(text_encoder(model).output_dim, separate_uncaptioned=args.separate_heads).to(device)
    text_heads = AttributeHeads(heads.heads["shape"].in_features).to(device) if args.n_text_only else None
    if args.init:
        load_heads(Path(args.init), heads, text_heads)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params / 1e6:.2f} M", flush=True)
    loss_fn = open_clip.loss.ClipLoss()
    head_params = list(heads.parameters()) + (list(text_heads.parameters()) if text_heads is not None else [])
    groups = param_groups(model, args.wd) + [{"params": head_params, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    # bf16 autocast on CUDA (fp32 master weights); fp32 on CPU.
    mixed = autocast(device, "bf16" if device.type == "cuda" else "fp32")
    mean = torch.tensor(PREPROCESS_CFG["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(PREPROCESS_CFG["std"]).view(1, 3, 1, 1)
    tok = CaptionTokens()
    pf = Prefetcher(args.seed, args.batch_size, args.p_two, mean, std, args.p_grouped, args.n_uncaptioned,
                    p_shape_word=args.p_shape_word, n_text_only=args.n_text_only, p_confuse=args.p_confuse,
                    ds_prefix=args.ds_caption_prefix, p_describe_bg=args.p_describe_bg, p_marker=args.p_marker,
                    n_confused_pairs=args.n_confused_pairs)

    total = args.steps
    t0 = time.time()
    step, ema = 0, None
    curve = []
    model.train()
    while True:
        if total is not None and step >= total:
            break
        x, caps, attrs, text_caps, text_attrs = pf.get()
        text = tok(caps + text_caps).to(device)
        x, attrs = x.to(device), attrs.to(device)
        lr = _lr(args, step, total, time.time() - t0)
        if lr is None:
            break
        for g in opt.param_groups:
            g["lr"] = lr
        with mixed:
            im_raw = model.encode_image(x)
            imf = F.normalize(im_raw[:len(caps)].float(), dim=-1)  # captioned images only
            tx_raw = encode_text_truncated(model, text)
            txf = F.normalize(tx_raw[:len(caps)].float(), dim=-1)
            loss_clip = loss_fn(imf, txf, model.logit_scale.exp())
            loss_aux, accs = (heads.loss(im_raw, attrs, args.batch_size, args.uncaptioned_weight) if args.aux_weight > 0
                              else (loss_clip.new_zeros(()), {}))
            loss = loss_clip + args.aux_weight * loss_aux
            if text_heads is not None:
                loss_text, text_accs = text_heads.loss(tx_raw[len(caps):], text_attrs.to(device))
                accs.update({f"t_{k}": v for k, v in text_accs.items()})
                loss = loss + args.text_aux_weight * loss_text
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        ema = loss_clip.item() if ema is None else 0.95 * ema + 0.05 * loss_clip.item()
        el = time.time() - t0
        if step % 10 == 0 or step == 1:
            acc = " ".join(f"{k[:6] if k.startswith(('ds_', 't_')) else k[:3]} {v:.2f}" for k, v in accs.items())
            print(f"step {step}/{total} clip {loss_clip.item():.3f} ema {ema:.3f} aux {loss_aux.item():.3f} [{acc}] "
                  f"lr {lr:.2e} scale {model.logit_scale.exp().item():.1f} {el:.0f}s {step / el:.2f} it/s", flush=True)
        if args.eval_every and step % args.eval_every == 0:
            r = probe_eval(model, device, ds_prefix=args.ds_caption_prefix or (MARKER_PREFIX if args.p_marker else None))
            curve.append({"step": step, "seconds": round(el), **r})
            print(f"PROBE step {step}: {r}", flush=True)
        if args.save_every and step % args.save_every == 0 and step >= args.save_from:
            snapshot = out / f"step_{step}"
            save_folder(model, snapshot, model_cfg, heads, text_heads)
            record = training_record(args, step, el, ema, model_cfg, device, curve)
            record["snapshot_of"] = args.steps  # taken mid-schedule: the run's --steps, not this step count
            if previous is not None:
                record["continued_from"] = previous
            (snapshot / "eval.json").write_text(json.dumps(
                {"model": f"local-dir:{snapshot}", "n_params": n_params, "training": record}, indent=2) + "\n")
        if args.trial and el > args.trial:
            print(f"TRIAL: {step} steps in {el:.1f}s = {step / el:.3f} steps/s at batch {args.batch_size}")
            pf.stop = True
            return
    train_seconds = time.time() - t0
    pf.stop = True
    print(f"trained {step} steps in {train_seconds:.0f}s", flush=True)

    model.cpu()
    save_folder(model, out, model_cfg, heads, text_heads)
    record = {
        "model": f"local-dir:{out}",
        "n_params": n_params,
        "training": training_record(args, step, train_seconds, ema, model_cfg, device, curve),
    }
    if previous is not None:
        record["training"]["continued_from"] = previous
    t1 = time.time()
    res = evaluate_folder(out)
    record.update(res)
    record["eval_seconds"] = round(time.time() - t1, 1)
    (out / "eval.json").write_text(json.dumps(record, indent=2) + "\n")
    write_card(out, record, res)
    print(json.dumps(res, indent=1))
