"""The learnable part: N text contexts, optional deep text prompts, the text→vision couplings or
independent visual tokens, and CoCoOp's meta-net.

Everything a prompt checkpoint stores lives in :class:`PromptLearner`; the frozen CLIP never
does. Which vision layers each prompt feeds is decided by :func:`resolve_partition`, and what
the vision tower sees at each layer by :meth:`PromptLearner.visual_schedule`.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from .config import PMPOConfig
from .errors import InputError

Segment = tuple[int, int]  # inclusive [first, last] vision layer


def _split(first: int, last: int, n: int) -> list[Segment]:
    """``n`` contiguous, near-equal segments covering first..last (earlier ones get the extra layer)."""
    total = last - first + 1
    if n > total:
        raise InputError(f"cannot split {total} vision layers ({first}..{last}) into {n} non-empty segments")
    base, extra = divmod(total, n)
    segments, start = [], first
    for i in range(n):
        size = base + (1 if i < extra else 0)
        segments.append((start, start + size - 1))
        start += size
    return segments


def resolve_partition(spec: str | list, n_prompts: int, n_layers: int, start: int = 0) -> list[Segment]:
    """Map each prompt to the vision layers it feeds.

    ``equal`` splits layers start..L-1 into N contiguous segments (DESIGN.md §2). ``all`` gives
    every prompt every layer (no partition, the ablation baseline). ``first-half``/``second-half``
    split only that half of the depth. An explicit list gives ``[first, last]`` per prompt.
    """
    if n_prompts == 0:
        return []
    if not 0 <= start < n_layers:
        raise InputError(f"visual_start {start} is outside the vision tower's layers 0..{n_layers - 1}")
    if isinstance(spec, str):
        half = start + (n_layers - start) // 2
        if spec == "equal":
            return _split(start, n_layers - 1, n_prompts)
        if spec == "all":
            return [(start, n_layers - 1)] * n_prompts
        if spec == "first-half":
            return _split(start, max(half - 1, start), n_prompts)
        if spec == "second-half":
            return _split(half, n_layers - 1, n_prompts)
        raise InputError(f"unknown partition {spec!r}")
    segments = [tuple(int(v) for v in seg) for seg in spec]
    if len(segments) != n_prompts or any(len(s) != 2 for s in segments):
        raise InputError(f"explicit partition needs one [first, last] pair per prompt ({n_prompts}), got {spec}")
    for first, last in segments:
        if not 0 <= first <= last < n_layers:
            raise InputError(f"partition segment [{first}, {last}] is outside vision layers 0..{n_layers - 1}")
    return segments  # type: ignore[return-value]


class PromptLearner(nn.Module):
    """Learnable prompts of every method; sizes come from the backbone, never hard-coded.

    Parameters:
      ``ctx``        [N, M, d_t]        text context of each prompt, spliced after SOS (none if M = 0);
      ``deep_ctx``   [N, D_t-1, M, d_t] deep text prompts for text layers 1..D_t-1 (if D_t > 1);
      ``couplings``  Linear(d_t, d_v)   one per prompt, one shared, or one per prompted vision layer;
      ``visual_ctx`` [T, K, d_v]        with coupling ``independent``: K tokens of their own for each of
                                        the T (prompt, layer) injections (VPT, IVLP), N(0, 0.02);
      ``meta_net``   Linear(D, D/16) → ReLU → Linear(D/16, d_t)  CoCoOp's per-image context shift.
    """

    def __init__(
        self,
        cfg: PMPOConfig,
        text_width: int,
        vision_width: int,
        vision_layers: int,
        init_embeddings: Callable[[str], torch.Tensor],
        image_dim: int | None = None,
    ):
        super().__init__()
        n, m = cfg.n_prompts, cfg.n_ctx
        self.n_prompts, self.n_ctx, self.text_depth = n, m, cfg.text_depth
        self.mode, self.coupling_kind = cfg.visual_mode, cfg.coupling
        self.ctx = nn.Parameter(self._init_ctx(cfg.ctx_init, n, m, text_width, init_embeddings)) if m > 0 else None
        deep = torch.empty(n, cfg.text_depth - 1, m, text_width)
        nn.init.normal_(deep, std=0.02)
        self.deep_ctx = nn.Parameter(deep) if cfg.text_depth > 1 and m > 0 else None

        self.segments: list[Segment] = []
        self.couplings = nn.ModuleList()
        self.layer_to_coupling: dict[int, int] = {}
        self.visual_ctx: nn.Parameter | None = None
        self.visual_rows: dict[tuple[int, int], int] = {}  # (prompt, layer) -> row of visual_ctx
        if cfg.uses_visual_prompts:
            self.segments = resolve_partition(cfg.partition, n, vision_layers, cfg.visual_start)
            if cfg.visual_mode == "carry":
                _check_carry_segments(self.segments)
            if cfg.coupling == "independent":
                # As VPT/IVLP build them (multimodal-prompt-learning, clip/model.py: `VPT` at the input
                # and one `VPT_shallow` per deeper layer, each nn.init.normal_(std=0.02)): own tokens
                # for every layer a prompt is injected at (its segment's first layer under carry).
                for i, (first, last) in enumerate(self.segments):
                    for layer in (range(first, last + 1) if cfg.visual_mode == "replace" else [first]):
                        self.visual_rows[(i, layer)] = len(self.visual_rows)
                tokens = torch.empty(len(self.visual_rows), cfg.n_ctx_vision, vision_width)
                nn.init.normal_(tokens, std=0.02)
                self.visual_ctx = nn.Parameter(tokens)
                count = 0  # no couplings
            elif cfg.coupling == "per_layer":
                layers = sorted({l for a, b in self.segments for l in range(a, b + 1)})
                self.layer_to_coupling = {l: i for i, l in enumerate(layers)}
                count = len(layers)
            else:
                count = n if cfg.coupling == "per_prompt" else 1
            if cfg.coupling == "per_layer" and count > 1:
                # As MaPLe builds them: the first prompted layer's coupling on its own, every deeper
                # layer's a deep copy of one Linear (multimodal-prompt-learning, trainers/maple.py:
                # `compound_prompt_projections = _get_clones(single_layer, depth - 1)`), so the deep
                # couplings start identical and only training tells them apart.
                first, deep_one = nn.Linear(text_width, vision_width), nn.Linear(text_width, vision_width)
                self.couplings.append(first)
                self.couplings.extend(copy.deepcopy(deep_one) for _ in range(count - 1))
            else:
                self.couplings.extend(nn.Linear(text_width, vision_width) for _ in range(count))

        self.meta_net: nn.Sequential | None = None
        if cfg.uses_meta_net:
            if image_dim is None:
                raise InputError("meta_net needs the image feature size (image_dim)")
            # CoCoOp's trainers/cocoop.py: vis_dim -> vis_dim // 16 -> ctx_dim, PyTorch's default init.
            hidden = max(1, image_dim // 16)
            self.meta_net = nn.Sequential(OrderedDict([
                ("linear1", nn.Linear(image_dim, hidden)),
                ("relu", nn.ReLU()),
                ("linear2", nn.Linear(hidden, text_width)),
            ]))

    @staticmethod
    def _init_ctx(init, n: int, m: int, width: int, embed: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """Each prompt starts from its init phrase's token embeddings.

        A phrase with more than M tokens contributes its first M; one with fewer is padded in front
        with small random vectors, so the phrase ends right before the class name as written.
        """
        phrases = init if isinstance(init, list) else [init] * n
        ctx = torch.empty(n, m, width)
        nn.init.normal_(ctx, std=0.02)
        for i, phrase in enumerate(phrases):
            if not phrase:
                continue
            vectors = embed(phrase)[:m]
            ctx[i, m - vectors.shape[0]:] = vectors
        return ctx

    # --- text side -------------------------------------------------------------------------
    def deep_text_prompts(self, n_classes: int) -> dict[int, torch.Tensor]:
        """Deep prompts per text layer, each [N*C, M, d_t] matching the prompt-major batch."""
        if self.deep_ctx is None:
            return {}
        out = {}
        for j in range(1, self.text_depth):
            p = self.deep_ctx[:, j - 1]  # [N, M, d]
            out[j] = p.unsqueeze(1).expand(-1, n_classes, -1, -1).reshape(-1, *p.shape[1:])
        return out

    # --- vision side -----------------------------------------------------------------------
    def _text_source(self, prompt: int, layer: int) -> torch.Tensor:
        """The text tokens that feed vision layer ``layer`` of ``prompt``'s segment.

        Depth ``k`` inside the segment reads the deep text prompt of text layer ``k`` when there
        is one (MaPLe couples text and vision layer by layer), otherwise the shallow context.
        """
        k = layer - self.segments[prompt][0]
        if self.deep_ctx is not None and 1 <= k < self.text_depth:
            return self.deep_ctx[prompt, k - 1]
        return self.ctx[prompt]

    def context_shift(self, image_features: torch.Tensor) -> torch.Tensor:
        """CoCoOp's π(x) [B, d_t] from normalised image features [B, D]: added to every context token."""
        assert self.meta_net is not None
        return self.meta_net(image_features.to(self.meta_net.linear1.weight.dtype))

    def _coupling(self, prompt: int, layer: int) -> nn.Linear:
        if self.coupling_kind == "per_layer":
            return self.couplings[self.layer_to_coupling[layer]]
        return self.couplings[prompt if self.coupling_kind == "per_prompt" else 0]

    def visual_tokens(self, prompt: int, layer: int) -> torch.Tensor:
        if self.visual_ctx is not None:
            return self.visual_ctx[self.visual_rows[(prompt, layer)]]
        return self._coupling(prompt, layer)(self._text_source(prompt, layer))

    def visual_schedule(self, n_layers: int, prompt: int | None = None) -> list[torch.Tensor | None] | None:
        """What the prompt slots hold at the input of each vision layer (see VisionEncoder).

        ``prompt=None``: single pass, all prompts' segments. ``prompt=i``: the pass of prompt i
        alone. ``replace`` re-injects at every layer of a segment; ``carry`` injects at a
        segment's first layer only. Outside all segments tokens are carried.
        """
        if not self.segments:
            return None
        active_ids = range(self.n_prompts) if prompt is None else [prompt]
        schedule: list[torch.Tensor | None] = []
        for layer in range(n_layers):
            active = [i for i in active_ids if self.segments[i][0] <= layer <= self.segments[i][1]]
            starts = [i for i in active if self.segments[i][0] == layer]
            inject = active if self.mode == "replace" else starts
            if inject and (self.mode == "replace" or len(starts) == len(active)):
                schedule.append(torch.cat([self.visual_tokens(i, layer) for i in inject], dim=0))
            else:
                schedule.append(None)
        return schedule

    def layer_segments(self, n_layers: int) -> list[list[int]]:
        """For each vision layer, the prompts whose segment contains it (for analysis and tests)."""
        return [[i for i, (a, b) in enumerate(self.segments) if a <= l <= b] for l in range(n_layers)]


def _check_carry_segments(segments: list[Segment]) -> None:
    """``carry`` keeps tokens between injections, so segments must not partly overlap."""
    for i, a in enumerate(segments):
        for b in segments[i + 1:]:
            overlap = not (a[1] < b[0] or b[1] < a[0])
            if overlap and a != b:
                raise InputError(
                    f"visual_mode 'carry' needs disjoint or identical segments; {list(a)} and {list(b)} partly overlap"
                )
