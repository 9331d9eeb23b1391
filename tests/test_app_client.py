"""The served app through the official gradio_client: structure, bad input, concurrency.

``python app.py`` runs in a subprocess on a free port with the tiny random-init CLIP, exactly
as a user would start it (options parsed by app.py, models loaded through the real path).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pmpo.app.launcher import launch, stop


def launch_app(model: str, cache_dir: Path):
    """``python app.py --model MODEL`` on a free port, its cache (examples, uploads) in ``cache_dir``."""
    env = {"PMPO_WARMUP": "0", "PMPO_CACHE_DIR": str(cache_dir)}
    return launch(["--model", model, "--device", "cpu"], cache_dir / "app.log", env=env)


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    cache = tmp_path_factory.mktemp("served-app")
    proc, url, seconds = launch_app(tiny_model, cache)
    yield url, cache, seconds
    stop(proc)


@pytest.fixture(scope="module")
def client(served):
    from gradio_client import Client

    return Client(served[0], verbose=False)


@pytest.fixture(scope="module")
def images(served):
    return sorted(str(p) for p in (Path(served[1]) / "examples").glob("*.png"))


def classify(client, paths, classes, **kw):
    from gradio_client import handle_file

    return client.predict(files=[handle_file(p) for p in paths], classes_text=classes, api_name="/classify", **kw)


def test_page_is_served_quickly(served):
    assert served[2] < 60, f"start-up took {served[2]:.1f} s"


def test_api_lists_the_tabs(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    for name in ("/classify", "/attention", "/embeddings", "/train", "/cancel_training", "/benchmarks", "/upload_checkpoint"):
        assert name in endpoints


def test_classify_returns_tables_plot_and_json(client, images):
    status, table, plot, per_prompt, result = classify(client, images[:2], "red circle\nblue square\ndog", top_k=2)
    assert "2 image(s), 3 classes" in status and "untrained PMPO" in status
    assert table["headers"][:3] == ["image", "rank", "zero-shot CLIP"] and len(table["data"]) == 2 * 2
    assert plot is not None
    assert len(per_prompt["data"]) == 2 * 4  # 4 prompts per image
    assert result["classes"] == ["red circle", "blue square", "dog"]
    assert [im["image"] for im in result["images"]] == [Path(p).name for p in images[:2]]
    for view in ("zero-shot CLIP", "prior (prompted image)", "learned"):
        probs = [p for _, p in result["images"][0][view]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001



def test_empty_backbone_fields_mean_the_start_up_backbone(client, images, tiny_model):
    """An API call may send the side column's backbone fields empty: it is answered on the backbone
    the app started with, not refused."""
    status, *_ = classify(client, images[:1], "red circle\nblue square", bb_model="", bb_pretrained=None)
    assert status.startswith("**1 image(s), 2 classes** on " + Path(tiny_model.removeprefix("local-dir:")).name), status

def test_one_class_is_answered_not_crashed(client, images):
    status, table, _, per_prompt, result = classify(client, images[:1], "red circle", top_k=3)
    assert not status.startswith("**Error"), status
    assert "1 image(s), 1 classes" in status and "Only one class" in status
    assert len(table["data"]) == 1 and table["data"][0][2].startswith("red circle")
    assert per_prompt["headers"] == ["image", "prompt", "vision layers", "top-1", "top-1 %"]
    assert result["images"][0]["learned"] == [["red circle", 1.0]]


def test_corrupt_upload_gives_message_and_app_keeps_serving(client, images, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    status, table, _, _, result = classify(client, [str(bad)], "cat, dog")
    assert status.startswith("**Error:**") and "broken.png" in status and "error" in result
    status, *_ = classify(client, images[:1], "")
    assert "class list is empty" in status
    status, *_ = classify(client, images[:1], "x" * 300)
    assert "too long" in status
    status, *_, result = classify(client, images[:1], "cat, dog")
    assert not status.startswith("**Error") and result["classes"] == ["cat", "dog"]


def test_ten_concurrent_clients_get_their_own_answers(served, images):
    from gradio_client import Client

    def one(i: int):
        classes = [f"class {i} {j}" for j in range(2 + i % 4)]
        own = Client(served[0], verbose=False)
        return classes, classify(own, [images[i % len(images)]], ", ".join(classes), top_k=10)

    with ThreadPoolExecutor(max_workers=10) as pool:
        answers = list(pool.map(one, range(10)))
    for i, (classes, (status, _table, _, _, result)) in enumerate(answers):
        assert not status.startswith("**Error"), status
        assert result["classes"] == classes
        image = result["images"][0]
        assert image["image"] == Path(images[i % len(images)]).name
        assert {c for c, _ in image["learned"]} == set(classes)


def test_bad_checkpoint_upload_is_reported(client, tmp_path):
    from gradio_client import handle_file

    fake = tmp_path / "weights.pt"
    fake.write_bytes(b"\x80\x04not-a-pickle-we-would-ever-open")
    status, _ = client.predict(file=handle_file(str(fake)), api_name="/upload_checkpoint")
    assert status.startswith("**Error:**") and "safetensors" in status


def test_attention_and_embeddings_endpoints(client, images):
    from gradio_client import handle_file

    status, maps, mass = client.predict(files=[handle_file(images[0])], classes_text="red circle, blue square",
                                        api_name="/attention")
    assert "class **" in status and maps is not None and mass is not None
    status, frame, figure = client.predict(files=[handle_file(p) for p in images[:3]], method="PCA",
                                           classes_text="red circle, blue square", api_name="/embeddings")
    assert "points" in status and figure is not None
    # The plot comes with its colour map (the static figure uses the same one).
    assert len(frame["value"]["data"]) == 2 * 3 + 2 * 5
    assert set(frame["color_map"]) == {"red circle", "blue square"}


def test_train_streams_progress_and_offers_checkpoint(client, images):
    from gradio_client import handle_file

    job = client.submit(train_files=[handle_file(p) for p in images[:4]], zip_file=None, method="coop", epochs=1,
                        api_name="/train")
    outputs = job.outputs() if job.result() is not None else []
    final_status, _, report, checkpoint, dropdown = outputs[-1]
    assert len(outputs) >= 2  # a first message, then progress
    assert "Finished after" in final_status and "(1 full epoch(s))" in final_status, final_status
    assert report["done"] and report["checkpoint"] == dropdown["value"]  # (one image per class: none held out)
    assert checkpoint and Path(checkpoint).suffix == ".safetensors"
    choice = dropdown["value"] if isinstance(dropdown, dict) else dropdown  # a gr.update selecting the new prompts
    assert choice.startswith("trained: ") and choice in (dropdown.get("choices") and [c[0] for c in dropdown["choices"]])
    status, *_, result = classify(client, images[:1], "red circle, blue square", checkpoint=choice)
    assert result["learned"] == f"learned ({choice})", status
    # A second visitor neither sees nor can use the first one's training.
    from gradio_client import Client

    other = Client(client.src, verbose=False)
    assert refused(other, images, choice)



def test_train_from_a_zip_alone(client, images, tmp_path):
    """An API call that trains from a zip sends only the zip: the file-list input is optional."""
    import zipfile

    from gradio_client import handle_file

    params = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/train"]["parameters"]
    assert {p["parameter_name"] for p in params if not p["parameter_has_default"]} == set()
    archive = tmp_path / "shapes.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in images[:4]:
            zf.write(p, f"{Path(p).stem.replace('_', ' ')}/{Path(p).name}")
    final_status, *_ = client.predict(zip_file=handle_file(str(archive)), method="coop", epochs=1, api_name="/train")
    assert "Finished after" in final_status and "on 4 images" in final_status and "coop-4cls" in final_status, final_status

def test_uploaded_checkpoint_is_seen_by_its_session_only(served, client, images):
    from gradio_client import Client, handle_file

    job = client.submit(train_files=[handle_file(p) for p in images[:4]], zip_file=None, method="coop", epochs=1,
                        name="shared", api_name="/train")
    _, _, _, checkpoint, _ = job.outputs()[-1] if job.result() is not None else (None,) * 5
    uploader, visitor = Client(served[0], verbose=False), Client(served[0], verbose=False)
    status, dropdown = uploader.predict(file=handle_file(checkpoint), api_name="/upload_checkpoint")
    assert status.startswith("Loaded **upload: shared.safetensors**"), status
    assert "/tmp/" not in status  # the file's name, not the server's temporary path
    status, *_, result = classify(uploader, images[:1], "red circle, blue square", checkpoint="upload: shared.safetensors")
    assert result["learned"] == "learned (upload: shared.safetensors)", status
    assert refused(visitor, images, "upload: shared.safetensors")


def refused(client, images, choice: str) -> bool:
    """Another session asking for ``choice``: Gradio refuses a value outside that session's picker
    (AppError), and were it let through, the app says it does not know the checkpoint."""
    from gradio_client.exceptions import AppError

    try:
        status, *_ = classify(client, images[:1], "red circle, blue square", checkpoint=choice)
    except AppError as exc:
        return "input 'checkpoint' (dropdown) must be one of" in str(exc)  # pmpo.app.refusals' one line
    return status.startswith("**Error:**") and "Unknown prompt checkpoint" in status
