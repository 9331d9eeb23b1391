"""The training objective's extra terms: each a name, the config option that weights it, and a
function of the step. Cross-entropy is always there; a term whose weight is 0 is not computed.

A method that needs a new term adds one function and one row of :data:`TERMS` (and its weight
option in :class:`pmpo.config.PMPOConfig`); :meth:`pmpo.model.PMPOModel.loss` adds the terms in
the order of this list, so the loss is the same sum, in the same order, for every method.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def against(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Cosine logits [B, C] of features [B, D] against shared weights [C, D] or per-image ones [B, C, D]."""
    if weights.dim() == 3:
        return torch.einsum("bd,bcd->bc", features, weights)
    return features @ weights.t()


@dataclass
class Step:
    """What the terms of one training step read: tensors, plus the frozen CLIP's views (PromptSRC's
    teacher) as functions that are called on first use, once per step, by whichever term asks first.
    The model fills it in (:meth:`pmpo.model.PMPOModel.loss`); the terms never see the model."""

    labels: torch.Tensor
    logits: torch.Tensor  # [B, C], the prompted model's
    feats: list[torch.Tensor]  # normalised image features, one [B, D] per image pass
    prompts: torch.Tensor | None  # [N, C, D], or [B, N, C, D] per image with a meta-net
    prior: torch.Tensor  # [C, D], the manual prior's class embeddings
    logit_scale: torch.Tensor
    frozen_text: Callable[[], torch.Tensor]  # -> [C, D], the template pool's frozen text features
    frozen_image: Callable[[], torch.Tensor]  # -> [B, D], the unprompted image features

    @functools.cached_property
    def teacher(self) -> torch.Tensor:
        """The frozen text features of the template pool [C, D] (PromptSRC's teacher)."""
        return self.frozen_text()

    @functools.cached_property
    def plain(self) -> torch.Tensor:
        """The frozen image features [B, D] (zero-shot CLIP's view of the batch)."""
        return self.frozen_image()


def aux(step: Step) -> torch.Tensor | None:
    """Per-prompt auxiliary CE (β): each prompt alone must classify, against its own image view."""
    if step.prompts is None:
        return None
    n = step.prompts.shape[-3]
    views = [step.feats[i if len(step.feats) > 1 else 0] for i in range(n)]
    scale = step.logit_scale
    return torch.stack([F.cross_entropy(scale * against(views[i], step.prompts[..., i, :, :]), step.labels)
                        for i in range(n)]).mean()


def consistency(step: Step) -> torch.Tensor | None:
    """Prior consistency (λ): 1 − cosine of the mean prompt's class embedding with the prior's."""
    if step.prompts is None:
        return None
    mean_prompt = F.normalize(step.prompts.mean(-3), dim=-1)
    return (1 - (mean_prompt * step.prior).sum(-1)).mean()


def text_l1(step: Step) -> torch.Tensor | None:
    """PromptSRC (trainers/promptsrc.py): L1 of the prompted class embeddings to the teacher's."""
    if step.prompts is None:
        return None
    return F.l1_loss(step.prompts, step.teacher.expand_as(step.prompts))


def image_l1(step: Step) -> torch.Tensor:
    """PromptSRC: L1 of each prompted image feature to the frozen one (mean over elements)."""
    return torch.stack([F.l1_loss(f, step.plain) for f in step.feats]).mean()


def logit_kl(step: Step) -> torch.Tensor:
    """PromptSRC: KL of the prompted logits to zero-shot CLIP's against the teacher, summed over
    the batch's logits and divided by their number, as their code does."""
    zero_shot = step.logit_scale * step.plain @ step.teacher.t()
    return F.kl_div(F.log_softmax(step.logits, dim=-1), F.log_softmax(zero_shot, dim=-1), reduction="sum",
                    log_target=True) / step.logits.numel()


@dataclass(frozen=True)
class Term:
    name: str  # its key in the loss dict (and in metrics)
    weight: str  # the PMPOConfig option that weights it (0: not computed)
    value: Callable[[Step], torch.Tensor | None]  # None: does not apply to this model


TERMS: tuple[Term, ...] = (
    Term("aux", "aux_weight", aux),
    Term("consistency", "consistency_weight", consistency),
    Term("text_l1", "text_l1_weight", text_l1),
    Term("image_l1", "image_l1_weight", image_l1),
    Term("logit_kl", "logit_kl_weight", logit_kl),
)


__all__ = ["TERMS", "Step", "Term", "against"]
