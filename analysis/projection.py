"""2-D projections of embeddings for plots: UMAP by default, PCA as the fast, deterministic option.

UMAP (umap-learn) is what the figures use; it needs a neighbourhood smaller than the point
count, so tiny inputs get a smaller ``n_neighbors`` and a random initialisation (the spectral one
fails on a handful of points). Only the 2-D picture comes from here — every number an analysis
reports (silhouette, similarities) is computed on the full-dimensional features.
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np

from pmpo.errors import InputError

METHODS = ("umap", "pca")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("projection")
    group.add_argument("--projection", default="umap", choices=METHODS, help="2-D projection for plots (default: umap)")
    group.add_argument("--neighbors", type=int, default=15, help="UMAP n_neighbors (default: 15)")
    group.add_argument("--seed", type=int, default=0, help="random seed of the projection (default: 0)")


def project(x: np.ndarray, method: str = "umap", seed: int = 0, metric: str = "cosine",
            neighbors: int = 15) -> np.ndarray:
    """[n, d] -> [n, 2]. Deterministic for a fixed seed."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < 2:
        raise InputError(f"need at least 2 points to project, got {x.shape[0] if x.ndim == 2 else x.shape}")
    if method not in METHODS:
        raise InputError(f"projection must be one of {METHODS}, got {method!r}")
    if method == "pca" or x.shape[0] < 4:
        return _pca(x)
    import umap

    n_neighbors = max(2, min(neighbors, x.shape[0] - 1))
    reducer = umap.UMAP(
        n_components=2, n_neighbors=n_neighbors, metric=metric, random_state=seed,
        init="spectral" if x.shape[0] > 3 * n_neighbors else "random", min_dist=0.1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # n_jobs/random_state and small-graph notices
        return np.asarray(reducer.fit_transform(x), dtype=np.float32)


def _pca(x: np.ndarray) -> np.ndarray:
    centred = x - x.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    coords = centred @ vt[:2].T
    if coords.shape[1] < 2:
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    return coords.astype(np.float32)
