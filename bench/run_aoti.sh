#!/usr/bin/env bash
# The Python-free runtime table (issue: AOTInductor packages, libadmrt, admrt-sample): guided
# DDIM-25, guided-diffusion vs admrt eager vs an AOTInductor package run by the C++ Context
# (Engine.from_package) vs the admrt-sample process on it, variants alternating
# (bench/measure.py --package; the export + compile time is reported apart).
#   bash bench/run_aoti.sh cpu   # bundled Fashion-MNIST models, fp32, batch 1 and 16
#   bash bench/run_aoti.sh gpu   # ADM-64, fp16, batch 1 and 64 (one device call)
set -uo pipefail
export PYTHONUNBUFFERED=1
mode=${1:-cpu}
if [ "$mode" = gpu ]; then
    OUT=${OUT:-bench/results/aoti_gpu}; mkdir -p "$OUT"
    python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/install.log" 2>&1 || { tail -40 "$OUT/install.log"; exit 1; }
    B="python3 -m admrt.cli bench --out $OUT --steps ddim25 --dtype fp16 --package --reps 5"
    for b in 1 64; do $B --preset imagenet64-cond --classifier imagenet64-classifier --batch $b 2>&1 | grep -E "img/s|FAILED|package"; done
else
    OUT=${OUT:-bench/results/aoti_cpu}; mkdir -p "$OUT"
    B="python3 -m admrt.cli bench --out $OUT --steps ddim25 --dtype fp32 --package --reps 5 --device cpu"
    for b in 1 16; do $B --preset fashion16-cond --classifier fashion16-classifier --batch $b 2>&1 | grep -E "img/s|FAILED|package"; done
fi
