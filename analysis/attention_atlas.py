"""Attention atlas: where the CLS token looks in each depth segment, and how much it reads the prompts.

For PMPO the question is what each depth-partitioned prompt does to the image tower. Three views:

* **Per-segment maps** — CLS→patch attention averaged over heads and over the layers of each
  prompt's depth segment (``model.prompts.segments``), one column per segment. A model without
  visual prompts (zero-shot CLIP, CoOp) is split into ``--groups`` equal layer groups instead, so
  the same figure compares prompted and unprompted towers.
* **Attention rollout** (Abnar & Zuidema, 2020) over all layers, with the residual identity
  (``0.5·A + 0.5·I``). Prompt tokens are treated as *sources*: every time a segment injects its
  tokens they enter the token-flow graph as new inputs, so the rollout of the CLS token splits
  exactly (rows sum to 1) into mass from image patches, from the CLS embedding, and from prompts.
* **Prompt attention mass** per layer — the share of CLS attention that lands on each prompt's
  tokens, one line per segment (solid inside its segment, dotted where its tokens are carried).

Outputs: ``attention_atlas.{png,pdf}``, ``attention_prompt_mass.{png,pdf}`` and the numbers in
``attention_maps.csv``, ``attention_prompt_mass.csv``, ``attention_rollout_sources.csv``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pmpo.encoders import VisionOutput
from pmpo.errors import InputError
from pmpo.prompts import resolve_partition

from . import common, style

NAME = "attention_atlas"
DESCRIPTION = "Per-depth-segment CLS attention maps, attention rollout and prompt-token attention mass."


# --- what occupies the prompt slots at each layer ---------------------------------------------------

@dataclass
class SlotLayout:
    """Prompt slots at the input of one vision layer: who owns them, and whether they are fresh."""

    injected: bool  # new prompt tokens were written into the slots at this layer
    owners: list[int]  # prompt id of every slot (empty: no prompt tokens at this layer)


@dataclass
class Column:
    """One atlas column: a depth segment (or a plain layer group) and the pass that shows it."""

    label: str
    first: int
    last: int
    view: int  # index into the list of vision outputs (per_prompt passes: prompt i -> pass i)
    prompts: list[int]


def slot_layouts(model, n_layers: int, prompt: int | None = None) -> list[SlotLayout]:
    """Slot owners per layer, read from the model's own visual schedule (the forward pass's truth)."""
    if model.prompts is None or not model.prompts.segments:
        return [SlotLayout(False, []) for _ in range(n_layers)]
    with torch.no_grad():
        schedule = model.prompts.visual_schedule(n_layers, prompt)
    active = model.prompts.layer_segments(n_layers)
    m = model.prompts.n_ctx
    layouts, owners = [], []
    for layer, tokens in enumerate(schedule):
        injected = tokens is not None
        if injected:
            ids = [i for i in active[layer] if prompt is None or i == prompt]
            owners = [i for i in ids for _ in range(m)]
            if len(owners) != tokens.shape[-2]:
                raise InputError(f"layer {layer}: {tokens.shape[-2]} prompt tokens but {len(ids)} prompts of {m} tokens")
        layouts.append(SlotLayout(injected, list(owners)))
    return layouts


def atlas_columns(model, n_layers: int, groups: int, per_prompt_views: bool) -> list[Column]:
    """Prompt segments (identical ones merged), or ``groups`` equal layer groups without prompts."""
    if model.prompts is not None and model.prompts.segments:
        columns: list[Column] = []
        for i, (a, b) in enumerate(model.prompts.segments):
            same = [c for c in columns if (c.first, c.last) == (a, b)]
            if same and not per_prompt_views:
                same[0].prompts.append(i)
                continue
            columns.append(Column("", a, b, i if per_prompt_views else 0, [i]))
        for c in columns:
            who = f"P{c.prompts[0] + 1}" if len(c.prompts) == 1 else f"P{c.prompts[0] + 1}–P{c.prompts[-1] + 1}"
            c.label = f"{who}: L{c.first}–{c.last}" if c.first != c.last else f"{who}: L{c.first}"
        return columns
    groups = max(1, min(groups, n_layers))
    return [Column(f"L{a}–{b}" if a != b else f"L{a}", a, b, 0, [])
            for a, b in resolve_partition("equal", groups, n_layers)]


# --- attention numbers ----------------------------------------------------------------------------

def cls_attention(output: VisionOutput) -> list[torch.Tensor]:
    """Per layer [B, T_l]: the CLS token's attention row, averaged over heads (each row sums to 1)."""
    if output.attentions is None:
        raise InputError("no attention maps: encode with return_attention=True")
    return [a[:, :, 0, :].float().mean(1) for a in output.attentions]


