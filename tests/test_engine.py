"""The training engine: schedule, data plan, learning, checkpoints, resume, NaN, stop, evaluation."""

from __future__ import annotations

import hashlib
import json
import math
import random
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pmpo import PMPOConfig, build_model, load_backbone, load_checkpoint
from pmpo.data import Datum, build_dataset
from pmpo.engine import (
    NonFiniteLossError,
    TrainConfig,
    evaluate,
    load_train_preset,
    lr_at,
    plan_epoch,
    train,
)
from pmpo.errors import CheckpointError, InputError

COLOURS = {"red": (220, 20, 20), "green": (20, 220, 20), "blue": (20, 20, 220), "yellow": (220, 220, 20)}


def make_colour_tree(root: Path, per_split=(4, 1, 2), seed: int = 0) -> Path:
    """An imagefolder tree ``root/{train,val,test}/<colour>/*.png`` of jittered solid colours:
    an easy task that a tiny random-init CLIP with prompts can learn within a few epochs."""
    from PIL import Image

    rng = random.Random(seed)
    for split, n in zip(("train", "val", "test"), per_split):
        for name, rgb in COLOURS.items():
            for i in range(n):
                path = root / split / name / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                colour = tuple(max(0, min(255, v + rng.randint(-30, 30))) for v in rgb)
                Image.new("RGB", (40, 40), colour).save(path)
    return root


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return build_dataset("imagefolder", make_colour_tree(tmp_path_factory.mktemp("colours")))


@pytest.fixture(scope="module")
def backbone(tiny_model):
    return load_backbone(tiny_model)


def make(backbone, method="pmpo", seed: int = 0, **kw):
    torch.manual_seed(seed)  # prompt init (couplings, padding vectors) is random
    model = build_model(PMPOConfig(method=method, model=backbone.model_name, pretrained="none", **kw), backbone=backbone)
    return model


def fast_cfg(**kw) -> TrainConfig:
    base = dict(epochs=3, batch_size=4, lr=0.5, warmup_epochs=0, log_every=1, num_workers=0, eval_batch_size=32)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture()
def sharp(backbone):
    """A random-init text tower maps all class names to nearly the same direction (cos ~0.97);
    CLIP's maximal logit scale (100) makes those small differences learnable."""
    scale = backbone.clip.logit_scale.data.clone()
    backbone.clip.logit_scale.data.fill_(math.log(100.0))
    yield backbone
    backbone.clip.logit_scale.data.copy_(scale)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- schedule and data plan ----------------------------------------------------------------


def test_default_is_maples_recipe_with_dassl_schedule():
    cfg = TrainConfig()
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.batch_size, cfg.epochs) == ("sgd", 0.0035, 0.9, 5e-4, 4, 5)
    lrs = [lr_at(cfg, e) for e in range(cfg.epochs)]
    # Dassl: ConstantWarmupScheduler(cons_lr=1e-5, 1 epoch) around CosineAnnealingLR(T_max=5)
    expected = [1e-5] + [0.5 * 0.0035 * (1 + math.cos(math.pi * k / 5)) for k in range(4)]
    assert lrs == pytest.approx(expected)
    assert lr_at(TrainConfig(scheduler="constant"), 3) == 0.0035


def test_presets_load_and_coop_has_its_own_recipe():
    coop = load_train_preset("coop", "base2new")
    assert (coop.lr, coop.batch_size, coop.epochs) == (0.002, 32, 200)
    assert load_train_preset("coop", "base2new", dataset="imagenet").epochs == 50
    assert load_train_preset("pmpo", "base2new") == load_train_preset("maple", "base2new")
    kgcoop = load_train_preset("kgcoop", "base2new")  # its authors' recipe, not MaPLe's
    assert (kgcoop.lr, kgcoop.batch_size, kgcoop.epochs, kgcoop.warmup_epochs, kgcoop.warmup_lr) == (0.002, 128, 100, 1, 1e-5)
    assert load_train_preset("pmpo", "base2new", lr=0.01).lr == 0.01
    with pytest.raises(InputError, match="unknown training option"):
        TrainConfig.from_dict({"learning_rate": 1})
    with pytest.raises(InputError, match="optimizer"):
        TrainConfig(optimizer="lbfgs")


