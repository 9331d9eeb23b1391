"""The Embeddings tab: image features and class-text embeddings in one 2-D map.

Points: every image's prompted feature (and its plain-CLIP feature), and every class's text
embedding from the prior and from each prompt, all L2-normalised in CLIP's joint space, then
reduced with UMAP (default), PCA or t-SNE. Images are coloured by their class — the label in
the file name when it names a class (the examples do), else the model's prediction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from PIL import Image

from pmpo.errors import InputError

from .examples import label_from_filename
from .served import LoadedModel
from .state import AppState

METHODS = ("UMAP", "PCA", "t-SNE")
MAX_EMBED_CLASSES = 200
MARKERS = {"image (prompted)": "o", "image (plain CLIP)": "s", "text: prior": "*"}


@dataclass
class Embedding:
    frame: pd.DataFrame  # x, y, class, source, item
    method: str


@torch.no_grad()
def collect(state: AppState, entry: LoadedModel, images: Sequence[Image.Image], paths: Sequence[str],
            names: Sequence[str], classnames: list[str], templates: list[str]) -> tuple[np.ndarray, list[dict]]:
    """Feature matrix [P, D] and one metadata dict per point."""
    if len(classnames) > MAX_EMBED_CLASSES:
        raise InputError(f"The embedding map takes at most {MAX_EMBED_CLASSES} classes ({len(classnames)} given).")
    model = entry.model
    views = state.features.views(entry, images)  # no image pass for images another tab has seen
    plain, feats = views.plain, views.prompted
    cw = state.class_weights(entry, classnames, templates)
    # CoCoOp's class weights depend on the image: its predictions come from its per-image text
    # pass (the text points shown are its context without the per-image shift).
    conditional = (torch.einsum("bd,bcd->bc", plain, model.conditional_weights(plain, cw)[0])
                   if cw.conditional else None)
    prompted = torch.stack(feats).mean(0)
    prompted = prompted / prompted.norm(dim=-1, keepdim=True)
    combined = conditional if conditional is not None else torch.stack([f @ cw.weights.t() for f in feats]).mean(0)
    vectors, meta = [], []
    for b, name in enumerate(names):
        label = label_from_filename(paths[b], classnames)
        cls = label or classnames[int(combined[b].argmax())]
        how = "label from file name" if label else "predicted"
        for source, f in (("image (prompted)", prompted[b]), ("image (plain CLIP)", plain[b])):
            vectors.append(f)
            meta.append({"class": cls, "source": source, "item": f"{name} ({how}: {cls})"})
    for c, cls in enumerate(classnames):
        vectors.append(cw.prior[c])
        meta.append({"class": cls, "source": "text: prior", "item": f"prior text: {cls}"})
        if cw.prompts is not None:
            for i in range(len(cw.prompts)):
                vectors.append(cw.prompts[i, c])
                meta.append({"class": cls, "source": f"text: prompt {i + 1}", "item": f"prompt {i + 1} text: {cls}"})
    return torch.stack(vectors).float().cpu().numpy(), meta


def reduce(vectors: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    """2-D coordinates; parameters adapt to the small point counts a demo has.

    One BLAS/OpenMP thread: the point sets are small, and on a shared CPU server extra threads
    only spin against torch's own (t-SNE slowed down several-fold without this limit).
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        return _reduce(vectors, method, seed)


def _reduce(vectors: np.ndarray, method: str, seed: int) -> np.ndarray:
    n = len(vectors)
    if n < 3:
        raise InputError("Need at least 3 points for a 2-D map: add images or classes.")
    if method == "PCA":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(vectors)
    if method == "t-SNE":
        from sklearn.manifold import TSNE

        perplexity = float(max(1.0, min(30.0, (n - 1) / 3)))
        tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, metric="cosine", max_iter=500)
        return tsne.fit_transform(vectors)
    if method == "UMAP":
        import umap

        # PCA initialisation: the spectral one fails on the few, tightly clustered points a demo has.
        reducer = umap.UMAP(n_components=2, n_neighbors=max(2, min(15, n - 1)), metric="cosine",
                            random_state=seed, n_jobs=1, init="pca")
        return reducer.fit_transform(vectors)
    raise InputError(f"Unknown projection {method!r}; choose one of {', '.join(METHODS)}.")


def warm_up() -> None:
    """Compile UMAP's numba kernels (about 20 s of CPU the first time) before a user waits for them."""
    import numpy as np

    reduce(np.random.default_rng(0).normal(size=(24, 8)).astype(np.float32), "UMAP")


def embed(state: AppState, entry: LoadedModel, images, paths, names, classnames, templates, method: str = "UMAP") -> Embedding:
    vectors, meta = collect(state, entry, images, paths, names, classnames, templates)
    xy = reduce(vectors, method)
    frame = pd.DataFrame(meta)
    frame.insert(0, "y", np.round(xy[:, 1].astype(float), 4))
    frame.insert(0, "x", np.round(xy[:, 0].astype(float), 4))
    return Embedding(frame, method)


# Matplotlib's tab10 then the light half of tab20, as hex: the interactive plot (Vega) and the static
# figure get the same colour for the same class from this one table.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7",
           "#dbdb8d", "#9edae5")


def class_colours(emb: Embedding) -> dict[str, str]:
    """Class -> colour, in the order the classes were given (cycling after 20)."""
    classes = list(dict.fromkeys(emb.frame["class"]))
    return {c: PALETTE[i % len(PALETTE)] for i, c in enumerate(classes)}


def figure(emb: Embedding) -> Figure:
    """Static view: colour = class, marker = source (the interactive plot has hover)."""
    fig = Figure(figsize=(8, 6), dpi=80, layout="constrained")
    ax = fig.subplots()
    colour = class_colours(emb)
    classes = list(colour)
    prompt_markers = ["^", "v", "<", ">", "P", "X", "D", "p"]
    for source, group in emb.frame.groupby("source", sort=False):
        marker = MARKERS.get(source) or prompt_markers[(int(source.rsplit(" ", 1)[-1]) - 1) % len(prompt_markers)]
        ax.scatter(group["x"], group["y"], c=[colour[c] for c in group["class"]], marker=marker,
                   s=90 if marker == "*" else 40, edgecolors="black", linewidths=0.4, label=source)
    legend = ax.legend(fontsize=8, loc="best", title="source (marker)", title_fontsize=8)
    for handle in legend.legend_handles:
        handle.set_facecolor("white")
    if len(classes) <= 12:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], marker="o", linestyle="", color=colour[c], label=c) for c in classes]
        ax.add_artist(legend)
        ax.legend(handles=handles, fontsize=7, loc="lower right", title="class (colour)", title_fontsize=8)
    ax.set_title(f"{emb.method} of image features and class-text embeddings", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    return fig
