"""The PMPO Gradio app: ``python app.py`` builds :func:`app.ui.build_demo` (one module per tab in
:mod:`app.tabs`) on an :class:`app.state.AppState`.

One module per tab (classify, attention, embeddings, train, benchmarks) holds the computation and
is testable without a browser; ``ui`` only lays out components and routes values.
"""
