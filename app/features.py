"""Image passes for every tab: each image goes through the image tower at most once per
(backbone, prompts), whichever tab asks first.

Classify, Embeddings, Per-depth attention and the Train tab's held-out scoring all need the same
passes per image: the plain CLIP pass (zero-shot's view) and the prompted pass (the learned
prompts' view). Their results are kept in one :class:`~pmpo.cache.TensorCache` shared by the tabs
and bounded in bytes, keyed by the image's *content* (a renamed upload is the same image; an
edited one is not), the backbone and, for prompted passes, a fingerprint of the prompt tensors. A
method without visual prompts (CoOp, KgCoOp, CoCoOp) has no prompted pass at all: its prompted
view *is* the plain one.

A pass also keeps what the attention tab draws — the CLS token's attention row in every layer and
the projected patch tokens — because recording them costs ~5 % of a pass (measured at ViT-B/16 on
2 CPU cores: 0.174 s vs 0.166 s) while a second pass would cost 100 %: after Classify, the
attention maps of the same image need no pass at all.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from PIL import Image

from pmpo.attention import supports_attention_maps
from pmpo.cache import TensorCache
from pmpo.encoders import VisionOutput

from .zerogpu import PASS_S, gpu, kernel_model

if TYPE_CHECKING:
    from .served import LoadedModel

BATCH = 16  # images per pass: the attention probabilities of a batch are [B, heads, T, T] per layer
CACHE_BYTES = 256 * 2**20


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


def _record(out: VisionOutput, b: int) -> tuple[torch.Tensor, ...]:
    """Image ``b`` of a pass, compactly: (features [1, D], tokens [1, P, D] or empty, then per layer
    the CLS row of the attention [1, heads, 1, T_l]); T_l counts that layer's prompt tokens too."""
    # clone(): a slice is a view that would keep the whole batch's [B, heads, T, T] maps alive.
    tokens = out.tokens[b:b + 1].detach().cpu().clone() if out.tokens is not None else torch.empty(0)
    rows = tuple(a[b:b + 1, :, :1].detach().cpu().clone() for a in out.attentions or [])
    return (out.features[b:b + 1].detach().float().cpu().clone(), tokens, torch.tensor(out.n_tokens), *rows)


def _output(record: tuple[torch.Tensor, ...], device) -> VisionOutput:
    features, tokens, n_tokens, *rows = record
    return VisionOutput(features.to(device), [r.to(device) for r in rows] or None, int(n_tokens),
                        tokens.to(device) if tokens.numel() else None)


class ImageFeatures:
    """The shared pass store of one app process (see the module docstring)."""

    def __init__(self, cache: TensorCache | None = None):
        self.cache = cache if cache is not None else TensorCache(CACHE_BYTES)

    # --- what the tabs ask for ------------------------------------------------------------------
    def views(self, entry: LoadedModel, images: Sequence[Image.Image], plain: bool = True,
              digests: Sequence[str] | None = None) -> ImageViews:
        """``plain=False``: leave out the plain features (None) when they would cost a pass of their
        own, i.e. unless the image side is frozen (then they are the prompted view). ``digests``:
        the images' :func:`image_digest`, when the caller has them already (hashing a photo costs)."""
        plain_outs, prompted, passes = self._passes(entry.spec, entry.fingerprint, entry.model, images,
                                                    plain=plain or entry.model.frozen_image_side, digests=digests)
        norm = lambda outs: torch.cat([F.normalize(o.features.float(), dim=-1) for o in outs])  # noqa: E731
        plain_feats = norm([p[0] for p in plain_outs]) if plain_outs is not None else None
        if prompted is None:
            return ImageViews(plain_feats, [plain_feats], True, passes)
        n_views = len(prompted[0])
        return ImageViews(plain_feats, [norm([p[v] for p in prompted]) for v in range(n_views)], False, passes)

    def passes(self, entry: LoadedModel, image: Image.Image) -> tuple[VisionOutput, list[VisionOutput], int]:
        """One image's plain pass and prompted pass(es), with attention rows and patch tokens."""
        plain, prompted, passes = self._passes(entry.spec, entry.fingerprint, entry.model, [image])
        return plain[0][0], (prompted[0] if prompted is not None else plain[0]), passes

    def missing(self, entry: LoadedModel, digests: Sequence[str]) -> tuple[int, int]:
        """How many of the images (by :func:`image_digest`) lack their plain and their prompted pass."""
        plain = sum(self.cache.get(("plain", entry.spec, d)) is None for d in digests)
        if entry.model.frozen_image_side:
            return plain, 0
        prompted = sum(self.cache.get(("prompted", entry.spec, entry.fingerprint, d)) is None for d in digests)
        return plain, prompted

    def plain(self, spec: Hashable, model, images: Sequence[Image.Image]) -> torch.Tensor:
        """Normalised plain features [B, D] on the backbone ``spec`` names (a model being trained
        has no served entry yet; its frozen features are everyone's)."""
        plain, _, _ = self._passes(spec, None, model, images, prompted=False)
        return torch.cat([F.normalize(p[0].features.float(), dim=-1) for p in plain])

    # --- the store --------------------------------------------------------------------------------
    def _passes(self, spec: Hashable, fingerprint: str | None, model, images: Sequence[Image.Image],
                prompted: bool = True, plain: bool = True, digests: Sequence[str] | None = None
                ) -> tuple[list[list[VisionOutput]] | None, list[list[VisionOutput]] | None, int]:
        digests = list(digests) if digests is not None else [image_digest(im) for im in images]
        plain_outs, n_plain = self._lookup(("plain", spec), digests, images, model, None) if plain else (None, 0)
        if not prompted or model.frozen_image_side:
            return plain_outs, None, n_plain
        prompted_outs, n_prompted = self._lookup(("prompted", spec, fingerprint), digests, images, model, model.prompts)
        return plain_outs, prompted_outs, n_plain + n_prompted

    def _lookup(self, scope: tuple, digests: list[str], images: Sequence[Image.Image], model,
                prompts) -> tuple[list[list[VisionOutput]], int]:
        """Per image, its pass outputs (1, or N under per_prompt) from the store or computed now."""
        device = model.device
        records: list[list | None] = []
        for d in digests:
            found = self.cache.get((*scope, d))
            records.append(None if found is None else list(found))
        missing = [i for i, r in enumerate(records) if r is None]
        attention = all(supports_attention_maps(b) for b in model.vision.visual.transformer.resblocks)
        for start in range(0, len(missing), BATCH):
            chunk = missing[start:start + BATCH]
            x = preprocess(model, [images[i] for i in chunk])
            for i, per_image in zip(chunk, encode_batch(model, x, prompts is not None, attention)):
                self.cache.put((*scope, digests[i]), per_image)
                records[i] = per_image
        return [[_output(r, device) for r in per_image] for per_image in records], len(missing)


@gpu(duration=PASS_S)
def encode_batch(model, x: torch.Tensor, prompted: bool, attention: bool) -> list[list[tuple[torch.Tensor, ...]]]:
    """The image pass itself (a kernel: :mod:`pmpo.app.zerogpu`): per image of ``x``, the compact
    record of each of its passes, on the CPU."""
    model = kernel_model(model)
    x = x.to(model.device)
    with torch.no_grad():
        if prompted:
            outs = model.encode_image(x, return_attention=attention, return_tokens=attention)
        else:
            outs = [model.vision(x, None, return_attention=attention, return_tokens=attention)]
    return [[_record(out, j) for out in outs] for j in range(x.shape[0])]


__all__ = ["ImageFeatures", "ImageViews", "encode_batch", "image_digest", "preprocess"]
