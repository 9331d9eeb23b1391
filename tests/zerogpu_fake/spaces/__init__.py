"""A stand-in for Hugging Face's ``spaces`` package *on a ZeroGPU Space*, for tests on a CPU machine.

It keeps the contract the app relies on, as the real package implements it: with
``SPACES_ZERO_GPU=true`` a function decorated with ``GPU`` runs in a **forked worker process**; its
arguments are pickled into the worker and its return value — or each value a generator yields — is
pickled back; nothing the worker changes reaches the caller; a call made inside a worker runs
directly; closing a generator's stream tells the worker to stop. Without the flag ``GPU`` returns
the function itself, as the real package does off ZeroGPU. No GPU is involved: the point is the
process boundary. Each call is appended to the file named by ``PMPO_FAKE_ZEROGPU_LOG`` (function
name and requested duration), so a test can see which kernels crossed it.
"""

from __future__ import annotations

import functools
import inspect
import multiprocessing
import os
import traceback

_ctx = multiprocessing.get_context("fork")
_in_worker = False


def _on() -> bool:
    return os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")


def _note(name: str, seconds) -> None:
    path = os.environ.get("PMPO_FAKE_ZEROGPU_LOG")
    if path:
        with open(path, "a") as fh:
            fh.write(f"{name} {seconds}\n")


def _serve(task, inbox, outbox, stop) -> None:
    global _in_worker
    _in_worker = True
    args, kwargs = inbox.get()
    try:
        if inspect.isgeneratorfunction(task):
            stream = task(*args, **kwargs)
            for value in stream:
                outbox.put(("yield", value))
                if stop.is_set():
                    stream.close()
                    break
            outbox.put(("end", None))
        else:
            outbox.put(("ok", task(*args, **kwargs)))
    except Exception:  # noqa: BLE001 (the caller re-raises it)
        outbox.put(("error", traceback.format_exc()))
    stop.wait(60)  # stay alive until the caller has read everything (tensors travel as shared memory)


def _start(task, duration, args, kwargs):
    seconds = duration(*args, **kwargs) if callable(duration) else duration
    _note(task.__name__, seconds)
    inbox, outbox, stop = _ctx.Queue(), _ctx.Queue(), _ctx.Event()
    worker = _ctx.Process(target=_serve, args=(task, inbox, outbox, stop), daemon=True)
    worker.start()
    inbox.put((args, kwargs))
    return worker, outbox, stop


def _finish(worker, stop) -> None:
    stop.set()
    worker.join(30)


def GPU(task=None, *, duration=None, size=None):
    if task is None:
        return lambda fn: GPU(fn, duration=duration, size=size)
    if not _on():
        return task
    if inspect.isgeneratorfunction(task):
        @functools.wraps(task)
        def stream(*args, **kwargs):
            if _in_worker:
                yield from task(*args, **kwargs)
                return
            worker, outbox, stop = _start(task, duration, args, kwargs)
            try:
                while True:
                    kind, value = outbox.get()
                    if kind == "error":
                        raise RuntimeError(f"GPU task failed:\n{value}")
                    if kind == "end":
                        return
                    yield value
            finally:
                _finish(worker, stop)
        return stream

    @functools.wraps(task)
    def call(*args, **kwargs):
        if _in_worker:
            return task(*args, **kwargs)
        worker, outbox, stop = _start(task, duration, args, kwargs)
        try:
            kind, value = outbox.get()
        finally:
            _finish(worker, stop)
        if kind == "error":
            raise RuntimeError(f"GPU task failed:\n{value}")
        return value
    return call
