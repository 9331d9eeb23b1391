"""The Embeddings tab's page: image features and each prompt's class embeddings in 2-D, coloured by
class, with hover (computed by :mod:`pmpo.app.embeddings`)."""

from __future__ import annotations

import gradio as gr

from .. import embeddings as embeddings_tab
from ..inputs import load_images
from ..page import PageContext, guarded, notices_md

TITLE = "Embeddings"


def build(page: PageContext) -> None:
    state = page.state

    @guarded(lambda message: (None, None))
    def embeddings(files, method, classes_text, templates_text, checkpoint, bb_model, bb_pretrained, request: gr.Request):
        classes, templates = page.task(classes_text, templates_text)
        loaded = load_images(files)
        entry = page.resolve(bb_model, bb_pretrained, checkpoint, request)
        with state.inference.busy():
            emb = embeddings_tab.embed(state, entry, loaded.images, loaded.paths, loaded.names, classes.names, templates, method)
        status = (f"{len(emb.frame)} points ({len(loaded.names)} images × 2 views, {len(classes.names)} classes × "
                  f"{emb.frame['source'].str.startswith('text').sum() // max(1, len(classes.names))} text sources), {method}. "
                  "Hover a point to see it. " + notices_md(entry.notices, loaded.notices))
        scatter = gr.ScatterPlot(value=emb.frame, color_map=embeddings_tab.class_colours(emb))
        return status, scatter, embeddings_tab.figure(emb)

    with gr.Row():
        emb_method = gr.Radio(list(embeddings_tab.METHODS), value="UMAP", label="Projection")
        emb_btn = gr.Button("Map embeddings", variant="primary", elem_id="embeddings-btn")
    emb_status = gr.Markdown(elem_id="embeddings-status")
    emb_scatter = gr.ScatterPlot(x="x", y="y", color="class", tooltip=["item", "source", "class"],
                                 label="Images and class texts (hover for details)")
    # No fixed height: with one, Gradio's Vega plot fills it and clips its own legend.
    gr.Markdown("**Static view** (colour = class, marker = source)")
    emb_figure = gr.Plot(show_label=False)
    emb_btn.click(embeddings, [page.files, emb_method, page.classes, page.templates, page.checkpoint, *page.backbone],
                  [emb_status, emb_scatter, emb_figure], api_name="embeddings")
