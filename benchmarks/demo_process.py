"""The demo benchmark's view of the machine and of the app process: CPU model, /proc readings
(peak RSS, CPU seconds, idleness), and starting and stopping ``python app.py`` headless on loopback.
Also used by benchmarks/load.py."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from demo_report import BenchError

GIB = 2 ** 30


def cpu_model() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in text.splitlines():
            if line.strip().startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown CPU"


def proc_status(pid: int) -> dict[str, int]:
    """VmHWM / VmRSS (kB) of a process from /proc/<pid>/status ({} when it is gone)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def peak_rss_gib(pid: int) -> float | None:
    kb = proc_status(pid).get("VmHWM")
    return kb * 1024 / GIB if kb is not None else None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds the process has used (its threads included)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def wait_idle(pid: int, timeout: float = 180.0, busy_below: float = 0.1, quiet_for: float = 2.0) -> float:
    """Wait until the process uses less than ``busy_below`` of a core for ``quiet_for`` seconds
    (its background warm-up done); return the seconds waited (the timeout at most)."""
    start = last_t = time.perf_counter()
    last_cpu, quiet = cpu_seconds(pid), 0.0
    while time.perf_counter() - start < timeout:
        time.sleep(0.5)
        now, cpu = time.perf_counter(), cpu_seconds(pid)
        if cpu is None or last_cpu is None:
            break
        quiet = quiet + (now - last_t) if (cpu - last_cpu) / (now - last_t) < busy_below else 0.0
        last_t, last_cpu = now, cpu
        if quiet >= quiet_for:
            break
    return time.perf_counter() - start


def headless_flags(app: Path, device: str | None) -> list[str]:
    """The flags of ``app.py --help`` that keep a run on loopback and off any browser / public link."""
    try:
        text = subprocess.run([sys.executable, str(app), "--help"], capture_output=True, text=True, timeout=120,
                              cwd=app.parent).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise BenchError(f"`python app.py --help` failed: {exc}") from exc
    if "--port" not in text:
        raise BenchError("`python app.py --help` offers no --port; cannot start the app on a free port")
    flags = []
    if "--host" in text:
        flags += ["--host", "127.0.0.1"]
    if device and "--device" in text:
        flags += ["--device", device]
    for flag in ("--no-browser", "--no-share"):
        if flag in text:
            flags.append(flag)
    return flags


class AppProcess:
    """``python app.py ARGS`` on a free port, started and stopped by the project's own launcher
    (:mod:`pmpo.app.launcher`, which the tests use too)."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str]):
        self.args = args
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        self.startup_s: float | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def command(self) -> str:
        return "python app.py " + " ".join(self.args)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def start(self, timeout: float) -> float:
        from pmpo.app.launcher import launch

        try:
            self.proc, self.url, self.startup_s = launch(self.args, self.log_path, env=self.env, timeout=timeout)
        except RuntimeError as exc:  # exited, or did not serve in time (the launcher killed it)
            raise BenchError(str(exc)[-2000:]) from exc
        return self.startup_s

    def stop(self) -> None:
        from pmpo.app.launcher import stop

        if self.proc is not None and self.proc.poll() is None:
            stop(self.proc)


def mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return None
