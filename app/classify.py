"""The Classify tab: zero-shot CLIP, the manual prior and the learned prompts side by side.

Three views of one image batch, all from one prompt model:

* **zero-shot CLIP** — the unprompted image feature against the manual prior (plain CLIP);
* **prior (prompted image)** — the prompted image feature against the prior alone, which
  shows what the visual prompts do on their own;
* **learned** — the prompted image feature against the combined class weights
  ``normalise((1 − α)·mean_i t_i + α·t0)``, i.e. the model's actual prediction;

plus what each of the N prompts would predict alone (its class embeddings only).
Image features come from the app's shared feature store (one pass per image at most, plain and
prompted; the prompted pass only for methods with visual prompts); the text side is cached.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from .features import image_digest
from .served import LoadedModel
from .state import AppState

VIEWS = ("zero-shot CLIP", "prior (prompted image)", "learned")
MAX_CHART_IMAGES = 8


@dataclass
class Scores:
    """Probabilities of every view for a batch: ``probs[view]`` is [B, C]; ``per_prompt`` [N, B, C]."""

    classnames: list[str]
    image_names: list[str]
    probs: dict[str, torch.Tensor]
    per_prompt: torch.Tensor | None
    segments: list[tuple[int, int]]
    learned_label: str
    shared: bool = False  # no visual prompts: the "prior (prompted image)" column is zero-shot's
    passes: int = 0  # image-tower passes the request ran


@torch.no_grad()
def score(state: AppState, entry: LoadedModel, images: Sequence[Image.Image], image_names: Sequence[str],
          classnames: list[str], templates: list[str],
          progress: Callable[[int, int], None] | None = None, plain_pass: bool = True,
          digests: Sequence[str] | None = None) -> Scores:
    """All views for ``images``: at most one plain and one prompted image pass per image (none for
    images the app has seen: :mod:`app.features`), and none of them for a method without visual
    prompts beyond the plain one. ``progress(done, total)`` follows the text passes of a new class
    list.

    ``plain_pass=False`` leaves out the zero-shot column when it would need a pass of its own (a
    method with visual prompts, images not seen yet): the learned columns then cost one pass, and
    the caller can show them while the plain pass runs (:func:`needs_two_passes`)."""
    model = entry.model
    views = state.features.views(entry, images, plain=plain_pass, digests=digests)
    plain, feats = views.plain, views.prompted
    scale = model.logit_scale
    cw = state.class_weights(entry, classnames, templates, progress)
    zero_shot = scale * plain @ cw.prior.t() if plain is not None else None
    prior_view = zero_shot if views.shared else scale * torch.stack([f @ cw.prior.t() for f in feats]).mean(0)
    per_prompt = None
    if cw.conditional:  # CoCoOp: per-image class weights from the (frozen) image feature, one text pass
        weights, prompts = model.conditional_weights(plain, cw)
        learned = scale * torch.einsum("bd,bcd->bc", plain, weights)
        per_prompt = torch.stack([scale * torch.einsum("bd,bcd->bc", plain, prompts[:, i]) for i in range(prompts.shape[1])])
    elif cw.prompts is not None:
        alpha = model.cfg.alpha
        if len(feats) == 1:
            learned = scale * feats[0] @ cw.weights.t()
        else:
            # Prompt i's view of the image (its own pass under per_prompt) meets its class
            # embeddings mixed with the prior, as in PMPOModel.logits_from.
            mixed = [F.normalize((1 - alpha) * cw.prompts[i] + alpha * cw.prior, dim=-1) for i in range(len(cw.prompts))]
            learned = scale * torch.stack([feats[i] @ mixed[i].t() for i in range(len(feats))]).mean(0)
        per_prompt = torch.stack([
            scale * feats[i if len(feats) > 1 else 0] @ cw.prompts[i].t() for i in range(len(cw.prompts))
        ])
    else:
        learned = scale * feats[0] @ cw.weights.t()
    rows = {VIEWS[0]: zero_shot, VIEWS[1]: prior_view, VIEWS[2]: learned}
    probs = {v: r.softmax(-1).cpu() for v, r in rows.items() if r is not None}
    segments = list(model.prompts.segments) if model.prompts is not None else []
    return Scores(list(classnames), list(image_names), probs,
                  per_prompt.softmax(-1).cpu() if per_prompt is not None else None,
                  segments, f"learned ({entry.choice})", views.shared, views.passes)


def needs_two_passes(state: AppState, entry: LoadedModel, images: Sequence[Image.Image],
                     digests: Sequence[str] | None = None) -> bool:
    """True when Classify would run both a plain and a prompted pass for some image: then the
    learned columns can be shown after the first (``score(..., plain_pass=False)``). ``digests``:
    the images' ``image_digest`` when the caller has them."""
    if entry.model.frozen_image_side:
        return False
    plain, prompted = state.features.missing(entry, digests or [image_digest(im) for im in images])
    return plain > 0 and prompted > 0


PENDING = "…"  # a column whose pass is still running


