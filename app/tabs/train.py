"""The Train tab's page: labelled images in, a live run with held-out scores out, the prompts saved
and selected in the checkpoint picker (the run itself is :mod:`pmpo.app.train`'s)."""

from __future__ import annotations

import logging
import uuid

import gradio as gr
import pandas as pd

from pmpo.errors import PMPOError

from .. import recipe, trainset
from .. import train as train_tab
from ..page import PageContext, error_text
from ..served import BackboneSpec

log = logging.getLogger("pmpo.app.ui")

TITLE = "Train"
INTRO = ("Few-shot prompt training on your images: files labelled by their names "
         "(`golden_retriever_3.jpg` → *golden retriever*), or a zip with one folder per class. "
         "One image in four per class is **held out**: the run scores the prompts on them, "
         "beside zero-shot CLIP, while it trains.")


def build(page: PageContext) -> None:
    state = page.state
    jobs = train_tab.TrainJobs()
    limits = train_tab.TrainLimits.from_env()

    # The data comes as uploaded files (+ labels), a zip or a server folder: whichever an API call
    # leaves out is None, so the client must not require the two file inputs (Gradio marks a
    # parameter optional when the handler defaults it to None). The rest default to the page's values.
    def train(train_files=None, label_table=None, zip_file=None, folder="", method=None, epochs=None, time_budget=None,
              name="", bb_model="", bb_pretrained="", request: gr.Request = None):
        key = (request.session_hash if request is not None else None) or uuid.uuid4().hex
        stop = None
        empty_plot = train_tab.progress_frame([], {})
        try:
            if zip_file is not None:
                items, names = trainset.items_from_zip(zip_file, state.cache_dir / "uploads")
            elif folder and folder.strip():
                items, names = trainset.items_from_folder(folder)
            else:
                items, names = trainset.items_from_table(train_files, label_table)
            limits.check_images(len(items))
            spec = page.spec(bb_model, bb_pretrained)
            stop = jobs.start(key)
            yield (f"Training **{method}** on {len(items)} images of {len(names)} classes ({', '.join(names[:8])}"
                   f"{'…' if len(names) > 8 else ''}) on {spec.label}…", empty_plot, {"phase": "starting"}, None, gr.update())
            for upd in train_tab.run_training(state, spec, method, int(epochs), items, names, stop, name=name,
                                              session=key, budget_s=limits.budget(time_budget)):
                if upd.error:
                    gr.Warning(upd.status)
                dropdown = (gr.update(choices=state.checkpoint_choices(key), value=upd.choice) if upd.choice
                            else gr.update())
                yield (("**Error:** " if upd.error else "") + upd.status, train_tab.progress_frame(upd.history, upd.report),
                       upd.report, upd.checkpoint, dropdown)
        except Exception as exc:
            if not isinstance(exc, PMPOError):
                log.exception("training failed")
            gr.Warning(error_text(exc))
            yield f"**Error:** {error_text(exc)}", empty_plot, {"error": error_text(exc)}, None, gr.update()
        finally:
            if stop is not None:
                jobs.finish(key, stop)

    def train_overview(train_files, label_table, method, epochs, time_budget, bb_model, bb_pretrained):
        """Counts per class, one thumbnail per class and the estimate, for what is selected now."""
        try:
            rows = trainset.class_summary(train_files, label_table)
            thumbs = trainset.class_thumbnails(train_files, label_table)
            n_images = sum(r[1] for r in rows)
            line = recipe.describe_estimate(state, page.spec(bb_model, bb_pretrained), method, n_images,
                                            len(rows), int(epochs), limits.budget(time_budget))
        except Exception as exc:
            if not isinstance(exc, PMPOError):
                log.exception("train overview failed")
            return pd.DataFrame(columns=trainset.SUMMARY_HEADERS), [], f"*{error_text(exc)}*"
        return pd.DataFrame(rows, columns=trainset.SUMMARY_HEADERS), thumbs, line

    def use_train_examples(bb_model, bb_pretrained):
        return trainset.example_set_for(page.spec(bb_model, bb_pretrained), state.cache_dir / "train-examples")

    def cancel(request: gr.Request):
        key = request.session_hash if request is not None else None
        if key and jobs.cancel(key):
            return "Cancelling after the current step…"
        return "No training is running in this session."

    gr.Markdown(INTRO, elem_id="train-intro")
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=280):
            train_files = gr.File(label="Training images", file_count="multiple", height=90, elem_id="train-files")
            with gr.Row():
                train_examples_btn = gr.Button("Use example training images", size="sm", elem_id="train-examples-btn")
                train_zip = gr.File(label="…or a zip (class folders)", file_count="single", file_types=[".zip"],
                                    height=90, min_width=120)
            train_examples_note = gr.Markdown(trainset.example_note(state.default_spec), elem_id="train-examples-note")
        with gr.Column(scale=3, min_width=320):
            train_summary = gr.Dataframe(headers=trainset.SUMMARY_HEADERS, interactive=False, max_height=170,
                                         label="Classes", elem_id="train-summary")
            train_thumbs = gr.Gallery(label="One image per class", columns=10, rows=1, height=84, allow_preview=False,
                                      show_label=False, elem_id="train-thumbs")
    with gr.Accordion("Edit labels (one row per file) or read a server folder", open=False):
        label_table = gr.Dataframe(headers=["file", "label"], datatype=["str", "str"], column_count=(2, "fixed"),
                                   interactive=True, max_height=260, label="Labels")
        train_folder = gr.Textbox(label="…or a local folder with class subfolders", value="",
                                  visible=trainset.local_paths_allowed())
    with gr.Row():
        train_method = gr.Dropdown(list(recipe.TRAIN_METHODS), value="pmpo", label="Method", min_width=100)
        train_epochs = gr.Slider(1, recipe.MAX_EPOCHS, value=recipe.default_epochs(state.default_spec), step=1,
                                 label="Epochs (at most)", elem_id="train-epochs")
        most = limits.max_seconds or recipe.MAX_BUDGET_S
        train_budget = gr.Slider(0, most, value=min(recipe.DEFAULT_BUDGET_S, most), step=10, elem_id="train-budget",
                                 label="Time budget, s (0 = " + (f"the limit, {limits.max_seconds:.0f} s)"
                                                                 if limits.max_seconds else "none)"))
        train_name = gr.Textbox(label="Checkpoint name (optional)", value="", min_width=120)
    train_estimate = gr.Markdown(elem_id="train-estimate")
    gr.Markdown(limits.describe(), elem_id="train-limits")
    with gr.Row():
        train_btn = gr.Button("Train", variant="primary", elem_id="train-btn")
        cancel_btn = gr.Button("Cancel (keeps what was learned)", variant="stop", elem_id="cancel-btn")
    cancel_status = gr.Markdown(elem_id="cancel-status")  # apart: never hides the run's own last word
    train_status = gr.Markdown(elem_id="train-status")
    train_plot = gr.LinePlot(None, x="step", y="accuracy", color="series", color_map=train_tab.SERIES, y_lim=[0, 100],
                             height=290, label="Accuracy (%) while training", elem_id="train-plot")
    with gr.Row():
        train_download = gr.File(label="Trained prompts (.safetensors)", interactive=False, height=60)
        with gr.Accordion("Run report (JSON)", open=False):
            train_report = gr.JSON(elem_id="train-report")

    overview_inputs = [train_files, label_table, train_method, train_epochs, train_budget, *page.backbone]
    overview_outputs = [train_summary, train_thumbs, train_estimate]
    train_files.change(trainset.label_rows, train_files, label_table, api_name=False).then(
        train_overview, overview_inputs, overview_outputs, api_name=False)
    for control in (label_table, train_method, train_epochs, train_budget):
        control.input(train_overview, overview_inputs, overview_outputs, api_name=False)
    train_examples_btn.click(use_train_examples, page.backbone, train_files, api_name=False)
    page.bb_model.change(lambda m, p: trainset.example_note(BackboneSpec.of(m, p)) if (m or "").strip() else "",
                         page.backbone, train_examples_note, api_name=False)
    train_btn.click(train, [train_files, label_table, train_zip, train_folder, train_method, train_epochs, train_budget,
                            train_name, *page.backbone],
                    [train_status, train_plot, train_report, train_download, page.checkpoint], api_name="train",
                    concurrency_limit=limits.max_concurrent, concurrency_id="train")
    cancel_btn.click(cancel, None, cancel_status, api_name="cancel_training", concurrency_limit=None)
    train_btn.click(lambda: "", None, cancel_status, api_name=False)
