"""One-line refusals for inputs Gradio itself rejects before a handler runs.

The handlers turn their own errors into messages, but a value of the wrong shape sent through the
API (``None`` for a slider, a number for a file list, a dict for a table) is refused by Gradio's
component validation first. Its message is then several lines of Pydantic or a repr of the whole
value — useless to an API client and noisy on a shared Space. :class:`Page` is ``gr.Blocks`` with
that one step wrapped: the client gets ``/endpoint: input 'name' (component) <problem>`` on one
line, the server log keeps the traceback, and the server goes on serving.
"""

from __future__ import annotations

import inspect
import logging
import re
from typing import Any

import gradio as gr

log = logging.getLogger("pmpo.app")

MAX_DETAIL = 160  # characters of a refused value's description (choices lists can be long)


class Page(gr.Blocks):
    """The app's page: ``gr.Blocks`` whose input refusals are one line (see the module docstring)."""

    async def preprocess_data(self, block_fn, inputs, state, *args, **kwargs):
        try:
            return await super().preprocess_data(block_fn, inputs, state, *args, **kwargs)
        except Exception as exc:
            message = refusal(block_fn, inputs, exc)
            log.warning("refused a request: %s", message, exc_info=exc)
            raise gr.Error(message, print_exception=False) from exc


def refusal(block_fn: Any, inputs: list[Any], exc: BaseException) -> str:
    """``/api_name: input 'param' (kind) problem.`` for the input that ``exc`` refused."""
    blocks = list(getattr(block_fn, "inputs", []) or [])
    index = _failing_index(blocks, inputs, exc)
    endpoint = f"/{block_fn.api_name}" if getattr(block_fn, "api_name", None) else "this request"
    if index is None:
        return f"{endpoint}: {_first_line(str(exc))}"
    block = blocks[index]
    kind = type(block).__name__.lower()
    value = inputs[index] if index < len(inputs) else None
    return f"{endpoint}: input '{_parameter(block_fn, index, block)}' ({kind}) {_problem(exc, value)}."


def _failing_index(blocks: list, inputs: list[Any], exc: BaseException) -> int | None:
    """Which input failed: Gradio names it in a processing error; otherwise re-check each input the
    way Gradio does (data model, then the component's own preprocessing) and take the first refused."""
    found = re.search(r"input component at index (\d+)", str(exc))
    if found and int(found.group(1)) < len(blocks):
        return int(found.group(1))
    for i, block in enumerate(blocks):
        value = inputs[i] if i < len(inputs) else None
        model = getattr(block, "data_model", None)
        try:
            if model is not None and value is not None:
                model.model_validate(value, context={"validate_meta": True})
            elif model is None:
                block.preprocess(value)
        except Exception:  # noqa: BLE001 (Gradio's checks raise many kinds; any of them names this input)
            return i
    return None


def _parameter(block_fn: Any, index: int, block: Any) -> str:
    """The name an API client uses (the handler's parameter, as ``view_api`` lists it), else the label."""
    try:
        names = [p.name for p in inspect.signature(block_fn.fn).parameters.values()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if index < len(names):
            return names[index]
    except (TypeError, ValueError):
        pass
    return str(getattr(block, "label", None) or f"#{index}")


def _problem(exc: BaseException, value: Any) -> str:
    got = f"got {type(value).__name__}"
    errors = getattr(exc, "errors", None)
    if callable(errors):  # a Pydantic ValidationError: its first complaint, in words
        try:
            first = errors()[0]
        except Exception:  # noqa: BLE001 (anything that is not the expected shape falls through)
            first = None
        if first:
            if "meta" in str(first.get("msg", "")):
                return f"must be uploaded file(s) (send them with gradio_client.handle_file), {got}"
            msg = str(first.get("msg", "is not valid")).rstrip(".")
            return f"{re.sub(r'^Input ', '', msg)} ({got})"
    text = str(exc)
    if "is not in the list of choices:" in text:
        choices = text.split("is not in the list of choices:", 1)[1].strip().strip('"')
        return f"must be one of {_clip(choices)} ({got})"
    expected = re.search(r"Expected an? `([^`]+)`", text)
    if expected:
        return f"expected {expected.group(1)}, {got}"
    return f"was refused: {_first_line(text)} ({got})"


def _first_line(text: str) -> str:
    return _clip(text.strip().splitlines()[0] if text.strip() else "invalid input")


def _clip(text: str) -> str:
    return text if len(text) <= MAX_DETAIL else text[:MAX_DETAIL - 1] + "…"


__all__ = ["Page", "refusal"]
