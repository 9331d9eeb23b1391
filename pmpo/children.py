"""A child interpreter that runs the authors' code and hands back one JSON result.

``pmpo bench --reference`` and ``pmpo verify`` both run reference code in a fresh process per
repository — their ``clip``, ``trainers`` and ``dassl`` packages would clash with each other and
must never enter our process — and both speak the same small protocol: the payload goes in as one
JSON argument, the result comes back as one stdout line marked :data:`RESULT_MARK`, and an expected
failure is one ``error: ...`` line on stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from .errors import PMPOError

RESULT_MARK = "PMPO_REFERENCE_RESULT "
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where `python -m pmpo....` resolves


def run_child(module: str, payload: dict[str, Any], what: str, quiet: bool = False,
              timeout: float | None = None) -> dict[str, Any]:
    """``python -m module --child PAYLOAD``; its result, or a PMPOError naming ``what`` and the child's last word."""
    proc = subprocess.run([sys.executable, "-m", module, "--child", json.dumps(payload)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE if quiet else None, text=True,
                          timeout=timeout, cwd=ROOT)
    lines = [line[len(RESULT_MARK):] for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    errors = [line for line in (proc.stderr or "").splitlines() if line.startswith("error: ")]
    detail = errors[-1][len("error: "):] if errors else \
        ((proc.stderr or "").strip().splitlines() or ["(see the output above)"])[-1]
    raise PMPOError(f"{what} failed (exit {proc.returncode}): {detail}")


def child_main(run: Callable[[dict, Callable[[str], None]], dict], payload_json: str,
               quiet_warnings: tuple[type[Warning], ...] = (FutureWarning,)) -> int:
    """The child's side: run ``run(payload, log)`` and print its result line (their imports warn
    about deprecated torch APIs; those warnings are theirs, not the user's)."""
    import warnings

    for category in quiet_warnings:
        warnings.filterwarnings("ignore", category=category)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    try:
        result = run(json.loads(payload_json), log)
    except PMPOError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


__all__ = ["RESULT_MARK", "child_main", "run_child"]
