"""The served app as a public Space runs it: start-up from a checkpoint alone, owner-set training
limits, one training per visitor (``python app.py`` in a subprocess, driven by gradio_client)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pmpo import PMPOConfig, build_model, load_backbone, save_checkpoint
from pmpo.app import examples as app_examples
from pmpo.app.launcher import launch, stop
from pmpo.app.startup import open_state
from pmpo.app.train import TrainJobs, TrainLimits
from pmpo.errors import InputError


def test_limits_come_from_the_environment_with_space_defaults():
    assert TrainLimits.from_env({}) == TrainLimits(0.0, 2000, 1)
    space = TrainLimits.from_env({"SPACE_ID": "me/pmpo"})
    assert (space.max_seconds, space.max_images, space.max_concurrent) == (600, 500, 1)
    owner = TrainLimits.from_env({"SPACE_ID": "me/pmpo", "PMPO_MAX_TRAIN_SECONDS": "25", "PMPO_MAX_TRAIN_IMAGES": "64",
                                  "PMPO_MAX_TRAININGS": "2"})
    assert (owner.max_seconds, owner.max_images, owner.max_concurrent) == (25, 64, 2)
    assert owner.budget(0) == 25 and owner.budget(10) == 10 and owner.budget(300) == 25
    assert TrainLimits.from_env({}).budget(0) == 0  # a local app: no budget unless the visitor sets one
    assert "25 s" in owner.describe() and "64" in owner.describe()
    with pytest.raises(InputError, match="PMPO_MAX_TRAIN_SECONDS"):
        TrainLimits.from_env({"PMPO_MAX_TRAIN_SECONDS": "soon"})
    with pytest.raises(InputError, match="PMPO_MAX_TRAININGS"):
        TrainLimits.from_env({"PMPO_MAX_TRAININGS": "0"})
    with pytest.raises(InputError, match="limit of 64"):
        owner.check_images(65)


def test_a_session_runs_one_training_at_a_time():
    jobs = TrainJobs()
    first = jobs.start("visitor")
    with pytest.raises(InputError, match="still running"):
        jobs.start("visitor")
    assert jobs.start("someone else") is not first
    jobs.finish("visitor", first)
    assert jobs.start("visitor") is not first


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tmp_path_factory) -> Path:
    backbone = load_backbone(tiny_model)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny-coop.safetensors"
    save_checkpoint(build_model(PMPOConfig(method="coop", model=backbone.model_name, pretrained="none"), backbone=backbone), path)
    return path


def _classify_status(client, folder: Path) -> str:
    """The status line of one Classify: it names the prompt checkpoint and method in use."""
    from gradio_client import handle_file

    example = app_examples.example_images(folder)[0]
    status, *_ = client.predict(files=[handle_file(example)], classes_text="red circle, blue circle",
                                api_name="/classify")
    return status


@pytest.mark.parametrize("how", ["flag", "env"])
def test_start_with_only_a_checkpoint(checkpoint, tmp_path, how):
    """`python app.py --checkpoint FILE` (or PMPO_CHECKPOINT alone, as a Space is configured): the
    backbone is the one the checkpoint names and its prompts are selected."""
    from gradio_client import Client

    args, env = (["--checkpoint", str(checkpoint)], {}) if how == "flag" else ([], {"PMPO_CHECKPOINT": str(checkpoint)})
    proc, url, _ = launch([*args, "--device", "cpu"], tmp_path / "app.log",
                          env={"PMPO_WARMUP": "0", "PMPO_CACHE_DIR": str(tmp_path / "cache"), **env})
    try:
        status = _classify_status(Client(url, verbose=False), tmp_path / "examples")
        assert "upload: tiny-coop.safetensors" in status and "coop" in status, status
    finally:
        stop(proc)


def test_a_checkpoint_whose_backbone_cannot_load_leaves_a_notice_and_a_working_app(checkpoint, tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(checkpoint), "pt") as fh:
        meta = fh.metadata()
    cfg = json.loads(meta["config"])
    cfg["model"] = "local-dir:/nonexistent/elsewhere-clip"
    meta["config"] = json.dumps(cfg)
    moved = tmp_path / "elsewhere.safetensors"
    save_file(load_file(str(checkpoint)), str(moved), metadata=meta)
    log = tmp_path / "app.log"
    proc, url, _ = launch(["--checkpoint", str(moved), "--device", "cpu"], log,
                          env={"PMPO_WARMUP": "0", "PMPO_CACHE_DIR": str(tmp_path / "cache")})
    try:
        from gradio_client import Client

        status = _classify_status(Client(url, verbose=False), tmp_path / "examples")
        assert status.startswith("**1 image(s)"), status  # the app serves
        assert "Could not load" in log.read_text() or "not loaded" in log.read_text()
    finally:
        stop(proc)


def test_space_limit_stops_a_long_training_with_a_held_out_result(tiny_model, tmp_path):
    """SPACE_ID set and PMPO_MAX_TRAIN_SECONDS: a 50-epoch request stops at the limit, keeps its
    prompts and reports the held-out score; the page states the limits."""
    from gradio_client import Client, handle_file

    from pmpo.app.fashion import fashion_images
    from pmpo.app.trainset import FASHION_PER_CLASS

    proc, url, _ = launch(["--model", tiny_model, "--device", "cpu"], tmp_path / "app.log",
                          env={"PMPO_WARMUP": "0", "PMPO_CACHE_DIR": str(tmp_path / "cache"), "SPACE_ID": "test/pmpo",
                               "PMPO_MAX_TRAIN_SECONDS": "4", "PMPO_ALLOWED_BACKBONES": tiny_model})
    try:
        client = Client(url, verbose=False)
        files = [handle_file(p) for p in fashion_images(per_class=FASHION_PER_CLASS)]  # 120: 50 epochs outlast 4 s anywhere
        job = client.submit(train_files=files, zip_file=None, method="pmpo", epochs=50, time_budget=0,
                            api_name="/train")
        status, _, report, checkpoint, _ = job.outputs()[-1] if job.result() is not None else (None,) * 5
        # Stopped there, or fitted to it from the start when the estimate says fewer epochs fit (a busy machine).
        assert "Held-out accuracy" in status and report["heldout"] and Path(checkpoint).is_file(), status
        assert report["budget_s"] == 4 and (report["stopped"] or report["epochs"] < 50), report
        assert ("Stopped at the time budget" in status) == report["stopped"], status
    finally:
        stop(proc)


def test_every_endpoint_answers_garbage_with_a_reason_and_keeps_serving(tiny_model, tmp_path):
    """None, wrong types, a 200 kB string, a list of non-files and files that are no images, sent to
    every endpoint ``view_api`` lists (new endpoints are covered without touching this test): each
    answer is a message in the page's status or a one-line refusal that names the endpoint, the input
    and the problem, never Gradio's generic failure or a traceback, and the server keeps serving."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    proc, url, _ = launch(["--model", tiny_model, "--device", "cpu"], tmp_path / "app.log",
                          env={"PMPO_WARMUP": "0", "PMPO_CACHE_DIR": str(tmp_path / "cache")})
    try:
        client = Client(url, verbose=False)
        endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
        assert {"/classify", "/attention", "/embeddings", "/train", "/upload_checkpoint"} <= set(endpoints)
        note = tmp_path / "note.txt"
        note.write_text("not an image")
        garbage = {"none": None, "number": 12345, "huge string": "x" * 200_000, "list": [1, "a", None],
                   "mapping": {"a": 1}, "non-images": [handle_file(str(note))] * 3}
        for name, endpoint in endpoints.items():
            for kind, value in garbage.items():
                kwargs = {p["parameter_name"]: value for p in endpoint["parameters"]}
                try:
                    out = client.submit(api_name=name, **kwargs).result(timeout=120)
                except AppError as exc:
                    message = str(exc)
                    assert "verbose error reporting" not in message and "Traceback" not in message, (name, kind, message)
                    # one line that names the endpoint and the refused input, of a readable length
                    assert "\n" not in message and len(message) < 300, (name, kind, message)
                    assert message.startswith(f"{name}: input '"), (name, kind, message)
                    continue
                status = out[0] if isinstance(out, (list, tuple)) else out
                assert "Internal error" not in str(status), (name, kind, status)
        example = app_examples.example_images(tmp_path / "examples")[0]
        status, *_ = client.predict(files=[handle_file(example)], classes_text="red circle, blue circle", api_name="/classify")
        assert status.startswith("**1 image(s)"), status  # still serving
        server_log = (tmp_path / "app.log").read_text()
        assert "refused a request: /classify: input 'files'" in server_log and "Traceback" in server_log
    finally:
        stop(proc)


