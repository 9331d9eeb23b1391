"""Attention scored against ground truth: how much of the CLS token's attention lands on the object.

A heatmap is an impression; ShapeWorld knows where every object is (``Sample.masks``), so a map
over the patch grid can be *scored*: the attention mass on the target's patches, on the grey
distractors' patches, on the rest of the image and on the prompt tokens, and whether the most
attended patch lies on the target (the pointing game). Chance is the target's share of the
patches: what a uniform map scores.

``score_map`` / ``patch_labels`` are model-independent (exact on synthetic maps);
``attention_scores`` applies them to every vision layer of a model, for the plain (zero-shot)
pass and the prompted pass(es); ``run`` is ``pmpo analyze attention_truth``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["PatchLabels", "MapScores", "attention_scores", "patch_labels", "score_map"]
NAME = "attention_truth"
DESCRIPTION = ("Per vision layer and pass: CLS attention mass on the target object, distractors, the rest and "
               "the prompt tokens, and the pointing game, scored against ShapeWorld's masks (chance = target area).")

TARGET, DISTRACTOR, REST = 0, 1, 2


@dataclass(frozen=True)
class PatchLabels:
    """Per patch of a ``rows x cols`` grid: TARGET if any target pixel falls in it, else DISTRACTOR if
    any distractor pixel does, else REST (so every patch has exactly one label)."""

    labels: np.ndarray  # [rows, cols] int

    @property
    def chance(self) -> float:
        """Share of patches on the target: the target mass of a uniform map."""
        return float((self.labels == TARGET).mean())


@dataclass(frozen=True)
class MapScores:
    target: float  # attention mass on target patches (fraction of the whole map, prompts included)
    distractors: float
    rest: float
    prompts: float
    pointing: float  # 1.0 if the most attended patch is a target patch, else 0.0
    chance: float  # target share of the patches


def patch_labels(target: np.ndarray, distractor: np.ndarray, grid: tuple[int, int]) -> PatchLabels:
    """Label each patch of ``grid`` from (H, W) bool masks of the whole (square-resized) image; pixel
    (y, x) falls in patch (y * rows // H, x * cols // W), so any grid works (14 x 14 on 64-px scenes)."""
    rows, cols = grid
    h, w = target.shape
    if distractor.shape != target.shape:
        raise ValueError(f"target mask {target.shape} and distractor mask {distractor.shape} differ")
    row_of = np.arange(h) * rows // h
    col_of = np.arange(w) * cols // w

    def any_in_patch(mask: np.ndarray) -> np.ndarray:
        out = np.zeros((rows, cols), dtype=bool)
        ys, xs = np.nonzero(mask)
        out[row_of[ys], col_of[xs]] = True
        return out

    labels = np.full((rows, cols), REST, dtype=np.int64)
    labels[any_in_patch(distractor)] = DISTRACTOR
    labels[any_in_patch(target)] = TARGET
    return PatchLabels(labels)


def score_map(patch_attention: np.ndarray, labels: PatchLabels, prompt_attention: float = 0.0) -> MapScores:
    """Score one attention map: ``patch_attention`` [rows, cols] >= 0 and ``prompt_attention`` (the mass
    on prompt tokens) are renormalised to sum to 1, so target + distractors + rest + prompts = 1."""
    a = np.asarray(patch_attention, dtype=np.float64)
    if a.shape != labels.labels.shape:
        raise ValueError(f"attention map {a.shape} does not match the patch grid {labels.labels.shape}")
    if (a < 0).any() or prompt_attention < 0:
        raise ValueError("attention must be non-negative")
    total = a.sum() + prompt_attention
    if total <= 0:
        raise ValueError("attention map sums to 0")
    a = a / total
    part = {k: float(a[labels.labels == k].sum()) for k in (TARGET, DISTRACTOR, REST)}
    peak = np.unravel_index(int(np.argmax(a)), a.shape)
    return MapScores(target=part[TARGET], distractors=part[DISTRACTOR], rest=part[REST],
                     prompts=float(prompt_attention / total),
                     pointing=float(labels.labels[peak] == TARGET), chance=labels.chance)


# --- a model's attention, per layer and pass --------------------------------------------------------

def _passes(model, weights) -> list[tuple[str, list | None, int | None, torch.Tensor]]:
    """(label, visual schedule, prompt id for the slot layout, class embeddings [C, D]) of the plain
    pass (with the manual prior) and of the model's prompted pass(es) (each prompt's own class
    embeddings, or the combined ones for the single pass)."""
    out = [("zero-shot (no prompts)", None, None, weights.prior)]
    if model.prompts is None:
        return out
    if not model.prompts.segments:  # text prompts only (CoOp, KgCoOp): same image pass, learned class embeddings
        return out + [("prompted (text only)", None, None, weights.weights)]
    if model.cfg.visual_pass == "per_prompt":
        return out + [(f"prompt {i + 1} pass", model.visual_schedule(i), i, weights.prompts[i])
                      for i in range(model.prompts.n_prompts)]
    return out + [("prompted", model.visual_schedule(), None, weights.weights)]


@torch.no_grad()
def attention_scores(model, samples: Sequence, batch_size: int = 32) -> list[dict]:
    """Rows per (pass, image): ``kind`` "attention" per layer (the CLS token's attention, mean over
    heads), "rollout" (attention rollout over all layers, prompt tokens as sources, as in
    attention_atlas), and "patch-text" (cosine of each projected patch token with the image's class
    embedding, min-shifted to be non-negative), each scored against the sample's masks."""
    from pmpo.analysis.attention_atlas import SlotLayout, attention_rollout, slot_layouts
    from pmpo.data import shapeworld as sw

    model.eval()
    grid = model.vision.grid_size
    n_layers = model.vision.n_layers
    transform = model.eval_transform()
    labels = [patch_labels(s.masks.target, s.masks.distractor, grid) for s in samples]
    names = sw.class_names()
    weights = model.class_weights(names)
    passes = _passes(model, weights)
    segments = model.prompts.layer_segments(n_layers) if model.prompts is not None and model.prompts.segments else None
    rows = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        x = torch.stack([transform(Image.fromarray(s.image, "RGB")) for s in chunk]).to(model.device)
        for label, schedule, prompt, text in passes:
            out = model.vision(x, schedule, return_attention=True, return_tokens=True)
            n = out.n_tokens
            layouts = (slot_layouts(model, n_layers, prompt) if schedule is not None
                       else [SlotLayout(False, []) for _ in range(n_layers)])
            flow, _ = attention_rollout(out.attentions, layouts, n)
            tokens = torch.nn.functional.normalize(out.tokens.float(), dim=-1)
            for b, sample in enumerate(chunk):
                base = {"pass": label, "image": start + b, "class": sample.objects[0].classname}
                for layer, probs in enumerate(out.attentions):
                    cls = probs[b, :, 0].float().mean(0).cpu().numpy()  # [T]
                    scores = score_map(cls[1:n].reshape(grid), labels[start + b], float(cls[n:].sum()))
                    rows.append({**base, "kind": "attention", "layer": layer,
                                 "prompts_in_layer": " ".join(str(i + 1) for i in segments[layer]) if segments else "",
                                 **asdict(scores)})
                roll = flow[b, 0].cpu().numpy()
                scores = score_map(roll[1:n].reshape(grid), labels[start + b], float(roll[n:].sum()))
                rows.append({**base, "kind": "rollout", "layer": n_layers - 1, "prompts_in_layer": "", **asdict(scores)})
                sim = (tokens[b] @ text[sample.label].float()).cpu().numpy()
                scores = score_map((sim - sim.min()).reshape(grid), labels[start + b])
                rows.append({**base, "kind": "patch-text", "layer": n_layers - 1, "prompts_in_layer": "", **asdict(scores)})
    return rows


def summarise(rows: Sequence[dict]) -> list[dict]:
    """Mean over images per (pass, kind, layer)."""
    keys = list(dict.fromkeys((r["pass"], r["kind"], r["layer"]) for r in rows))
    fields = ("target", "distractors", "rest", "prompts", "pointing", "chance")
    out = []
    for p, kind, layer in keys:
        group = [r for r in rows if r["pass"] == p and r["kind"] == kind and r["layer"] == layer]
        out.append({"pass": p, "kind": kind, "layer": layer, "n_images": len(group),
                    "prompts_in_layer": group[0]["prompts_in_layer"],
                    **{f: float(np.mean([r[f] for r in group])) for f in fields}})
    return out


def segment_summary(rows: Sequence[dict], segments: Sequence[tuple[int, int]]) -> list[dict]:
    """Per pass and depth segment: the per-layer attention scores averaged over the segment's layers."""
    out = []
    for p in dict.fromkeys(r["pass"] for r in rows):
        for i, (first, last) in enumerate(segments):
            group = [r for r in rows if r["pass"] == p and r["kind"] == "attention" and first <= r["layer"] <= last]
            out.append({"pass": p, "segment": f"prompt {i + 1} (layers {first}-{last})",
                        **{f: float(np.mean([r[f] for r in group]))
                           for f in ("target", "distractors", "rest", "prompts", "pointing", "chance")}})
    return out


def plot(summary: Sequence[dict], out: Path, title: str) -> list[Path]:
    from pmpo.analysis import style

    fig, axes = style.figure("page", aspect=0.32, ncols=2)
    passes = list(dict.fromkeys(r["pass"] for r in summary))
    for i, p in enumerate(passes):
        group = [r for r in summary if r["pass"] == p and r["kind"] == "attention"]
        layers = [r["layer"] for r in group]
        colour = "black" if i == 0 else style.segment_colour(i - 1)
        axes[0].plot(layers, [r["target"] for r in group], marker="o", color=colour, label=p)
        axes[1].plot(layers, [r["pointing"] for r in group], marker="o", color=colour, label=p)
    chance = summary[0]["chance"]
    for ax, name in zip(axes, ("CLS attention mass on the target", "pointing game (peak on target)")):
        ax.axhline(chance, color="grey", linestyle="--", linewidth=0.8, label="chance (target area)")
        ax.set_xlabel("vision layer")
        ax.set_ylabel(name)
        ax.set_ylim(0, 1)
        ax.set_xticks(sorted({r["layer"] for r in summary if r["kind"] == "attention"}))
    axes[1].legend(fontsize=6, loc="best")
    fig.suptitle(title, fontsize=8)
    return style.save_figure(fig, out, NAME)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pmpo.analysis import common

    common.add_common_args(parser, NAME)
    parser.add_argument("--style", default="downstream", choices=("downstream", "sketch", "pretrain"),
                        help="ShapeWorld rendering of the scored images (default: downstream)")
    parser.add_argument("--seed", type=int, default=1234, help="eval-set seed (default: 1234, the model card's)")
    parser.add_argument("--per-class", type=int, default=2, help="images per class (default: 2)")
    parser.add_argument("--max-classes", type=int, default=64, help="first K of the 64 classes (default: all)")
    parser.add_argument("--batch-size", type=int, default=32)


def run(args: argparse.Namespace) -> list[Path]:
    from pmpo.analysis import common, style
    from pmpo.data import shapeworld as sw
    from pmpo.errors import InputError

    if args.per_class < 1 or not 1 <= args.max_classes <= len(sw.CLASS_COMBOS):
        raise InputError("--per-class must be >= 1 and --max-classes in 1..64")
    out = common.prepare_out(args)
    model = common.load_model(args)
    samples = sw.generate_eval_samples(args.seed, args.per_class, args.style, labels=range(args.max_classes))
    rows = attention_scores(model, samples, args.batch_size)
    summary = summarise(rows)
    per_image = style.write_csv(out / f"{NAME}_per_image.csv", rows)
    table = style.write_csv(out / f"{NAME}.csv", summary)
    written = [table, per_image]
    if model.prompts is not None and model.prompts.segments:
        written.append(style.write_csv(out / f"{NAME}_segments.csv", segment_summary(rows, model.prompts.segments)))
    backbone = model.backbone.model_name.rstrip("/").rsplit("/", 1)[-1]  # no local paths in a paper figure
    title = f"{model.cfg.method} on {backbone}: {len(samples)} ShapeWorld {args.style} images (seed {args.seed})"
    return written + plot(summary, out, title)


def main(argv: Sequence[str] | None = None) -> int:
    from pmpo.analysis import common

    return common.main_for(NAME, add_arguments, run, DESCRIPTION, argv)


if __name__ == "__main__":
    raise SystemExit(main())
