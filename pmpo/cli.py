"""The ``pmpo`` command line. Each subcommand lives in ``pmpo/commands/<name>.py`` and exposes
``register(subparsers)``; this file only lists them, parses, and turns user errors into one line.

Exit codes: 0 success, 1 a user-facing error (one line on stderr), 2 bad command-line usage,
130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings

from .errors import PMPOError

# Explicit list: a command exists because it is named here, not because something was imported.
COMMANDS = ("predict", "train", "eval", "table", "sweep", "bench", "analyze")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pmpo",
        description="Prompt learning for CLIP: PMPO, CoOp, KgCoOp, MaPLe and zero-shot CLIP on open_clip backbones.",
        epilog="Run 'pmpo <command> --help' for the options of one command.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs and full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name in COMMANDS:
        importlib.import_module(f"pmpo.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # open_clip reports download failures on the root logger; we say it better in one line.
    logging.basicConfig(level=logging.INFO if args.verbose else logging.CRITICAL, format="%(message)s")
    if not args.verbose:
        warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        return int(args.func(args) or 0)
    except PMPOError as exc:
        if args.verbose:
            raise
        print(f"pmpo {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"pmpo {args.command}: interrupted", file=sys.stderr)
        return 130
