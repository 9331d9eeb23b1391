"""Linear probe on frozen image features: the reference row that says how much class information
a backbone's features carry, against which zero-shot and prompt learning are read.

CoOp's paper (Fig. 3) compares prompt learning with exactly this: logistic regression on the
frozen CLIP image features of the K-shot training set. Here the regularisation strength is
chosen on the few-shot *val* split (never on test), the features are the normalised, unprompted
image features under the eval transform (no augmentation), and the classifier is scikit-learn's
L-BFGS logistic regression.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .data.datasets import Datum
from .data.loader import load_image
from .errors import InputError
from .model import PMPOModel

PROBE_CS: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)


@dataclass
class ProbeResult:
    accuracy: float        # % on the test items
    val_accuracy: float    # % on the val items at the chosen C
    C: float               # chosen on val
    n_train: int


@torch.no_grad()
def image_features(model: PMPOModel, items: Sequence[Datum], batch_size: int = 256) -> np.ndarray:
    """Normalised, unprompted image features [N, D] of ``items`` under the model's eval transform."""
    transform = model.eval_transform()
    out = []
    for start in range(0, len(items), batch_size):
        batch = torch.stack([transform(load_image(d.path)) for d in items[start:start + batch_size]])
        out.append(model.plain_image_features(batch).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.vision.output_dim), dtype=np.float32)


def linear_probe(model: PMPOModel, train: Sequence[Datum], val: Sequence[Datum], test: Sequence[Datum],
                 Cs: Sequence[float] = PROBE_CS) -> ProbeResult:
    """Fit on ``train``, pick C by ``val`` accuracy (ties: the smaller C), score ``test``."""
    from sklearn.linear_model import LogisticRegression

    if not train or not val or not test:
        raise InputError("a linear probe needs train, val and test items")
    x = {k: image_features(model, v) for k, v in (("train", train), ("val", val), ("test", test))}
    y = {k: np.array([d.label for d in v]) for k, v in (("train", train), ("val", val), ("test", test))}
    best = None
    for C in sorted(Cs):
        clf = LogisticRegression(C=C, max_iter=3000).fit(x["train"], y["train"])
        acc = float((clf.predict(x["val"]) == y["val"]).mean())
        if best is None or acc > best[0]:
            best = (acc, C, clf)
    val_acc, C, clf = best
    test_acc = float((clf.predict(x["test"]) == y["test"]).mean())
    return ProbeResult(accuracy=100.0 * test_acc, val_accuracy=100.0 * val_acc, C=C, n_train=len(train))
