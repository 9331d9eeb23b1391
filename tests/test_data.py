"""Tests for pmpo.data: loaders on tiny generated trees in CoOp's layouts, few-shot sampling
(checked against Dassl's procedure), the base/new split, HM, transforms and image loading."""

from __future__ import annotations

import json
import os
import random
import sys
import types
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from PIL import Image

import pmpo.data.fewshot as fewshot_mod
from pmpo.data import (
    CLIP_MEAN,
    CLIP_STD,
    MAX_IMAGE_PIXELS,
    DatasetSplits,
    Datum,
    ImageDataset,
    build_dataset,
    build_transform,
    harmonic_mean,
    list_datasets,
    load_image,
    resolve_dataset_name,
    sample_few_shot,
    subsample_classes,
)
from pmpo.errors import DatasetError, PMPOError

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

_COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]


def make_image(path: Path, index: int = 0, size=(8, 8), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = _COLORS[index % len(_COLORS)]
    if mode == "L":
        color = color[0]
    elif mode == "RGBA":
        color = (*color, 128)
    img = Image.new(mode if mode != "P" else "RGB", size, color)
    if mode == "P":
        img = img.convert("P")
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    img.save(path, fmt)
    return path


def write_split(path: Path, split: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(split))


def coop_split_tree(image_dir: Path, classes: list[str], per_split=(3, 1, 2), nested=True):
    """Create images for ``classes`` and return CoOp split entries [rel_path, label, name]."""
    split = {"train": [], "val": [], "test": []}
    for label, cname in enumerate(classes):
        n = 0
        for part, count in zip(("train", "val", "test"), per_split):
            for _ in range(count):
                rel = f"{cname}/{cname}_{n:04d}.jpg" if nested else f"{cname}_{n}.jpg"
                make_image(image_dir / rel, label)
                split[part].append([rel, label, cname])
                n += 1
    return split


def synthetic_splits(n_classes=5, n_train=20, n_val=6, n_test=3, name="synthetic") -> DatasetSplits:
    """Labels interleaved in a non-sorted first-appearance order, to exercise Dassl's grouping."""
    order = list(range(n_classes))[::-1]
    order = order[1::2] + order[0::2]

    def items(part, count):
        return [
            Datum(f"/data/{name}/{part}/c{y}/{i}.jpg", y, f"class {y}")
            for i in range(count)
            for y in order
        ]

    return DatasetSplits(
        name, [f"class {y}" for y in range(n_classes)], items("train", n_train), items("val", n_val),
        items("test", n_test), ["a photo of a {}."],
    )


def dassl_reference(train: list[Datum], val: list[Datum], shots: int, seed: int):
    """Dassl's procedure, written out: seed the *global* random, then per label (first
    appearance order) random.sample(items, K) if len >= K else all items; train then val."""
    random.seed(seed)

    def generate(data, k):
        tracker = defaultdict(list)
        for item in data:
            tracker[item.label].append(item)
        out = []
        for items in tracker.values():
            out.extend(random.sample(items, k) if len(items) >= k else items)
        return out

    return generate(train, shots), generate(val, min(shots, 4))


# --------------------------------------------------------------------------------------------
# benchmark loaders in CoOp's layouts
# --------------------------------------------------------------------------------------------


def test_dtd_loader(tmp_path):
    classes = ["banded", "bubbly", "zig_zagged"]
    split = coop_split_tree(tmp_path / "dtd" / "images", classes)
    write_split(tmp_path / "dtd" / "split_zhou_DescribableTextures.json", split)

    ds = build_dataset("DescribableTextures", tmp_path)
    assert ds.name == "dtd"
    assert ds.classnames == ["banded", "bubbly", "zig zagged"]
    assert ds.templates == ["{} texture."]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (9, 3, 6)
    assert [d.label for d in ds.train] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for d in ds.train + ds.val + ds.test:
        assert os.path.isabs(d.path) and os.path.isfile(d.path)
        assert d.classname == ds.classnames[d.label]
    assert ds.train[0].path == str(tmp_path / "dtd" / "images" / "banded" / "banded_0000.jpg")


def test_oxford_pets_loader_and_root_as_dataset_folder(tmp_path):
    image_dir = tmp_path / "oxford_pets" / "images"
    split = coop_split_tree(image_dir, ["abyssinian", "american_bulldog"], nested=False)
    write_split(tmp_path / "oxford_pets" / "split_zhou_OxfordPets.json", split)

    ds = build_dataset("OxfordPets", tmp_path)
    assert ds.classnames == ["abyssinian", "american bulldog"]
    assert ds.templates == ["a photo of a {}, a type of pet."]
    assert ds.test[-1].path == str(image_dir / "american_bulldog_5.jpg")
    # --root may also point at the dataset folder itself
    again = build_dataset("oxford_pets", tmp_path / "oxford_pets")
    assert again == ds


def test_eurosat_classnames_are_renamed(tmp_path):
    split = coop_split_tree(tmp_path / "eurosat" / "2750", ["AnnualCrop", "Forest", "SeaLake"])
    # CoOp's released file already holds the descriptive names; both spellings must work.
    split["test"] = [[p, y, "Sea or Lake" if c == "SeaLake" else c] for p, y, c in split["test"]]
    write_split(tmp_path / "eurosat" / "split_zhou_EuroSAT.json", split)

    ds = build_dataset("eurosat", tmp_path)
    assert ds.classnames == ["Annual Crop Land", "Forest", "Sea or Lake"]
    assert ds.templates == ["a centered satellite photo of {}."]
    assert {d.classname for d in ds.test} == set(ds.classnames)


def test_caltech_ignores_background_folders(tmp_path):
    split = coop_split_tree(tmp_path / "caltech-101" / "101_ObjectCategories", ["accordion", "airplanes"])
    make_image(tmp_path / "caltech-101" / "101_ObjectCategories" / "BACKGROUND_Google" / "x.jpg")
    split["train"].append(["BACKGROUND_Google/x.jpg", 2, "BACKGROUND_Google"])
    write_split(tmp_path / "caltech-101" / "split_zhou_Caltech101.json", split)

    ds = build_dataset("caltech101", tmp_path)
    assert ds.classnames == ["accordion", "airplane"]
    assert all("BACKGROUND" not in d.path for d in ds.train)


def test_fgvc_aircraft_loader(tmp_path):
    root = tmp_path / "fgvc_aircraft"
    variants = ["707-320", "A300B4", "Cessna 172"]
    root.mkdir()
    (root / "variants.txt").write_text("\n".join(variants) + "\n")
    for part, ids in (("train", [1, 2, 3]), ("val", [4]), ("test", [5, 6])):
        lines = []
        for i in ids:
            make_image(root / "images" / f"{i:07d}.jpg", i)
            lines.append(f"{i:07d} {variants[i % 3]}")
        (root / f"images_variant_{part}.txt").write_text("\n".join(lines) + "\n")

    ds = build_dataset("FGVCAircraft", tmp_path)
    assert ds.classnames == variants
    assert [(d.label, d.classname) for d in ds.train] == [(1, "A300B4"), (2, "Cessna 172"), (0, "707-320")]
    assert ds.templates == ["a photo of a {}, a type of aircraft."]


def _write_imagenet_classnames(path: Path, wnids: list[str], names: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{w} {n}\n" for w, n in zip(wnids, names)))


WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475"]
NAMES = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead shark"]


def test_imagenet_loader_uses_test_as_val(tmp_path):
    root = tmp_path / "imagenet"
    _write_imagenet_classnames(root / "classnames.txt", WNIDS[:3], NAMES[:3])
    for y, w in enumerate(WNIDS[:3]):
        for i in range(3):
            make_image(root / "images" / "train" / w / f"{w}_{i}.JPEG", y)
        make_image(root / "images" / "val" / w / f"ILSVRC2012_val_{y:08d}.JPEG", y)
    (root / "images" / "train" / WNIDS[0] / ".DS_Store").write_text("junk")

    ds = build_dataset("ImageNet", tmp_path)
    assert ds.classnames == NAMES[:3]
    assert ds.templates == ["a photo of a {}."]
    assert len(ds.train) == 9 and len(ds.test) == 3
    assert ds.val == ds.test  # CoOp evaluates on val and uses it as val too
    assert [d.label for d in ds.test] == [0, 1, 2]
    assert ds.test[2].classname == "great white shark"


def test_imagenet_missing_classnames_txt(tmp_path):
    (tmp_path / "imagenet" / "images" / "train" / WNIDS[0]).mkdir(parents=True)
    with pytest.raises(DatasetError) as e:
        build_dataset("imagenet", tmp_path)
    assert str(tmp_path / "imagenet" / "classnames.txt") in str(e.value)


@pytest.mark.parametrize("name,folder,image_dir", [
    ("ImageNet-A", "imagenet-adversarial", "imagenet-a"),
    ("imagenet_r", "imagenet-rendition", "imagenet-r"),
])
def test_imagenet_a_r_class_subset(tmp_path, name, folder, image_dir):
    root = tmp_path / folder
    _write_imagenet_classnames(root / "classnames.txt", WNIDS, NAMES)
    subset = [WNIDS[4], WNIDS[1]]  # 2 of the 5 classes, created out of order
    for w in subset:
        for i in range(2):
            make_image(root / image_dir / w / f"{i}.jpg", i)
    (root / image_dir / "README.txt").write_text("not a class")

    ds = build_dataset(name, tmp_path)
    assert ds.classnames == ["goldfish", "hammerhead shark"]  # sorted wnids, labels 0..1
    assert ds.train == [] and ds.val == []
    assert [d.label for d in ds.test] == [0, 0, 1, 1]
    assert all(d.classname == ds.classnames[d.label] for d in ds.test)


def test_imagenetv2_and_sketch(tmp_path):
    _write_imagenet_classnames(tmp_path / "imagenetv2" / "classnames.txt", WNIDS, NAMES)
    v2 = tmp_path / "imagenetv2" / "imagenetv2-matched-frequency-format-val"
    for label in (0, 3, 10 - 8):
        make_image(v2 / str(label) / "a.jpeg", label)
    ds = build_dataset("ImageNetV2", tmp_path)
    assert ds.classnames == NAMES
    assert [(d.label, d.classname) for d in ds.test] == [(0, "tench"), (2, "great white shark"), (3, "tiger shark")]

    _write_imagenet_classnames(tmp_path / "imagenet-sketch" / "classnames.txt", WNIDS, NAMES)
    for w in WNIDS:
        make_image(tmp_path / "imagenet-sketch" / "images" / w / "1.JPEG")
    sk = build_dataset("ImageNetSketch", tmp_path)
    assert sk.classnames == NAMES and len(sk.test) == 5


# --------------------------------------------------------------------------------------------
# errors for missing files, names
# --------------------------------------------------------------------------------------------


def test_missing_split_file_names_expected_path(tmp_path):
    (tmp_path / "oxford_pets" / "images").mkdir(parents=True)
    with pytest.raises(DatasetError) as e:
        build_dataset("oxford_pets", tmp_path)
    msg = str(e.value)
    assert "OxfordPets" in msg
    assert str(tmp_path / "oxford_pets" / "split_zhou_OxfordPets.json") in msg
    assert "DATASETS.md" in msg and "oxford_pets/images" in msg
    assert isinstance(e.value, PMPOError)


def test_missing_image_dir_and_missing_images(tmp_path):
    write_split(tmp_path / "dtd" / "split_zhou_DescribableTextures.json",
                {"train": [["banded/a.jpg", 0, "banded"]], "val": [], "test": []})
    with pytest.raises(DatasetError, match="image folder not found") as e:
        build_dataset("dtd", tmp_path)
    assert str(tmp_path / "dtd" / "images") in str(e.value)

    (tmp_path / "dtd" / "images").mkdir()
    with pytest.raises(DatasetError) as e:
        build_dataset("dtd", tmp_path)
    assert str(tmp_path / "dtd" / "images" / "banded" / "a.jpg") in str(e.value)


def test_malformed_split_file(tmp_path):
    (tmp_path / "dtd" / "images").mkdir(parents=True)
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text("{not json")
    with pytest.raises(DatasetError, match="cannot read split file"):
        build_dataset("dtd", tmp_path)
    write_split(tmp_path / "dtd" / "split_zhou_DescribableTextures.json", {"train": [["a.jpg", "x", "y"]], "val": [], "test": []})
    with pytest.raises(DatasetError, match="relative_path, label, classname"):
        build_dataset("dtd", tmp_path)


def test_dataset_names():
    names = list_datasets()
    for key in ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101", "imagenetv2",
                "imagenet_sketch", "imagenet_a", "imagenet_r", "imagefolder", "csv"):
        assert key in names
    assert resolve_dataset_name("OxfordFlowers") == "oxford_flowers"
    assert resolve_dataset_name("Flowers102") == "oxford_flowers"
    assert resolve_dataset_name("ImageNet-Sketch") == "imagenet_sketch"
    assert resolve_dataset_name("StanfordCars") == "stanford_cars"
    with pytest.raises(DatasetError) as e:
        build_dataset("mnist", "/nowhere")
    assert "oxford_pets" in str(e.value) and "imagenet_r" in str(e.value)


def test_shapeworld_is_delegated_lazily(tmp_path, monkeypatch):
    fake = types.ModuleType("pmpo.data.shapeworld")
    fake.build_shapeworld_splits = lambda root: DatasetSplits("shapeworld", ["circle"], [], [], [], ["{}"])
    monkeypatch.setitem(sys.modules, "pmpo.data.shapeworld", fake)
    assert build_dataset("ShapeWorld", tmp_path).name == "shapeworld"  # looked up when asked for, not at import


# --------------------------------------------------------------------------------------------
# custom data
# --------------------------------------------------------------------------------------------


def test_imagefolder_deterministic_split(tmp_path):
    for y, cname in enumerate(["cat", "dog_breed"]):
        for i in range(10):
            make_image(tmp_path / "data" / cname / f"{i}.png", y)
    (tmp_path / "data" / "notes.txt").write_text("ignored")

    ds = build_dataset("imagefolder", tmp_path / "data")
    assert ds.classnames == ["cat", "dog breed"]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (14, 2, 4)
    all_paths = [d.path for d in ds.train + ds.val + ds.test]
    assert len(set(all_paths)) == 20
    again = build_dataset("imagefolder", tmp_path / "data")
    assert again == ds


def test_imagefolder_with_split_folders(tmp_path):
    root = tmp_path / "data"
    for part, n in (("train", 3), ("test", 2)):
        for y, cname in enumerate(["b", "a"]):
            for i in range(n):
                make_image(root / part / cname / f"{i}.jpg", y)
    ds = build_dataset("ImageFolder", root)
    assert ds.classnames == ["a", "b"]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (6, 0, 4)
    assert all(f"{os.sep}test{os.sep}" in d.path for d in ds.test)


def test_csv_with_and_without_split(tmp_path):
    for i in range(4):
        make_image(tmp_path / "imgs" / f"r{i}.jpg", 0)
        make_image(tmp_path / "imgs" / f"g{i}.jpg", 1)
    rows = ["path,label,split"] + [f"imgs/r{i}.jpg,red,{'train' if i < 2 else 'test'}" for i in range(4)]
    rows += [f"{tmp_path / 'imgs' / f'g{i}.jpg'},green,{'train' if i < 3 else 'val'}" for i in range(4)]
    (tmp_path / "a.csv").write_text("\n".join(rows) + "\n")
    ds = build_dataset("csv", tmp_path / "a.csv")
    assert ds.classnames == ["green", "red"]
    assert [d.label for d in ds.train] == [1, 1, 0, 0, 0]
    assert len(ds.val) == 1 and len(ds.test) == 2
    assert ds.train[0].path == str(tmp_path / "imgs" / "r0.jpg")

    (tmp_path / "b.csv").write_text("path,label\n" + "".join(f"imgs/r{i}.jpg,red\n" for i in range(4)))
    ds = build_dataset("csv", tmp_path / "b.csv")
    assert (len(ds.train), len(ds.val), len(ds.test)) == (3, 0, 1)


def test_csv_errors(tmp_path):
    with pytest.raises(DatasetError, match="CSV file not found"):
        build_dataset("csv", tmp_path / "none.csv")
    (tmp_path / "bad.csv").write_text("file,class\nx.jpg,a\n")
    with pytest.raises(DatasetError, match="path,label"):
        build_dataset("csv", tmp_path / "bad.csv")
    (tmp_path / "missing.csv").write_text("path,label\nnope.jpg,a\n")
    with pytest.raises(DatasetError) as e:
        build_dataset("csv", tmp_path / "missing.csv")
    assert str(tmp_path / "nope.jpg") in str(e.value)


# --------------------------------------------------------------------------------------------
# base/new split and HM
# --------------------------------------------------------------------------------------------


def test_subsample_47_classes():
    ds = synthetic_splits(n_classes=47, n_train=2, n_val=1, n_test=1)
    base = subsample_classes(ds, "base")
    new = subsample_classes(ds, "new")
    assert base.num_classes == 24 and new.num_classes == 23
    assert base.classnames == [f"class {y}" for y in range(24)]
    assert new.classnames == [f"class {y}" for y in range(24, 47)]
    for part, n_per_class in (("train", 2), ("val", 1), ("test", 1)):
        b, n = getattr(base, part), getattr(new, part)
        assert sorted({d.label for d in b}) == list(range(24))
        assert sorted({d.label for d in n}) == list(range(23))
        assert len(b) == 24 * n_per_class and len(n) == 23 * n_per_class
        assert all(d.classname == base.classnames[d.label] for d in b)
        assert all(d.classname == new.classnames[d.label] for d in n)
    assert subsample_classes(ds, "all") is ds
    with pytest.raises(DatasetError):
        subsample_classes(ds, "half")


def test_harmonic_mean():
    assert round(harmonic_mean(69.34, 74.22), 2) == 71.70
    assert round(harmonic_mean(82.69, 63.22), 2) == 71.66
    assert harmonic_mean(0.0, 0.0) == 0.0
    assert harmonic_mean(50.0, 50.0) == pytest.approx(50.0)


# --------------------------------------------------------------------------------------------
# few-shot sampling
# --------------------------------------------------------------------------------------------


def test_global_seed_and_instance_give_the_same_stream():
    random.seed(3)
    expected = random.sample(range(100), 10)
    assert random.Random(3).sample(range(100), 10) == expected


@pytest.mark.parametrize("shots,seed", [(1, 1), (2, 2), (4, 3), (16, 1)])
def test_few_shot_matches_dassl(shots, seed):
    ds = synthetic_splits()
    ds.train.extend(Datum(f"/x/extra{i}.jpg", 5, "class 5") for i in range(4))  # a small class
    ds.classnames.append("class 5")
    ref_train, ref_val = dassl_reference(ds.train, ds.val, shots, seed)
    fs = sample_few_shot(ds, shots, seed)
    assert fs.train == ref_train
    assert fs.val == ref_val
    assert fs.test is ds.test
    counts = defaultdict(int)
    for d in fs.train:
        counts[d.label] += 1
    assert counts == {y: min(shots, 20) for y in range(5)} | {5: min(shots, 4)}
    val_counts = defaultdict(int)
    for d in fs.val:
        val_counts[d.label] += 1
    assert set(val_counts.values()) == {min(shots, 4)}


def test_few_shot_seeds_and_keep_all():
    ds = synthetic_splits()
    a, b, c = (sample_few_shot(ds, 4, s) for s in (1, 1, 2))
    assert a.train == b.train and a.val == b.val
    assert a.train != c.train
    assert sample_few_shot(ds, "all", 1) is ds
    assert sample_few_shot(ds, 0, 1) is ds
    assert sample_few_shot(ds, -1, 1) is ds
    with pytest.raises(DatasetError):
        sample_few_shot(ds, "many", 1)


def test_few_shot_cache_is_used(tmp_path, monkeypatch):
    ds = synthetic_splits()
    first = sample_few_shot(ds, 4, 2, cache_dir=tmp_path)
    cache = tmp_path / "synthetic" / "shot_4-seed_2.json"
    data = json.loads(cache.read_text())
    assert data["train"] == [ds.train.index(d) for d in first.train]
    assert os.listdir(cache.parent) == [cache.name]  # no temporary files left behind

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled although the cache matches")

    monkeypatch.setattr(fewshot_mod, "Random", no_sampling)
    second = sample_few_shot(ds, 4, 2, cache_dir=tmp_path)
    assert second.train == first.train and second.val == first.val


def test_few_shot_cache_survives_moving_the_data(tmp_path):
    ds = synthetic_splits()
    sample_few_shot(ds, 2, 1, cache_dir=tmp_path)
    moved = DatasetSplits(
        ds.name, ds.classnames,
        [Datum(d.path.replace("/data/", "/mnt/other/"), d.label, d.classname) for d in ds.train],
        [Datum(d.path.replace("/data/", "/mnt/other/"), d.label, d.classname) for d in ds.val],
        ds.test, ds.templates,
    )
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample_few_shot(moved, 2, 1, cache_dir=tmp_path)


def test_few_shot_stale_cache_is_resampled(tmp_path):
    ds = synthetic_splits()
    sample_few_shot(ds, 4, 1, cache_dir=tmp_path)
    cache = tmp_path / "synthetic" / "shot_4-seed_1.json"
    changed = synthetic_splits(n_train=21)  # a different split file -> different fingerprint
    with pytest.warns(UserWarning, match="different split"):
        fs = sample_few_shot(changed, 4, 1, cache_dir=tmp_path)
    assert fs.train == dassl_reference(changed.train, changed.val, 4, 1)[0]
    assert json.loads(cache.read_text())["fingerprint"]["n_train"] == len(changed.train)

    cache.write_text("{broken")
    with pytest.warns(UserWarning, match="unreadable"):
        fs = sample_few_shot(changed, 4, 1, cache_dir=tmp_path)
    assert fs.train == dassl_reference(changed.train, changed.val, 4, 1)[0]


def test_few_shot_before_subsample_on_real_loader(tmp_path):
    classes = [f"c{i}" for i in range(5)]
    split = coop_split_tree(tmp_path / "dtd" / "images", classes, per_split=(3, 5, 1))
    write_split(tmp_path / "dtd" / "split_zhou_DescribableTextures.json", split)
    ds = build_dataset("dtd", tmp_path)
    fs = sample_few_shot(ds, 2, 1, cache_dir=tmp_path / "cache")
    assert len(fs.train) == 10 and len(fs.val) == 10
    assert (tmp_path / "cache" / "dtd" / "shot_2-seed_1.json").is_file()
    new = subsample_classes(fs, "new")
    assert new.classnames == ["c3", "c4"] and len(new.train) == 4 and len(new.test) == 2


# --------------------------------------------------------------------------------------------
# transforms and image loading
# --------------------------------------------------------------------------------------------


def test_clip_constants_match_open_clip():
    constants = pytest.importorskip("open_clip.constants")
    assert tuple(constants.OPENAI_DATASET_MEAN) == CLIP_MEAN
    assert tuple(constants.OPENAI_DATASET_STD) == CLIP_STD


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
@pytest.mark.parametrize("train", [True, False])
def test_transform_shapes(mode, train):
    color = {"RGB": (10, 20, 30), "L": 40, "RGBA": (10, 20, 30, 100), "P": 3}[mode]
    img = Image.new(mode, (48, 24), color)
    out = build_transform(32, CLIP_MEAN, CLIP_STD, train=train)(img)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_test_transform_resizes_shorter_side_and_center_crops():
    img = Image.new("RGB", (64, 32), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 8, 32))  # left eighth white: cropped away
    out = build_transform(16, (0, 0, 0), (1, 1, 1), train=False)(img)
    assert out.shape == (3, 16, 16)
    assert out.max() < 0.05  # resized to 32x16, the central 16x16 holds only black
    assert torch.equal(out, build_transform(16, (0, 0, 0), (1, 1, 1), train=False)(img))


