"""The page: a header, the side column every tab reads (images, classes, templates, prompt
checkpoint, backbone), and the tabs, each built by its own module in :mod:`pmpo.app.tabs`.

What a tab shares with the others travels in one :class:`~pmpo.app.page.PageContext`; adding a
tab is a module with ``build(page)`` and one entry in :data:`TABS`.
"""

from __future__ import annotations

import gradio as gr

from pmpo.backbone import portable_model_name

from .examples import EXAMPLE_CLASSES, example_images
from .inputs import display_name, file_path
from .page import PageContext, guarded, notices_md, session_of
from .refusals import Page
from .served import BackboneSpec
from .state import UNTRAINED, AppState
from .tabs import attention, benchmarks, classify, embeddings, train

TITLE = "PMPO — multi-prompt, depth-partitioned prompt learning for CLIP"
INTRO = (
    f"# {TITLE}\n"
    "Compare **zero-shot CLIP**, the **manual prior** and **learned prompts** side by side, see where each "
    "depth-segment prompt looks, map image and text embeddings, and train prompts on your own images. "
    "PMPO here is a *reconstruction* of arXiv 2305.06221 (no official code exists); every uncertain choice is an option."
)
DEFAULT_TEMPLATES = "a photo of a {}."
CONCURRENCY = 2  # CPU inference: more parallel requests only split the same cores
# (tab id, module with TITLE and build(page)), in page order.
TABS = (("classify", classify), ("attention", attention), ("embeddings", embeddings), ("train", train),
        ("benchmarks", benchmarks))


def build_demo(state: AppState) -> gr.Blocks:
    """The whole app; ``state`` holds the models and is shared by every session."""
    with Page(title="PMPO demo", fill_width=True) as demo:
        gr.Markdown(INTRO)
        gr.Markdown(notices_md(state.notices), elem_id="startup-notice", visible=bool(state.notices))
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=320):
                page = side_column(state, demo)
            with gr.Column(scale=3), gr.Tabs():
                for tab_id, tab in TABS:
                    with gr.Tab(tab.TITLE, id=tab_id):
                        tab.build(page)
    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=64)
    return demo


def side_column(state: AppState, demo: gr.Blocks) -> PageContext:
    """Images, classes, templates, the prompt checkpoint (picked or uploaded) and the backbone, with
    their own handlers; returns the context the tabs are built from."""
    examples = example_images(state.cache_dir / "examples")

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

    files = gr.File(label="Images", file_count="multiple", elem_id="images")
    examples_btn = gr.Button("Use example images (ShapeWorld)", size="sm", elem_id="examples-btn")
    classes = gr.Textbox(label="Classes (one per line, or comma-separated)", lines=6, value="\n".join(EXAMPLE_CLASSES),
                         elem_id="classes")
    templates = gr.Textbox(label="Manual templates (one per line, {} = class name)", lines=2, value=DEFAULT_TEMPLATES,
                           elem_id="templates")
    checkpoint = gr.Dropdown(label="Prompt checkpoint", choices=state.checkpoint_choices(), value=state.default_choice,
                             elem_id="checkpoint")
    ckpt_upload = gr.File(label="Upload a prompt checkpoint (.safetensors)", file_count="single", height=130)
    ckpt_status = gr.Markdown()
    with gr.Accordion("Backbone (frozen CLIP)", open=False):
        allowed = state.allowed_backbones()
        if allowed is not None:
            gr.Markdown("On this public Space only these backbones load: "
                        + ", ".join(f"`{portable_model_name(a.model)}`" + (f" + `{a.pretrained}`" if a.pretrained else "") for a in allowed)
                        + ". Run the app yourself for any other.")
        bb_model = gr.Textbox(label="open_clip model or local-dir:PATH", value=portable_model_name(state.default_spec.model))
        bb_pretrained = gr.Textbox(label="pretrained tag or weights file ('none' = random)",
                                   value=state.default_spec.pretrained or "")
        bb_button = gr.Button("Load backbone", size="sm")
        bb_status = gr.Markdown()

    examples_btn.click(use_examples, None, [files, classes], api_name=False)
    ckpt_upload.upload(upload_checkpoint, [ckpt_upload, bb_model, bb_pretrained], [ckpt_status, checkpoint],
                       api_name="upload_checkpoint")
    bb_button.click(load_backbone, [bb_model, bb_pretrained], bb_status, api_name="load_backbone")
    demo.load(refresh_choices, checkpoint, checkpoint, api_name=False)
    demo.unload(end_session)
    return PageContext(state, demo, files, classes, templates, checkpoint, bb_model, bb_pretrained)


def allowed_paths(state: AppState) -> list[str]:
    """Files the app itself serves: example renders and trained checkpoints in its cache dir."""
    from .fashion import FASHION_DIR

    return [str(state.cache_dir), str(FASHION_DIR)]


__all__ = ["build_demo", "allowed_paths", "side_column", "TABS", "UNTRAINED", "CONCURRENCY"]
