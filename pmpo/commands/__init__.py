"""One module per ``pmpo`` subcommand (see ``pmpo/cli.py``).

The one-line summaries live here, not in the command modules, so ``pmpo --help`` lists every
command without importing any of them (most import torch, which takes seconds)."""

SUMMARIES: dict[str, str] = {
    "predict": "classify images with a method preset or a prompt checkpoint",
    "train": "train prompts under a protocol and write result.json",
    "recipe": "the resolved model, training options and templates a train run would use",
    "eval": "accuracy of a prompt checkpoint or method preset on a dataset split",
    "table": "tables (mean ± std over seeds) from result.json files",
    "sweep": "run datasets × methods × seeds from a YAML file (resumable)",
    "bench": "measure inference/training speed and memory against plain open_clip",
    "verify": "train each baseline step by step next to its authors' trainer and compare",
    "analyze": "per-depth prompt analysis: figures (PNG+PDF) and their numbers (CSV)",
    "app": "start the Gradio demo (pmpo app --help for its options)",
}
