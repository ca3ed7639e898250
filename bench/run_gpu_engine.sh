#!/usr/bin/env bash
# One device call: build admrt on the GPU machine, run the engine's GPU tests, then the
# end-to-end sampling benchmarks against guided-diffusion. Results under $OUT.
# The oracle travels in .carry/guided_diffusion (ignored; copied from guided-diffusion-sdk).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/.carry
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install --no-build-isolation --no-deps -e . > /tmp/install.log 2>&1 || { tail -40 /tmp/install.log; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m pytest -q -m gpu tests/engine 2>&1 | tee "$OUT/gpu_tests.log" | tail -6
B="python3 -m admrt.cli bench --out $OUT"
$B --preset imagenet64-cond --classifier imagenet64-classifier --batch 64 --steps ddim25 --dtype fp16 --reps 2 2>&1 | grep -E "img/s|FAILED"
$B --preset imagenet256-cond --classifier imagenet256-classifier --batch 8 --steps ddim25 --dtype fp16 --reps 2 2>&1 | grep -E "img/s|FAILED"
$B --preset imagenet64-cond --classifier imagenet64-classifier --batch 4 --steps ddim10 --dtype fp32 --reps 1 2>&1 | grep -E "img/s|FAILED|max_abs"
