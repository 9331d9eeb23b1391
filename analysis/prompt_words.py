"""Prompt interpretation: the vocabulary words nearest to each learned context vector.

CoOp reads its learned context back as words by searching the token-embedding matrix for the
nearest neighbours of every context vector. We do the same for each of the N prompts, with both
metrics people report — cosine similarity and Euclidean distance — because they can disagree
(token embeddings differ in norm, and learned vectors drift in norm). Deep text prompts (MaPLe,
``text_depth > 1``) are listed too, with their text layer; those vectors live in a deeper layer's
space, so their "words" are only a rough reading.

The figure shows, per prompt and position, the top-1 word and how close it is: a learned
vector far from every word (low cosine) is not a word any more, whatever its nearest token is.

Outputs: ``prompt_words.{csv,md}`` (top-k per vector and metric), ``prompt_words.{png,pdf}``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pmpo.errors import InputError

from . import common, style

NAME = "prompt_words"
DESCRIPTION = "Nearest vocabulary tokens of every learned context vector (cosine and Euclidean)."
METRICS = ("cosine", "euclidean")


@dataclass
class Neighbour:
    prompt: int  # 0-based prompt id
    layer: int  # 0 = the input context; j >= 1 = deep text prompt of text layer j
    position: int  # context position 0..M-1
    metric: str
    rank: int  # 1 = nearest
    token_id: int
    token: str
    score: float  # cosine similarity, or Euclidean distance


def context_vectors(model) -> list[tuple[int, int, torch.Tensor]]:
    """(prompt, layer, [M, d_t]) for the input context and each deep text prompt."""
    if model.prompts is None or model.prompts.ctx is None:  # zero-shot, or VPT (visual tokens only)
        raise InputError(f"method {model.cfg.method!r} has no learned prompts to interpret (no text context)")
    out = [(i, 0, model.prompts.ctx[i]) for i in range(model.prompts.n_prompts)]
    if model.prompts.deep_ctx is not None:
        deep = model.prompts.deep_ctx  # [N, D_t - 1, M, d_t]
        out += [(i, j + 1, deep[i, j]) for i in range(deep.shape[0]) for j in range(deep.shape[1])]
    return out


@torch.no_grad()
def nearest_tokens(vectors: torch.Tensor, vocab: torch.Tensor, k: int, metric: str,
                   chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` vocabulary rows for each of ``vectors`` [M, d]: (scores [M, k], ids [M, k]).

    Cosine: highest similarity first. Euclidean: smallest distance first. The vocabulary is
    scanned in chunks so a 49k × 768 matrix never needs a second full-size copy.
    """
    if metric not in METRICS:
        raise InputError(f"metric must be one of {METRICS}, got {metric!r}")
    k = min(k, vocab.shape[0])
    v = vectors.float()
    best_s = torch.empty(v.shape[0], 0)
    best_i = torch.empty(v.shape[0], 0, dtype=torch.long)
    vn = F.normalize(v, dim=-1)
    for start in range(0, vocab.shape[0], chunk):
        w = vocab[start:start + chunk].float().to(v.device)
        if metric == "cosine":
            s = vn @ F.normalize(w, dim=-1).t()
        else:
            s = -torch.cdist(v, w)  # negated so larger is nearer in both cases
        s, i = s.topk(min(k, s.shape[1]), dim=-1)
        best_s = torch.cat([best_s, s.cpu()], 1)
        best_i = torch.cat([best_i, (i + start).cpu()], 1)
        best_s, order = best_s.topk(min(k, best_s.shape[1]), dim=-1)
        best_i = best_i.gather(1, order)
    return (best_s if metric == "cosine" else -best_s), best_i


def interpret(model, k: int = 5) -> list[Neighbour]:
    """Top-``k`` nearest tokens of every context vector under both metrics."""
    if k < 1:
        raise InputError(f"--top-k must be >= 1, got {k}")
    vocab = model.text.token_embedding_matrix.detach()
    rows: list[Neighbour] = []
    for prompt, layer, ctx in context_vectors(model):
        for metric in METRICS:
            scores, ids = nearest_tokens(ctx.detach(), vocab, k, metric)
            words = model.text.decode(ids.flatten().tolist())
            for pos in range(ids.shape[0]):
                for r in range(ids.shape[1]):
                    rows.append(Neighbour(prompt, layer, pos, metric, r + 1, int(ids[pos, r]),
                                          words[pos * ids.shape[1] + r], float(scores[pos, r])))
    return rows