def test_plan_is_the_same_global_batches_for_any_world_and_accumulation():
    cfg = TrainConfig(batch_size=8, seed=3)
    single = plan_epoch(37, cfg, epoch=2)
    assert len(single) == 4  # 37 // 8, the incomplete batch dropped as Dassl does
    for world, accum in ((2, 1), (2, 2), (1, 4)):
        c = TrainConfig(batch_size=8, seed=3, grad_accum=accum)
        per_rank = [plan_epoch(37, c, 2, rank, world) for rank in range(world)]
        for s, step in enumerate(single):
            merged = [key for rank in range(world) for mb in per_rank[rank][s].micro for key in mb]
            assert merged == step.micro[0]  # same images, same per-image seeds, same order
            assert sum(w for rank in range(world) for w in per_rank[rank][s].weights) == pytest.approx(1.0)
    assert plan_epoch(37, cfg, 3)[0].micro != single[0].micro  # a new order every epoch
    assert [len(s.micro[0]) for s in plan_epoch(5, cfg, 0)] == [5]  # fewer images than a batch: one step
    with pytest.raises(InputError, match="cannot be split"):
        plan_epoch(3, TrainConfig(batch_size=8, grad_accum=4), 0)


# --- learning, checkpoints, logs -------------------------------------------------------------


