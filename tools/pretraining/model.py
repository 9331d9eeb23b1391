"""The model being pretrained and what the optimiser needs of it.

Only what open_clip and the library do not have lives here: the offline model's architecture
(``MODEL_CFG``, ``PREPROCESS_CFG``), the residual-scaled init, depth growth (``grow``), the
attribute heads that ride along during pretraining, and the AdamW parameter groups and
per-step learning rate. The model itself is ``open_clip.model.CLIP``; its truncated text pass
is the library's (``pmpo.encoders.TextEncoder``).
"""
from __future__ import annotations

import math

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from pmpo.encoders import TextEncoder

from .captions import ATTRIBUTES

# The offline model's architecture: as deep as ViT-B/16 (12 + 12 layers) so every method preset
# runs unchanged. The shipped model (checkpoints/shapeworld-clip) reaches it by --grow from a
# shallow first stage (--write-config 2 2 8); its card lists every stage's command.
MODEL_CFG = {
    "embed_dim": 128,
    "quick_gelu": False,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 128, "layers": 12, "head_width": 32,
                   "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 12,
                 "mlp_ratio": 4.0},
}
PREPROCESS_CFG = {"mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD),
                  "interpolation": "bicubic", "resize_mode": "shortest", "size": 64}


def text_encoder(model: torch.nn.Module) -> TextEncoder:
    """The library's truncated text pass over ``model``'s own text tower (it holds no weights)."""
    return TextEncoder(model, open_clip.tokenize)


def encode_text_truncated(model: torch.nn.Module, text: torch.Tensor, embeddings: torch.Tensor | None = None) -> torch.Tensor:
    """Exactly ``model.encode_text`` (causal mask, EOT pooling) on ``text[:, :L]`` with
    ``L = last EOT position + 1`` over the batch: tokens after the EOT never influence it.
    ``embeddings`` [B, L, d] replaces the token embeddings (a perturbed prompt, ``context_leverage``).

    Both cases are the library's ``TextEncoder``: ``encode_tokens`` in one chunk (so the whole batch
    shares one ``L``), and its ``forward``, which takes the embeddings and cuts them to ``L`` itself."""
    encoder = text_encoder(model)
    if embeddings is None:
        return encoder.encode_tokens(text, chunk=max(1, text.shape[0]))
    return encoder(embeddings, encoder.eot_positions(text))


def build_model(model_cfg: dict, residual_scale: float = 1.0) -> torch.nn.Module:
    """open_clip's CLIP; ``residual_scale`` < 1 shrinks every block's output projections (attention
    out_proj and MLP c_proj) at init, so the 12-block towers start close to the identity and train
    like shallow ones first (GPT-2 uses 1/sqrt(2 * layers) for the same reason)."""
    model = open_clip.model.CLIP(**model_cfg)
    if residual_scale != 1.0:
        with torch.no_grad():
            for tower in (model.visual.transformer, model.transformer):
                for block in tower.resblocks:
                    block.attn.out_proj.weight.mul_(residual_scale)
                    block.mlp.c_proj.weight.mul_(residual_scale)
    return model


