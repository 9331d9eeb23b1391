"""UMAP, the Embeddings tab's default projection (its own file: numba compiles it for ~15 s of CPU)."""

from __future__ import annotations

import numpy as np

from pmpo.app import embeddings


def test_umap_separates_clusters_and_is_deterministic():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 5
    points = np.concatenate([c + rng.normal(size=(8, 16)) * 0.3 for c in centres]).astype(np.float32)
    xy = embeddings.reduce(points, "UMAP")
    assert xy.shape == (24, 2) and np.isfinite(xy).all()
    means = [xy[i * 8:(i + 1) * 8].mean(0) for i in range(3)]
    spread = max(np.linalg.norm(xy[i * 8:(i + 1) * 8] - means[i], axis=1).max() for i in range(3))
    gaps = [np.linalg.norm(means[i] - means[j]) for i in range(3) for j in range(i + 1, 3)]
    assert min(gaps) > spread  # every cluster stays apart from the others
    assert np.allclose(embeddings.reduce(points, "UMAP"), xy)  # fixed seed: the same map twice