def segment_map(rows: Sequence[torch.Tensor], first: int, last: int, n_tokens: int) -> torch.Tensor:
    """[B, P] CLS→patch attention averaged over layers first..last (token 0 is CLS, 1..P patches)."""
    return torch.stack([rows[l][:, 1:n_tokens] for l in range(first, last + 1)]).mean(0)


def attention_rollout(attentions: Sequence[torch.Tensor], layouts: Sequence[SlotLayout], n_tokens: int,
                      residual: float = 0.5) -> tuple[torch.Tensor, list[int]]:
    """Attention rollout with injected prompt tokens as extra sources.

    Returns ``R`` [B, T_L, S]: row ``t`` says how much of token ``t``'s final representation flows
    from each source — the ``n_tokens`` image-tower inputs (CLS, patches) followed by every prompt
    token ever injected — and the prompt id of each prompt source. Rows sum to 1 exactly because
    each layer's ``(1-r)·A + r·I`` is row-stochastic.
    """
    first = attentions[0]
    batch, device = first.shape[0], first.device
    flow = torch.eye(n_tokens, device=device).expand(batch, -1, -1).clone()
    source_owner: list[int] = []
    for attn, layout in zip(attentions, layouts):
        tokens = attn.shape[-1]
        if layout.injected:
            k = tokens - n_tokens
            grown = torch.zeros(batch, tokens, flow.shape[-1] + k, device=device)
            grown[:, :n_tokens, : flow.shape[-1]] = flow[:, :n_tokens]
            grown[:, n_tokens:, flow.shape[-1]:] = torch.eye(k, device=device)
            flow = grown
            source_owner += layout.owners
        elif flow.shape[1] != tokens:
            raise InputError(f"rollout: {flow.shape[1]} tokens carried into a layer that attends over {tokens}")
        a = attn.float().mean(1)
        a = (1 - residual) * a + residual * torch.eye(tokens, device=device)
        a = a / a.sum(-1, keepdim=True)
        flow = a @ flow
    return flow, source_owner


def prompt_mass(rows: Sequence[torch.Tensor], layouts: Sequence[SlotLayout], n_tokens: int,
                prompts: Sequence[int]) -> dict[int, list[torch.Tensor | None]]:
    """For each prompt, per layer [B] CLS attention on that prompt's tokens (None where it has none)."""
    out: dict[int, list[torch.Tensor | None]] = {p: [] for p in prompts}
    for row, layout in zip(rows, layouts):
        owners = torch.tensor(layout.owners, dtype=torch.long)
        for p in prompts:
            mask = owners == p
            if not bool(mask.any()):
                out[p].append(None)
                continue
            slots = torch.nonzero(mask).flatten().to(row.device) + n_tokens
            out[p].append(row[:, slots].sum(-1))
    return out


# --- the analysis ----------------------------------------------------------------------------------

@dataclass
class AtlasResult:
    maps: np.ndarray  # [B, n_columns, gh, gw] segment-mean CLS→patch attention
    rollout: np.ndarray  # [B, gh, gw] rollout of CLS onto patch sources
    rollout_sources: list[dict]  # per image: share from patches, CLS, each prompt
    mass: dict[int, list[tuple[float, float] | None]]  # prompt -> per layer (mean, std) over images
    columns: list[Column]
    predictions: list[int]
    grid: tuple[int, int]
    n_layers: int


