"""The package as a newcomer gets it: a wheel built from the checkout, installed into a fresh
virtual environment, used from a directory that is not the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "-q", "-w", str(out)],
                   check=True, capture_output=True, text=True, timeout=600)
    (path,) = out.glob("pmpo-*.whl")
    return path


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed (--no-deps); its dependencies come from this
    interpreter's site-packages through a .pth line, which does not activate the editable install
    of the checkout (its finder is itself a .pth file, and those run only in site directories)."""
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300)
    return root


def run_in(venv: Path, cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}:{env.get('PATH', '')}", OMP_NUM_THREADS="1")
    return subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_wheel_carries_presets_model_app_and_analysis_and_nothing_top_level(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("pmpo/configs/methods/pmpo.yaml", "pmpo/configs/sweeps/tiny.yaml", "pmpo/configs/train/base2new.yaml",
                   "pmpo/checkpoints/shapeworld-clip/open_clip_config.json",
                   "pmpo/checkpoints/shapeworld-clip/open_clip_model.safetensors",
                   "pmpo/app/ui.py", "pmpo/app/main.py", "pmpo/app/tabs/train.py", "pmpo/analysis/tables.py"):
        assert needed in names, needed
    top = {n.split("/")[0] for n in names if not n.startswith("pmpo-")}
    assert top == {"pmpo"}, top  # no importable 'app', 'analysis' or 'tests' to collide with a user's


def test_installed_wheel_works_from_any_directory(venv, tmp_path):
    python = str(venv / "bin" / "python")
    where = run_in(venv, tmp_path, python, "-c",
                   "import pmpo, pmpo.app.ui, pmpo.analysis.tables; from pmpo import PMPOConfig;"
                   "print(pmpo.__file__); print(PMPOConfig(method='pmpo').n_prompts)")
    assert where.returncode == 0, where.stderr
    path, n_prompts = where.stdout.split()
    assert Path(path).is_relative_to(venv) and int(n_prompts) > 0  # the installed copy, presets found

    helped = run_in(venv, tmp_path, str(venv / "bin" / "pmpo"), "--help")
    assert helped.returncode == 0 and "analyze" in helped.stdout and "app" in helped.stdout

    dry = run_in(venv, tmp_path, str(venv / "bin" / "pmpo"), "sweep", "tiny", "--root", str(tmp_path / "data"), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "run" in dry.stdout.lower()

    from PIL import Image

    Image.new("RGB", (64, 64), (215, 35, 35)).save(tmp_path / "red.png")
    pred = run_in(venv, tmp_path, str(venv / "bin" / "pmpo"), "predict", "red.png", "--offline", "--method", "zeroshot",
                  "--classes", "red circle,blue square")
    assert pred.returncode == 0, pred.stderr
    assert "red circle" in pred.stdout

    analyses = run_in(venv, tmp_path, str(venv / "bin" / "pmpo"), "analyze", "tables", "--help")
    assert analyses.returncode == 0, analyses.stderr


def test_space_upload_is_what_the_space_runs_and_nothing_else(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("deploy_space", REPO / "tools" / "deploy_space.py")
    deploy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(deploy)
    # A checkout as a developer's looks after a day of work: runs, data, a venv, caches, test output.
    for junk in ("runs/x/result.json", "data/shapeworld/a.png", ".venv/lib/x.py", "venv/bin/python",
                 "pmpo/__pycache__/model.cpython-311.pyc", "tests/test_x.py", ".pytest_cache/v/x",
                 "docs/screenshots/a.png", "figs/atlas.png", "outputs/o.txt", "dist/pmpo.whl"):
        (tmp_path / junk).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / junk).write_text("x")
    for real in ("app.py", "README.md", "requirements.txt", "pmpo/__init__.py", "pmpo/configs/methods/pmpo.yaml",
                 "checkpoints/shapeworld-clip/open_clip_model.safetensors", "app/__init__.py", "app/tabs/train.py",
                 "analysis/tables.py", "app/examples/fashion_mnist/a.png"):
        (tmp_path / real).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / real).write_text("x")
    files = deploy.space_files(tmp_path)
    assert files == sorted(["README.md", "app.py", "pmpo/__init__.py", "checkpoints/shapeworld-clip/open_clip_model.safetensors",
                            "pmpo/configs/methods/pmpo.yaml", "requirements.txt", "app/__init__.py", "app/tabs/train.py",
                            "analysis/tables.py", "app/examples/fashion_mnist/a.png"])
    real = deploy.space_files()  # this checkout
    assert "app.py" in real and "checkpoints/shapeworld-clip/open_clip_model.safetensors" in real
    assert not [f for f in real if f.startswith(("runs/", "data/", ".venv/", "tests/")) or "__pycache__" in f]
    assert "*.safetensors filter=lfs" in deploy.SPACE_GITATTRIBUTES and "*.png filter=lfs" in deploy.SPACE_GITATTRIBUTES
    runtime = (REPO / "requirements.txt").read_text()
    assert "pytest" not in runtime and "playwright" not in runtime  # test tools stay off the Space


def test_space_deploy_sets_the_hardware_and_the_owners_limits(monkeypatch):
    """--hardware and the limit options become the Space's hardware request and PMPO_* variables,
    checked with the app's own rules first (a ZeroGPU training is one GPU call: its limit has a
    ceiling); the upload goes through one commit."""
    import importlib.util

    import huggingface_hub

    spec = importlib.util.spec_from_file_location("deploy_space", REPO / "tools" / "deploy_space.py")
    deploy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(deploy)
    hardware, variables = deploy.space_settings("zero-a10g", {"max_train_seconds": 90.0, "max_trainings": 2,
                                                             "allowed_backbones": None, "dry_run": True})
    assert hardware == "zero-a10g" and variables == {"PMPO_MAX_TRAIN_SECONDS": "90", "PMPO_MAX_TRAININGS": "2"}
    for bad in (("zero-a10g", {"max_train_seconds": 900.0}), ("gpu-big", {}), (None, {"max_train_images": 1}),
                ("cpu-basic", {"max_trainings": 0})):
        with pytest.raises(ValueError):
            deploy.space_settings(*bad)
    assert deploy.main(["me/space", "--dry-run", "--hardware", "zero-a10g", "--max-train-seconds", "900"]) == 2

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw.get("space_sdk")))

        def add_space_variable(self, repo_id, key, value):
            calls.append(("variable", key, value))

        def create_commit(self, repo_id, operations, **kw):
            calls.append(("commit", len(operations)))
            return type("Info", (), {"commit_url": "https://huggingface.co/spaces/me/space/commit/1"})()

        def request_space_hardware(self, repo_id, hardware):
            calls.append(("hardware", hardware))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert deploy.main(["me/space", "--hardware", "cpu-upgrade", "--max-train-seconds", "300"]) == 0
    kinds = [c[0] for c in calls]
    assert kinds == ["create_repo", "variable", "commit", "hardware"], calls
    assert ("variable", "PMPO_MAX_TRAIN_SECONDS", "300") in calls and ("hardware", "cpu-upgrade") in calls
    assert calls[2][1] == len(deploy.space_files()) + 1  # every Space file and the .gitattributes


