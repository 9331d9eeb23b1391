#!/usr/bin/env python
"""Deploy this checkout as a Hugging Face Space (Gradio SDK; the README's front matter configures it).

    python tools/deploy_space.py USER/SPACE            # needs `huggingface-cli login` or HF_TOKEN
    python tools/deploy_space.py USER/SPACE --dry-run  # list what would be uploaded and set
    python tools/deploy_space.py USER/SPACE --hardware zero-a10g --max-train-seconds 90

The hardware (``--hardware``: cpu-basic, cpu-upgrade, zero-a10g for ZeroGPU, or a dedicated GPU such as
t4-small / a10g-small / l4x1) and the owner's settings (``--max-train-seconds``, ``--max-train-images``,
``--max-trainings``, ``--allowed-backbones``, ``--model``, ``--pretrained``) become the Space's hardware
request and its variables, which the app reads at start (``PMPO_*``). They are checked here first,
with the app's own rules, so a typo fails before anything is uploaded.

One commit through ``huggingface_hub`` (already installed with open_clip): the Hub stores the
offline model (17.6 MB) and any large or binary file through LFS/Xet itself, which a plain
``git push`` of this repository would not (the Hub refuses binary blobs over 10 MB). Only what the
Space runs is uploaded: ``app.py``, the ``pmpo`` library (with its presets), ``app/``, ``analysis/``,
``checkpoints/`` (the offline model), the runtime ``requirements.txt`` and the README; never runs, data, virtual environments, tests or
caches. The Space gets its own ``.gitattributes`` (``SPACE_GITATTRIBUTES``) marking model files and
images for LFS, so a later ``git clone`` of the Space works too.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALLOW = ["app.py", "README.md", "requirements.txt", "LICENSE", "pmpo/**", "app/**", "analysis/**", "checkpoints/**"]
IGNORE = ["**/__pycache__/**", "**/*.pyc", "**/.DS_Store", "**/*.tmp"]
SPACE_GITATTRIBUTES = """\
*.safetensors filter=lfs diff=lfs merge=lfs -text
*.bin filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.png filter=lfs diff=lfs merge=lfs -text
*.jpg filter=lfs diff=lfs merge=lfs -text
*.pdf filter=lfs diff=lfs merge=lfs -text
*.zip filter=lfs diff=lfs merge=lfs -text
"""


def space_files(root: Path = ROOT) -> list[str]:
    """The repository paths a Space needs, filtered exactly as ``upload_folder`` filters them."""
    from huggingface_hub.utils import filter_repo_objects

    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return list(filter_repo_objects(paths, allow_patterns=ALLOW, ignore_patterns=IGNORE))


# Option → the Space variable the app reads (app/main.py, app/train.py TrainLimits).
VARIABLES = {"max_train_seconds": "PMPO_MAX_TRAIN_SECONDS", "max_train_images": "PMPO_MAX_TRAIN_IMAGES",
             "max_trainings": "PMPO_MAX_TRAININGS", "allowed_backbones": "PMPO_ALLOWED_BACKBONES",
             "model": "PMPO_MODEL", "pretrained": "PMPO_PRETRAINED"}
ZERO_GPU = "zero-a10g"  # the Hub's name for ZeroGPU hardware


def space_settings(hardware: str | None, options: dict) -> tuple[str | None, dict[str, str]]:
    """The hardware request and the Space variables for these options, checked as the app will check
    them on that hardware (a ZeroGPU training is one GPU call, so its time limit has a ceiling)."""
    from huggingface_hub import SpaceHardware

    names = [h.value for h in SpaceHardware]
    if hardware is not None and hardware not in names:
        raise ValueError(f"unknown hardware {hardware!r}; the Hub offers: {', '.join(names)}")
    variables = {VARIABLES[k]: f"{v:g}" if isinstance(v, float) else str(v)
                 for k, v in options.items() if k in VARIABLES and v is not None}
    env = {**variables, "SPACE_ID": "check/limits"}
    from pmpo.app import zerogpu
    from pmpo.app.train import TrainLimits
    from pmpo.errors import PMPOError

    try:
        limits = TrainLimits.from_env(env)
    except PMPOError as exc:
        raise ValueError(str(exc)) from None
    most = zerogpu.TRAIN_MAX_S - zerogpu.TRAIN_SETUP_S
    if hardware == ZERO_GPU and "PMPO_MAX_TRAIN_SECONDS" in variables and not 0 < limits.max_seconds <= most:
        raise ValueError(f"--max-train-seconds must lie between 1 and {most} on ZeroGPU (a training is one GPU call)")
    return hardware, variables


def deploy(repo_id: str, root: Path = ROOT, private: bool = False, hardware: str | None = None,
           variables: dict[str, str] | None = None) -> str:
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
    ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(root / p)) for p in space_files(root)]
    ops.append(CommitOperationAdd(path_in_repo=".gitattributes", path_or_fileobj=SPACE_GITATTRIBUTES.encode()))
    # Variables first: the commit restarts the Space, which then starts with them.
    for key, value in (variables or {}).items():
        api.add_space_variable(repo_id, key, value)
    info = api.create_commit(repo_id, repo_type="space", operations=ops, commit_message="Deploy PMPO demo")
    if hardware:  # an existing Space keeps its hardware unless asked (paid tiers are billed to the owner)
        api.request_space_hardware(repo_id, hardware)
    return info.commit_url


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("repo_id", help="USER/SPACE on huggingface.co (created if missing)")
    p.add_argument("--private", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="list the files and their total size, upload nothing")
    p.add_argument("--hardware", help=f"Space hardware: cpu-basic (free), cpu-upgrade, {ZERO_GPU} (ZeroGPU), "
                                      "t4-small, a10g-small, l4x1, … (default: leave it as it is)")
    p.add_argument("--max-train-seconds", type=float, help="PMPO_MAX_TRAIN_SECONDS: every training stops there")
    p.add_argument("--max-train-images", type=int, help="PMPO_MAX_TRAIN_IMAGES: training images per run")
    p.add_argument("--max-trainings", type=int, help="PMPO_MAX_TRAININGS: trainings running at once")
    p.add_argument("--allowed-backbones", help="PMPO_ALLOWED_BACKBONES: 'MODEL+TAG, ...' visitors may load")
    p.add_argument("--model", help="PMPO_MODEL: the start-up backbone (default ViT-B-16-quickgelu)")
    p.add_argument("--pretrained", help="PMPO_PRETRAINED: its weights tag (default openai)")
    args = p.parse_args(argv)
    try:
        hardware, variables = space_settings(args.hardware, vars(args))
    except ValueError as exc:
        print(f"deploy_space: error: {exc}", file=sys.stderr)
        return 2
    files = space_files()
    size = sum((ROOT / f).stat().st_size for f in files)
    if args.dry_run:
        print("\n".join(files))
        print(f"{len(files)} files, {size / 1e6:.1f} MB (+ .gitattributes)", file=sys.stderr)
        print(f"hardware: {hardware or 'unchanged'}; variables: "
              + (", ".join(f"{k}={v}" for k, v in variables.items()) or "none"), file=sys.stderr)
        return 0
    try:
        print(deploy(args.repo_id, private=args.private, hardware=hardware, variables=variables))
    except Exception as exc:  # noqa: BLE001 network, auth: one line, not a traceback
        print(f"deploy_space: error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
