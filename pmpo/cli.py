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

from .commands import SUMMARIES
from .errors import PMPOError

# Explicit list: a command exists because it is named here, not because something was imported.
COMMANDS = tuple(SUMMARIES)


def _selected_command(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The full parser of the command named in ``argv`` (all of them when ``argv`` is None); the
    others are listed by their summary only, so that ``pmpo --help`` imports no command module."""
    parser = argparse.ArgumentParser(
        prog="pmpo",
        description="Prompt learning for CLIP: PMPO, CoOp, KgCoOp, MaPLe and zero-shot CLIP on open_clip backbones.",
        epilog="Run 'pmpo <command> --help' for the options of one command.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs and full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    selected = None if argv is None else _selected_command(argv)
    for name in COMMANDS:
        if argv is None or name == selected:
            importlib.import_module(f"pmpo.commands.{name}").register(sub)
        else:
            sub.add_parser(name, help=SUMMARIES[name])
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "forward_options", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.forwarded = unknown
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
