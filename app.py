#!/usr/bin/env python
"""Start the PMPO demo (Hugging Face Spaces runs this file): ``python app.py --help``.

The app itself lives in :mod:`pmpo.app` so that an installed package has it too (``pmpo app``).
"""

import sys

from pmpo.app.main import main

if __name__ == "__main__":
    sys.exit(main())
