#!/usr/bin/env python
"""Pretrain the offline ShapeWorld-CLIP (checkpoints/shapeworld-clip): the launcher of ``tools/pretraining``.

    python tools/pretrain_shapeworld.py --out checkpoints/shapeworld-clip

``--help`` describes every option; the code is the package ``tools/pretraining`` (its ``cli.main``).
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT / "tools", ROOT):  # the package; pmpo, when the project is not installed
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from pretraining import main  # noqa: E402

if __name__ == "__main__":
    main()
