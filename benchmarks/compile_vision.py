"""torch.compile check: PMPO's prompted image pass (the vision tower's forward, the part that dominates
inference), compiled vs eager on the same model, interleaved, outputs compared.

    python benchmarks/compile_vision.py            # ViT-B/16 sizes, random init, batch 4, 50 classes, 2 threads

Only the vision tower: the text tower's truncation length is data-dependent, so its compiled forward
recompiles per class list (see docs/PERFORMANCE.md); the image pass is where inference time goes."""
import time

import torch

from pmpo.backbone import load_backbone
from pmpo.bench import bench_classnames
from pmpo.config import PMPOConfig
from pmpo.model import build_model


def seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    bb = load_backbone("ViT-B-16", "none", device="cpu")
    m = build_model(PMPOConfig(method="pmpo"), backbone=bb).eval()
    names = bench_classnames(50)
    x = torch.randn(4, 3, 224, 224)
    with torch.no_grad():
        ref = m(x, names)
        eager = seconds(lambda: [m(x, names) for _ in range(3)]) / 3
        eager_fwd = m.vision.forward
        compiled_fwd = torch.compile(eager_fwd)
        m.vision.forward = compiled_fwd
        t = time.perf_counter()
        out = m(x, names)
        first = time.perf_counter() - t
        print(f"compiled first call (compile + run): {first:.1f} s", flush=True)
        te, tc = [], []
        for _ in range(7):  # interleaved rounds, medians
            for fwd, acc in ((eager_fwd, te), (compiled_fwd, tc)):
                m.vision.forward = fwd
                acc.append(seconds(lambda: m(x, names)))
        eager, comp = sorted(te)[3], sorted(tc)[3]
    print(f"median of 7 interleaved rounds: eager {eager * 1000:.0f} ms/batch, compiled {comp * 1000:.0f} ms/batch, "
          f"speed-up {eager / comp:.2f}x; max |logit diff| {float((out - ref).abs().max()):.2e}; torch {torch.__version__}")


if __name__ == "__main__":
    main()
