#!/usr/bin/env python
"""Start the PMPO demo (Hugging Face Spaces runs this file): ``python app.py --help``.

The app itself lives in :mod:`pmpo.app` so that an installed package has it too (``pmpo app``).
"""

import contextlib
import os
import sys

if os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true"):
    # A ZeroGPU Space: `spaces` must come before anything touches CUDA (pmpo.app.zerogpu).
    with contextlib.suppress(ImportError):
        import spaces  # noqa: F401

from pmpo.app.main import main

if __name__ == "__main__":
    sys.exit(main())