def grow(shallow: torch.nn.Module, model_cfg: dict) -> torch.nn.Module:
    """A deeper CLIP (``model_cfg``: same widths, more layers) that computes *exactly* what
    ``shallow`` computes: the shallow blocks are spread evenly over the new depth and every added
    block starts as the identity (attention out_proj and MLP c_proj zeroed, so both residual
    branches add 0).

    Measured reason (docs/SHAPEWORLD.md): from random init a 2-layer ViT learns shape, size and
    position on ShapeWorld within a few hundred steps, a 12-layer one stays at chance for
    hundreds of steps; growing a trained shallow tower keeps what it learned and lets the
    added blocks train from there (progressive stacking)."""
    deep = open_clip.model.CLIP(**model_cfg)
    old_sd = shallow.state_dict()
    new_sd = deep.state_dict()
    towers = (("visual.transformer.resblocks.", shallow.visual.transformer.resblocks, deep.visual.transformer.resblocks),
              ("transformer.resblocks.", shallow.transformer.resblocks, deep.transformer.resblocks))
    placed: dict[str, dict[int, int]] = {}
    for prefix, old_blocks, new_blocks in towers:
        n_old, n_new = len(old_blocks), len(new_blocks)
        if n_new < n_old:
            raise ValueError(f"cannot grow {n_old} blocks into {n_new}")
        placed[prefix] = {round(i * (n_new - 1) / max(1, n_old - 1)) if n_old > 1 else 0: i for i in range(n_old)}
    for key in new_sd:
        prefix = next((p for p, _, _ in towers if key.startswith(p)), None)
        if prefix is None:
            if old_sd[key].shape != new_sd[key].shape:
                raise ValueError(f"{key}: shape {tuple(old_sd[key].shape)} -> {tuple(new_sd[key].shape)}; only depth may grow")
            new_sd[key] = old_sd[key].clone()
            continue
        index, rest = key[len(prefix):].split(".", 1)
        source = placed[prefix].get(int(index))
        if source is not None:
            new_sd[key] = old_sd[f"{prefix}{source}.{rest}"].clone()
        elif rest.startswith(("attn.out_proj.", "mlp.c_proj.")):
            new_sd[key] = torch.zeros_like(new_sd[key])
    deep.load_state_dict(new_sd)
    return deep


class AttributeHeads(torch.nn.Module):
    """Linear read-outs of the *projected* image embedding (the feature prompt learning sees),
    one per ShapeWorld attribute. Trained beside the contrastive loss so that the frozen features
    carry every attribute linearly, as a real CLIP's features carry far more than its zero-shot
    prompts use; they are a pretraining device only and are not part of the shipped model."""

    def __init__(self, dim: int, separate_uncaptioned: bool = False):
        super().__init__()
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(dim, len(v)) for k, v in ATTRIBUTES.items()})
        # Own heads for the uncaptioned downstream-style scenes: the features must carry the
        # attributes there too, but need not use the directions the captioned style aligned with text.
        self.uncaptioned = torch.nn.ModuleDict(
            {k: torch.nn.Linear(dim, len(v)) for k, v in ATTRIBUTES.items()}) if separate_uncaptioned else None

    def loss(self, features: torch.Tensor, targets: torch.Tensor,
             n_captioned: int | None = None, uncaptioned_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
        """Cross-entropy averaged over every (attribute, scene) pair, times the number of scene groups
        (captioned; uncaptioned, the rows from ``n_captioned`` on), so each group weighs about as
        much as the captioned one alone; ``uncaptioned_weight`` scales the uncaptioned group's share
        (the downstream style is where the benchmark's probe reads the features). Accuracies of the
        uncaptioned rows carry a ``ds_`` prefix."""
        n = features.shape[0] if n_captioned is None else n_captioned
        parts = [("", self.heads, slice(0, n), 1.0)]
        if n < features.shape[0]:
            parts.append(("ds_", self.uncaptioned if self.uncaptioned is not None else self.heads,
                          slice(n, features.shape[0]), uncaptioned_weight))
        feats = F.normalize(features.float(), dim=-1) * 10.0  # fixed scale: the head sees directions only
        total, count, accs = feats.new_zeros(()), 0, {}
        for prefix, heads, rows, weight in parts:
            for i, (name, head) in enumerate(heads.items()):
                y = targets[rows, i]
                keep = y >= 0
                if not keep.any():
                    continue
                logits = head(feats[rows][keep])
                total = total + F.cross_entropy(logits, y[keep]) * int(keep.sum()) * weight
                count += int(keep.sum())
                accs[prefix + name] = (logits.argmax(1) == y[keep]).float().mean().item()
        return total / max(1, count) * len(parts), accs


def param_groups(model: torch.nn.Module, wd: float) -> list[dict]:
    """AdamW groups: weight decay on matrices only (not on gains, biases, embeddings, logit scale)."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embedding" in n or "logit_scale" in n else decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total: int, base_lr: float, warmup: int) -> float:
    """Per-step linear warm-up to ``base_lr`` then cosine to 0 at ``total`` (``pmpo.train_config.lr_at``
    is per epoch with a constant warm-up rate: another schedule)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
