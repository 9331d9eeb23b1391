"""Embedding clusters: do prompted image features separate the classes better than zero-shot CLIP's?

Image features of a dataset split are computed twice — unprompted (zero-shot CLIP) and through
the model's visual prompts — projected with UMAP side by side and coloured by class. The claim a
reader takes from such a figure ("classes cluster more tightly") is made a number: the
silhouette score (scikit-learn, cosine distance) on the full-dimensional normalised features,
not on the 2-D picture, printed in each panel and written to CSV. Text-only methods (CoOp,
KgCoOp) do not change image features, so their two panels coincide — which is the honest answer.

Outputs: ``embedding_clusters.{png,pdf}``, ``embedding_clusters.csv`` (per image: label and
2-D coordinates per method) and ``embedding_silhouette.csv``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pmpo.errors import InputError

from . import common, projection, style

NAME = "embedding_clusters"
DESCRIPTION = "UMAP of zero-shot vs prompted image features coloured by class, with silhouette scores."


def prompted_features(model, images: torch.Tensor) -> torch.Tensor:
    """Normalised image features the model classifies with; per-prompt passes are averaged."""
    with torch.no_grad():
        views = model.encode_image(images)
        feats = torch.stack([F.normalize(v.features.float(), dim=-1) for v in views]).mean(0)
    return F.normalize(feats, dim=-1).cpu()


def silhouette(features: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette coefficient with cosine distance (in [-1, 1]; higher = tighter classes)."""
    from sklearn.metrics import silhouette_score

    n_labels = len(np.unique(labels))
    if n_labels < 2 or n_labels >= len(labels):
        raise InputError(f"silhouette needs 2 <= classes < images; got {n_labels} classes for {len(labels)} images "
                         "(use more images per class, --per-class)")
    return float(silhouette_score(features, labels, metric="cosine"))


def plot(panels: Sequence[tuple[str, np.ndarray, float]], labels: np.ndarray, classnames: Sequence[str],
         method: str, out: Path) -> list[Path]:
    fig, axes = style.figure("column", aspect=0.56, ncols=len(panels), squeeze=False)
    n_classes = len(classnames)
    cmap = style.colormap("tab10" if n_classes <= 10 else "tab20" if n_classes <= 20 else "turbo")
    colours = [cmap(i / max(1, n_classes - 1)) if n_classes > 20 else cmap(i) for i in range(n_classes)]
    for ax, (title, xy, score) in zip(axes[0], panels):
        for c in range(n_classes):
            sel = labels == c
            ax.scatter(xy[sel, 0], xy[sel, 1], s=4, color=colours[c], linewidths=0,
                       label=style.short_label(classnames[c], 16))
        ax.set_title(f"{title}\nsilhouette {score:.3f}")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"{method.upper()} 1")
    axes[0][0].set_ylabel(f"{method.upper()} 2")
    if n_classes <= 10:
        handles, names = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, names, loc="lower center", ncol=min(5, n_classes), bbox_to_anchor=(0.5, -0.16),
                   markerscale=2, handletextpad=0.1, columnspacing=0.6)
    return style.save_figure(fig, out, "embedding_clusters")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_common_args(parser, NAME)
    common.add_image_args(parser, per_class=20)
    projection.add_arguments(parser)


def run(args: argparse.Namespace) -> list[Path]:
    out = common.prepare_out(args)
    images = common.load_image_set(args)
    labels = images.labels
    if (labels < 0).any():
        raise InputError("clusters need a class per image: use --dataset, or --images with --labels")
    model = common.load_model(args)
    transform = model.eval_transform()
    zs = common.batched(model.plain_image_features, images.items, transform, args.batch_size).numpy()
    ours = common.batched(lambda x: prompted_features(model, x), images.items, transform, args.batch_size).numpy()
    label = f"{model.cfg.method}" + ("" if model.cfg.uses_visual_prompts else " (text-only: same features)")
    methods = [("zero-shot CLIP", zs), (label, ours)]

    panels, scores = [], []
    for title, feats in methods:
        score = silhouette(feats, labels)
        xy = projection.project(feats, args.projection, args.seed, "cosine", args.neighbors)
        panels.append((title, xy, score))
        scores.append({"method": title, "silhouette": score, "n_images": len(labels),
                       "n_classes": len(np.unique(labels)), "dim": feats.shape[1], "source": images.source})
    rows = [{"image": i, "path": d.path, "label": int(labels[i]), "class": images.classnames[labels[i]],
             **{f"{key}_{axis}": float(p[1][i, k]) for key, p in zip(("zeroshot", "model"), panels)
                for k, axis in enumerate("xy")}}
            for i, d in enumerate(images.items)]
    paths = [style.write_csv(out / "embedding_silhouette.csv", scores),
             style.write_csv(out / "embedding_clusters.csv", rows)]
    return paths + plot(panels, labels, images.classnames, args.projection, out)


def main(argv: Sequence[str] | None = None) -> int:
    return common.main_for(NAME, add_arguments, run, DESCRIPTION, argv)


if __name__ == "__main__":
    raise SystemExit(main())
