"""What every tab of the page shares: the components of the side column, the app state, and the
way a handler turns any failure into a message.

Each tab is built by one function, ``build(page)`` in :mod:`pmpo.app.tabs`, from a :class:`PageContext`;
handlers do three things only: turn component values into clean inputs (:mod:`app.inputs`), fetch the
shared model (:class:`app.state.AppState`), and call one tab module. Every user error
(:class:`pmpo.errors.PMPOError`) becomes a toast plus a visible message and an empty result; an
unexpected exception is logged with its traceback and reported the same way, so the app keeps
serving whatever a request sends.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr

from pmpo.errors import PMPOError

from .inputs import parse_classes, parse_templates
from .served import BackboneSpec, LoadedModel
from .state import AppState

log = logging.getLogger("pmpo.app.ui")


@dataclass
class PageContext:
    """The app state and the shared components a tab reads (images, classes, templates, the prompt
    checkpoint and the backbone fields of the side column) or updates (the checkpoint picker)."""

    state: AppState
    demo: gr.Blocks
    files: Any
    classes: Any
    templates: Any
    checkpoint: Any
    bb_model: Any
    bb_pretrained: Any

    @property
    def backbone(self) -> list:
        return [self.bb_model, self.bb_pretrained]

    def spec(self, bb_model: str | None, bb_pretrained: str | None) -> BackboneSpec:
        """The backbone the side column's fields name; left empty (an API call that sends only images
        and classes), the one the app started with."""
        if not (bb_model or "").strip():
            return self.state.default_spec
        return BackboneSpec.of(bb_model, bb_pretrained)

    def resolve(self, bb_model: str, bb_pretrained: str, choice: str, request: gr.Request | None) -> LoadedModel:
        """The served model for these backbone fields and checkpoint choice, as this session sees them."""
        return self.state.model(self.spec(bb_model, bb_pretrained), choice or self.state.default_choice,
                                session_of(request))

    @staticmethod
    def task(classes_text: str, templates_text: str):
        return parse_classes(classes_text), parse_templates(templates_text)


def error_text(exc: BaseException) -> str:
    if isinstance(exc, PMPOError):
        return str(exc)
    return f"Internal error ({type(exc).__name__}: {exc}). The app is still running; please report this."


def guarded(empty: Callable[[str], tuple]) -> Callable:
    """Run a handler; on any exception show a toast and return ``("**Error:** …", *empty(message))``."""

    def wrap(fn: Callable) -> Callable:
        def failed(exc: Exception):
            if not isinstance(exc, PMPOError):
                log.exception("handler %s failed", fn.__name__)
            message = error_text(exc)
            gr.Warning(message)
            rest = empty(message)
            return (f"**Error:** {message}", *rest) if rest else f"**Error:** {message}"

        if inspect.isgeneratorfunction(fn):  # a handler that answers in stages
            @functools.wraps(fn)
            def stream(*args, **kwargs):
                try:
                    yield from fn(*args, **kwargs)
                except Exception as exc:  # noqa: BLE001 - the UI must survive any request
                    yield failed(exc)

            return stream

        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - the UI must survive any request
                return failed(exc)

        return inner

    return wrap


def session_of(request: gr.Request | None) -> str | None:
    """The browser (or API client) session a request comes from: uploads and trainings are its own."""
    return getattr(request, "session_hash", None) if request is not None else None


def notices_md(*groups: list[str]) -> str:
    lines = [n for g in groups for n in g if n]
    return "\n\n".join(f"ℹ️ {n}" for n in lines)


__all__ = ["PageContext", "error_text", "guarded", "notices_md", "session_of"]
