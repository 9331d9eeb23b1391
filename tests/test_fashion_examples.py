"""The shipped Fashion-MNIST example images: complete, labelled by their file names, licensed,
packaged; and the tool that writes them parses IDX files and selects images deterministically
(checked on a tiny IDX pair written here, so no Debian package is needed)."""

from __future__ import annotations

import glob
import gzip
import importlib.util
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import tomllib
from PIL import Image

from pmpo.app.examples import label_from_filename
from pmpo.app.fashion import FASHION_CLASSES, FASHION_CREDIT, FASHION_DIR, FASHION_PER_CLASS, fashion_available, fashion_images
from pmpo.app.trainset import guess_label

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("make_fashion_examples", REPO / "tools" / "make_fashion_examples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sixteen_images_per_class_sorted_by_class_then_k():
    assert len(FASHION_CLASSES) == 10 and len(set(FASHION_CLASSES)) == 10
    assert fashion_available()
    paths = fashion_images()
    assert len(paths) == 10 * FASHION_PER_CLASS == 160
    expected = [f"{c.replace(' ', '_')}_{k}.png" for c in FASHION_CLASSES for k in range(1, FASHION_PER_CLASS + 1)]
    assert [Path(p).name for p in paths] == expected
    assert sorted(p.name for p in FASHION_DIR.glob("*.png")) == sorted(expected)  # nothing else in the folder
    assert [Path(p).name for p in fashion_images(per_class=2)][:3] == ["t_shirt_1.png", "t_shirt_2.png", "trouser_1.png"]
    assert len(fashion_images(per_class=2)) == 20


def test_every_image_opens_as_28x28_and_the_set_is_small():
    total = 0
    for p in fashion_images():
        with Image.open(p) as im:
            im.load()
            assert im.size == (28, 28) and im.mode in ("L", "RGB"), (p, im.size, im.mode)
        total += Path(p).stat().st_size
    assert total < 200 * 1024


def test_file_names_give_back_their_class():
    for p in fashion_images():
        expected = FASHION_CLASSES[[c.replace(" ", "_") for c in FASHION_CLASSES].index(Path(p).stem.rsplit("_", 1)[0])]
        assert guess_label(Path(p).name) == expected, p
        assert label_from_filename(p, FASHION_CLASSES) == expected, p


def test_licence_readme_and_credit():
    licence = (FASHION_DIR / "LICENSE").read_text()
    assert "MIT" in licence and "Zalando SE" in licence and "Permission is hereby granted" in licence
    readme = (FASHION_DIR / "README.md").read_text()
    assert "dataset-fashion-mnist" in readme and "github.com/zalandoresearch/fashion-mnist" in readme
    assert "\n" not in FASHION_CREDIT and "MIT" in FASHION_CREDIT and "Zalando" in FASHION_CREDIT


def test_package_data_globs_cover_the_folder():
    """setuptools expands package-data globs with glob(recursive=True) under the package's folder
    (app/, which the wheel maps to pmpo.app)."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = setuptools["package-data"]["pmpo.app"]
    pkg = REPO / setuptools["package-dir"]["pmpo.app"]
    shipped = {Path(f).resolve() for pat in patterns for f in glob.glob(str(pkg / pat), recursive=True)}
    for f in [*map(Path, fashion_images()), FASHION_DIR / "LICENSE", FASHION_DIR / "README.md"]:
        assert f.resolve() in shipped, f


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_tool_selects_first_items_per_class_in_file_order(tool, tmp_path):
    labels = np.array([2, 0, 1, 0, 2, 1, 1, 0, 2, 0, 1, 2], dtype=np.uint8)  # 3 classes x 4, interleaved
    images = (np.arange(len(labels) * 4 * 5).reshape(len(labels), 4, 5) * 3 % 251).astype(np.uint8)
    src = tmp_path / "src"
    src.mkdir()
    _write_idx(src / tool.TEST_IMAGES, images)
    _write_idx(src / tool.TEST_LABELS, labels)
    np.testing.assert_array_equal(tool.read_idx(src / tool.TEST_IMAGES), images)
    np.testing.assert_array_equal(tool.read_idx(src / tool.TEST_LABELS), labels)

    out = tmp_path / "out"
    out.mkdir()
    (out / "LICENSE").write_text("keep")
    (out / "b_9.png").write_bytes(b"stale")  # named like ours, not in the selection: removed
    (out / "photo.png").write_bytes(b"not ours")  # any other file stays
    classes = ["a", "b", "c d"]
    written = tool.make_examples(src, out, per_class=3, classes=classes)
    assert [p.name for p in written] == ["a_1.png", "a_2.png", "a_3.png", "b_1.png", "b_2.png", "b_3.png",
                                         "c_d_1.png", "c_d_2.png", "c_d_3.png"]
    first = {0: [1, 3, 7], 1: [2, 5, 6], 2: [0, 4, 8]}  # indices of each label's first three, file order
    for c, name in enumerate(classes):
        for k, i in enumerate(first[c], start=1):
            with Image.open(out / f"{name.replace(' ', '_')}_{k}.png") as im:
                assert im.mode == "L"
                np.testing.assert_array_equal(np.array(im), images[i])
    assert sorted(p.name for p in out.iterdir()) == sorted(["LICENSE", "photo.png", *(p.name for p in written)])
    assert guess_label("c_d_2.png") == "c d"

    snapshot = {p.name: p.read_bytes() for p in written}
    again = tool.make_examples(src, out, per_class=3, classes=classes)  # deterministic: the same bytes
    assert {p.name: p.read_bytes() for p in again} == snapshot

    tool.make_examples(src, out, per_class=2, classes=classes)  # fewer per class: the extra files go
    assert sorted(p.name for p in out.glob("*_*.png")) == ["a_1.png", "a_2.png", "b_1.png", "b_2.png",
                                                          "c_d_1.png", "c_d_2.png"]

    with pytest.raises(ValueError, match="only 4 items"):
        tool.make_examples(src, out, per_class=5, classes=classes)


def test_tool_rejects_malformed_idx(tool, tmp_path):
    bad = tmp_path / "bad.gz"
    bad.write_bytes(gzip.compress(b"\x01\x02\x08\x01" + struct.pack(">I", 3) + b"abc"))
    with pytest.raises(ValueError, match="magic"):
        tool.read_idx(bad)
    short = tmp_path / "short"  # not gzip'd: read as is
    short.write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 4) + b"abc")
    with pytest.raises(ValueError, match="data bytes"):
        tool.read_idx(short)


def test_cli_per_class_and_source(tool, tmp_path):
    labels = np.repeat(np.arange(10, dtype=np.uint8), 2)
    images = np.stack([np.full((28, 28), 10 * i, np.uint8) for i in range(20)])
    _write_idx(tmp_path / tool.TEST_IMAGES, images)
    _write_idx(tmp_path / tool.TEST_LABELS, labels)
    out = tmp_path / "out"
    assert tool.main(["--source", str(tmp_path), "--per-class", "2", "--out", str(out)]) == 0
    names = sorted(p.name for p in out.glob("*.png"))
    assert len(names) == 20 and "ankle_boot_2.png" in names and "t_shirt_1.png" in names
    assert all(re.fullmatch(r"[a-z_]+_[12]\.png", n) for n in names)
    with Image.open(out / "ankle_boot_2.png") as im:
        assert np.array(im).max() == 190  # image 19: the second of label 9
