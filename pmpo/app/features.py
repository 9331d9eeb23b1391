"""Image features for every tab: each image goes through the image tower at most once per
(backbone, prompts), whichever tab asks first.

Classify, Embeddings and the Train tab's held-out scoring all need the same two things per image:
the plain CLIP feature (zero-shot's view) and the prompted feature (the learned prompts' view).
Both are kept in one :class:`~pmpo.cache.TensorCache` shared by the tabs and bounded in bytes,
keyed by the image's *content* (a renamed upload is the same image; an edited one is not), the
backbone and, for prompted features, a fingerprint of the prompt tensors. A method without visual
prompts (CoOp, KgCoOp, CoCoOp) has no prompted pass at all: its prompted feature *is* the plain one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Hashable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from pmpo.cache import TensorCache

if TYPE_CHECKING:
    from .state import LoadedModel

BATCH = 32


def image_digest(image: Image.Image) -> str:
    """A content key: the decoded pixels, their mode and size (not the file name or its bytes)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def preprocess(model, images: Sequence[Image.Image]) -> torch.Tensor:
    transform = model.eval_transform()
    return torch.stack([transform(im.convert("RGB")) for im in images]).to(model.device)


@dataclass
class ImageViews:
    """Normalised features of a batch: ``plain`` [B, D]; ``prompted`` one [B, D] per prompted pass
    (one for a single pass, N for ``per_prompt``); ``shared``: no visual prompts, so ``prompted`` is
    ``[plain]`` and every column that pairs it with the prior equals zero-shot's."""

    plain: torch.Tensor
    prompted: list[torch.Tensor]
    shared: bool
    passes: int  # image-tower passes this call ran (0 when everything came from the cache)


class ImageFeatures:
    """The shared feature store of one app process (see the module docstring)."""

    def __init__(self, cache: TensorCache | None = None):
        self.cache = cache if cache is not None else TensorCache(128 * 2**20)

    def views(self, entry: "LoadedModel", images: Sequence[Image.Image], digests: Sequence[str] | None = None) -> ImageViews:
        digests = list(digests) if digests is not None else [image_digest(im) for im in images]
        model = entry.model
        shared = model.frozen_image_side
        passes = 0
        plain, n = self._lookup(("plain", entry.spec), digests, images, model, self._plain)
        passes += n
        if shared:
            return ImageViews(plain, [plain], True, passes)
        prompted, n = self._lookup(("prompted", entry.spec, entry.fingerprint), digests, images, model, self._prompted)
        passes += n
        return ImageViews(plain, list(prompted.unbind(1)), False, passes)

    def plain(self, spec: Hashable, model, images: Sequence[Image.Image]) -> torch.Tensor:
        """Normalised plain features [B, D] of ``images`` on the backbone ``spec`` names (a model
        being trained has no served entry yet; its frozen features are everyone's)."""
        return self._lookup(("plain", spec), [image_digest(im) for im in images], images, model, self._plain)[0]

    def _lookup(self, scope: tuple, digests: list[str], images: Sequence[Image.Image], model, compute) -> tuple[torch.Tensor, int]:
        found = [self.cache.get((*scope, d)) for d in digests]
        missing = [i for i, f in enumerate(found) if f is None]
        for start in range(0, len(missing), BATCH):
            chunk = missing[start:start + BATCH]
            with torch.no_grad():
                values = compute(model, preprocess(model, [images[i] for i in chunk]))
            for i, value in zip(chunk, values):
                value = value.cpu()
                self.cache.put((*scope, digests[i]), value)
                found[i] = value
        return torch.stack(found).to(model.device), len(missing)

    @staticmethod
    def _plain(model, x: torch.Tensor) -> torch.Tensor:
        return model.plain_image_features(x)

    @staticmethod
    def _prompted(model, x: torch.Tensor) -> torch.Tensor:
        """[B, V, D]: V = 1 (single pass) or N (per_prompt) normalised prompted features per image."""
        out = model.encode_image(x)
        views = out if isinstance(out, list) else [out]
        return torch.stack([F.normalize(v.features.float(), dim=-1) for v in views], dim=1)


__all__ = ["ImageFeatures", "ImageViews", "image_digest", "preprocess"]
