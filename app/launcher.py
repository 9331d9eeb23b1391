"""Start ``app.py`` in a subprocess and wait until its page is served.

Used by the client and browser tests and by the screenshot and latency tools, so all of them
measure the app exactly as a user starts it (``python app.py ...``), not an in-process copy.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.request import urlopen

ROOT = Path(__file__).resolve().parents[1]  # the checkout, where app.py lives


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], log_path: str | Path, env: dict[str, str] | None = None,
           timeout: float = 120.0) -> tuple[subprocess.Popen, str, float]:
    """Run ``app.py *args`` on a free port; return (process, url, seconds until the page answered 200)."""
    port = free_port()
    # The caller's SPACE_ID (a test of Space behaviour) counts; one inherited from the environment does not.
    full_env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(ROOT)}
    full_env.pop("SPACE_ID", None)
    full_env.update(env or {})
    log_path = Path(log_path)
    log = open(log_path, "w")  # noqa: SIM115 (the app writes to it for its whole life)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), *args, "--port", str(port)],
                            cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            with urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return proc, url, time.perf_counter() - start
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"app.py did not serve {url} within {timeout} s:\n{log_path.read_text()}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
