"""Running open_clip residual blocks ourselves, optionally returning attention probabilities.

open_clip calls ``nn.MultiheadAttention`` with ``need_weights=False`` (fast fused attention) and
has no switch to get the weights back. For analysis we recompute the block from its own
parameters — same LayerNorms, same in/out projections, same MLP — so the maps describe exactly
the network that produced the prediction. Without a map request the block's own ``forward`` runs,
keeping PyTorch's fused SDPA path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError


def supports_attention_maps(block: nn.Module) -> bool:
    """True for open_clip's standard ``ResidualAttentionBlock`` (ln_1 → MHA → ls_1, ln_2 → MLP → ls_2)."""
    attn = getattr(block, "attn", None)
    return (
        isinstance(attn, nn.MultiheadAttention)
        and attn._qkv_same_embed_dim
        and attn.in_proj_weight is not None
        and not hasattr(block, "ln_1_kv")
        and all(hasattr(block, name) for name in ("ln_1", "ls_1", "ln_2", "mlp", "ls_2"))
    )


def block_with_attention(
    block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One residual block on batch-first ``x`` [B, L, D]; returns (output, probs [B, heads, L, L])."""
    if not supports_attention_maps(block):
        raise InputError(
            f"attention maps need open_clip's standard ResidualAttentionBlock; this backbone uses {type(block).__name__}"
        )
    mha: nn.MultiheadAttention = block.attn
    batch, length, width = x.shape
    heads = mha.num_heads
    head_dim = width // heads

    y = block.ln_1(x)
    q, k, v = F.linear(y, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(batch, length, heads, head_dim).transpose(1, 2) for t in (q, k, v))
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(head_dim)
    if attn_mask is not None:
        scores = scores + attn_mask.to(scores.dtype)
    probs = scores.softmax(dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(batch, length, width)
    x = x + block.ls_1(mha.out_proj(out))
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x, probs