def markdown_table(rows: Sequence[Neighbour], n_ctx: int) -> str:
    """One line per prompt (and deep layer): the top-1 word of each position, both metrics."""
    top = {(r.prompt, r.layer, r.position, r.metric): r for r in rows if r.rank == 1}
    keys = sorted({(r.prompt, r.layer) for r in rows})
    head = "| prompt | layer | " + " | ".join(f"ctx {j + 1}" for j in range(n_ctx)) + " |"
    lines = [head, "|" + "---|" * (n_ctx + 2)]
    for p, layer in keys:
        cells = []
        for j in range(n_ctx):
            c, e = top[(p, layer, j, "cosine")], top[(p, layer, j, "euclidean")]
            cells.append(f"{_md(c.token)} ({c.score:.2f}) / {_md(e.token)} ({e.score:.2f})")
        lines.append(f"| P{p + 1} | {layer} | " + " | ".join(cells) + " |")
    note = ("\nEach cell: nearest token by cosine (similarity) / by Euclidean distance (distance); "
            "layer 0 is the input context, layer j ≥ 1 a deep text prompt.\n")
    return "\n".join(lines) + "\n" + note


def _md(token: str) -> str:
    return "`" + (token.replace("|", "\\|").replace("`", "'") or " ") + "`"


def plot(rows: Sequence[Neighbour], n_ctx: int, out: Path) -> list[Path]:
    top = {(r.prompt, r.layer, r.position): r for r in rows if r.rank == 1 and r.metric == "cosine"}
    keys = sorted({(p, l) for p, l, _ in top})
    sim = np.array([[top[(p, l, j)].score for j in range(n_ctx)] for p, l in keys])
    width = style.COLUMN_WIDTH if n_ctx <= 8 else style.PAGE_WIDTH
    height = 0.32 * len(keys) + 0.55
    fig, ax = style.figure(width, aspect=height / width)
    im = ax.imshow(sim, cmap="viridis", vmin=min(0.0, float(sim.min())), vmax=1.0, aspect="auto")
    for a, (p, l) in enumerate(keys):
        for j in range(n_ctx):
            ax.text(j, a, style.short_label(top[(p, l, j)].token, 10), ha="center", va="center", fontsize=5.5,
                    color="white" if sim[a, j] < 0.6 else "black")
    ax.set_xticks(range(n_ctx), [f"ctx {j + 1}" for j in range(n_ctx)])
    ax.set_yticks(range(len(keys)), [f"P{p + 1}" + (f" L{l}" if l else "") for p, l in keys])
    ax.tick_params(length=0)
    for s in ax.spines.values():
        s.set_visible(False)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="cosine to nearest token")
    return style.save_figure(fig, out, "prompt_words")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_common_args(parser, NAME)
    parser.add_argument("--top-k", type=int, default=5, help="neighbours per vector and metric (default: 5)")


def run(args: argparse.Namespace) -> list[Path]:
    out = common.prepare_out(args)
    model = common.load_model(args)
    rows = interpret(model, args.top_k)
    n_ctx = model.prompts.n_ctx
    csv_path = style.write_csv(out / "prompt_words.csv", (vars(r) | {"prompt": r.prompt + 1, "position": r.position + 1} for r in rows),
                               ["prompt", "layer", "position", "metric", "rank", "token_id", "token", "score"])
    md_path = out / "prompt_words.md"
    md_path.write_text(markdown_table(rows, n_ctx), encoding="utf-8")
    return [csv_path, md_path] + plot(rows, n_ctx, out)


def main(argv: Sequence[str] | None = None) -> int:
    return common.main_for(NAME, add_arguments, run, DESCRIPTION, argv)


if __name__ == "__main__":
    raise SystemExit(main())
