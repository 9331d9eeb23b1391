"""The Benchmarks tab's page: published numbers beside tables from the user's own ``result.json``
files (built by :mod:`pmpo.app.benchmarks`)."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from .. import benchmarks as benchmarks_tab
from ..page import PageContext, guarded

TITLE = "Benchmarks"


def build(page: PageContext) -> None:
    @guarded(lambda message: (pd.DataFrame(), pd.DataFrame(), None))
    def benchmarks(results_dir):
        view = benchmarks_tab.build_view(results_dir)
        return view.status, view.reference, view.ours, view.figure

    with gr.Row():
        bench_dir = gr.Textbox(label="Result folder(s) (result.json files found recursively)",
                               value=", ".join(benchmarks_tab.default_dirs()))
        bench_btn = gr.Button("Refresh", variant="primary")
    bench_status = gr.Markdown(elem_id="benchmarks-status")
    bench_ref = gr.Dataframe(label="Reference (published, ViT-B/16, base-to-new, avg of 11 datasets)", interactive=False)
    bench_ours = gr.Dataframe(label="This project's runs (result.json)", interactive=False,
                              headers=["table", "Dataset", "Method", "Seeds", "Base", "New", "HM", "datasets"])
    bench_plot = gr.Plot(label="Harmonic mean: reference vs. ours")
    outputs = [bench_status, bench_ref, bench_ours, bench_plot]
    bench_btn.click(benchmarks, bench_dir, outputs, api_name="benchmarks")
    page.demo.load(benchmarks, bench_dir, outputs, api_name=False)
