"""ZeroGPU: Hugging Face's shared-GPU tier for Gradio Spaces, and the same code everywhere else.

On a ZeroGPU Space (``SPACES_ZERO_GPU=true``, with the ``spaces`` package installed by the
platform) the server process never holds a GPU. A function decorated with ``spaces.GPU`` is run in
a *forked worker* that gets a GPU slice for the call: its arguments are pickled into the worker and
its return value (or each yield of a generator) pickled back; nothing the worker changes reaches
the server process. Elsewhere ``spaces.GPU`` is the function itself.

So the app draws one boundary, the same in both worlds: a handful of pure compute kernels — an
image pass (:func:`pmpo.app.features.encode_batch`), a text pass
(:func:`pmpo.app.state.text_weights`), the cost probe and a training session
(:func:`pmpo.app.session.train_session`) — take a model and tensors and return CPU tensors. The
feature store, the sessions, the checkpoints and the page stay in the server process, on the CPU;
the server's model stays on the CPU too, and a kernel moves *its own copy* to the GPU
(:func:`kernel_model`). Anything outside the kernels still runs, on the CPU: the boundary decides
speed, never correctness.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

# Longest GPU call a visitor may ask for, in seconds. ZeroGPU bills a visitor's daily quota by the
# duration asked, and a shorter ask is scheduled sooner; inference calls need far less.
PASS_S = 30
TRAIN_MAX_S = 300  # a training on ZeroGPU asks for its budget plus TRAIN_SETUP_S, at most this
TRAIN_SETUP_S = 30


def active(env: dict | None = None) -> bool:
    """A ZeroGPU Space: the platform's flag is set and its ``spaces`` package is importable."""
    env = os.environ if env is None else env
    if str(env.get("SPACES_ZERO_GPU", "")).lower() not in ("1", "t", "true"):
        return False
    try:
        importlib.import_module("spaces")
    except ImportError:
        return False
    return True


def gpu(duration: int | Callable[..., int]) -> Callable[[F], F]:
    """``spaces.GPU(duration=...)`` when the ``spaces`` package is installed (itself a no-op off
    ZeroGPU), else the function unchanged. ``duration`` may be a callable of the call's arguments."""

    def decorate(fn: F) -> F:
        try:
            spaces = importlib.import_module("spaces")
        except ImportError:
            return fn
        return spaces.GPU(duration=duration)(fn)

    return decorate


def kernel_model(model):
    """The model a kernel computes with: inside a ZeroGPU worker (which holds a private, unpickled
    copy) that copy moved to the GPU; everywhere else the model as it is — a shared model is never
    moved to run one request."""
    import torch

    if not active():
        return model
    # A forked worker must not enter an OpenMP parallel region: the server process has used its
    # thread team, which the fork does not copy, and libgomp then waits for it forever. One thread
    # costs nothing here: the worker's work is on the GPU.
    torch.set_num_threads(1)
    if torch.cuda.is_available() and next(model.parameters()).device.type != "cuda":
        return model.to("cuda")
    return model


__all__ = ["PASS_S", "TRAIN_MAX_S", "TRAIN_SETUP_S", "active", "gpu", "kernel_model"]
