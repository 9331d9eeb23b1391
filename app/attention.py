"""The per-depth attention tab: where each depth segment / prompt looks in the image.

For one image and one class it shows, as heatmaps over the image:

* row 1 — CLS→patch attention (averaged over heads and over the layers of a segment): plain
  CLIP over all layers, then each prompt's depth segment of the prompted pass;
* row 2 — patch–text similarity: every patch token, through the same final LayerNorm and
  projection as the pooled feature, against the class embedding of the prior (plain pass)
  and of each prompt (prompted pass);

and a curve of how much of the CLS token's attention goes to the prompt tokens at each layer.
The attention probabilities are recomputed from each block's own weights
(:mod:`pmpo.attention`), so they describe exactly the network that made the prediction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image

from pmpo.encoders import VisionOutput
from pmpo.errors import InputError

from .features import preprocess
from .served import LoadedModel
from .state import AppState


@dataclass
class AttentionMaps:
    classname: str
    image: np.ndarray  # [H, W, 3] uint8, the model's input crop
    titles: list[str]  # one per column
    cls_maps: list[np.ndarray]  # [g, g] per column (row 1)
    text_maps: list[np.ndarray]  # [g, g] per column (row 2)
    text_scores: list[float]  # cosine of the pooled feature with that column's class embedding
    layer_mass: dict[str, list[float]]  # pass label -> per-layer CLS attention to prompt tokens
    segments: list[tuple[int, int]]
    n_layers: int
    prompt_share: list[float]  # per column: CLS attention on prompt tokens, mean over its layers


def truth_table(maps: AttentionMaps, masks) -> str:
    """Markdown: each column's CLS attention scored against the image's object masks
    (pmpo.analysis.attention_truth), or a line saying there is no ground truth."""
    if masks is None:
        return ("*No ground truth for this image: attention is scored against object masks only for the "
                "ShapeWorld example images (Use example images).*")
    from pmpo.analysis.attention_truth import patch_labels, score_map

    labels = patch_labels(masks.target, masks.distractor, maps.cls_maps[0].shape)
    lines = ["| column | mass on the object | on distractors | on prompt tokens | peak on the object |",
             "|---|---:|---:|---:|:---:|"]
    for title, grid, share in zip(maps.titles, maps.cls_maps, maps.prompt_share):
        s = score_map(grid, labels, share)
        lines.append(f"| {title} | {s.target:.2f} | {s.distractors:.2f} | {s.prompts:.2f} | {'yes' if s.pointing else 'no'} |")
    return ("**Ground truth** (this is a ShapeWorld example, its object mask is known); chance = the object's share "
            f"of the patches, {labels.chance:.2f}:\n\n" + "\n".join(lines))


def _grid(values: torch.Tensor) -> np.ndarray:
    side = int(math.isqrt(values.numel()))
    if side * side != values.numel():
        raise InputError(f"{values.numel()} patch tokens do not form a square grid")
    return values.reshape(side, side).float().cpu().numpy()


def cls_attention(out: VisionOutput, layers: range) -> np.ndarray:
    """CLS→patch attention, mean over heads and ``layers`` (image 0 of the batch)."""
    rows = torch.stack([out.attentions[l][0, :, 0, 1:out.n_tokens].mean(0) for l in layers])
    return _grid(rows.mean(0))


def prompt_mass(out: VisionOutput) -> list[float]:
    """Per layer: the CLS token's attention (mean over heads) on the prompt tokens (0 where none)."""
    return [float(a[0, :, 0, out.n_tokens:].sum(-1).mean()) for a in out.attentions]


def patch_similarity(out: VisionOutput, text: torch.Tensor) -> np.ndarray:
    """Cosine of every patch token with one class embedding [D] (image 0)."""
    tokens = F.normalize(out.tokens[0].float(), dim=-1)
    return _grid(tokens @ text)


