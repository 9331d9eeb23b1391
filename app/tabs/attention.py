"""The Per-depth attention tab's page: one image's CLS→patch attention per depth segment, patch–text
similarity per prompt and the attention mass on prompt tokens (computed by :mod:`pmpo.app.attention`)."""

from __future__ import annotations

import gradio as gr

from pmpo.errors import PMPOError

from .. import attention as attention_tab
from ..examples import EXAMPLE_CLASSES, example_masks
from ..inputs import as_list, display_name, file_path, load_images, parse_classes
from ..page import PageContext, guarded, notices_md

TITLE = "Per-depth attention"


def build(page: PageContext) -> None:
    state = page.state

    @guarded(lambda message: (None, None))
    def attention(files, image_name, classname, classes_text, templates_text, checkpoint, bb_model, bb_pretrained,
                  request: gr.Request):
        classes, templates = page.task(classes_text, templates_text)
        paths = [file_path(f) for f in as_list(files)]
        if image_name:
            paths = [p for p in paths if display_name(p) == image_name] or paths
        loaded = load_images(paths[:1])
        entry = page.resolve(bb_model, bb_pretrained, checkpoint, request)
        with state.inference.busy():
            maps = attention_tab.attention_maps(state, entry, loaded.images[0], classes.names, templates, classname or None)
        status = (f"**{loaded.names[0]}**, class **{maps.classname}**, {entry.description}. Row 1: CLS→patch attention "
                  "(mean over heads and the segment's layers); row 2: cosine of each patch token with the class "
                  "embedding. " + notices_md(entry.notices) + "\n\n"
                  + attention_tab.truth_table(maps, example_masks(loaded.images[0])))
        return status, attention_tab.maps_figure(maps), attention_tab.mass_figure(maps)

    def image_names(files):
        names = [display_name(file_path(f)) for f in as_list(files)]
        return gr.update(choices=names or [""], value=names[0] if names else "")

    def class_choices(classes_text):
        try:
            names = parse_classes(classes_text).names
        except PMPOError:
            names = []
        return gr.update(choices=[""] + names, value="")

    with gr.Row():
        att_image = gr.Dropdown(label="Image (from the uploaded images)", choices=[""], value="", allow_custom_value=True)
        att_class = gr.Dropdown(label="Class (empty = the model's prediction)",
                                choices=[""] + EXAMPLE_CLASSES, value="", allow_custom_value=True)
        att_btn = gr.Button("Show attention", variant="primary", elem_id="attention-btn")
    att_status = gr.Markdown(elem_id="attention-status")
    # Captions as text above the figures: Gradio's label badge would cover their titles.
    gr.Markdown("**Per-depth-segment maps**")
    att_maps = gr.Plot(show_label=False)
    gr.Markdown("**Attention on prompt tokens per layer**")
    att_mass = gr.Plot(show_label=False)
    att_btn.click(attention, [page.files, att_image, att_class, page.classes, page.templates, page.checkpoint,
                              *page.backbone], [att_status, att_maps, att_mass], api_name="attention")
    page.files.change(image_names, page.files, att_image, api_name=False)
    page.classes.change(class_choices, page.classes, att_class, api_name=False)
