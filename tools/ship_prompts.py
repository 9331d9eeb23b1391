"""Ship prompt checkpoints that already learned, beside the offline model.

Why: the offline ShapeWorld CLIP (checkpoints/shapeworld-clip/) is the one backbone every
install has, but a prompt learned on it had to be trained first. This script ships three that
already learned (pmpo, maple, coop) as ``checkpoints/shapeworld-clip/prompts/<method>.safetensors``.
Nothing is chosen here: each is the seed-1 run of the ShapeWorld benchmark
(``pmpo/configs/sweeps/shapeworld.yaml``), run through the sweep's own code (``load_sweep``,
``sweep_recipe``, ``run_protocol``), so it is exactly that benchmark's run. The zero-shot run of the
same protocol is run too, for comparison. Each shipped file is the run's ``last.safetensors``
re-saved with its provenance (recipe, seed, held-out test accuracy next to zero-shot's) as metadata,
and the model card's section between ``<!-- shipped-prompts -->`` markers is rewritten.

    python tools/ship_prompts.py    # runs what is missing (resumable), ships, rewrites the card

Retraining the offline model makes these prompts stale (each records the model's sha256; a test
checks it): rerun this script then; its run folders are keyed by that sha256, so it trains afresh.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pmpo.backbone import load_backbone  # noqa: E402
from pmpo.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint  # noqa: E402
from pmpo.commands.sweep import load_sweep, sweep_recipe  # noqa: E402
from pmpo.data import shapeworld as sw  # noqa: E402
from pmpo.protocols import read_finished, run_dir, run_protocol  # noqa: E402

SWEEP = "pmpo/configs/sweeps/shapeworld.yaml"
METHODS = ("pmpo", "maple", "coop")  # shipped, in this order; "zeroshot" runs beside them
SEED = 1
DATASET = "shapeworld"
MODEL_DIR = REPO / "checkpoints" / "shapeworld-clip"
SHIP_DIR = MODEL_DIR / "prompts"
CARD = MODEL_DIR / "MODEL_CARD.md"
START, END = "<!-- shipped-prompts -->", "<!-- /shipped-prompts -->"
COMMAND = "python tools/ship_prompts.py"


def model_sha256() -> str:
    return hashlib.sha256((MODEL_DIR / "open_clip_model.safetensors").read_bytes()).hexdigest()


def run_all(out: Path, device: str) -> dict[str, dict]:
    """The seed-1 runs of the sweep for zeroshot + METHODS, as ``pmpo sweep`` runs them (resumable)."""
    sweep = load_sweep(REPO / SWEEP)
    root = Path(sweep.root) if Path(sweep.root).is_absolute() else REPO / sweep.root
    specs = {m.name: m for m in sweep.methods}
    backbone, results = None, {}
    for name in ("zeroshot", *METHODS):
        folder = run_dir(out, sweep.protocol, DATASET, name, sweep.shots, SEED)
        result = read_finished(folder)
        if result is None:
            print(f"running {folder}", file=sys.stderr)
            recipe = sweep_recipe(sweep, specs[name], DATASET)
            cfg = recipe.model
            if backbone is None:  # the same model for all four (the sweep's `model:`), loaded once
                backbone = load_backbone(cfg.model, cfg.pretrained, device=device, quick_gelu=cfg.quick_gelu)
            result = run_protocol(sweep.protocol, DATASET, root, cfg, recipe.train, folder, shots=sweep.shots,
                                  seed=SEED, name=name, targets=sweep.targets, target_root=sweep.target_root,
                                  target_templates=recipe.target_templates, recipe=recipe.to_dict(),
                                  device=device, backbone=backbone, resume=True,
                                  log=lambda msg: print(msg, file=sys.stderr))
        results[name] = {**result, "folder": folder}
    return results


def rounded(acc: dict) -> dict[str, float]:
    return {k: round(acc[k], 2) for k in ("base", "new", "hm")}


def ship(results: dict[str, dict]) -> dict[str, Path]:
    """Re-save each run's last.safetensors with its provenance under SHIP_DIR (through the library's API)."""
    sweep = load_sweep(REPO / SWEEP)
    zs = results["zeroshot"]
    backbone = load_backbone(sweep.model, sweep.pretrained)
    SHIP_DIR.mkdir(parents=True, exist_ok=True)
    base_names, _ = sw.base_new_split()
    shipped = {}
    for name in METHODS:
        r = results[name]
        src = r["folder"] / r["checkpoint"]
        _, old = read_checkpoint(src)
        model = load_checkpoint(src, backbone=backbone)
        path = SHIP_DIR / f"{name}.safetensors"
        save_checkpoint(
            model, path,
            epoch=old.get("epoch", ""), train_config=old.get("train_config", ""),
            provenance=f"seed-{SEED} '{name}' run of the ShapeWorld benchmark ({SWEEP}), shipped by {COMMAND}",
            sweep=SWEEP, sweep_train=json.dumps({**sweep.train, **next(m.train for m in sweep.methods if m.name == name)}),
            protocol=r["protocol"], dataset=r["dataset"], shots=str(r["shots"]), seed=str(r["seed"]),
            train_classes=json.dumps([sw.class_names()[i] for i in base_names]),
            test_accuracy=json.dumps(rounded(r["accuracy"])),
            zeroshot_test_accuracy=json.dumps(rounded(zs["accuracy"])),
            test_targets=json.dumps({k: round(v, 2) for k, v in r["targets"].items()}),
            n_test=json.dumps(r["n_test"]),
            offline_model_sha256=model_sha256(), git_commit=str(r.get("git_commit")), regenerate=COMMAND,
        )
        shipped[name] = path
        print(f"{path.relative_to(REPO)}: {path.stat().st_size / 1024:.1f} KiB, test {rounded(r['accuracy'])}",
              file=sys.stderr)
    return shipped


def card_section(results: dict[str, dict], shipped: dict[str, Path]) -> str:
    zs, r1 = results["zeroshot"], results[METHODS[0]]
    tr = r1["train"]
    lines = [
        START,
        "## Shipped prompt checkpoints",
        "",
        "Prompts that already learned on this model, in `prompts/`: load one with",
        "`pmpo.checkpoint.load_checkpoint` or `pmpo predict --checkpoint ...`; the app offers them as",
        "`shipped: <method>` and starts with `shipped: pmpo` on this model. They are **class-agnostic**:",
        "any class list works at load time.",
        "",
        f"- **How they were trained:** each is the seed-{SEED} run of the ShapeWorld benchmark (`{SWEEP}`), with that",
        f"  file's recipe and nothing chosen: protocol {r1['protocol']}, {r1['shots']} shots per class of the",
        f"  {r1['classes']['train']} base classes of the benchmark's split; its `train:` block ({tr['epochs']} epochs, batch",
        f"  {tr['batch_size']}, SGD lr {tr['lr']}, momentum {tr['momentum']}, weight decay {tr['weight_decay']},",
        f"  {tr['warmup_epochs']} warm-up epoch at {tr['warmup_lr']} then cosine, flip only: min_crop_scale",
        f"  {tr['min_crop_scale']}); each method's own model preset; the last epoch is shipped.",
        "- **Provenance** (recipe, seed, the accuracies below, the sha256 of the model weights they were trained on)",
        "  is in each file's metadata.",
        f"- **Regenerate:** `{COMMAND}` (runs what is missing, then rewrites the files and this section;",
        "  rerun it after retraining the model, whose new weights make these prompts stale).",
        "",
        f"Held-out test accuracy (%) of those runs: {r1['n_test']['base']} base and {r1['n_test']['new']} new test images,",
        "each half scored among its own 32 classes, HM of base and new; zero-shot is the same protocol's",
        "`zeroshot` run. One seed each (the README's table averages 3 seeds).",
        "",
        "| file | method | learnable | size | base | new | HM |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, path in shipped.items():
        a = rounded(results[name]["accuracy"])
        n = sum(t.numel() for t in read_checkpoint(path)[0].values())
        lines.append(f"| `prompts/{path.name}` | {name} | {n:,} | {path.stat().st_size / 1024:.0f} KiB | "
                     f"{a['base']:.2f} | {a['new']:.2f} | {a['hm']:.2f} |")
    z = rounded(zs["accuracy"])
    lines += [f"| (none) | zero-shot (`a photo of a {{}}.`) | 0 | – | {z['base']:.2f} | {z['new']:.2f} | {z['hm']:.2f} |",
              END]
    return "\n".join(lines)


def write_card(section: str) -> None:
    text = CARD.read_text(encoding="utf-8")
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + section + rest.split(END, 1)[1]
    else:  # the card was regenerated (tools/pretrain_shapeworld.py): append the section
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    CARD.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "runs" / "shipped-prompts"),
                    help="root of the run folders (they go into <out>/<first 12 hex digits of the model's sha256>/)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    results = run_all(Path(args.out) / model_sha256()[:12], args.device)  # a retrained model gets fresh runs
    shipped = ship(results)
    write_card(card_section(results, shipped))
    print(f"rewrote {CARD.relative_to(REPO)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
