"""Prompt-aware text and image encoders that drive open_clip's own blocks.

Neither encoder owns weights: they are plain objects (not modules) holding references to the
frozen CLIP's towers, which the model owns and saves, and run their blocks with prompt tokens
spliced in between. This avoids forking open_clip's model code and means any open_clip ViT CLIP
with a standard text transformer works.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import block_with_attention
from .errors import BackboneLoadError, InputError


class TextEncoder:
    """The frozen text tower, run on token *embeddings* so learnable context can be spliced in.

    Every sequence is cut to (its batch's last EOT position + 1). The causal mask means tokens
    after the EOT never influence the EOT feature that is pooled, so this is exact, and it turns
    77-token sequences into ~10–20-token ones.
    """

    def __init__(self, clip: nn.Module, tokenizer: Callable[..., torch.Tensor]):
        tower = clip.text if hasattr(clip, "text") else clip
        if getattr(tower, "cls_emb", None) is not None or not hasattr(tower, "token_embedding"):
            raise BackboneLoadError(
                f"{type(tower).__name__}: only open_clip's causal text transformer (CLIP, CustomTextCLIP) "
                "is supported for text prompting"
            )
        self.pool_type = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
        if self.pool_type not in ("argmax", "eos"):
            raise BackboneLoadError(f"text pooling {self.pool_type!r} is not supported (need 'argmax' or 'eos')")
        self.tower = tower
        self.tokenizer = tokenizer
        self.eos_id = getattr(tower, "text_eos_id", getattr(tower, "eos_id", None))
        self.batch_first = getattr(tower.transformer, "batch_first", True)
        # Recompute each block in backward instead of storing its activations: N·C sequences with
        # gradients (ImageNet: 4 × 1000) otherwise hold gigabytes. Same gradients, ~1/3 more time.
        self.grad_checkpointing = False

    @property
    def width(self) -> int:
        return self.tower.token_embedding.weight.shape[1]

    @property
    def n_layers(self) -> int:
        return len(self.tower.transformer.resblocks)

    @property
    def context_length(self) -> int:
        return self.tower.positional_embedding.shape[0]

    @property
    def token_embedding_matrix(self) -> torch.Tensor:
        """[vocab, d_t] input token embeddings: what learned context vectors are compared against
        when they are read back as words (CoOp's prompt interpretation)."""
        return self.tower.token_embedding.weight

    def decode(self, token_ids: Sequence[int]) -> list[str]:
        """Each token id as text, via the tokenizer's own decoder (BPE or Hugging Face)."""
        tok = self.tokenizer
        decoder = getattr(tok, "decode", None) or getattr(getattr(tok, "tokenizer", None), "decode", None)
        if decoder is None:
            raise BackboneLoadError(f"tokenizer {type(tok).__name__} has no decoder to turn token ids into text")
        return [decoder([int(i)]).strip() for i in token_ids]

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        device = self.tower.token_embedding.weight.device
        return self.tokenizer(list(texts)).to(device)

    def eot_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pool_type == "argmax":
            return tokens.argmax(dim=-1)
        return (tokens == self.eos_id).int().argmax(dim=-1)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings of ``tokens`` (no positions), in the transformer's dtype."""
        dtype = self.tower.transformer.get_cast_dtype()
        return self.tower.token_embedding(tokens).to(dtype)

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return self.forward(*args, **kwargs)  # looked up on the instance: a compiled forward replaces it

    def forward(
        self,
        embeddings: torch.Tensor,
        eot: torch.Tensor,
        deep_prompts: dict[int, torch.Tensor] | None = None,
        prompt_slice: slice | None = None,
    ) -> torch.Tensor:
        """Encode [B, L, D] token embeddings pooled at ``eot`` [B]; returns unnormalised features.

        ``deep_prompts[j]`` ([B, M, D]) replaces the tokens at ``prompt_slice`` at the input of
        text layer ``j`` (MaPLe-style deep text prompts).
        """
        length = int(eot.max()) + 1
        x = embeddings[:, :length] + self.tower.positional_embedding[:length].to(embeddings.dtype)
        mask = self.tower.attn_mask
        mask = mask[:length, :length] if mask is not None else None
        blocks = self.tower.transformer.resblocks
        if not self.batch_first:
            x = x.transpose(0, 1)
        for j, block in enumerate(blocks):
            if deep_prompts and j in deep_prompts:
                p = deep_prompts[j].to(x.dtype)
                if not self.batch_first:
                    p = p.transpose(0, 1)
                    x = torch.cat([x[:prompt_slice.start], p, x[prompt_slice.stop:]], dim=0)
                else:
                    x = torch.cat([x[:, :prompt_slice.start], p, x[:, prompt_slice.stop:]], dim=1)
            if self.grad_checkpointing and torch.is_grad_enabled() and x.requires_grad:
                x = checkpoint(block, x, attn_mask=mask, use_reentrant=False)
            else:
                x = block(x, attn_mask=mask)
        if not self.batch_first:
            x = x.transpose(0, 1)
        x = self.tower.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot]
        proj = self.tower.text_projection
        if proj is None:
            return pooled
        return proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj

    def encode_tokens(self, tokens: torch.Tensor, chunk: int = 2048,
                      progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Exact equivalent of open_clip's ``encode_text`` (unnormalised), truncated and chunked;
        ``progress(done, total)`` after every chunk of sequences."""
        outs = []
        for start in range(0, tokens.shape[0], chunk):
            part = tokens[start:start + chunk]
            eot = self.eot_positions(part)
            length = int(eot.max()) + 1
            outs.append(self(self.embed(part[:, :length]), eot))
            if progress is not None:
                progress(start + len(part), tokens.shape[0])
        return torch.cat(outs) if outs else torch.empty(0, self.output_dim, device=tokens.device)

    @property
    def output_dim(self) -> int:
        proj = self.tower.text_projection
        if proj is None:
            return self.width
        return proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]


@dataclass
class VisionOutput:
    features: torch.Tensor  # [B, D] projected, unnormalised
    attentions: list[torch.Tensor] | None  # per layer [B, heads, T, T] when requested
    n_tokens: int  # CLS + patch tokens (prompt tokens follow them)
    tokens: torch.Tensor | None = None  # [B, n_tokens - 1, D] projected patch tokens when requested


class VisionEncoder:
    """The frozen ViT image tower with prompt tokens appended after the patch tokens.

    ``schedule[l]`` says what the prompt slots hold at the input of layer ``l``: a tensor
    ([K, D] or [B, K, D]) replaces whatever prompt tokens are there (possibly none), ``None``
    keeps the current tokens (they are processed by the block like any other token, i.e.
    carried). After the last block the prompt tokens are dropped before pooling, so pooling is
    open_clip's own, over the original tokens.
    """

    def __init__(self, visual: nn.Module):
        needed = ("_embeds", "_pool", "transformer", "proj")
        if not all(hasattr(visual, n) for n in needed) or not hasattr(visual.transformer, "resblocks"):
            raise BackboneLoadError(
                f"{type(visual).__name__}: visual prompting needs open_clip's VisionTransformer image tower"
            )
        self.visual = visual
        self.batch_first = getattr(visual.transformer, "batch_first", True)

    @property
    def width(self) -> int:
        return self.visual.class_embedding.shape[0]

    @property
    def n_layers(self) -> int:
        return len(self.visual.transformer.resblocks)

    @property
    def output_dim(self) -> int:
        return self.visual.output_dim

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, columns): patch token ``k`` sits at ``divmod(k, columns)``."""
        rows, cols = self.visual.grid_size
        return int(rows), int(cols)

    def __call__(self, *args, **kwargs) -> VisionOutput:
        return self.forward(*args, **kwargs)

    def forward(
        self,
        images: torch.Tensor,
        schedule: Sequence[torch.Tensor | None] | None = None,
        return_attention: bool = False,
        return_tokens: bool = False,
    ) -> VisionOutput:
        """``return_tokens`` also gives the patch tokens through the same final LayerNorm and
        projection as the pooled feature, so they live in the joint space (patch-text maps)."""
        x = self.visual._embeds(images)
        batch, n_tokens = x.shape[0], x.shape[1]
        attentions: list[torch.Tensor] | None = [] if return_attention else None
        for layer, block in enumerate(self.visual.transformer.resblocks):
            prompts = schedule[layer] if schedule is not None else None
            if prompts is not None:
                prompts = prompts.to(x.dtype)
                if prompts.dim() == 2:
                    prompts = prompts.unsqueeze(0).expand(batch, -1, -1)
                x = torch.cat([x[:, :n_tokens], prompts], dim=1)
            if return_attention:
                x, probs = block_with_attention(block, x)
                attentions.append(probs)
            elif self.batch_first:
                x = block(x)
            else:
                x = block(x.transpose(0, 1)).transpose(0, 1)
        pooled, tokens = self.visual._pool(x[:, :n_tokens])
        if self.visual.proj is not None:
            pooled = pooled @ self.visual.proj
        patch = self._patch_tokens(tokens) if return_tokens else None
        return VisionOutput(pooled, attentions, n_tokens, patch)

    def _patch_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Patch tokens as open_clip's pooling left them, normalised and projected like the pooled one."""
        visual = self.visual
        if getattr(visual, "attn_pool", None) is not None:
            raise InputError("per-patch features need a ViT image tower without attention pooling")
        if getattr(visual, "final_ln_after_pool", False):
            tokens = visual.ln_post(tokens)  # _pool normalised only the pooled token
        return tokens @ visual.proj if visual.proj is not None else tokens
