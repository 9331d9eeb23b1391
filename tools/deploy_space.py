#!/usr/bin/env python
"""Deploy this checkout as a Hugging Face Space (Gradio SDK; the README's front matter configures it).

    python tools/deploy_space.py USER/SPACE            # needs `huggingface-cli login` or HF_TOKEN
    python tools/deploy_space.py USER/SPACE --dry-run  # list what would be uploaded

One commit through ``huggingface_hub`` (already installed with open_clip): the Hub stores the
offline model (17.6 MB) and any large or binary file through LFS/Xet itself, which a plain
``git push`` of this repository would not (the Hub refuses binary blobs over 10 MB). Only what the
Space runs is uploaded: ``app.py``, the ``pmpo`` package (with its presets and offline model), the
runtime ``requirements.txt`` and the README; never runs, data, virtual environments, tests or
caches. The Space gets its own ``.gitattributes`` (``SPACE_GITATTRIBUTES``) marking model files and
images for LFS, so a later ``git clone`` of the Space works too.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALLOW = ["app.py", "README.md", "requirements.txt", "LICENSE", "pmpo/**"]
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


def deploy(repo_id: str, root: Path = ROOT, private: bool = False) -> str:
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
    ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(root / p)) for p in space_files(root)]
    ops.append(CommitOperationAdd(path_in_repo=".gitattributes", path_or_fileobj=SPACE_GITATTRIBUTES.encode()))
    info = api.create_commit(repo_id, repo_type="space", operations=ops, commit_message="Deploy PMPO demo")
    return info.commit_url


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("repo_id", help="USER/SPACE on huggingface.co (created if missing)")
    p.add_argument("--private", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="list the files and their total size, upload nothing")
    args = p.parse_args(argv)
    files = space_files()
    size = sum((ROOT / f).stat().st_size for f in files)
    if args.dry_run:
        print("\n".join(files))
        print(f"{len(files)} files, {size / 1e6:.1f} MB (+ .gitattributes)", file=sys.stderr)
        return 0
    try:
        print(deploy(args.repo_id, private=args.private))
    except Exception as exc:  # network, auth: one line, not a traceback
        print(f"deploy_space: error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