@torch.no_grad()
def attention_maps(state: AppState, entry: LoadedModel, image: Image.Image, classnames: list[str],
                   templates: list[str], classname: str | None = None) -> AttentionMaps:
    """Maps for ``classname`` (default: the model's top prediction) on one image."""
    model = entry.model
    plain, passes, _ = state.features.passes(entry, image)  # no pass for an image another tab has seen
    if plain.attentions is None:
        raise InputError("attention maps need open_clip's standard ResidualAttentionBlock; this backbone uses another block")
    cw = state.class_weights(entry, classnames, templates)
    x = preprocess(model, [image])  # the crop the maps are drawn on (no pass)
    n_layers = model.vision.n_layers
    segments = list(model.prompts.segments) if model.prompts is not None else []

    if classname:
        lookup = {c.lower(): i for i, c in enumerate(classnames)}
        if classname.strip().lower() not in lookup:
            raise InputError(f"Class {classname!r} is not in the class list.")
        c = lookup[classname.strip().lower()]
    elif cw.conditional:  # CoCoOp: the class weights of this image (its own text pass)
        c = int(model.logits_from(passes[:1], cw)[0].argmax())
    else:
        feats = [F.normalize(p.features.float(), dim=-1) for p in passes]
        c = int(torch.stack([f @ cw.weights.t() for f in feats]).mean(0)[0].argmax())

    titles = ["plain CLIP (all layers)"]
    cls_maps = [cls_attention(plain, range(n_layers))]
    text_maps = [patch_similarity(plain, cw.prior[c])]
    text_scores = [float(F.normalize(plain.features.float(), dim=-1)[0] @ cw.prior[c])]
    shares = [0.0]
    for i, (first, last) in enumerate(segments):
        out = passes[i] if len(passes) > 1 else passes[0]
        titles.append(f"prompt {i + 1} (layers {first}–{last})")
        cls_maps.append(cls_attention(out, range(first, last + 1)))
        # VPT learns no text: its prompted image meets the class weights (the frozen prior).
        text = cw.prompts[i, c] if cw.prompts is not None else cw.weights[c]
        text_maps.append(patch_similarity(out, text))
        text_scores.append(float(F.normalize(out.features.float(), dim=-1)[0] @ text))
        shares.append(float(np.mean(prompt_mass(out)[first:last + 1])))

    if model.prompts is None or not segments:
        mass = {}
    elif len(passes) > 1:
        mass = {f"pass of prompt {i + 1}": prompt_mass(p) for i, p in enumerate(passes)}
    else:
        mass = {"prompted pass": prompt_mass(passes[0])}
    crop = _unnormalise(x[0], model.backbone.mean, model.backbone.std)
    return AttentionMaps(classnames[c], crop, titles, cls_maps, text_maps, text_scores, mass, segments, n_layers,
                         shares)


def _unnormalise(x: torch.Tensor, mean, std) -> np.ndarray:
    m = torch.tensor(mean, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, device=x.device).view(3, 1, 1)
    return ((x * s + m).clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8)


def overlay(image: np.ndarray, grid: np.ndarray, cmap: str, alpha: float = 0.55) -> np.ndarray:
    """``grid`` upsampled (bilinear) to the image, coloured with ``cmap`` over its own range and
    blended onto ``image``, as one RGB array: the figure then draws one image per panel instead of
    resampling two layers (it halved the cost of the figure, which is most of this tab's answer)."""
    from matplotlib import colormaps

    h, w = image.shape[:2]
    up = np.asarray(Image.fromarray(grid.astype(np.float32), mode="F").resize((w, h), Image.Resampling.BILINEAR))
    low, high = float(up.min()), float(up.max())
    heat = colormaps[cmap]((up - low) / (high - low) if high > low else np.zeros_like(up))[..., :3]
    return ((1 - alpha) * image / 255.0 + alpha * heat).clip(0, 1)


def maps_figure(maps: AttentionMaps) -> Figure:
    """Two rows of heatmaps overlaid on the input crop; columns as in ``maps.titles``."""
    cols = len(maps.titles)
    fig = Figure(figsize=(2.6 * cols, 5.6), dpi=80, layout="constrained")
    axes = fig.subplots(2, cols, squeeze=False)
    for j in range(cols):
        for row, (grid, cmap) in enumerate(((maps.cls_maps[j], "inferno"), (maps.text_maps[j], "viridis"))):
            ax = axes[row][j]
            ax.imshow(overlay(maps.image, grid, cmap), interpolation="none")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(maps.titles[j], fontsize=8)
            else:
                ax.set_title(f"{'prior' if j == 0 else 'prompt'} · '{maps.classname[:20]}' cos {maps.text_scores[j]:.2f}", fontsize=8)
        if j == 0:
            axes[0][0].set_ylabel("CLS → patch attention", fontsize=8)
            axes[1][0].set_ylabel("patch–text similarity", fontsize=8)
    return fig


def mass_figure(maps: AttentionMaps) -> Figure:
    """Share of the CLS token's attention on prompt tokens per layer, segments shaded."""
    fig = Figure(figsize=(7, 2.8), dpi=80, layout="constrained")
    ax = fig.subplots()
    layers = list(range(maps.n_layers))
    for i, (first, last) in enumerate(maps.segments):
        ax.axvspan(first - 0.5, last + 0.5, color=f"C{i % 10}", alpha=0.12)
        ax.text((first + last) / 2, 1.01, f"P{i + 1}", ha="center", va="bottom", fontsize=8, transform=ax.get_xaxis_transform())
    for label, values in maps.layer_mass.items():
        ax.plot(layers, values, marker="o", label=label)
    if not maps.layer_mass:
        ax.text(0.5, 0.5, "this model has no visual prompt tokens", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("vision layer")
    ax.set_ylabel("CLS attention on prompt tokens")
    ax.set_ylim(0, max([0.05] + [max(v) * 1.15 for v in maps.layer_mass.values()]))
    ax.set_xticks(layers)
    if maps.layer_mass:
        ax.legend(fontsize=8)
    return fig
