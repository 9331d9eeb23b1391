"""``pmpo app ...``: the Gradio demo from an installed package (same as ``python app.py`` in a checkout)."""

from __future__ import annotations

import argparse

from . import SUMMARIES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("app", help=SUMMARIES["app"],
                       description="Start the PMPO Gradio demo; options as python app.py.", add_help=False)
    # Every option (--help included) belongs to the app: the pmpo parser forwards what it does not know.
    p.set_defaults(func=run, forward_options=True)


def run(args: argparse.Namespace) -> int:
    from ..app.main import main

    return main(args.forwarded)