def analyse(model, images: torch.Tensor, classnames: Sequence[str], groups: int = 4,
            batch_size: int = 16) -> AtlasResult:
    """All numbers of the atlas for a batch of preprocessed images (no plotting)."""
    n_layers = model.vision.n_layers
    per_prompt = model.prompts is not None and bool(model.prompts.segments) and model.cfg.visual_pass == "per_prompt"
    n_prompts = model.prompts.n_prompts if model.prompts is not None and model.prompts.segments else 0
    layouts = ([slot_layouts(model, n_layers, i) for i in range(n_prompts)] if per_prompt
               else [slot_layouts(model, n_layers)])
    columns = atlas_columns(model, n_layers, groups, per_prompt)
    grid = model.vision.grid_size
    weights = model.class_weights(classnames)

    maps, rollouts, sources, preds = [], [], [], []
    mass_rows: dict[int, list[list[torch.Tensor]]] = {p: [[] for _ in range(n_layers)] for p in range(n_prompts)}
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size]
        with torch.no_grad():
            views = model.encode_image(x, return_attention=True)
            preds += model.logits_from(views, weights).argmax(-1).tolist()
        n_tokens = views[0].n_tokens
        if n_tokens - 1 != grid[0] * grid[1]:
            raise InputError(f"the image tower has {n_tokens} tokens, not CLS + {grid[0]}x{grid[1]} patches")
        rows = [cls_attention(v) for v in views]
        maps.append(torch.stack([segment_map(rows[c.view], c.first, c.last, n_tokens) for c in columns], 1))
        roll_cls, share = [], []
        for v, layout in zip(views, layouts):
            flow, owner = attention_rollout(v.attentions, layout, n_tokens)
            cls_row = flow[:, 0]
            roll_cls.append(cls_row[:, 1:n_tokens])
            share.append((cls_row, owner))
        rollouts.append(torch.stack(roll_cls).mean(0))
        for b in range(x.shape[0]):
            entry = {"patches": 0.0, "cls": 0.0, **{f"prompt {p + 1}": 0.0 for p in range(n_prompts)}}
            for cls_row, owner in share:
                entry["patches"] += float(cls_row[b, 1:n_tokens].sum()) / len(share)
                entry["cls"] += float(cls_row[b, 0]) / len(share)
                for j, p in enumerate(owner):
                    entry[f"prompt {p + 1}"] += float(cls_row[b, n_tokens + j]) / len(share)
            sources.append(entry)
        for view_id, (r, layout) in enumerate(zip(rows, layouts)):
            wanted = [view_id] if per_prompt else list(range(n_prompts))
            for p, per_layer in prompt_mass(r, layout, n_tokens, wanted).items():
                for layer, values in enumerate(per_layer):
                    if values is not None:
                        mass_rows[p][layer].append(values.cpu())

    mass = {p: [(float(torch.cat(v).mean()), float(torch.cat(v).std(unbiased=False))) if v else None
                for v in per_layer] for p, per_layer in mass_rows.items()}
    b = images.shape[0]
    return AtlasResult(
        maps=torch.cat(maps).reshape(b, len(columns), *grid).cpu().numpy(),
        rollout=torch.cat(rollouts).reshape(b, *grid).cpu().numpy(),
        rollout_sources=sources,
        mass=mass,
        columns=columns,
        predictions=preds,
        grid=grid,
        n_layers=n_layers,
    )


# --- figures and tables ------------------------------------------------------------------------------