def test_training_reduces_loss_and_writes_checkpoints(sharp, colours, tmp_path):
    model = make(sharp, "pmpo")
    before = evaluate(model, colours.test, colours.classnames)
    seen = []
    cfg = fast_cfg(optimizer="adamw", lr=0.01)
    result = train(model, colours.train, colours.classnames, cfg, out_dir=tmp_path, progress=seen.append)
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 3 and losses[-1] < 0.5 * losses[0], losses
    after = evaluate(model, colours.test, colours.classnames)
    assert after.accuracy > before.accuracy, (before.accuracy, after.accuracy)
    assert after.n == len(colours.test) and set(after.per_class) == set(colours.classnames)
    # progress every step; metrics.jsonl has step and epoch lines with the promised fields
    assert [p["step"] for p in seen] == list(range(1, 13)) and seen[-1]["total_steps"] == 12  # 16 images / 4
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"epoch", "step", "loss", "lr", "acc", "images_per_s"} <= set(rows[0])
    assert [r["epoch"] for r in rows if r["type"] == "epoch"] == [1, 2, 3]
    # the prompt checkpoint reproduces the trained model exactly
    loaded = load_checkpoint(tmp_path / "last.safetensors", backbone=sharp)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x, colours.classnames), model(x, colours.classnames), atol=1e-5)
    # the training state is safetensors with JSON metadata (no pickle anywhere)
    with safe_open(str(tmp_path / "train_state.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
        assert meta["format"] == "pmpo-train-state/1" and meta["epoch"] == "3"
        assert any(k.startswith("optim.") for k in fh.keys())


def test_resume_after_kill_matches_uninterrupted_run(backbone, colours, tmp_path):
    cfg = fast_cfg(lr=0.05, batch_size=8, epochs=2)
    full = make(backbone, "pmpo")
    reference = train(full, colours.train, colours.classnames, cfg, out_dir=tmp_path / "full")

    class Killed(Exception):
        pass

    def kill_in_epoch_2(p):
        if p["epoch"] == 2 and p["epoch_step"] == 1:
            raise Killed  # dies mid-epoch: only epoch 1's checkpoint is on disk

    broken = make(backbone, "pmpo")
    with pytest.raises(Killed):
        train(broken, colours.train, colours.classnames, cfg, out_dir=tmp_path / "killed", progress=kill_in_epoch_2)
    state = tmp_path / "killed" / "train_state.safetensors"
    with safe_open(str(state), framework="pt") as fh:
        assert fh.metadata()["epoch"] == "1"

    resumed_model = make(backbone, "pmpo")  # a fresh process would start from new prompts
    resumed = train(resumed_model, colours.train, colours.classnames, cfg, out_dir=tmp_path / "killed", resume=True)
    assert resumed.start_epoch == 1 and resumed.epochs_run == 1
    for a, b in zip(full.learnable_parameters(), resumed_model.learnable_parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), (a - b).abs().max()
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in reference.history], abs=1e-6)
    lines = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    assert [r["epoch"] for r in map(json.loads, lines) if r["type"] == "epoch"] == [1, 2]
    # a finished run resumes to the same result without training again
    again = train(make(backbone, "pmpo"), colours.train, colours.classnames, cfg, out_dir=tmp_path / "killed", resume=True)
    assert again.epochs_run == 0 and len(again.history) == 2
    # resuming with other options is refused rather than silently mixing recipes
    with pytest.raises(CheckpointError, match="lr"):
        train(make(backbone, "pmpo"), colours.train, colours.classnames, fast_cfg(lr=0.1),
              out_dir=tmp_path / "killed", resume=True)


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(backbone, colours, tmp_path):
    model = make(backbone, "coop")
    cfg = fast_cfg(lr=0.01)
    steps_per_epoch = len(colours.train) // cfg.batch_size
    calls = {"n": 0}
    real_loss = model.loss

    def poisoned(images, labels, classnames, **kwargs):
        calls["n"] += 1
        out = real_loss(images, labels, classnames, **kwargs)
        if calls["n"] > steps_per_epoch:  # from the first step of epoch 2 on
            out["loss"] = out["loss"] * float("nan")
        return out

    model.loss = poisoned
    ckpt = tmp_path / "last.safetensors"
    snapshot = {}

    def remember(p):
        if p["epoch"] == 2 and not snapshot:
            snapshot["sha"] = sha(ckpt)

    with pytest.raises(NonFiniteLossError, match=r"loss became nan at epoch 2 step 1; last good checkpoint: .*last.safetensors"):
        train(model, colours.train, colours.classnames, cfg, out_dir=tmp_path, progress=remember)
    assert not snapshot  # the NaN step never reported progress
    with safe_open(str(tmp_path / "train_state.safetensors"), framework="pt") as fh:
        assert fh.metadata()["epoch"] == "1"
    loaded = load_checkpoint(ckpt, backbone=backbone)
    assert all(torch.isfinite(p).all() for p in loaded.learnable_parameters())
    assert all(torch.isfinite(p).all() for p in model.learnable_parameters())  # no NaN step was taken


def test_stop_event_cancels_between_steps(backbone, colours, tmp_path):
    model = make(backbone, "coop")
    stop = threading.Event()
    result = train(model, colours.train, colours.classnames, fast_cfg(), out_dir=tmp_path, stop=stop,
                   progress=lambda p: stop.set() if p["step"] == 2 else None)
    assert result.stopped and result.history == [] and not (tmp_path / "last.safetensors").exists()


def test_gradient_accumulation_gives_the_same_training(backbone, colours):
    a, b = make(backbone, "coop"), make(backbone, "coop")
    train(a, colours.train, colours.classnames, fast_cfg(epochs=1, lr=0.05, batch_size=8))
    train(b, colours.train, colours.classnames, fast_cfg(epochs=1, lr=0.05, batch_size=8, grad_accum=4))
    for p, q in zip(a.learnable_parameters(), b.learnable_parameters()):
        assert torch.allclose(p, q, atol=1e-6)


