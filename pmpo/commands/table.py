"""``pmpo table``: mean ± std over seeds of result.json files, as Markdown, CSV or LaTeX."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..protocols import PROTOCOLS
from ..results import FORMATS, build_tables, load_results, render
from . import SUMMARIES

EPILOG = """\
examples:
  pmpo table runs/                                  # every result.json below runs/, Markdown
  pmpo table runs/base2new --reference              # with the papers' 11-dataset averages
  pmpo table runs/ --format latex --output table.tex
  pmpo table runs/a/result.json runs/b/result.json --format csv
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "table", help=SUMMARIES["table"],
        description="Aggregate runs per protocol, dataset and method; base-to-new HM is the HM of the "
                    "seed-averaged base and new accuracies; best value per dataset in bold.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("runs", nargs="+", help="result.json files or folders searched recursively")
    p.add_argument("--format", default="md", choices=FORMATS, help="(default: md)")
    p.add_argument("--reference", action="store_true", help="add the published base-to-new averages (pmpo/reference.py)")
    p.add_argument("--protocol", choices=PROTOCOLS, help="only this protocol")
    p.add_argument("--output", help="write to this file instead of printing")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    text = render(build_tables(load_results(args.runs), reference=args.reference, protocol=args.protocol), args.format)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        print(text, end="")
    return 0
