"""Published base-to-new numbers, in one place, each with its source.

All are averages over the 11 datasets of DESIGN.md §3, ViT-B/16 CLIP, 16 shots, 3 seeds, as
reported by the papers (and restated in DESIGN.md §3). They are what our own tables are shown
beside — never used to compute anything.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reference:
    label: str  # how tables name it
    method: str | None  # our method preset it corresponds to (None: not implemented here)
    base: float | None
    new: float | None
    hm: float
    source: str


BASE2NEW_AVERAGE: tuple[Reference, ...] = (
    Reference("CLIP", "zeroshot", 69.34, 74.22, 71.70, "Zhou et al., CoCoOp, CVPR 2022, Table 1 (average)"),
    Reference("CoOp", "coop", 82.69, 63.22, 71.66, "Zhou et al., CoCoOp, CVPR 2022, Table 1 (average)"),
    Reference("CoCoOp", "cocoop", 80.47, 71.69, 75.83, "Zhou et al., CoCoOp, CVPR 2022, Table 1 (average)"),
    Reference("KgCoOp", "kgcoop", 80.73, 73.60, 77.00, "Yao et al., KgCoOp, CVPR 2023, Table 1 (average)"),
    Reference("MaPLe", "maple", 82.28, 75.14, 78.55, "Khattak et al., MaPLe, CVPR 2023, Table 1 (average)"),
    # Only the harmonic mean is stated in the abstract, the one part of the paper available to us.
    Reference("PMPO", "pmpo", None, None, 79.28, "Tian et al., PMPO, arXiv 2305.06221, abstract"),
    Reference("PromptSRC", "promptsrc", 84.26, 76.10, 79.97, "Khattak et al., PromptSRC, ICCV 2023, Table 1 (average)"),
)


def base2new_reference() -> list[Reference]:
    return list(BASE2NEW_AVERAGE)