def test_a_training_gives_way_to_requests_between_its_steps(tiny_model, tmp_path):
    """While a request computes (``state.inference.busy()``), a training finishes the step it is in
    and waits before the next one; released, it runs to the end."""
    import threading
    import time

    from test_app import _colour_set

    from pmpo.app import train as train_tab
    from pmpo.app import trainset

    st = open_state(tiny_model, None, device="cpu", cache_dir=tmp_path / "cache", shipped_dir=tmp_path)
    items, names = trainset.items_from_table(_colour_set(tmp_path), None)
    run = train_tab.run_training(st, st.default_spec, "coop", 30, items, names, threading.Event(), poll_s=0.01)
    with st.inference.busy():
        held = time.perf_counter()
        upd = next(run)
        while time.perf_counter() - held < 2.0:
            upd = next(run)
        steps_while_busy = len(upd.history)
    for upd in run:  # noqa: B007 (let the training finish; its last update is checked below)
        pass
    assert steps_while_busy <= 1 and upd.done and len(upd.history) == upd.history[-1]["total_steps"], upd.status
    assert st.inference.wait_idle(0.1) < 0.1  # nothing left busy


FAKE_ZEROGPU = Path(__file__).parent / "zerogpu_fake"  # a `spaces` that forks, as ZeroGPU does


