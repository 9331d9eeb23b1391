"""Write the app's Fashion-MNIST example images from the dataset's IDX files.

Reads the **test** split (``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``) as the
Debian package ``dataset-fashion-mnist`` installs it, takes the first ``--per-class`` images of
each of the 10 classes in file order, and saves their 28×28 grayscale pixels unchanged as
``<class>_<k>.png`` (mode L, k = 1..per_class) in ``app/examples/fashion_mnist/``:

    apt-get install dataset-fashion-mnist          # or: apt-get download + dpkg -x
    python tools/make_fashion_examples.py          # --source DIR --per-class 16 --out DIR

The selection depends only on the files, so a rerun writes the same images. PNGs in the output
folder that are named like the selection but are not part of it are removed (a smaller
``--per-class`` leaves no stale files); other files there (LICENSE, README.md) are left alone.
"""

from __future__ import annotations

import argparse
import gzip
import re
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pmpo.app.fashion import FASHION_CLASSES, FASHION_DIR, FASHION_PER_CLASS, fashion_stem  # noqa: E402

DEBIAN_SOURCE = Path("/usr/share/datasets/fashion-mnist")
TEST_IMAGES, TEST_LABELS = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"

# IDX type byte -> numpy big-endian dtype (the format's element types).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (gzip'd when its name ends in .gz) as an array of its stated shape.

    Header: two zero bytes, a type byte, a byte with the number of dimensions, then one
    big-endian uint32 size per dimension; the data follow in C order.
    """
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    kind, ndim = raw[2], raw[3]
    if kind not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX element type 0x{kind:02x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[kind])
    size = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if len(raw) != header + size * dtype.itemsize:
        raise ValueError(f"{path}: {len(raw) - header} data bytes for shape {shape} of {dtype}")
    return np.frombuffer(raw, dtype, count=size, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def select(labels: np.ndarray, per_class: int, n_classes: int) -> list[list[int]]:
    """Per class (label order), the indices of its first ``per_class`` items in file order."""
    chosen = []
    for c in range(n_classes):
        idx = np.flatnonzero(labels == c)[:per_class]
        if len(idx) < per_class:
            raise ValueError(f"class {c} has only {len(idx)} items, {per_class} wanted")
        chosen.append([int(i) for i in idx])
    return chosen


def make_examples(source: str | Path = DEBIAN_SOURCE, out: str | Path = FASHION_DIR,
                  per_class: int = FASHION_PER_CLASS, classes: list[str] = FASHION_CLASSES) -> list[Path]:
    """Write the selection as ``<class>_<k>.png`` into ``out``; returns the paths, class then k."""
    from PIL import Image

    source, out = Path(source), Path(out)
    images, labels = read_idx(source / TEST_IMAGES), read_idx(source / TEST_LABELS)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images of shape (n, h, w), got {images.dtype} {images.shape}")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for cls, indices in zip(classes, select(labels, per_class, len(classes))):
        for k, i in enumerate(indices, start=1):
            path = out / f"{fashion_stem(cls, k)}.png"
            Image.fromarray(np.ascontiguousarray(images[i])).save(path, optimize=True)  # 2-D uint8: mode L
            written.append(path)
    ours = re.compile("(" + "|".join(re.escape(c.replace(" ", "_")) for c in classes) + r")_\d+\.png")
    for stale in set(out.glob("*.png")) - set(written):
        if ours.fullmatch(stale.name):  # only files this tool names: never a stranger's PNG
            stale.unlink()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(DEBIAN_SOURCE),
                        help=f"folder with {TEST_IMAGES} and {TEST_LABELS} (default: %(default)s)")
    parser.add_argument("--per-class", type=int, default=FASHION_PER_CLASS,
                        help="first N test images of each class, in file order (default: %(default)s)")
    parser.add_argument("--out", default=str(FASHION_DIR), help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.per_class < 1:
        parser.error("--per-class must be at least 1")
    paths = make_examples(args.source, args.out, args.per_class)
    total = sum(p.stat().st_size for p in paths)
    print(f"wrote {len(paths)} images ({total / 1024:.1f} KiB) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
