"""Prompt geometry: do the N prompts learn different class embeddings, and how far from the prior?

If the depth-partitioned prompts all converged to the same class embeddings, partitioning would
buy nothing; if they drift far from the hand-crafted prior, generalisation to new classes
suffers. Three numbers make that visible:

* **similarity matrix** ``S[a, b] = mean_c cos(t_a,c, t_b,c)`` over the prior (``a = 0``) and the N
  prompts — symmetric, ones on the diagonal;
* **per-class spread**: for each class, the mean pairwise cosine *distance* between its N prompt
  embeddings, and its distance from the prior;
* **UMAP** of all (N + 1)·C class embeddings, coloured by prompt, each class's prompts linked to
  its prior, so clusters by prompt (prompts specialise) or by class (prompts agree) are visible.

Outputs: ``prompt_similarity``, ``prompt_spread``, ``prompt_umap`` (PNG + PDF) and
``prompt_similarity.csv``, ``prompt_spread.csv``, ``prompt_umap.csv``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pmpo.errors import InputError

from . import common, projection, style

NAME = "prompt_geometry"
DESCRIPTION = "Similarity of the N prompts' class embeddings and the prior, per-class spread, UMAP."


def class_embeddings(model, classnames: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """Names ("prior", "P1", …) and [N + 1, C, D] normalised class embeddings, prior first."""
    with torch.no_grad():
        cw = model.class_weights(classnames)
    if cw.prompts is None:
        if model.prompts is None:
            raise InputError(f"method {model.cfg.method!r} has no learned prompts: nothing to compare with the prior")
        with torch.no_grad():
            prompts = model.prompt_features(classnames)  # alpha = 1 hides them from the weights, not from us
    else:
        prompts = cw.prompts
    names = ["prior"] + [f"P{i + 1}" for i in range(prompts.shape[0])]
    return names, torch.cat([cw.prior[None], prompts]).float().cpu()


def similarity_matrix(embeddings: torch.Tensor) -> np.ndarray:
    """``S[a, b]`` = mean over classes of cos(embeddings[a, c], embeddings[b, c]); input [K, C, D]."""
    e = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    return torch.einsum("acd,bcd->ab", e, e).div(e.shape[1]).numpy()


def class_spread(embeddings: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per class: mean pairwise cosine distance among the prompts, and 1 − cos(prompt mean, prior).

    ``embeddings`` is [N + 1, C, D] with the prior first. With one prompt the spread is 0.
    """
    e = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    prior, prompts = e[0], e[1:]
    n = prompts.shape[0]
    cos = torch.einsum("icd,jcd->cij", prompts, prompts)  # [C, N, N]
    off = ~torch.eye(n, dtype=torch.bool)
    spread = (1 - cos[:, off]).mean(-1) if n > 1 else torch.zeros(e.shape[1])
    mean = torch.nn.functional.normalize(prompts.mean(0), dim=-1)
    to_prior = 1 - (mean * prior).sum(-1)
    return spread.numpy(), to_prior.numpy()


def plot_similarity(sim: np.ndarray, names: Sequence[str], out: Path) -> list[Path]:
    k = len(names)
    size = min(style.COLUMN_WIDTH, 0.45 * k + 1.2)
    fig, ax = style.figure(size, aspect=0.85)
    lo = min(0.0, float(sim.min()))
    im = ax.imshow(sim, cmap="viridis", vmin=lo, vmax=1.0)
    for a in range(k):
        for b in range(k):
            ax.text(b, a, f"{sim[a, b]:.2f}", ha="center", va="center", fontsize=5.5,
                    color="white" if sim[a, b] < lo + 0.6 * (1 - lo) else "black")
    ax.set_xticks(range(k), names)
    ax.set_yticks(range(k), names)
    ax.tick_params(length=0)
    for s in ax.spines.values():
        s.set_visible(False)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, label="mean cosine over classes")
    return style.save_figure(fig, out, "prompt_similarity")


