"""``pmpo analyze <name> ...``: the analysis toolkit (``analysis/``) from the pmpo command line.

Each analysis owns its options; this command only dispatches, and imports the analysis (and
matplotlib, umap) only when it is asked for, so other commands stay fast to start.
"""

from __future__ import annotations

import argparse
import importlib

from ..errors import InputError
from . import SUMMARIES

# Kept in step with analysis.ANALYSES (a test checks); listed here so --help works without importing it.
ANALYSES = ("attention_atlas", "attention_truth", "prompt_words", "prompt_geometry", "embedding_clusters", "ablations", "tables")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help=SUMMARIES["analyze"],
        description="Run one analysis of analysis/ (same as python -m pmpo.analysis.<name>). "
                    "'pmpo analyze <name> --help' lists its options.",
        epilog="example: pmpo analyze attention_atlas --offline --dataset shapeworld --out figs/atlas",
    )
    p.add_argument("name", choices=ANALYSES, help="the analysis to run")
    p.add_argument("options", nargs=argparse.REMAINDER, help="options of that analysis")
    p.set_defaults(func=run)


def _analysis_module(name: str):
    try:
        return importlib.import_module(f"pmpo.analysis.{name}")
    except ModuleNotFoundError as exc:
        if exc.name in ("matplotlib", "sklearn", "umap", "pandas"):
            raise InputError(f"analysis needs {exc.name}: pip install 'pmpo[analysis]' "
                             "(in a checkout: pip install -e '.[analysis]')") from exc
        raise


def run(args: argparse.Namespace) -> int:
    module = _analysis_module(args.name)
    parser = argparse.ArgumentParser(prog=f"pmpo analyze {args.name}", description=module.DESCRIPTION)
    module.add_arguments(parser)
    for path in module.run(parser.parse_args(args.options)):
        print(path)
    return 0
