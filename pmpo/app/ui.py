"""The Gradio Blocks layout and the thin handlers that connect it to the tab modules.

Handlers do three things only: turn component values into clean inputs (:mod:`app.inputs`),
fetch the shared model (:class:`app.state.AppState`), and call one tab module. Every user
error (:class:`pmpo.errors.PMPOError`) becomes a toast plus a visible message and an empty
result; an unexpected exception is logged with its traceback and reported the same way, so
the app keeps serving whatever a request sends.
"""

from __future__ import annotations

import functools
import inspect
import logging
import uuid
from typing import Callable

import gradio as gr
import pandas as pd

from pmpo.errors import PMPOError

from . import attention as attention_tab
from . import benchmarks as benchmarks_tab
from . import classify as classify_tab
from . import embeddings as embeddings_tab
from . import recipe, trainset
from . import train as train_tab
from .features import image_digest
from .inputs import as_list, display_name, file_path, load_images, parse_classes, parse_templates
from .refusals import Page
from .state import EXAMPLE_CLASSES, UNTRAINED, AppState, BackboneSpec, example_images, example_masks

log = logging.getLogger(__name__)

TITLE = "PMPO — multi-prompt, depth-partitioned prompt learning for CLIP"
INTRO = (
    f"# {TITLE}\n"
    "Compare **zero-shot CLIP**, the **manual prior** and **learned prompts** side by side, see where each "
    "depth-segment prompt looks, map image and text embeddings, and train prompts on your own images. "
    "PMPO here is a *reconstruction* of arXiv 2305.06221 (no official code exists); every uncertain choice is an option."
)
DEFAULT_TEMPLATES = "a photo of a {}."
CONCURRENCY = 2  # CPU inference: more parallel requests only split the same cores


def error_text(exc: BaseException) -> str:
    if isinstance(exc, PMPOError):
        return str(exc)
    return f"Internal error ({type(exc).__name__}: {exc}). The app is still running; please report this."


def guarded(empty: Callable[[str], tuple]) -> Callable:
    """Run a handler; on any exception show a toast and return ``("**Error:** …", *empty(message))``."""

    def wrap(fn: Callable) -> Callable:
        def failed(exc: Exception):
            if not isinstance(exc, PMPOError):
                log.exception("handler %s failed", fn.__name__)
            message = error_text(exc)
            gr.Warning(message)
            rest = empty(message)
            return (f"**Error:** {message}", *rest) if rest else f"**Error:** {message}"

        if inspect.isgeneratorfunction(fn):  # a handler that answers in stages
            @functools.wraps(fn)
            def stream(*args, **kwargs):
                try:
                    yield from fn(*args, **kwargs)
                except Exception as exc:  # noqa: BLE001 - the UI must survive any request
                    yield failed(exc)

            return stream

        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - the UI must survive any request
                return failed(exc)

        return inner

    return wrap


def session_of(request: gr.Request | None) -> str | None:
    """The browser (or API client) session a request comes from: uploads and trainings are its own."""
    return getattr(request, "session_hash", None) if request is not None else None


def notices_md(*groups: list[str]) -> str:
    lines = [n for g in groups for n in g if n]
    return "\n\n".join(f"ℹ️ {n}" for n in lines)


