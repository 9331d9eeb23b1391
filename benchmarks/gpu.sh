#!/usr/bin/env bash
# PMPO speed and memory on one CUDA GPU, side by side with plain open_clip (the floor).
#
#   bash benchmarks/gpu.sh                 # results in benchmarks/results/gpu-<date>/ (or $OUT if set)
#   PYTHON=/path/to/python bash benchmarks/gpu.sh
#   PMPO_BENCH_DEVICE=cpu PMPO_BENCH_MODEL=local-dir:/tmp/tiny bash benchmarks/gpu.sh   # smoke run, no GPU
#   PMPO_REFERENCE_DIR=~/refs bash benchmarks/gpu.sh   # also the authors' CoOp / MaPLe side by side
#
# Installs nothing beyond requirements.txt: uses $PYTHON, else ./.venv, else a python3 that already
# has torch + open_clip, else creates ./.venv from requirements.txt. Random-init ViT-B/16 (speed does
# not depend on weights), bf16 autocast, batches 32/64/128; every step has its own time limit so
# the whole script ends in under 8 minutes even if one step hangs. Writes one JSON + one Markdown
# file per step and SUMMARY.md with all tables.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ -n "${PYTHON:-}" ]; then
    PY="$PYTHON"
elif [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
elif python3 -c "import torch, open_clip" 2>/dev/null; then
    PY=python3
else
    echo "creating .venv from requirements.txt" >&2
    python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt || exit 1
    PY=.venv/bin/python
fi
DEVICE="${PMPO_BENCH_DEVICE:-cuda}"
MODEL="${PMPO_BENCH_MODEL:-ViT-B-16-quickgelu}"
if [ "$DEVICE" != cpu ]; then
    "$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null || { echo "gpu.sh needs a CUDA GPU (PMPO_BENCH_DEVICE=cpu for a smoke run)" >&2; exit 1; }
fi

OUT_DIR="${PMPO_BENCH_OUT:-${OUT:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}}"
mkdir -p "$OUT_DIR"
START=$(date +%s)
{
    echo "# PMPO GPU benchmark"
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "- git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "- gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo unknown)"
    echo "- python: $("$PY" -c 'import sys, torch, open_clip; print(sys.version.split()[0], "torch", torch.__version__, "open_clip", open_clip.__version__)')"
} > "$OUT_DIR/SUMMARY.md"

STATUS=0
# step NAME LIMIT_S ARGS... : one `pmpo bench` run with its own time limit.
step() {
    local name="$1" limit="$2"; shift 2
    echo "== $name (limit ${limit}s)" >&2
    # A CPU smoke run only checks that every step works: give it 20x the GPU time limits.
    [ "$DEVICE" = cpu ] && limit=$(( limit * 20 ))
    if timeout "$limit" "$PY" -m pmpo bench --device "$DEVICE" --model "$MODEL" --quiet --json "$OUT_DIR/$name.json" \
            --markdown "$OUT_DIR/$name.md" "$@" > "$OUT_DIR/$name.log" 2>&1; then
        printf '\n## %s\n\n`pmpo bench %s`\n\n' "$name" "$*" >> "$OUT_DIR/SUMMARY.md"
        cat "$OUT_DIR/$name.md" >> "$OUT_DIR/SUMMARY.md"
    else
        STATUS=1
        printf '\n## %s\n\nFAILED or timed out (limit %ss): `pmpo bench %s`\n\n```\n%s\n```\n' \
            "$name" "$limit" "$*" "$(tail -5 "$OUT_DIR/$name.log")" >> "$OUT_DIR/SUMMARY.md"
    fi
}

# Main table: floor, inference, training rows, text at C = 100/1000, memory at ImageNet scale.
step bf16-b32 140 --dtype bf16 --batch 32 --repeats 10 --warmup 3
step bf16-b64 55 --dtype bf16 --batch 64 --repeats 10 --warmup 3 --text-classes "" --no-memory
step bf16-b128 55 --dtype bf16 --batch 128 --repeats 10 --warmup 3 --text-classes "" --no-memory
# fp32 reference at one size, and how cost grows with classes, prompts and images.
step fp32-b64 55 --dtype fp32 --batch 64 --repeats 10 --warmup 3 --text-classes "" --no-memory
step scaling-bf16-b64 80 --dtype bf16 --batch 64 --classes 100 --repeats 5 --warmup 2 --scaling \
    --text-classes "" --no-memory --methods pmpo
# torch.compile: the first calls compile (minutes are possible), so few repeats and a hard limit.
step compile-bf16-b64 55 --dtype bf16 --batch 64 --repeats 5 --warmup 2 --compile --text-classes "" \
    --no-memory --methods pmpo
# Against the authors' CoOp and MaPLe (their fp16 path on CUDA), when their checkouts are given:
# PMPO_REFERENCE_DIR=DIR holding CoOp/, Dassl.pytorch/, multimodal-prompt-learning/ (docs/PERFORMANCE.md).
if [ -n "${PMPO_REFERENCE_DIR:-}" ]; then
    step reference-b32 150 --reference "$PMPO_REFERENCE_DIR" --batch 32 --classes 100 --repeats 5 --warmup 2
fi

echo >> "$OUT_DIR/SUMMARY.md"
echo "Total wall time: $(( $(date +%s) - START )) s." >> "$OUT_DIR/SUMMARY.md"
cat "$OUT_DIR/SUMMARY.md"
echo "results: $OUT_DIR" >&2
exit $STATUS
