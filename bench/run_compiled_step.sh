#!/usr/bin/env bash
# The compiled-step table (issue: capture-ready core, whole-step CUDA graphs): guided DDIM-25,
# guided-diffusion vs admrt eager vs admrt + graphs vs admrt compile + graphs, variants
# alternating (bench/measure.py). Results as JSON under $OUT (default bench/results/...).
#   bash bench/run_compiled_step.sh gpu   # one device call: ADM-64 b1,b64; ADM-256 b1,b8,b64; fp16
#   bash bench/run_compiled_step.sh cpu   # bundled Fashion-MNIST models and tiny-*, fp32
set -uo pipefail
export PYTHONUNBUFFERED=1
mode=${1:-cpu}
if [ "$mode" = gpu ]; then
    OUT=${OUT:-bench/results/compiled_step_gpu}; mkdir -p "$OUT"
    python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/install.log" 2>&1 || { tail -40 "$OUT/install.log"; exit 1; }
    B="python3 -m admrt.cli bench --out $OUT --steps ddim25 --dtype fp16 --compile --reps 5"
    for b in 1 64; do $B --preset imagenet64-cond --classifier imagenet64-classifier --batch $b 2>&1 | grep -E "img/s|FAILED"; done
    for b in 1 8 64; do $B --preset imagenet256-cond --classifier imagenet256-classifier --batch $b 2>&1 | grep -E "img/s|FAILED"; done
else
    OUT=${OUT:-bench/results/compiled_step_cpu}; mkdir -p "$OUT"
    B="python3 -m admrt.cli bench --out $OUT --steps ddim25 --dtype fp32 --compile --reps 5 --device cpu"
    for b in 1 16; do $B --preset fashion16-cond --classifier fashion16-classifier --batch $b 2>&1 | grep -E "img/s|FAILED"; done
    for b in 1 8; do $B --preset tiny-cond --classifier tiny-classifier --batch $b 2>&1 | grep -E "img/s|FAILED"; done
fi
