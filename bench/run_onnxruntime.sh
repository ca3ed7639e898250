#!/usr/bin/env bash
# The onnxruntime row (issue: ONNX export and the onnxruntime backend): guided DDIM-25,
# guided-diffusion vs admrt eager vs backend="onnxruntime" (both units exported to ONNX and run in
# onnxruntime sessions), variants alternating (bench/measure.py --onnxruntime; the export time
# is reported apart).
#   bash bench/run_onnxruntime.sh cpu   # bundled Fashion-MNIST models, fp32, batch 1 and 16
#   bash bench/run_onnxruntime.sh gpu   # ADM-64, fp16, batch 1 and 64 (needs onnxruntime-gpu)
set -uo pipefail
export PYTHONUNBUFFERED=1
mode=${1:-cpu}
if [ "$mode" = gpu ]; then
    OUT=${OUT:-bench/results/onnxruntime_gpu}; mkdir -p "$OUT"
    B="python3 -m admrt.cli bench --out $OUT --steps ddim25 --dtype fp16 --onnxruntime --reps 5"
    for b in 1 64; do $B --preset imagenet64-cond --classifier imagenet64-classifier --batch $b 2>&1 | grep -E "img/s|FAILED|onnxruntime"; done
else
    OUT=${OUT:-bench/results/onnxruntime_cpu}; mkdir -p "$OUT"
    B="python3 -m admrt.cli bench --out $OUT --steps ddim25 --dtype fp32 --onnxruntime --reps 5 --device cpu"
    for b in 1 16; do $B --preset fashion16-cond --classifier fashion16-classifier --batch $b 2>&1 | grep -E "img/s|FAILED|onnxruntime"; done
fi
