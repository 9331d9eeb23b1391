"""Turning what a browser (or an API client) sends into clean inputs, or into one clear message.

Every tab reads class lists, templates and uploaded files the same way, so the limits and the
wording of the errors live here once. Anything refused raises :class:`pmpo.errors.InputError`
(or ``DatasetError`` for images), which the handlers show as a message; nothing here may raise
anything else for bad user input.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from pmpo.data.loader import load_image
from pmpo.errors import DatasetError, InputError

# Limits that keep one request from monopolising a shared CPU. A thousand classes is ImageNet;
# beyond that the text pass alone (N prompts x C classes) takes minutes on a CPU.
MAX_CLASSES = 1000
MAX_CLASSNAME_CHARS = 100
MAX_TEMPLATES = 100
MAX_IMAGES = 64


@dataclass
class ClassList:
    names: list[str]
    notices: list[str] = field(default_factory=list)


def guess_label(name: str) -> str:
    """'golden_retriever_03.jpg' -> 'golden retriever': the file stem without a trailing number."""
    stem = Path(name).stem
    stem = re.sub(r"[\s_\-.]*\(?\d+\)?$", "", stem)
    return re.sub(r"[_\-]+", " ", stem).strip()


def split_lines_or_commas(text: str) -> list[str]:
    """One item per line; a single line is split at commas instead ("cat, dog, bird")."""
    text = (text or "").strip()
    parts = text.splitlines() if "\n" in text else text.split(",")
    return [p.strip() for p in parts if p.strip()]


def parse_classes(text: str, max_classes: int = MAX_CLASSES) -> ClassList:
    """Class names from a textbox. Duplicates (case-insensitive) are dropped with a notice,
    because a duplicated class would split its probability in two and read as a bug."""
    raw = split_lines_or_commas(text)
    if not raw:
        raise InputError("The class list is empty: enter at least one class name (one per line, or comma-separated).")
    too_long = [n for n in raw if len(n) > MAX_CLASSNAME_CHARS]
    if too_long:
        raise InputError(
            f"Class name too long ({len(too_long[0])} characters, limit {MAX_CLASSNAME_CHARS}): "
            f"{too_long[0][:40]!r}... CLIP reads at most 77 tokens; use a short name."
        )
    names, seen, dropped = [], set(), []
    for n in raw:
        key = n.lower()
        if key in seen:
            dropped.append(n)
            continue
        seen.add(key)
        names.append(n)
    if len(names) > max_classes:
        raise InputError(
            f"{len(names)} classes is more than this app handles per request ({max_classes}); "
            "use the pmpo command line for larger label sets."
        )
    notices = [f"Ignored duplicate class name(s): {', '.join(repr(d) for d in dropped[:10])}."] if dropped else []
    if len(names) == 1:
        notices.append(f"Only one class ({names[0]!r}): every image gets 100 % for it. Add the classes it "
                       "should be told apart from to see what the model prefers.")
    return ClassList(names, notices)


def parse_templates(text: str) -> list[str]:
    """Manual templates, one per line, each with a ``{}`` where the class name goes."""
    lines = [t.strip() for t in (text or "").splitlines() if t.strip()]
    if not lines:
        raise InputError("The template list is empty: give at least one template such as 'a photo of a {}.'")
    if len(lines) > MAX_TEMPLATES:
        raise InputError(f"{len(lines)} templates is more than the limit of {MAX_TEMPLATES}.")
    missing = [t for t in lines if "{}" not in t]
    if missing:
        raise InputError(f"Template {missing[0]!r} has no '{{}}' where the class name should go.")
    bad = [t for t in lines if t.count("{}") > 1 or re.search(r"\{[^}]", t)]
    if bad:
        raise InputError(f"Template {bad[0]!r} must contain exactly one '{{}}' and no other braces.")
    return lines


def file_path(value: Any) -> str:
    """The local path of a Gradio file value (a str, a dict with 'path', or an object with .name)."""
    if isinstance(value, (str, Path)):
        return str(value)
    if isinstance(value, dict) and value.get("path"):
        return str(value["path"])
    name = getattr(value, "path", None) or getattr(value, "name", None)
    if name:
        return str(name)
    raise InputError(f"unrecognised upload value {type(value).__name__}")


def as_list(files: Any) -> list[Any]:
    if files is None:
        return []
    if isinstance(files, (list, tuple)):
        return [f for f in files if f is not None]
    return [files]


def display_name(path: str) -> str:
    """The name a user recognises: Gradio keeps the original file name as the last component."""
    return Path(path).name


@dataclass
class LoadedImages:
    names: list[str]
    images: list[Image.Image]
    paths: list[str]
    notices: list[str] = field(default_factory=list)


def load_images(files: Any, max_images: int = MAX_IMAGES) -> LoadedImages:
    """Decode uploads with :func:`pmpo.data.load_image` (size guard, clear errors).

    Bad files are skipped with a notice naming them, so one broken file does not lose a batch;
    if nothing usable remains the request fails with the reasons.
    """
    paths = [file_path(f) for f in as_list(files)]
    if not paths:
        raise InputError("No images: upload one or more images, or click 'Use example images'.")
    if len(paths) > max_images:
        raise InputError(f"{len(paths)} images is more than the limit of {max_images} per request.")
    out = LoadedImages([], [], [])
    problems = []
    for p in paths:
        try:
            image = load_image(p)
        except DatasetError as exc:
            problems.append(_short_image_error(exc, p))
            continue
        out.names.append(display_name(p))
        out.images.append(image)
        out.paths.append(p)
    if not out.images:
        raise InputError("No usable image. " + " ".join(problems))
    if problems:
        out.notices.append("Skipped: " + " ".join(problems))
    return out


def _short_image_error(exc: Exception, path: str) -> str:
    """The loader's message with the server-side temp folder replaced by the file's own name."""
    return str(exc).replace(str(path), repr(display_name(path))).rstrip(".") + "."