def build_demo(state: AppState) -> gr.Blocks:
    """The whole app; ``state`` holds the models and is shared by every session."""
    examples = example_images(state.cache_dir / "examples")
    jobs = train_tab.TrainJobs()
    limits = train_tab.TrainLimits.from_env()

    def resolve(bb_model: str, bb_pretrained: str, choice: str, request: gr.Request | None):
        return state.model(BackboneSpec.of(bb_model, bb_pretrained), choice or state.default_choice, session_of(request))

    def task(classes_text: str, templates_text: str):
        classes = parse_classes(classes_text)
        templates = parse_templates(templates_text)
        return classes, templates

    # --- handlers -----------------------------------------------------------------------------
    @guarded(lambda message: (pd.DataFrame(), "", pd.DataFrame(), {"error": message}))
    def classify(files, classes_text, templates_text, checkpoint, top_k, bb_model, bb_pretrained, request: gr.Request,
                 progress=gr.Progress()):
        classes, templates = task(classes_text, templates_text)
        loaded = load_images(files)
        entry = resolve(bb_model, bb_pretrained, checkpoint, request)

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

    @guarded(lambda message: (None, None))
    def attention(files, image_name, classname, classes_text, templates_text, checkpoint, bb_model, bb_pretrained,
                  request: gr.Request):
        classes, templates = task(classes_text, templates_text)
        paths = [file_path(f) for f in as_list(files)]
        if image_name:
            paths = [p for p in paths if display_name(p) == image_name] or paths
        loaded = load_images(paths[:1])
        entry = resolve(bb_model, bb_pretrained, checkpoint, request)
        with state.inference.busy():
            maps = attention_tab.attention_maps(state, entry, loaded.images[0], classes.names, templates, classname or None)
        status = (f"**{loaded.names[0]}**, class **{maps.classname}**, {entry.description}. Row 1: CLS→patch attention "
                  "(mean over heads and the segment's layers); row 2: cosine of each patch token with the class "
                  "embedding. " + notices_md(entry.notices) + "\n\n"
                  + attention_tab.truth_table(maps, example_masks(loaded.images[0])))
        return status, attention_tab.maps_figure(maps), attention_tab.mass_figure(maps)

    @guarded(lambda message: (None, None))
    def embeddings(files, method, classes_text, templates_text, checkpoint, bb_model, bb_pretrained, request: gr.Request):
        classes, templates = task(classes_text, templates_text)
        loaded = load_images(files)
        entry = resolve(bb_model, bb_pretrained, checkpoint, request)
        with state.inference.busy():
            emb = embeddings_tab.embed(state, entry, loaded.images, loaded.paths, loaded.names, classes.names, templates, method)
        status = (f"{len(emb.frame)} points ({len(loaded.names)} images × 2 views, {len(classes.names)} classes × "
                  f"{emb.frame['source'].str.startswith('text').sum() // max(1, len(classes.names))} text sources), {method}. "
                  "Hover a point to see it. " + notices_md(entry.notices, loaded.notices))
        scatter = gr.ScatterPlot(value=emb.frame, color_map=embeddings_tab.class_colours(emb))
        return status, scatter, embeddings_tab.figure(emb)

    @guarded(lambda message: (gr.update(),))
    def upload_checkpoint(file, bb_model, bb_pretrained, request: gr.Request):
        if file is None:
            return "", gr.update()
        session = session_of(request)
        spec = BackboneSpec.of(bb_model, bb_pretrained)
        # Built before it is offered: a checkpoint that does not fit this backbone never enters the picker.
        path = file_path(file)
        choice = state.add_checkpoint_file(path, name=display_name(path), session=session, spec=spec)
        entry = state.model(spec, choice, session)
        return (f"Loaded **{choice}**: {entry.description}. " + notices_md(entry.notices),
                gr.update(choices=state.checkpoint_choices(session), value=choice))

    @guarded(lambda message: ())
    def load_backbone(bb_model, bb_pretrained):
        spec = BackboneSpec.of(bb_model, bb_pretrained)
        backbone = state.backbone(spec)
        return f"Backbone ready: **{spec.label}** (image size {backbone.image_size})."

    def end_session(request: gr.Request):
        if session_of(request):
            state.drop_session(session_of(request))

    def refresh_choices(current: str, request: gr.Request):
        choices = state.checkpoint_choices(session_of(request))
        return gr.update(choices=choices, value=current if current in choices else state.default_choice)

    def use_examples():
        return examples, "\n".join(EXAMPLE_CLASSES)

    def image_names(files):
        names = [display_name(file_path(f)) for f in as_list(files)]
        return gr.update(choices=names or [""], value=names[0] if names else "")

    def class_choices(classes_text):
        try:
            names = parse_classes(classes_text).names
        except PMPOError:
            names = []
        return gr.update(choices=[""] + names, value="")

    def train(train_files, label_table, zip_file, folder, method, epochs, time_budget, name, bb_model, bb_pretrained,
              request: gr.Request):
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
            spec = BackboneSpec.of(bb_model, bb_pretrained)
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
        except Exception as exc:  # noqa: BLE001
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
            line = recipe.describe_estimate(state, BackboneSpec.of(bb_model, bb_pretrained), method, n_images,
                                               len(rows), int(epochs), limits.budget(time_budget))
        except Exception as exc:  # noqa: BLE001 - an overview must never break the page
            if not isinstance(exc, PMPOError):
                log.exception("train overview failed")
            return pd.DataFrame(columns=trainset.SUMMARY_HEADERS), [], f"*{error_text(exc)}*"
        return pd.DataFrame(rows, columns=trainset.SUMMARY_HEADERS), thumbs, line

    def use_train_examples(bb_model, bb_pretrained):
        return trainset.example_set_for(BackboneSpec.of(bb_model, bb_pretrained), state.cache_dir / "train-examples")

    def cancel(request: gr.Request):
        key = request.session_hash if request is not None else None
        if key and jobs.cancel(key):
            return "Cancelling after the current step…"
        return "No training is running in this session."

    @guarded(lambda message: (pd.DataFrame(), pd.DataFrame(), None))
    def benchmarks(results_dir):
        view = benchmarks_tab.build_view(results_dir)
        return view.status, view.reference, view.ours, view.figure

    # --- layout ---------------------------------------------------------------------------------
    with Page(title="PMPO demo", fill_width=True) as demo:
        gr.Markdown(INTRO)
        gr.Markdown(notices_md(state.notices), elem_id="startup-notice", visible=bool(state.notices))
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=320):
                files = gr.File(label="Images", file_count="multiple", elem_id="images")
                examples_btn = gr.Button("Use example images (ShapeWorld)", size="sm", elem_id="examples-btn")
                classes = gr.Textbox(label="Classes (one per line, or comma-separated)", lines=6,
                                     value="\n".join(EXAMPLE_CLASSES), elem_id="classes")
                templates = gr.Textbox(label="Manual templates (one per line, {} = class name)", lines=2,
                                       value=DEFAULT_TEMPLATES, elem_id="templates")
                checkpoint = gr.Dropdown(label="Prompt checkpoint", choices=state.checkpoint_choices(),
                                         value=state.default_choice, elem_id="checkpoint")
                ckpt_upload = gr.File(label="Upload a prompt checkpoint (.safetensors)", file_count="single", height=130)
                ckpt_status = gr.Markdown()
                with gr.Accordion("Backbone (frozen CLIP)", open=False):
                    allowed = state.allowed_backbones()
                    if allowed is not None:
                        gr.Markdown("On this public Space only these backbones load: "
                                    + ", ".join(f"`{a.model}`" + (f" + `{a.pretrained}`" if a.pretrained else "") for a in allowed)
                                    + ". Run the app yourself for any other.")
                    bb_model = gr.Textbox(label="open_clip model or local-dir:PATH", value=state.default_spec.model)
                    bb_pretrained = gr.Textbox(label="pretrained tag or weights file ('none' = random)",
                                               value=state.default_spec.pretrained or "")
                    bb_button = gr.Button("Load backbone", size="sm")
                    bb_status = gr.Markdown()
            with gr.Column(scale=3):
                with gr.Tabs():
                    with gr.Tab("Classify", id="classify"):
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
                    with gr.Tab("Per-depth attention", id="attention"):
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
                    with gr.Tab("Embeddings", id="embeddings"):
                        with gr.Row():
                            emb_method = gr.Radio(list(embeddings_tab.METHODS), value="UMAP", label="Projection")
                            emb_btn = gr.Button("Map embeddings", variant="primary", elem_id="embeddings-btn")
                        emb_status = gr.Markdown(elem_id="embeddings-status")
                        emb_scatter = gr.ScatterPlot(x="x", y="y", color="class", tooltip=["item", "source", "class"],
                                                     label="Images and class texts (hover for details)")
                        # No fixed height: with one, Gradio's Vega plot fills it and clips its own legend.
                        gr.Markdown("**Static view** (colour = class, marker = source)")
                        emb_figure = gr.Plot(show_label=False)
                    with gr.Tab("Train", id="train"):
                        gr.Markdown("Few-shot prompt training on your images: files labelled by their names "
                                    "(`golden_retriever_3.jpg` → *golden retriever*), or a zip with one folder per class. "
                                    "One image in four per class is **held out**: the run scores the prompts on them, "
                                    "beside zero-shot CLIP, while it trains.", elem_id="train-intro")
                        with gr.Row(equal_height=False):
                            with gr.Column(scale=2, min_width=280):
                                train_files = gr.File(label="Training images", file_count="multiple", height=120,
                                                      elem_id="train-files")
                                with gr.Row():
                                    train_examples_btn = gr.Button("Use example training images", size="sm",
                                                                   elem_id="train-examples-btn")
                                    train_zip = gr.File(label="…or a zip (class folders)", file_count="single",
                                                        file_types=[".zip"], height=60, min_width=120)
                                train_examples_note = gr.Markdown(trainset.example_note(state.default_spec),
                                                                  elem_id="train-examples-note")
                            with gr.Column(scale=3, min_width=320):
                                train_summary = gr.Dataframe(headers=trainset.SUMMARY_HEADERS, interactive=False,
                                                             max_height=170, label="Classes", elem_id="train-summary")
                                train_thumbs = gr.Gallery(label="One image per class", columns=10, rows=1, height=84,
                                                          allow_preview=False, show_label=False, elem_id="train-thumbs")
                        with gr.Accordion("Edit labels (one row per file) or read a server folder", open=False):
                            label_table = gr.Dataframe(headers=["file", "label"], datatype=["str", "str"],
                                                       column_count=(2, "fixed"), interactive=True, max_height=260,
                                                       label="Labels")
                            train_folder = gr.Textbox(label="…or a local folder with class subfolders", value="",
                                                      visible=trainset.local_paths_allowed())
                        with gr.Row():
                            train_method = gr.Dropdown(list(recipe.TRAIN_METHODS), value="pmpo", label="Method", min_width=100)
                            train_epochs = gr.Slider(1, recipe.MAX_EPOCHS, value=recipe.default_epochs(state.default_spec),
                                                     step=1, label="Epochs (at most)", elem_id="train-epochs")
                            train_budget = gr.Slider(0, limits.max_seconds or recipe.MAX_BUDGET_S,
                                                     value=min(recipe.DEFAULT_BUDGET_S, limits.max_seconds or recipe.MAX_BUDGET_S),
                                                     step=10, elem_id="train-budget",
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
                        train_plot = gr.LinePlot(None, x="step", y="accuracy", color="series", color_map=train_tab.SERIES,
                                                 y_lim=[0, 100], height=290, label="Accuracy (%) while training",
                                                 elem_id="train-plot")
                        with gr.Row():
                            train_download = gr.File(label="Trained prompts (.safetensors)", interactive=False, height=60)
                            with gr.Accordion("Run report (JSON)", open=False):
                                train_report = gr.JSON(elem_id="train-report")
                    with gr.Tab("Benchmarks", id="benchmarks"):
                        with gr.Row():
                            bench_dir = gr.Textbox(label="Result folder(s) (result.json files found recursively)",
                                                   value=", ".join(benchmarks_tab.default_dirs()))
                            bench_btn = gr.Button("Refresh", variant="primary")
                        bench_status = gr.Markdown(elem_id="benchmarks-status")
                        bench_ref = gr.Dataframe(label="Reference (published, ViT-B/16, base-to-new, avg of 11 datasets)",
                                                 interactive=False)
                        bench_ours = gr.Dataframe(label="This project's runs (result.json)", interactive=False,
                                                  headers=["table", "Dataset", "Method", "Seeds", "Base", "New", "HM", "datasets"])
                        bench_plot = gr.Plot(label="Harmonic mean: reference vs. ours")

        backbone_inputs = [bb_model, bb_pretrained]
        classify_btn.click(classify, [files, classes, templates, checkpoint, top_k, *backbone_inputs],
                           [classify_status, topk_table, topk_plot, prompt_table, result_json], api_name="classify")
        att_btn.click(attention, [files, att_image, att_class, classes, templates, checkpoint, *backbone_inputs],
                      [att_status, att_maps, att_mass], api_name="attention")
        emb_btn.click(embeddings, [files, emb_method, classes, templates, checkpoint, *backbone_inputs],
                      [emb_status, emb_scatter, emb_figure], api_name="embeddings")
        examples_btn.click(use_examples, None, [files, classes], api_name=False)
        files.change(image_names, files, att_image, api_name=False)
        classes.change(class_choices, classes, att_class, api_name=False)
        ckpt_upload.upload(upload_checkpoint, [ckpt_upload, *backbone_inputs], [ckpt_status, checkpoint],
                           api_name="upload_checkpoint")
        bb_button.click(load_backbone, backbone_inputs, bb_status, api_name="load_backbone")
        overview_inputs = [train_files, label_table, train_method, train_epochs, train_budget, *backbone_inputs]
        overview_outputs = [train_summary, train_thumbs, train_estimate]
        train_files.change(trainset.label_rows, train_files, label_table, api_name=False).then(
            train_overview, overview_inputs, overview_outputs, api_name=False)
        for control in (label_table, train_method, train_epochs, train_budget):
            control.input(train_overview, overview_inputs, overview_outputs, api_name=False)
        train_examples_btn.click(use_train_examples, backbone_inputs, train_files, api_name=False)
        bb_model.change(lambda m, p: trainset.example_note(BackboneSpec.of(m, p)) if (m or "").strip() else "",
                        backbone_inputs, train_examples_note, api_name=False)
        train_btn.click(train, [train_files, label_table, train_zip, train_folder, train_method, train_epochs, train_budget,
                                train_name, *backbone_inputs],
                        [train_status, train_plot, train_report, train_download, checkpoint], api_name="train",
                        concurrency_limit=limits.max_concurrent, concurrency_id="train")
        cancel_btn.click(cancel, None, cancel_status, api_name="cancel_training", concurrency_limit=None)
        train_btn.click(lambda: "", None, cancel_status, api_name=False)
        bench_btn.click(benchmarks, bench_dir, [bench_status, bench_ref, bench_ours, bench_plot], api_name="benchmarks")
        demo.load(refresh_choices, checkpoint, checkpoint, api_name=False)
        demo.unload(end_session)
        demo.load(benchmarks, bench_dir, [bench_status, bench_ref, bench_ours, bench_plot], api_name=False)
    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=64)
    return demo


def allowed_paths(state: AppState) -> list[str]:
    """Files the app itself serves: example renders and trained checkpoints in its cache dir."""
    from .fashion import FASHION_DIR

    return [str(state.cache_dir), str(FASHION_DIR)]


__all__ = ["build_demo", "allowed_paths", "error_text", "guarded", "UNTRAINED", "CONCURRENCY"]