def _upsample(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    t = torch.from_numpy(m)[None, None].float()
    up = F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()
    lo, hi = up.min(), up.max()
    return (up - lo) / (hi - lo) if hi > lo else np.zeros_like(up)


def plot_atlas(result: AtlasResult, pictures: np.ndarray, titles: Sequence[str], out: Path, rows: int) -> list[Path]:
    rows = min(rows, pictures.shape[0])
    ncols = 2 + len(result.columns)
    width = style.COLUMN_WIDTH if ncols <= 5 else style.PAGE_WIDTH
    panel = width / ncols
    fig, axes = style.figure(width, aspect=(rows * panel + 0.25) / width, nrows=rows, ncols=ncols, squeeze=False)
    size = pictures.shape[1:3]
    heads = ["image"] + [c.label for c in result.columns] + ["rollout"]
    for r in range(rows):
        heat = [result.maps[r, c] for c in range(len(result.columns))] + [result.rollout[r]]
        for c, ax in enumerate(axes[r]):
            ax.imshow(pictures[r])
            if c > 0:
                ax.imshow(_upsample(heat[c - 1], size), cmap=style.HEATMAP_CMAP, alpha=0.65, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if r == 0:
                ax.set_title(heads[c], fontsize=5.5)
        axes[r][0].set_ylabel(titles[r], fontsize=5.5)
    fig.subplots_adjust(wspace=0.04, hspace=0.08)
    return style.save_figure(fig, out, "attention_atlas")


def plot_mass(result: AtlasResult, columns_of: dict[int, tuple[int, int]], out: Path) -> list[Path]:
    fig, ax = style.figure("column", aspect=0.62)
    layers = np.arange(result.n_layers)
    for p, per_layer in result.mass.items():
        mean = np.array([v[0] if v else np.nan for v in per_layer])
        std = np.array([v[1] if v else np.nan for v in per_layer])
        a, b = columns_of[p]
        inside = (layers >= a) & (layers <= b)
        colour = style.segment_colour(p)
        ax.plot(layers, np.where(inside, np.nan, mean), ":", color=colour, linewidth=0.9)
        ax.plot(layers, np.where(inside, mean, np.nan), "-o", color=colour, label=f"P{p + 1} (L{a}–{b})")
        ax.fill_between(layers, mean - std, mean + std, where=inside, color=colour, alpha=0.15, linewidth=0)
    ax.set_xlabel("vision layer")
    ax.set_ylabel("CLS attention on prompt tokens")
    ax.set_xticks(layers[:: max(1, len(layers) // 12)])
    ax.set_ylim(bottom=0)
    ax.grid(True, axis="y")
    if result.mass:
        ax.legend(ncol=2, loc="best")
    else:
        ax.text(0.5, 0.5, "no visual prompt tokens", transform=ax.transAxes, ha="center", va="center")
    return style.save_figure(fig, out, "attention_prompt_mass")


def write_tables(result: AtlasResult, items, classnames, segments, out: Path) -> list[Path]:
    gh, gw = result.grid
    map_rows = []
    for b, item in enumerate(items):
        panels = [(c.label, c.first, c.last, result.maps[b, k]) for k, c in enumerate(result.columns)]
        panels.append(("rollout", 0, result.n_layers - 1, result.rollout[b]))
        for label, first, last, m in panels:
            for i in range(gh):
                for j in range(gw):
                    map_rows.append({"image": b, "path": item.path, "label": item.classname,
                                     "predicted": classnames[result.predictions[b]], "map": label,
                                     "first_layer": first, "last_layer": last, "patch_row": i,
                                     "patch_col": j, "attention": float(m[i, j])})
    mass_rows = []
    for p, per_layer in result.mass.items():
        a, b = segments[p]
        for layer, v in enumerate(per_layer):
            if v is not None:
                mass_rows.append({"prompt": p + 1, "layer": layer, "segment_first": a, "segment_last": b,
                                  "in_segment": a <= layer <= b, "mass_mean": v[0], "mass_std": v[1],
                                  "n_images": len(items)})
    source_rows = [{"image": b, "path": item.path, **{k: float(v) for k, v in result.rollout_sources[b].items()}}
                   for b, item in enumerate(items)]
    return [
        style.write_csv(out / "attention_maps.csv", map_rows),
        style.write_csv(out / "attention_prompt_mass.csv", mass_rows,
                        ["prompt", "layer", "segment_first", "segment_last", "in_segment", "mass_mean", "mass_std", "n_images"]),
        style.write_csv(out / "attention_rollout_sources.csv", source_rows),
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_common_args(parser, NAME)
    common.add_image_args(parser, per_class=1)
    parser.add_argument("--rows", type=int, default=4, help="images shown in the atlas (default: 4)")
    parser.add_argument("--groups", type=int, default=4,
                        help="layer groups shown for models without visual prompts (default: 4)")
    parser.add_argument("--max-images", type=int, default=64,
                        help="at most this many images enter the averages (default: 64)")


def run(args: argparse.Namespace) -> list[Path]:
    if args.rows < 1 or args.max_images < 1:
        raise InputError("--rows and --max-images must be >= 1")
    out = common.prepare_out(args)
    images = common.load_image_set(args)
    items = images.items[: args.max_images]
    model = common.load_model(args)
    x = common.image_tensor(items, model.eval_transform())
    result = analyse(model, x, images.classnames, args.groups, args.batch_size)
    pictures = common.denormalise(x[: args.rows], model.backbone.mean, model.backbone.std)
    titles = [style.short_label(f"{d.classname or '?'}\n→ {images.classnames[p]}", 40)
              for d, p in zip(items, result.predictions)]
    segments = {p: tuple(model.prompts.segments[p]) for p in result.mass} if result.mass else {}
    paths = plot_atlas(result, pictures, titles, out, args.rows)
    paths += plot_mass(result, segments, out)
    paths += write_tables(result, items, images.classnames, segments, out)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    return common.main_for(NAME, add_arguments, run, DESCRIPTION, argv)


if __name__ == "__main__":
    raise SystemExit(main())