def topk_rows(scores: Scores, k: int) -> list[list]:
    """Rows: image, rank, then "class · p %" for each view: one column per view keeps the learned
    column (the main result) on screen at laptop widths (the exact numbers are in the JSON)."""
    k = max(1, min(int(k), len(scores.classnames)))
    rows = []
    tops = {v: scores.probs[v].topk(k, dim=-1) for v in VIEWS if v in scores.probs}
    for b, name in enumerate(scores.image_names):
        for r in range(k):
            row: list = [name, r + 1]
            for v in VIEWS:
                if v not in tops:
                    row.append(PENDING)
                    continue
                p, i = tops[v]
                row.append(f"{scores.classnames[int(i[b, r])]} · {100 * float(p[b, r]):.1f} %")
            rows.append(row)
    return rows


def topk_headers() -> list[str]:
    return ["image", "rank", *VIEWS]


PER_PROMPT_K = 2  # each prompt's top-2 alone


def per_prompt_k(scores: Scores, k: int = PER_PROMPT_K) -> int:
    """The k that per_prompt_rows and per_prompt_headers both use: capped at the number of classes."""
    return max(1, min(int(k), len(scores.classnames)))


def per_prompt_rows(scores: Scores, k: int = PER_PROMPT_K) -> list[list]:
    """Rows: image, prompt, its vision layers, then its top-k (class, %) alone."""
    if scores.per_prompt is None:
        return []
    k = per_prompt_k(scores, k)
    p, idx = scores.per_prompt.topk(k, dim=-1)  # [N, B, k]
    rows = []
    for b, name in enumerate(scores.image_names):
        for i in range(p.shape[0]):
            layers = f"{scores.segments[i][0]}–{scores.segments[i][1]}" if i < len(scores.segments) else "text only"
            row: list = [name, f"prompt {i + 1}", layers]
            for r in range(k):
                row += [scores.classnames[int(idx[i, b, r])], round(100 * float(p[i, b, r]), 2)]
            rows.append(row)
    return rows


def per_prompt_headers(k: int = PER_PROMPT_K) -> list[str]:
    out = ["image", "prompt", "vision layers"]
    for r in range(1, k + 1):
        out += [f"top-{r}", f"top-{r} %"]
    return out


def as_json(scores: Scores, k: int) -> dict:
    """Everything the tables show, as plain data (what API clients read)."""
    k = max(1, min(int(k), len(scores.classnames)))
    images = []
    for b, name in enumerate(scores.image_names):
        item = {"image": name}
        for v in VIEWS:
            if v not in scores.probs:
                continue  # still running (only in the first of two answers)
            p, i = scores.probs[v][b].topk(k)
            item[v] = [[scores.classnames[int(j)], round(float(q), 6)] for q, j in zip(p, i)]
        if scores.per_prompt is not None:
            item["per_prompt"] = [scores.classnames[int(j)] for j in scores.per_prompt[:, b].argmax(-1)]
        images.append(item)
    return {"classes": scores.classnames, "learned": scores.learned_label, "images": images}


COLOURS = ("#7f7f7f", "#1f77b4", "#d62728")  # zero-shot, prior with the prompted image, learned


def bar_chart(scores: Scores, k: int) -> str:
    """One block per image (at most MAX_CHART_IMAGES): the union of the views' top-k classes, one
    bar per view and class, as HTML the browser draws. A server-side figure cost ~0.4 s per request
    (mostly PNG encoding) — more than the whole answer when the features are cached."""
    k = max(1, min(int(k), len(scores.classnames), 10))
    n = min(len(scores.image_names), MAX_CHART_IMAGES)
    labels = [scores.learned_label if v == "learned" else v for v in VIEWS]
    legend = " ".join(f'<span style="color:{c}">&#9632;</span> {html.escape(label)}' for c, label in zip(COLOURS, labels))
    parts = [f'<div class="pmpo-bars" style="font-size:12px;line-height:1.25">'
             f'<div style="margin-bottom:6px">{legend}</div>']
    for b in range(n):
        ids = list(dict.fromkeys(int(i) for v in reversed(VIEWS) if v in scores.probs for i in scores.probs[v][b].topk(k).indices))
        parts.append(f'<div style="margin:8px 0 2px;font-weight:600">{html.escape(scores.image_names[b][:60])}</div>'
                     '<table style="border-collapse:collapse;width:100%">')
        for i in ids:
            bars = "".join(
                f'<div title="{html.escape(label)}: {100 * float(scores.probs[v][b][i]):.1f} %" style="height:5px;margin:1px 0;'
                f'background:{c};width:{max(0.5, 100 * float(scores.probs[v][b][i])):.1f}%"></div>'
                for v, c, label in zip(VIEWS, COLOURS, labels) if v in scores.probs)
            top = 100 * float(scores.probs[VIEWS[2]][b][i])
            parts.append(f'<tr><td style="width:32%;padding:1px 6px 1px 0;white-space:nowrap;overflow:hidden;'
                         f'text-overflow:ellipsis;max-width:220px">{html.escape(scores.classnames[i][:40])}</td>'
                         f'<td style="padding:1px 0">{bars}</td><td style="width:52px;text-align:right">{top:.1f} %</td></tr>')
        parts.append("</table>")
    if len(scores.image_names) > n:
        parts.append(f"<div>first {n} of {len(scores.image_names)} images (all are in the table)</div>")
    parts.append("</div>")
    return "".join(parts)