def test_a_space_runs_from_the_uploaded_files_alone(tmp_path):
    """What the deploy tool uploads, copied into a fresh folder and started as a Space starts it
    (`python app.py`, the package never installed): it serves, and what it serves comes from the
    copy — the library, the app beside it and the offline model in checkpoints/."""
    import importlib.util
    import shutil
    import time
    from urllib.request import urlopen

    from gradio_client import Client, handle_file

    from pmpo.app.examples import example_images
    from pmpo.app.launcher import free_port

    spec = importlib.util.spec_from_file_location("deploy_space", REPO / "tools" / "deploy_space.py")
    deploy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(deploy)
    space = tmp_path / "space"
    for name in deploy.space_files():
        (space / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, space / name)
    ui = space / "app" / "ui.py"
    ui.write_text(ui.read_text().replace('TITLE = "PMPO — ', 'TITLE = "PMPO (uploaded copy) — '))
    (space / "checkpoints" / "shapeworld-clip" / "prompts" / "maple.safetensors").unlink()  # the copy's own models
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SPACE_ID")}
    env.update(PMPO_WARMUP="0", PMPO_CACHE_DIR=str(tmp_path / "cache"), GRADIO_ANALYTICS_ENABLED="False")
    log = open(tmp_path / "space.log", "w")  # noqa: SIM115 (the app writes to it for its whole life)
    proc = subprocess.Popen([sys.executable, "app.py", "--model", "shapeworld-clip", "--port", str(port)], cwd=space,
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(600):
            assert proc.poll() is None, (tmp_path / "space.log").read_text()
            try:
                with urlopen(url + "config", timeout=2) as response:
                    config = response.read().decode()
                break
            except OSError:
                time.sleep(0.2)
        assert "PMPO (uploaded copy)" in config  # the page is the copy's
        assert "shipped: pmpo" in config and "shipped: coop" in config and "shipped: maple" not in config
        status, *_ = Client(url, verbose=False).predict(files=[handle_file(example_images(tmp_path / "ex")[0])],
                                                        classes_text="red circle, blue circle", api_name="/classify")
        assert status.startswith("**1 image(s)"), status
    finally:
        proc.terminate()
        proc.wait(timeout=15)