def plot_spread(classnames: Sequence[str], spread: np.ndarray, to_prior: np.ndarray, out: Path,
                max_classes: int = 24) -> list[Path]:
    order = np.argsort(-spread)
    if len(order) > max_classes:  # the most and the least spread classes
        half = max_classes // 2
        order = np.concatenate([order[:half], order[-half:]])
    n = len(order)
    fig, ax = style.figure("column", aspect=(0.11 * n + 0.45) / style.COLUMN_WIDTH)
    y = np.arange(n)
    ax.barh(y - 0.2, spread[order], height=0.4, color=style.segment_colour(0), label="spread across prompts")
    ax.barh(y + 0.2, to_prior[order], height=0.4, color=style.PRIOR_COLOUR, alpha=0.55, label="distance to prior")
    ax.set_yticks(y, [style.short_label(classnames[i], 22) for i in order], fontsize=5)
    ax.invert_yaxis()
    ax.set_xlabel("cosine distance")
    ax.grid(True, axis="x")
    ax.legend(loc="lower right")
    return style.save_figure(fig, out, "prompt_spread")


def plot_umap(coords: np.ndarray, names: Sequence[str], n_classes: int, method: str, out: Path) -> list[Path]:
    k = len(names)
    pts = coords.reshape(k, n_classes, 2)
    fig, ax = style.figure("column", aspect=0.85)
    for c in range(n_classes):
        for a in range(1, k):
            ax.plot([pts[0, c, 0], pts[a, c, 0]], [pts[0, c, 1], pts[a, c, 1]], color="#bbbbbb", linewidth=0.3, zorder=1)
    for a in range(1, k):
        ax.scatter(pts[a, :, 0], pts[a, :, 1], s=6, color=style.segment_colour(a - 1), label=names[a], zorder=2, linewidths=0)
    ax.scatter(pts[0, :, 0], pts[0, :, 1], s=12, marker="*", color=style.PRIOR_COLOUR, label="prior", zorder=3, linewidths=0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(f"{method.upper()} 1")
    ax.set_ylabel(f"{method.upper()} 2")
    ax.legend(ncol=min(k, 5), loc="upper center", bbox_to_anchor=(0.5, 1.12), handletextpad=0.1, columnspacing=0.8)
    return style.save_figure(fig, out, "prompt_umap")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_common_args(parser, NAME)
    common.add_class_args(parser)
    projection.add_arguments(parser)


def run(args: argparse.Namespace) -> list[Path]:
    out = common.prepare_out(args)
    classnames, _ = common.load_classnames(args)
    model = common.load_model(args)
    names, emb = class_embeddings(model, classnames)
    sim = similarity_matrix(emb)
    spread, to_prior = class_spread(emb)
    k, c = emb.shape[0], emb.shape[1]
    coords = projection.project(emb.reshape(k * c, -1).numpy(), args.projection, args.seed, "cosine", args.neighbors)

    paths = [
        style.write_csv(out / "prompt_similarity.csv",
                        ({"row": names[a], **{names[b]: float(sim[a, b]) for b in range(k)}} for a in range(k)),
                        ["row", *names]),
        style.write_csv(out / "prompt_spread.csv",
                        ({"class": classnames[i], "spread": float(spread[i]), "distance_to_prior": float(to_prior[i])}
                         for i in range(c)), ["class", "spread", "distance_to_prior"]),
        style.write_csv(out / "prompt_umap.csv",
                        ({"source": names[a], "class": classnames[i], "x": float(coords[a * c + i, 0]),
                          "y": float(coords[a * c + i, 1])} for a in range(k) for i in range(c)),
                        ["source", "class", "x", "y"]),
    ]
    paths += plot_similarity(sim, names, out)
    paths += plot_spread(classnames, spread, to_prior, out)
    paths += plot_umap(coords, names, c, args.projection, out)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    return common.main_for(NAME, add_arguments, run, DESCRIPTION, argv)


if __name__ == "__main__":
    raise SystemExit(main())
