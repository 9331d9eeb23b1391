"""The demo benchmark's images and its floor: fresh seeded ShapeWorld renders, and the image
encoder (and the text tower for a 1000-class list) timed through the library on the same images,
in the benchmark's own process while the app is idle."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from demo_report import N_BIG_CLASSES, class_list, summarize


def render_set(folder: Path, classes: Sequence[str], seed: int, px: int, tag: str) -> list[Path]:
    """One new ShapeWorld render per class (seeded: the same run renders the same images)."""
    import numpy as np
    from PIL import Image

    from pmpo.data import shapeworld as sw

    folder.mkdir(parents=True, exist_ok=True)
    names = sw.class_names()
    paths = []
    for i, cls in enumerate(classes):
        index = names.index(cls) if cls in names else i % len(names)
        sample = sw.sample_class_scene(index, np.random.default_rng([seed, i]), style="pretrain", size=px)
        path = folder / f"{tag}_{cls.replace(' ', '_')}.png"
        Image.fromarray(sample.image, "RGB").save(path)
        paths.append(path)
    return paths


def measure_floor(model: str, pretrained: str | None, sets: Sequence[Sequence[Path]], warmup: Sequence[Path],
                  threads: int, template: str, n_text: int = N_BIG_CLASSES, text: bool = True,
                  floor_repeats: int = 3) -> dict[str, Any]:
    """encode_image on each set of 8 and on its first image (medians of at least ``floor_repeats``
    timings, cycling over the sets), after a warm-up call; and
    ``n_text`` plain prompts through the library's (truncating) text encoder once. Frees the model."""
    import torch
    from PIL import Image

    from pmpo.backbone import load_backbone
    from pmpo.data.transforms import build_transform

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    bb = load_backbone(model, None if pretrained in (None, "", "none") else pretrained, device="cpu")
    load_s = time.perf_counter() - t0
    transform = build_transform(bb.image_size, bb.mean, bb.std, train=False)

    def batch(paths: Sequence[Path]) -> torch.Tensor:
        return torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])

    cores: list[float] = []  # CPU seconds / wall seconds of each timed call: ~threads when it had the cores to itself

    def timed(fn: Callable[[], Any]) -> float:
        c, t = time.process_time(), time.perf_counter()
        fn()
        wall = time.perf_counter() - t
        cores.append((time.process_time() - c) / wall if wall > 0 else 0.0)
        return wall

    out: dict[str, Any] = {"model": bb.model_name, "pretrained": bb.pretrained, "threads": torch.get_num_threads(),
                           "image_size": bb.image_size, "load_s": load_s}
    try:
        with torch.no_grad():
            x = batch(warmup)
            bb.clip.encode_image(x)
            bb.clip.encode_image(x[:1])
            b8, b1, prep = [], [], []
            encode = bb.clip.encode_image
            for paths in [sets[i % len(sets)] for i in range(max(floor_repeats, len(sets)))]:
                t = time.perf_counter()
                x = batch(paths)
                prep.append(time.perf_counter() - t)
                b8.append(timed(lambda x=x: encode(x)))
                b1.append(timed(lambda x=x: encode(x[:1])))
            out.update(batch8_s=summarize(b8), single_s=summarize(b1), batch8_samples=b8, single_samples=b1,
                       preprocess8_s=statistics.median(prep))
            out["cores_used"] = statistics.median(cores)
            out["text1000_s"] = None
            if text:
                from pmpo.encoders import TextEncoder

                enc = TextEncoder(bb.clip, bb.tokenizer)
                enc.encode_tokens(enc.tokenize([template.format(c) for c in class_list(8, 99)]))
                tokens = enc.tokenize([template.format(c) for c in class_list(n_text, 98)])
                out["text1000_s"] = timed(lambda: enc.encode_tokens(tokens))
    finally:
        del bb
        gc.collect()
    return out