def test_image_dataset_and_modes(tmp_path):
    items = [
        Datum(str(make_image(tmp_path / "a.jpg", 0, (20, 10))), 0, "a"),
        Datum(str(make_image(tmp_path / "b.png", 1, (10, 20), mode="RGBA")), 1, "b"),
        Datum(str(make_image(tmp_path / "c.png", 2, mode="L")), 2, "c"),
        Datum(str(make_image(tmp_path / "d.png", 3, mode="P")), 3, "d"),
    ]
    data = ImageDataset(items, build_transform(16, train=False))
    assert len(data) == 4
    for i in range(4):
        x, y = data[i]
        assert x.shape == (3, 16, 16) and y == i
    assert load_image(items[2].path).mode == "RGB"
    x, _ = ImageDataset(items)[0]
    assert x.shape == (3, 10, 20)


def test_corrupt_missing_and_huge_images(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(DatasetError) as e:
        ImageDataset([Datum(str(bad), 0, "x")])[0]
    assert str(bad) in str(e.value)

    good = make_image(tmp_path / "big.jpg", 0, (64, 64))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(DatasetError, match="truncated.jpg"):
        load_image(str(truncated))

    with pytest.raises(DatasetError, match="not found"):
        load_image(str(tmp_path / "gone.jpg"))

    assert MAX_IMAGE_PIXELS == 178_000_000
    with pytest.raises(DatasetError, match="too large"):
        load_image(str(good), max_pixels=1000)


def test_large_photos_are_downscaled_on_load_not_refused(tmp_path):
    from PIL import Image

    photo = tmp_path / "phone.jpg"
    Image.new("RGB", (8000, 6000), (200, 30, 30)).save(photo, quality=70)  # 48 MP
    image = load_image(str(photo))
    assert image.width * image.height <= 16_000_000 and abs(image.width / image.height - 4 / 3) < 0.01
    assert image.getpixel((10, 10))[0] > 150  # the picture, not a blank
    png = tmp_path / "scan.png"
    Image.new("RGB", (5000, 4000), (0, 0, 255)).save(png)  # 20 MP, not a JPEG: resized after decoding
    assert load_image(str(png), downscale_above=1_000_000).size == (1118, 894)


def test_train_crop_scale_is_configurable():
    import torchvision.transforms as T

    from pmpo.data.transforms import build_transform

    crops = [t for t in build_transform(32, train=True, min_crop_scale=0.5).transforms if isinstance(t, T.RandomResizedCrop)]
    assert len(crops) == 1 and crops[0].scale == (0.5, 1.0)
    default = [t for t in build_transform(32, train=True).transforms if isinstance(t, T.RandomResizedCrop)]
    assert default[0].scale == (0.08, 1.0)  # CoOp's protocol unless asked otherwise


def test_train_augmentation_draws_from_its_generator_exactly_as_torchvision_from_the_global_one():
    """The engine seeds a generator per image instead of the global one; the crops and flips must
    be torchvision's all the same (the published numbers were made with them), and the global
    random state must not move."""
    import numpy as np
    import torchvision.transforms as T

    from pmpo.data.transforms import build_transform

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 40), (30, 70), (64, 20))]
    ours = build_transform(24, train=True, min_crop_scale=0.08)
    reference = T.Compose([T.RandomResizedCrop(24, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                           T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
    state = torch.get_rng_state()
    for seed in range(40):
        for image in images:
            got = ours(image, generator=torch.Generator().manual_seed(seed * 1_000_003))
            assert torch.equal(torch.get_rng_state(), state)
            torch.manual_seed(seed * 1_000_003)
            assert torch.equal(got, reference(image)), seed
            torch.set_rng_state(state)
