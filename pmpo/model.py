"""One model class for zero-shot CLIP, CoOp, CoCoOp, KgCoOp, VPT, IVLP, MaPLe, PromptSRC and PMPO.

Data flow (DESIGN.md §2):

    class names ──► prior t0 [C, D] (templates, frozen)
                └─► prompts t_i [N, C, D] (learnable context through the frozen text tower)
    w_c = normalise((1 − α)·mean_i t_i,c + α·t0_c)
    image ──► vision tower with prompt tokens per depth segment ──► views: f [B, D] per image pass
    logits = exp(logit_scale) · normalise(f) · wᵀ

The model holds parameters only. What is worth keeping between calls is kept by the caller: frozen
text features in a :class:`~pmpo.cache.TensorCache` passed to :meth:`PMPOModel.prior_features`
(and to ``class_weights`` / ``loss``, which the engine does for a whole training run), class weights
of fixed prompts by whoever serves them (the engine's evaluation, the app's text store).

With CoCoOp's meta-net the context is shifted per image, ctx + π(normalise(f)), so the prompts are
t_i [B, N, C, D] and the weights w [B, C, D]: computed for every image (one batched text pass over
B·N·C sequences), never cached. PromptSRC's self-regulating terms compare the prompted features and
logits with the frozen CLIP's (``loss``).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import Backbone, load_backbone
from .cache import TensorCache
from .config import PMPOConfig, template_pool
from .data.types import clean_classname
from .encoders import TextEncoder, VisionEncoder, VisionOutput
from .errors import InputError
from .losses import TERMS, Step, against
from .prompts import PromptLearner

# Sequences per text call when no gradient flows: bounds the memory of a long class list (a
# 1000-class PMPO list is 4 × 1000 prompted sequences) and paces progress reports.
TEXT_CHUNK = 512
# Sequences per text call when per-image prompts (CoCoOp) are encoded without gradients: bounds the
# memory of evaluating B images × C classes (ImageNet: 100 × 1000) while keeping calls large.
CONDITIONAL_TEXT_CHUNK = 4096


def clean_classnames(classnames: Sequence[str]) -> list[str]:
    """Class names as the text encoder should see them; rejects lists that cannot work."""
    if isinstance(classnames, str):
        raise InputError("classnames must be a list of names, not one string")
    names = [clean_classname(c) for c in classnames]
    if not names:
        raise InputError("the class list is empty: give at least one class name")
    empty = [i for i, n in enumerate(names) if not n]
    if empty:
        raise InputError(f"class names at positions {empty} are empty")
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if n.lower() in seen:
            raise InputError(f"duplicate class name {n!r} (positions {seen[n.lower()]} and {i})")
        seen[n.lower()] = i
    return names


@dataclass
class ClassWeights:
    """What the text side gives for one class list. With a meta-net (``conditional``) the weights
    depend on the image: ``weights``/``prompts`` are then those of the context *without* its
    per-image shift (for display), and logits must come from :meth:`PMPOModel.logits_from`."""

    weights: torch.Tensor  # [C, D] combined, normalised
    prompts: torch.Tensor | None  # [N, C, D] per-prompt, normalised
    prior: torch.Tensor  # [C, D] manual prior, normalised
    classnames: tuple[str, ...] = ()
    conditional: bool = False


class PMPOModel(nn.Module):
    """A frozen CLIP with the prompts of one method. Only ``self.prompts`` is learnable."""

    def __init__(self, cfg: PMPOConfig, backbone: Backbone):
        super().__init__()
        # The config records the backbone actually used, so a saved checkpoint names it.
        self.cfg = dataclasses.replace(cfg)
        self.cfg.model, self.cfg.pretrained = backbone.model_name, backbone.pretrained or "none"
        self.backbone = backbone
        self.clip = backbone.clip.eval().requires_grad_(False)
        self.text = TextEncoder(self.clip, backbone.tokenizer)
        self.vision = VisionEncoder(self.clip.visual)
        self.templates = list(cfg.templates)
        self.prompts: PromptLearner | None = None
        if cfg.text_depth > self.text.n_layers:
            raise InputError(f"text_depth {cfg.text_depth} exceeds the text tower's {self.text.n_layers} layers")
        if cfg.n_prompts > 0:
            self.prompts = PromptLearner(
                cfg, self.text.width, self.vision.width, self.vision.n_layers, self._phrase_embeddings,
                image_dim=self.vision.output_dim,
            ).to(self.clip.logit_scale.device)
        # Fixed by the config and the tokenizer: computed once, not on every training step.
        self._tails = self._init_tails() if cfg.uses_text_prompts else []

    # --- bookkeeping ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.clip.logit_scale.device

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp()

    def train(self, mode: bool = True) -> PMPOModel:
        """The backbone stays in eval mode (no dropout, no patch dropout): it is frozen."""
        super().train(mode)
        self.clip.eval()
        return self

    @property
    def frozen_image_side(self) -> bool:
        """True when no learnable tensor acts inside the image tower (no visual prompts): the image
        features then depend on the image alone, so training may compute them once per image
        (``TrainConfig.cached_views``) — CoOp, KgCoOp and CoCoOp (whose meta-net reads them)."""
        return self.prompts is None or not self.prompts.segments

    def learnable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.prompts.parameters()] if self.prompts is not None else []

    def num_learnable(self) -> int:
        return sum(p.numel() for p in self.learnable_parameters())

    # --- text side -----------------------------------------------------------------------------
    @torch.no_grad()
    def _phrase_embeddings(self, phrase: str) -> torch.Tensor:
        tokens = self.text.tokenize([phrase])
        eot = int(self.text.eot_positions(tokens)[0])
        return self.text.embed(tokens)[0, 1:eot].float().cpu()

    @torch.no_grad()
    def prior_features(self, classnames: Sequence[str], templates: Sequence[str] | None = None,
                       progress: Callable[[int, int], None] | None = None,
                       cache: TensorCache | None = None) -> torch.Tensor:
        """t0 [C, D]: normalised mean of normalised template features (CLIP's ensembling).

        Frozen: it depends on the backbone, the names and the templates only, so ``cache`` (keyed by
        names and templates) may be shared by every model on the same backbone."""
        names = clean_classnames(classnames)
        templates = list(templates or self.templates)
        key = ("prior", tuple(names), tuple(templates))
        found = cache.get(key) if cache is not None else None
        if found is not None:
            return found
        texts = [t.format(n) for t in templates for n in names]
        feats = F.normalize(self.text.encode_tokens(self.text.tokenize(texts), TEXT_CHUNK, progress).float(), dim=-1)
        prior = F.normalize(feats.view(len(templates), len(names), -1).mean(0), dim=-1)
        if cache is not None:
            cache.put(key, prior)
        return prior

    @torch.no_grad()
    def teacher_text_features(self, classnames: Sequence[str], cache: TensorCache | None = None) -> torch.Tensor:
        """[C, D]: the frozen text side of PromptSRC's terms, normalise(mean over ``teacher_templates``
        of the *unnormalised* text features), as trainers/promptsrc.py averages ``encode_text``
        (frozen, so cached like :meth:`prior_features`)."""
        names = clean_classnames(classnames)
        templates = template_pool(self.cfg.teacher_templates)
        key = ("teacher", tuple(names), tuple(templates))
        found = cache.get(key) if cache is not None else None
        if found is not None:
            return found
        texts = [t.format(n) for t in templates for n in names]
        feats = self.text.encode_tokens(self.text.tokenize(texts)).float()
        teacher = F.normalize(feats.view(len(templates), len(names), -1).mean(0), dim=-1)
        if cache is not None:
            cache.put(key, teacher)
        return teacher

    def prompt_tokens(self, classnames: Sequence[str]) -> torch.Tensor:
        """Token ids [G, C, L] of the prompted sequences ``[SOS] X..X (tail) {class}. [EOT]``: the M
        ``X`` slots take the learned context; ``tail`` is the rest of the init phrase when
        ``frozen_init_tail`` is on (MaPLe). G = 1 when every prompt's tail is the same (the usual
        case: no tail), else G = N."""
        assert self.prompts is not None
        names = clean_classnames(classnames)
        m = self.prompts.n_ctx
        base = self.text.tokenize([" ".join(["X"] * m + [f"{name}."]) for name in names])
        tails = self._tails
        if all(t.numel() == 0 for t in tails):
            return base[None]
        length = base.shape[1]
        rows = []
        for tail in (tails[:1] if all(torch.equal(t, tails[0]) for t in tails) else tails):
            tail = tail.to(base.device)
            row = torch.cat([base[:, :1 + m], tail.expand(base.shape[0], -1), base[:, 1 + m:]], dim=1)
            if row[:, length:].any():
                raise InputError(f"a class name is too long for the {length}-token context with the prompt "
                                 f"({m} context tokens + {tail.numel()} frozen init tokens)")
            rows.append(row[:, :length])
        return torch.stack(rows)

    def _init_tails(self) -> list[torch.Tensor]:
        """Per prompt, the token ids of its init phrase after the first M (empty when off)."""
        if not self.cfg.frozen_init_tail:
            return [torch.empty(0, dtype=torch.long)] * self.prompts.n_prompts
        init = self.cfg.ctx_init
        phrases = init if isinstance(init, list) else [init] * self.prompts.n_prompts
        tails = []
        for phrase in phrases:
            if not phrase:
                tails.append(torch.empty(0, dtype=torch.long))
                continue
            tokens = self.text.tokenize([phrase])
            eot = int(self.text.eot_positions(tokens)[0])
            tails.append(tokens[0, 1 + self.prompts.n_ctx:eot].cpu())
        return tails

    def prompt_features(self, classnames: Sequence[str], shift: torch.Tensor | None = None,
                        progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """t_i [N, C, D]: all N prompts × C classes in one batched, truncated text pass.

        ``shift`` [B, d_t] (CoCoOp's π(x)) is added to every context token, image by image: the result
        is [B, N, C, D] from one pass over B·N·C sequences (the same per-sequence computation as
        CoCoOp's loop over images), cut into calls of ``CONDITIONAL_TEXT_CHUNK`` sequences when no
        gradient flows."""
        if self.prompts is None or self.prompts.ctx is None:
            raise InputError(f"method {self.cfg.method!r} learns no text context (n_prompts {self.cfg.n_prompts}, "
                             f"n_ctx {self.cfg.n_ctx}): there are no prompted class embeddings")
        n = self.prompts.n_prompts
        tokens = self.prompt_tokens(classnames)  # [G, C, L]
        c = tokens.shape[1]
        eot = self.text.eot_positions(tokens.reshape(-1, tokens.shape[-1])).view(tokens.shape[0], c)
        with torch.no_grad():
            frozen = self.text.embed(tokens[:, :, : int(eot.max()) + 1])  # [G, C, L, d]
        frozen = frozen.expand(n, -1, -1, -1)
        eot = eot.expand(n, -1).reshape(-1)
        deep = self.prompts.deep_text_prompts(c)
        ctx = self.prompts.ctx.to(frozen.dtype)  # [N, M, d]
        if shift is None and (torch.is_grad_enabled() or n * c <= TEXT_CHUNK):
            return self._encode_contexts(frozen, ctx[None], eot, deep)[0]
        if shift is None:  # no gradient, many classes: calls of ~TEXT_CHUNK sequences, classes in order
            step = max(1, TEXT_CHUNK // n)
            eot = eot.view(n, c)
            parts = []
            for i in range(0, c, step):
                size = min(step, c - i)
                parts.append(self._encode_contexts(frozen[:, i:i + size], ctx[None], eot[:, i:i + size].reshape(-1),
                                                   self.prompts.deep_text_prompts(size))[0])
                if progress is not None:
                    progress(min(c, i + step) * n, c * n)
            return torch.cat(parts, dim=1)
        contexts = ctx[None] + shift.to(frozen.dtype)[:, None, None, :]  # [B, N, M, d]
        step = contexts.shape[0] if torch.is_grad_enabled() else max(1, CONDITIONAL_TEXT_CHUNK // (n * c))
        return torch.cat([self._encode_contexts(frozen, contexts[i:i + step], eot, deep)
                          for i in range(0, contexts.shape[0], step)])

    def _encode_contexts(self, frozen: torch.Tensor, contexts: torch.Tensor, eot: torch.Tensor,
                         deep: dict[int, torch.Tensor]) -> torch.Tensor:
        """[B, N, C, D] features of B context sets [B, N, M, d] spliced into the frozen sequences
        [N, C, L, d] (deep prompts are the same for every context set)."""
        b, (n, c) = contexts.shape[0], frozen.shape[:2]
        m = contexts.shape[2]
        x = torch.cat([frozen[None, :, :, :1].expand(b, -1, -1, -1, -1),
                       contexts[:, :, None].expand(-1, -1, c, -1, -1),
                       frozen[None, :, :, 1 + m:].expand(b, -1, -1, -1, -1)], dim=3)
        x = x.reshape(b * n * c, -1, frozen.shape[-1])
        deep = {j: p.repeat(b, 1, 1) for j, p in deep.items()} if b > 1 else deep
        feats = self.text(x, eot.repeat(b), deep, prompt_slice=slice(1, 1 + m))
        return F.normalize(feats.float(), dim=-1).view(b, n, c, -1)

    def class_weights(self, classnames: Sequence[str], templates: Sequence[str] | None = None,
                      progress: Callable[[int, int], None] | None = None,
                      cache: TensorCache | None = None) -> ClassWeights:
        """Combined class weights: the prompts' text pass (with gradients when they flow) mixed with
        the prior (from ``cache`` when given). ``templates`` overrides ``self.templates`` for this
        call only, so concurrent callers (the app) never mutate shared state. ``progress(done,
        total)`` follows the text passes in sequences (prior, then prompts) when no gradient flows."""
        names = clean_classnames(classnames)
        prior = self.prior_features(names, templates, progress, cache)
        if not self.cfg.uses_text_prompts or self.cfg.alpha == 1.0:
            return ClassWeights(prior, None, prior, tuple(names))
        prompts = self.prompt_features(names, progress=progress)
        return ClassWeights(self._mix(prompts, prior), prompts, prior, tuple(names), self.cfg.uses_meta_net)

    def _mix(self, prompts: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """w = normalise((1 − α)·mean_i t_i + α·t0) over the prompt axis (-3) of [..., N, C, D]."""
        alpha = self.cfg.alpha
        return F.normalize((1 - alpha) * prompts.mean(-3) + alpha * prior, dim=-1)

    def conditional_weights(self, features: torch.Tensor, cw: ClassWeights) -> tuple[torch.Tensor, torch.Tensor]:
        """CoCoOp: per-image weights [B, C, D] and prompts [B, N, C, D] for image features [B, D]
        (the meta-net reads the normalised feature, as trainers/cocoop.py does)."""
        shift = self.prompts.context_shift(F.normalize(features.float(), dim=-1))
        prompts = self.prompt_features(cw.classnames, shift)
        return self._mix(prompts, cw.prior), prompts

    # --- image side ----------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor, return_attention: bool = False,
                     return_tokens: bool = False) -> list[VisionOutput]:
        """Prompted image features, one view per image pass: a single view when every prompt shares
        the pass (and when the image side is frozen), N views with ``visual_pass: per_prompt``, view
        i seeing prompt i's visual tokens only."""
        images = images.to(self.device)
        if self.frozen_image_side:
            schedules = [None]
        elif self.cfg.visual_pass == "per_prompt":
            schedules = [self.visual_schedule(i) for i in range(self.prompts.n_prompts)]
        else:
            schedules = [self.visual_schedule()]
        return [self.vision(images, s, return_attention, return_tokens) for s in schedules]

    def visual_schedule(self, prompt: int | None = None) -> list[torch.Tensor | None] | None:
        """The prompt tokens at the input of each vision layer (all prompts, or ``prompt``'s pass).

        With ``prompt_ln_pre`` the tokens injected at layer 0 go through the tower's ``ln_pre``,
        which open_clip has already applied to the patch tokens: MaPLe concatenates its layer-0
        prompts *before* ln_pre, and a per-token LayerNorm makes the two orders the same."""
        if self.prompts is None:
            return None
        schedule = self.prompts.visual_schedule(self.vision.n_layers, prompt)
        if schedule and self.cfg.prompt_ln_pre and schedule[0] is not None:
            schedule = [self.vision.visual.ln_pre(schedule[0]), *schedule[1:]]
        return schedule

    def plain_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Unprompted, normalised image features (zero-shot CLIP's view of the image)."""
        with torch.no_grad():
            return F.normalize(self.vision(images.to(self.device)).features.float(), dim=-1)

    # --- logits and losses -----------------------------------------------------------------------
    def logits_from(self, views: Sequence[VisionOutput], cw: ClassWeights) -> torch.Tensor:
        """Logits [B, C] of the image views of :meth:`encode_image` against ``cw``."""
        return self._scored(views, cw)[0]

    def _scored(self, views: Sequence[VisionOutput], cw: ClassWeights) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [B, C] and the prompts they were computed with: ``cw.prompts`` [N, C, D], or with a
        meta-net (CoCoOp) each image's own [B, N, C, D] from its per-image text pass."""
        scale = self.logit_scale
        if cw.conditional:
            weights, prompts = self.conditional_weights(views[0].features, cw)
            return scale * torch.einsum("bd,bcd->bc", F.normalize(views[0].features.float(), dim=-1), weights), prompts
        if len(views) == 1:
            return scale * F.normalize(views[0].features.float(), dim=-1) @ cw.weights.t(), cw.prompts
        # per_prompt pass: prompt i's image feature meets prompt i's class embedding, each mixed
        # with the prior as in the single pass; the N views are averaged.
        alpha = self.cfg.alpha
        logits = 0
        for i, out in enumerate(views):
            w_i = F.normalize((1 - alpha) * cw.prompts[i] + alpha * cw.prior, dim=-1)
            logits = logits + F.normalize(out.features.float(), dim=-1) @ w_i.t()
        return scale * logits / len(views), cw.prompts

    def forward(self, images: torch.Tensor, classnames: Sequence[str]) -> torch.Tensor:
        """Logits [B, C] for a batch of preprocessed images and a class list."""
        cw = self.class_weights(classnames)
        return self.logits_from(self.encode_image(images), cw)

    def loss(self, images: torch.Tensor | None, labels: torch.Tensor, classnames: Sequence[str],
             views: Sequence[VisionOutput] | None = None, cache: TensorCache | None = None,
             vision: VisionOutput | None = None) -> dict[str, torch.Tensor]:
        """Training objective: CE plus the weighted terms of :data:`pmpo.losses.TERMS` — per-prompt
        auxiliary CE (β), prior consistency (λ) and PromptSRC's self-regulating terms (L1 text, L1
        image, KL logits) — each computed only when its weight is not 0.

        ``views`` replaces the image pass with features computed earlier; only valid when the image
        side is frozen (:attr:`frozen_image_side`), where they are the same numbers. ``cache`` keeps
        the frozen text features (prior, PromptSRC's teacher) from step to step. ``vision`` (one
        view) is the deprecated spelling of ``views``, kept until 0.3."""
        if vision is not None:
            warnings.warn("PMPOModel.loss(vision=...) is deprecated: pass views=[vision]", DeprecationWarning, stacklevel=2)
            views = [vision] if views is None else views
        cfg = self.cfg
        cw = self.class_weights(classnames, cache=cache)
        if views is None:
            views = self.encode_image(images)
        elif not self.frozen_image_side or cfg.uses_teacher:
            raise InputError(f"method {cfg.method!r} learns inside the image tower: its image features "
                             "cannot be computed ahead of the step")
        feats = [F.normalize(v.features.float(), dim=-1) for v in views]
        logits, prompts = self._scored(views, cw)  # prompts: [N, C, D], or [B, N, C, D] with a meta-net
        labels = labels.to(logits.device)
        ce = F.cross_entropy(logits, labels)
        out = {"logits": logits, "ce": ce, "loss": ce}
        step = Step(labels, logits, feats, prompts, cw.prior, self.logit_scale,
                    frozen_text=lambda: self.teacher_text_features(classnames, cache),
                    frozen_image=lambda: self.plain_image_features(images))
        for term in TERMS:  # in order, so the sum is the same for every method (pmpo.losses)
            weight = getattr(cfg, term.weight)
            value = term.value(step) if weight else None
            if value is not None:
                out[term.name] = value
                out["loss"] = out["loss"] + weight * value
        return out

    @torch.no_grad()
    def per_prompt_logits(self, images: torch.Tensor, classnames: Sequence[str]) -> torch.Tensor:
        """[N, B, C]: what each learned prompt alone would predict (no prior mixed in)."""
        cw = self.class_weights(classnames)
        if cw.prompts is None:
            raise InputError(f"method {self.cfg.method!r} has no learned text prompts")
        views = self.encode_image(images)
        prompts = self.conditional_weights(views[0].features, cw)[1] if cw.conditional else cw.prompts
        views = views if len(views) > 1 else views * len(cw.prompts)
        return torch.stack([
            self.logit_scale * against(F.normalize(v.features.float(), dim=-1), prompts[..., i, :, :])
            for i, v in enumerate(views)
        ])

    @torch.no_grad()
    def zero_shot_logits(self, images: torch.Tensor, classnames: Sequence[str]) -> torch.Tensor:
        """Plain CLIP: unprompted image features against the manual prior."""
        return self.logit_scale * self.plain_image_features(images) @ self.prior_features(classnames).t()

    # --- convenience ---------------------------------------------------------------------------
    def eval_transform(self):
        from .data.transforms import build_transform

        b = self.backbone
        return build_transform(b.image_size, b.mean, b.std, train=False)

    def train_transform(self, min_crop_scale: float = 0.08):
        from .data.transforms import build_transform

        b = self.backbone
        return build_transform(b.image_size, b.mean, b.std, train=True, min_crop_scale=min_crop_scale)

    @torch.no_grad()
    def predict(self, images: Sequence, classnames: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Softmax probabilities [B, C] for PIL images (or paths), with the eval transform applied:
        the class weights once, then one image pass per batch. Nothing about the model changes (no
        mode switch: the frozen CLIP is always in eval mode and the prompts have no dropout)."""
        from .data.loader import load_image

        transform = self.eval_transform()
        pils = [load_image(im) if isinstance(im, (str, bytes)) or hasattr(im, "__fspath__") else im for im in images]
        if not pils:
            raise InputError("no images given")
        out = []
        with torch.no_grad():
            cw = self.class_weights(classnames)
            for start in range(0, len(pils), batch_size):
                batch = torch.stack([transform(im.convert("RGB")) for im in pils[start:start + batch_size]])
                out.append(self.logits_from(self.encode_image(batch), cw).softmax(dim=-1))
        return torch.cat(out)


def build_model(cfg: PMPOConfig, device: str | torch.device = "cpu", backbone: Backbone | None = None) -> PMPOModel:
    """The model of ``cfg``; pass ``backbone`` to share one loaded CLIP between several models."""
    if backbone is None:
        backbone = load_backbone(cfg.model, cfg.pretrained, device=device, quick_gelu=cfg.quick_gelu)
    return PMPOModel(cfg, backbone).to(device)
