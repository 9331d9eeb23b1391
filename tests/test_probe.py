"""The linear-probe reference (pmpo.probe): C is chosen on val, never on test; the fit is real."""

from __future__ import annotations

import numpy as np
import pytest

import pmpo.probe as probe
from pmpo.data.datasets import Datum
from pmpo.errors import InputError


def _items(split: str, n_per_class: int, n_classes: int = 4) -> list[Datum]:
    return [Datum(path=f"{split}/{c}/{i}.png", label=c, classname=f"c{c}")
            for c in range(n_classes) for i in range(n_per_class)]


def _features(noise: dict[str, float]):
    """Class-mean directions plus noise whose size depends on the split (encoded in the path)."""
    means = np.eye(4, 16, dtype=np.float32) * 3

    def fake(model, items, batch_size=256):
        rng = np.random.default_rng(len(items))
        x = np.stack([means[d.label] for d in items]) + rng.normal(0, noise[items[0].path.split("/")[0]], (len(items), 16))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return fake


def test_probe_separates_classes_the_features_separate(monkeypatch):
    monkeypatch.setattr(probe, "image_features", _features({"train": 0.3, "val": 0.3, "test": 0.3}))
    res = probe.linear_probe(None, _items("train", 16), _items("val", 4), _items("test", 25))
    assert res.accuracy == pytest.approx(100.0) and res.n_train == 64 and res.C in probe.PROBE_CS


def test_probe_is_at_chance_on_features_without_class_information(monkeypatch):
    monkeypatch.setattr(probe, "image_features", _features({"train": 50.0, "val": 50.0, "test": 50.0}))
    res = probe.linear_probe(None, _items("train", 16), _items("val", 4), _items("test", 200))
    assert res.accuracy < 40  # chance is 25 %


def test_probe_picks_C_by_val_accuracy(monkeypatch):
    monkeypatch.setattr(probe, "image_features", _features({"train": 1.0, "val": 1.0, "test": 1.0}))
    seen = []
    real = probe.linear_probe

    res = real(None, _items("train", 8), _items("val", 4), _items("test", 10), Cs=(0.01, 100.0))
    for C in (0.01, 100.0):
        seen.append(real(None, _items("train", 8), _items("val", 4), _items("test", 10), Cs=(C,)).val_accuracy)
    assert res.val_accuracy == max(seen) and (0.01, 100.0)[int(np.argmax(seen))] == res.C


def test_probe_refuses_empty_splits():
    with pytest.raises(InputError, match="train, val and test"):
        probe.linear_probe(None, [], _items("val", 1), _items("test", 1))