def test_zerogpu_runs_the_kernels_in_forked_workers_with_the_same_answers(tiny_model, tmp_path):
    """On a ZeroGPU Space every image pass, text pass, cost probe and training crosses into a forked
    worker (arguments and results pickled, nothing shared). Classify answers as it does in one
    process, and a Space-limited training there stops at its limit with a held-out result whose
    prompts then serve Classify. The stand-in ``spaces`` (tests/zerogpu_fake) keeps the real one's
    process contract; no GPU is involved."""
    import json
    import os

    from gradio_client import Client, handle_file

    from pmpo.app.fashion import fashion_images
    from pmpo.app.launcher import ROOT
    from pmpo.app.trainset import FASHION_PER_CLASS

    examples = [handle_file(p) for p in app_examples.example_images(tmp_path / "examples")[:3]]
    ask = dict(files=examples, classes_text="red circle, blue square, green triangle", api_name="/classify")
    base = {"PMPO_WARMUP": "0", "PMPO_ALLOWED_BACKBONES": tiny_model}

    proc, url, _ = launch(["--model", tiny_model, "--device", "cpu"], tmp_path / "plain.log",
                          env={**base, "PMPO_CACHE_DIR": str(tmp_path / "c1")})
    try:
        *_, expected = Client(url, verbose=False).predict(**ask)
    finally:
        stop(proc)

    calls = tmp_path / "gpu-calls.txt"
    proc, url, _ = launch(["--model", tiny_model], tmp_path / "zero.log",
                          env={**base, "PMPO_CACHE_DIR": str(tmp_path / "c2"), "SPACE_ID": "test/pmpo",
                               "SPACES_ZERO_GPU": "true", "PMPO_FAKE_ZEROGPU_LOG": str(calls),
                               "PMPO_MAX_TRAIN_SECONDS": "4",
                               "PYTHONPATH": os.pathsep.join([str(ROOT), str(FAKE_ZEROGPU)])})
    try:
        client = Client(url, verbose=False)
        *_, got = client.predict(**ask)
        assert "notice: Running on **ZeroGPU**" in (tmp_path / "zero.log").read_text()
        assert got["classes"] == expected["classes"] and len(got["images"]) == len(expected["images"]) == 3
        for mine, theirs in zip(got["images"], expected["images"]):  # every view, classes and probabilities
            assert mine.keys() == theirs.keys()
            for view in ("zero-shot CLIP", "prior (prompted image)", "learned"):
                assert [c for c, _ in mine[view]] == [c for c, _ in theirs[view]], (view, mine, theirs)
                assert torch.allclose(torch.tensor([q for _, q in mine[view]]), torch.tensor([q for _, q in theirs[view]]),
                                      atol=1e-5), (view, mine, theirs)
        first = calls.read_text().split()
        assert {"encode_batch", "text_weights"} <= set(first[::2]), first

        files = [handle_file(p) for p in fashion_images(per_class=FASHION_PER_CLASS)]  # 120: 50 epochs outlast 4 s anywhere
        job = client.submit(train_files=files, zip_file=None, method="pmpo", epochs=50, time_budget=0, api_name="/train")
        job.result(timeout=300)
        status, _, report, checkpoint, _ = job.outputs()[-1]
        # Stopped at the limit, or fitted to it from the start (the estimate's choice on this machine).
        assert "Held-out accuracy" in status and report["heldout"] and Path(checkpoint).is_file(), status
        assert report["budget_s"] == 4 and (report["stopped"] or report["epochs"] < 50), report
        assert ("Stopped at the time budget" in status) == report["stopped"], status
        names = calls.read_text().split()[::2]
        assert {"time_passes", "train_session"} <= set(names), names
        trained = report["checkpoint"]
        status, *_, scores = client.predict(**ask, checkpoint=trained)
        assert trained in status and len(scores["images"]) == 3, status
        assert json.dumps(scores["images"]) != json.dumps(got["images"])  # the trained prompts answer
    finally:
        stop(proc)
