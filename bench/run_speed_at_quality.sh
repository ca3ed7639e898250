#!/usr/bin/env bash
# Speed at equal quality (issue: guided solvers): guided-diffusion's DDIM-25 (its own loop, and with
# torch.compile) against admrt running the plan that matches DDIM-25's FID with fewer model calls
# (docs/solvers: FID against calls), in one run, variants alternating (bench/measure.py
# --admrt-steps; compile and export times reported apart). Nothing else may run meanwhile.
#   bash bench/run_speed_at_quality.sh cpu [PLAN]   # bundled Fashion-MNIST architectures, fp32, batch 1 and 16
#   bash bench/run_speed_at_quality.sh gpu [PLAN]   # ADM-64, fp16, batch 64
set -uo pipefail
export PYTHONUNBUFFERED=1
mode=${1:-cpu}
plan=${2:-dpmpp2m-sde8}
if [ "$mode" = gpu ]; then
    OUT=${OUT:-bench/results/speed_at_quality_gpu}; mkdir -p "$OUT"
    B="python3 -m admrt.cli bench --out $OUT --steps ddim25 --admrt-steps $plan --dtype fp16 --reps 5 --impls gd,gd-compile,graphs,compile"
    $B --preset imagenet64-cond --classifier imagenet64-classifier --batch 64 2>&1 | grep -E "img/s|FAILED"
else
    OUT=${OUT:-bench/results/speed_at_quality_cpu}; mkdir -p "$OUT"
    B="python3 -m admrt.cli bench --out $OUT --steps ddim25 --admrt-steps $plan --dtype fp32 --reps 5 --device cpu --impls gd,gd-compile,eager,compile,aoti"
    for b in 1 16; do $B --preset fashion16-cond --classifier fashion16-classifier --batch $b 2>&1 | grep -E "img/s|FAILED|package|exported"; done
fi
