"""The Classify tab's page: top-k of zero-shot CLIP, the prior and the learned prompts, bars, and
what each prompt alone predicts (computed by :mod:`pmpo.app.classify`)."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from .. import classify as classify_tab
from ..features import image_digest
from ..inputs import load_images
from ..page import PageContext, guarded, notices_md

TITLE = "Classify"


def build(page: PageContext) -> None:
    state = page.state

    @guarded(lambda message: (pd.DataFrame(), "", pd.DataFrame(), {"error": message}))
    def classify(files, classes_text, templates_text, checkpoint, top_k, bb_model, bb_pretrained, request: gr.Request,
                 progress=gr.Progress()):  # noqa: B008 (Gradio injects the tracker through this default)
        classes, templates = page.task(classes_text, templates_text)
        loaded = load_images(files)
        entry = page.resolve(bb_model, bb_pretrained, checkpoint, request)

        def text_progress(done: int, total: int) -> None:  # a new long class list: the text passes take a while
            progress(done / max(total, 1), desc=f"text encoder: {done}/{total} sequences")

        for n in loaded.notices + classes.notices:
            gr.Warning(n)
        status = notices_md(entry.notices, classes.notices, loaded.notices) or ""
        status = f"**{len(loaded.names)} image(s), {len(classes.names)} classes** on {entry.spec.label}; {entry.description}.\n\n{status}"
        k = int(top_k)

        def answer(scores: classify_tab.Scores, note: str = ""):
            return (
                status + note,
                pd.DataFrame(classify_tab.topk_rows(scores, k), columns=classify_tab.topk_headers()),
                classify_tab.bar_chart(scores, k),
                pd.DataFrame(classify_tab.per_prompt_rows(scores),
                             columns=classify_tab.per_prompt_headers(classify_tab.per_prompt_k(scores))),
                {**classify_tab.as_json(scores, k), "backbone": entry.spec.label},
            )

        digests = [image_digest(im) for im in loaded.images]  # once: the store is keyed by them
        if classify_tab.needs_two_passes(state, entry, loaded.images, digests):
            # The learned columns after one image pass; zero-shot's plain pass follows.
            with state.inference.busy():
                first = classify_tab.score(state, entry, loaded.images, loaded.names, classes.names, templates,
                                           text_progress, plain_pass=False, digests=digests)
            yield answer(first, f"\n\n*Zero-shot CLIP column ({classify_tab.PENDING}): running the plain image pass…*")
        with state.inference.busy():
            scores = classify_tab.score(state, entry, loaded.images, loaded.names, classes.names, templates, text_progress,
                                        digests=digests)
        yield answer(scores)

    with gr.Row():
        top_k = gr.Slider(1, 10, value=3, step=1, label="top-k")
        classify_btn = gr.Button("Classify", variant="primary", elem_id="classify-btn")
    classify_status = gr.Markdown(elem_id="classify-status")
    topk_table = gr.Dataframe(label="Top-k: zero-shot CLIP | prior with the prompted image | learned prompts",
                              headers=classify_tab.topk_headers(), interactive=False, elem_id="topk-table")
    gr.Markdown("**Top-k per image** (bar: probability; number: the learned column's)")
    topk_plot = gr.HTML(elem_id="topk-bars")
    prompt_table = gr.Dataframe(label="Per-prompt predictions (each learned prompt alone)",
                                headers=classify_tab.per_prompt_headers(), interactive=False)
    with gr.Accordion("Raw result (JSON)", open=False):
        result_json = gr.JSON()
    classify_btn.click(classify, [page.files, page.classes, page.templates, page.checkpoint, top_k, *page.backbone],
                       [classify_status, topk_table, topk_plot, prompt_table, result_json], api_name="classify")