@pytest.mark.parametrize("method", ["coop", "cocoop"])
def test_cached_views_train_exactly_as_the_image_pass_would(backbone, colours, method, monkeypatch):
    """With a deterministic transform, one cached view is the image pass itself: same prompts after
    training. The image tower then runs once per image, not once per step."""
    from pmpo.model import PMPOModel

    eval_transform = PMPOModel.eval_transform
    monkeypatch.setattr(PMPOModel, "train_transform", lambda self, min_crop_scale=0.08: eval_transform(self))
    a, b = make(backbone, method), make(backbone, method)
    cfg = dict(epochs=2, lr=0.05, batch_size=4)
    train(a, colours.train, colours.classnames, fast_cfg(**cfg))
    passes = []
    hook = b.vision.visual.transformer.resblocks[0].register_forward_pre_hook(lambda _m, args: passes.append(args[0].shape[0]))
    events = []
    try:
        result = train(b, colours.train, colours.classnames, fast_cfg(cached_views=1, **cfg), progress=events.append)
    finally:
        hook.remove()
    for p, q in zip(a.learnable_parameters(), b.learnable_parameters()):
        assert torch.allclose(p, q, atol=1e-5)
    assert len(result.history) == 2 and sum(passes) == len(colours.train)
    assert events[0]["type"] == "features" and events[0]["total"] == len(colours.train)
    assert {e["type"] for e in events} == {"features", "step"}


def test_cached_views_draw_each_view_and_refuse_visual_prompts(backbone, colours, tmp_path):
    from PIL import Image

    from pmpo.engine import cached_image_features

    model = make(backbone, "coop")
    cfg = fast_cfg(cached_views=3, epochs=1)
    noise = []  # textured images, so that crops and flips change the features
    for i in range(4):
        path = tmp_path / f"noise{i}.png"
        Image.fromarray(torch.randint(0, 256, (40, 40, 3), generator=torch.Generator().manual_seed(i),
                                      dtype=torch.uint8).numpy()).save(path)
        noise.append(Datum(str(path), i % 2, "ab"[i % 2]))
    views = []
    hook = model.vision.visual.transformer.resblocks[0].register_forward_pre_hook(lambda _m, args: views.append(args[0].shape[0]))
    try:
        feats = cached_image_features(model, noise, cfg)
    finally:
        hook.remove()
    assert feats.shape[:2] == (3, len(noise)) and sum(views) == 3 * len(noise)
    assert not torch.allclose(feats[0], feats[1])  # each view its own augmentation
    assert torch.equal(feats, cached_image_features(model, noise, cfg))  # seeded: the same views again
    with pytest.raises(InputError, match="visual prompts"):
        train(make(backbone, "pmpo"), colours.train, colours.classnames, cfg)
    stop = threading.Event()
    stop.set()
    result = train(model, colours.train, colours.classnames, cfg, stop=stop)
    assert result.stopped and result.history == []
    with pytest.raises(InputError, match="cached_views"):
        TrainConfig(cached_views=-1)


def test_bad_inputs_are_clear_errors(backbone, colours):
    model = make(backbone, "coop")
    with pytest.raises(InputError, match="no images"):
        evaluate(model, [], colours.classnames)
    with pytest.raises(InputError, match="outside the 4 classes"):
        evaluate(model, [Datum(colours.test[0].path, 7, "x")], colours.classnames)
    with pytest.raises(InputError, match="no learnable prompts"):
        train(make(backbone, "zeroshot"), colours.train, colours.classnames, fast_cfg())
    with pytest.raises(InputError, match="bf16 needs a CUDA"):
        train(model, colours.train, colours.classnames, fast_cfg(precision="bf16"))


def test_training_leaves_the_global_random_state_alone(backbone, colours):
    """The engine draws from generators of its own (data order, augmentations, loader seeds): a
    run neither reseeds nor advances torch's, numpy's or Python's global generator, which the
    app's other threads share -- and a reseeded global generator could not change the run."""
    import numpy as np

    model = make(backbone, "coop")
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    train(model, colours.train, colours.classnames, fast_cfg(epochs=2))
    evaluate(model, colours.test, colours.classnames)
    assert torch.equal(torch.get_rng_state(), before[0])
    assert random.getstate() == before[1] and (np.random.get_state()[1] == before[2]).all()
