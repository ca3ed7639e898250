#!/usr/bin/env bash
# The fused-kernel benchmark (issue 10, "Measure"; bench/bench_kernels.py): admrt.kernels against
# the torch eager chain, native GroupNorm, SDPA-flash and the einsum reference, eager and
# graph-replayed, with the targets summary. Results as JSON and logs under $OUT.
#   bash bench/run_kernels.sh gpu     # one device call (H100): install, GPU kernel tests, benchmark,
#                                     # Nsight Compute profile if ncu is on PATH; OUT=bench/results/kernels_gpu
#   bash bench/run_kernels.sh smoke   # CPU, Triton interpreter: every code path of the benchmark at
#                                     # tiny shapes (~1 min); OUT = a new temporary folder
# gpu knobs: REP / GRAPH_REP (ms per eager / per graph-replay measurement; default 50 / 20, the
# benchmark's own defaults are 200 / 200); stage limits in seconds, so the call fits a 10-minute
# device command with the install: TEST_TIMEOUT (100), BENCH_LIMIT (270: the benchmark starts no
# row after it and still writes its targets; the target-deciding rows run first), BENCH_TIMEOUT
# (330: killed; the JSON is rewritten after every row, so it keeps what it measured),
# NCU_TIMEOUT (60). The benchmark gets an empty Triton cache folder, so first_call_ms is a
# cold compile (the tests before it fill the default cache).
set -uo pipefail
export PYTHONUNBUFFERED=1
mode=${1:-smoke}
stage() { echo "== $1 (${SECONDS} s)"; }
if [ "$mode" = gpu ]; then
    OUT=${OUT:-bench/results/kernels_gpu}; mkdir -p "$OUT"
    stage install
    python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/install.log" 2>&1 || { tail -40 "$OUT/install.log"; exit 1; }
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
    stage "tests (pytest -m gpu tests/kernels)"
    timeout "${TEST_TIMEOUT:-100}" python3 -m pytest -q -m gpu tests/kernels > "$OUT/tests_gpu.log" 2>&1
    echo "tests rc $?"; tail -4 "$OUT/tests_gpu.log"
    stage benchmark
    cache=$(mktemp -d)
    TRITON_CACHE_DIR=$cache timeout "${BENCH_TIMEOUT:-330}" python3 bench/bench_kernels.py --rep "${REP:-50}" \
        --graph-rep "${GRAPH_REP:-20}" --time-limit "${BENCH_LIMIT:-270}" --out "$OUT/kernels_h100.json" \
        > "$OUT/kernels_h100.log" 2>&1
    echo "benchmark rc $?"; grep -E "^device|failed|Error" "$OUT/kernels_h100.log" | head -20
    sed -n '/^targets:/,$p' "$OUT/kernels_h100.log"; rm -rf "$cache"
    stage "Nsight Compute"
    if command -v ncu > /dev/null; then
        # GN ADM-256 res 256 fp16 AdaGN+SiLU, NCHW and channels_last, forward + backward (two-pass:
        # 4 kernels each), then attention ADM-256 T1024 fp16 legacy order, forward + backward (2)
        timeout "${NCU_TIMEOUT:-60}" ncu --clock-control none --section SpeedOfLight --section Occupancy \
            --section MemoryWorkloadAnalysis --section WarpStateStats -k 'regex:_gn_|_attn_' --launch-count 12 \
            --csv --log-file "$OUT/ncu_kernels.csv" python3 -P - > "$OUT/ncu.log" 2>&1 <<'EOF'
import torch

import admrt.kernels as K

torch.manual_seed(0)
dev = "cuda"
B, C, H, W = 4, 256, 256, 256
for cl in (False, True):
    x = torch.randn(B, C, H, W, device=dev, dtype=torch.float16)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    w, b = torch.randn(C, device=dev), torch.randn(C, device=dev)
    sc, sh = torch.randn(B, C, device=dev), torch.randn(B, C, device=dev)
    ins = [t.requires_grad_() for t in (x, w, b, sc, sh)]
    y = K.group_norm_act(x, w, b, scale=sc, shift=sh, act="silu", fused="require")
    torch.autograd.grad(y, ins, torch.randn_like(y))
    torch.cuda.synchronize()
qkv = torch.randn(8, 3 * 8 * 64, 1024, device=dev, dtype=torch.float16, requires_grad=True)
o = K.qkv_attention(qkv, 8, legacy_order=True, fused="require")
torch.autograd.grad(o, qkv, torch.randn_like(o))
torch.cuda.synchronize()
print("profiled: GN (4, 256, 256, 256) fp16 AdaGN+SiLU NCHW and channels_last fwd+bwd; attention (8, 8, 64, 1024) fp16 fwd+bwd")
EOF
        echo "ncu rc $?"; tail -3 "$OUT/ncu.log"; wc -l "$OUT/ncu_kernels.csv" 2> /dev/null
    else
        echo "ncu not on PATH: no profile"
    fi
    stage done
elif [ "$mode" = smoke ]; then
    OUT=${OUT:-$(mktemp -d)}; mkdir -p "$OUT"
    TRITON_INTERPRET=1 python3 bench/bench_kernels.py --smoke --out "$OUT/kernels_smoke.json" 2>&1 \
        | tee "$OUT/kernels_smoke.log" | sed -n '/^targets:/,$p'
    rc=$?
    echo "smoke rc $rc; results in $OUT"
    exit $rc
else
    echo "usage: bash bench/run_kernels.sh gpu|smoke" >&2
    exit 2
fi
