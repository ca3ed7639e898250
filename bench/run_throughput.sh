#!/usr/bin/env bash
# The throughput issue's runs: the captured step's profiles (bench/profile_step.py) and the
# pytest-benchmark suite (bench/test_throughput.py) with its table and plot (bench/report.py).
#   bash bench/run_throughput.sh carry     # here, before the device calls: copy the pure-Python
#                                          # packages the GPU machine lacks into .carry/ (ignored)
#   bash bench/run_throughput.sh profile   # one device call: install, the captured step's
#                                          # profiles (ADM-256 b64 and b1, ADM-64 b64 on the default
#                                          # engine; ADM-256 b64 compiled) -> $OUT/profiles.tgz
#   bash bench/run_throughput.sh suite     # one device call: the GPU matrix, most important rows
#                                          # first, stopped at SUITE_TIMEOUT (530 s) so the call
#                                          # fits 10 minutes; every finished configuration is a
#                                          # JSON in bench/results/throughput_gpu, which the next
#                                          # call skips (--bench-skip-done) once it is copied back
#                                          # there from $OUT/throughput_gpu.tgz
#   bash bench/run_throughput.sh cpu       # here: the CPU matrix -> bench/results/throughput_cpu
# Knobs: REPS (timed rounds per configuration: 3 on GPU, 5 on CPU), SELECT (a pytest -k
# expression, e.g. "imagenet256 and b64"), SUITE_TIMEOUT, CALL_LIMIT (560: the profiles' budget).
set -uo pipefail
export PYTHONUNBUFFERED=1
mode=${1:-cpu}
stage() { echo "== $1 (${SECONDS} s)"; }
install() {
    python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/install.log" 2>&1 || { tail -40 "$OUT/install.log"; exit 1; }
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
}
case "$mode" in
carry)
    mkdir -p .carry
    for pkg in guided_diffusion pytest_benchmark cpuinfo; do
        src=$(python3 -c "import $pkg, os; print(os.path.dirname($pkg.__file__))") || exit 1
        rm -rf ".carry/$pkg"; cp -r "$src" ".carry/$pkg"; find ".carry/$pkg" -name __pycache__ -prune -exec rm -rf {} +
    done
    du -sh .carry ;;
profile)
    OUT=${OUT:-bench/results/profile_gpu}; mkdir -p "$OUT"; export PYTHONPATH=$PWD/.carry
    stage install; install
    # each profile gets what is left of CALL_LIMIT (560 s), so the call ends inside 10 minutes;
    # one compiled profile (a cold compile of ADM-256 takes minutes), the rest the default engine
    prof() {
        left=$(( ${CALL_LIMIT:-560} - SECONDS )); [ $left -gt 30 ] || { echo "skipped (time): $*"; return; }
        stage "profile $*"
        timeout $left python3 bench/profile_step.py --out "$OUT" --dtype fp16 --reps 3 "$@" \
            > "$OUT/log_$(echo "$*" | tr -c 'a-z0-9' _).txt" 2>&1; echo "rc $?"
    }
    prof --backend eager --batch 64
    prof --backend eager --batch 1
    prof --backend eager --batch 64 --preset imagenet64-cond --classifier imagenet64-classifier
    prof --backend compile --batch 64
    cat "$OUT"/profile_*.md
    (cd "$OUT" && tar czf profiles.tgz profile_* log_* && rm -f profile_* log_*) ;;  # <= 8 files come back
suite)
    OUT=${OUT:-/tmp/throughput_out}; mkdir -p "$OUT"; export PYTHONPATH=$PWD/.carry
    stage install; install
    stage suite
    timeout "${SUITE_TIMEOUT:-530}" python3 -m pytest bench/ -q -p no:cacheprovider --bench-matrix gpu \
        --bench-reps "${REPS:-3}" --bench-out bench/results/throughput_gpu --bench-skip-done \
        --benchmark-json="$OUT/benchmark_$(date +%Y%m%dT%H%M%S).json" ${SELECT:+-k "$SELECT"} 2>&1 \
        | grep -E "img/s|FAILED|passed|failed|error" | tail -60
    python3 bench/report.py bench/results/throughput_gpu > /dev/null
    tar czf "$OUT/throughput_gpu.tgz" -C bench/results throughput_gpu ;;
cpu)
    mkdir -p bench/results/throughput_cpu
    stage suite
    python3 -m pytest bench/ -q -p no:cacheprovider --bench-matrix cpu --bench-reps "${REPS:-5}" --bench-skip-done \
        --bench-out bench/results/throughput_cpu --benchmark-json=bench/results/throughput_cpu/benchmark.json \
        ${SELECT:+-k "$SELECT"} 2>&1 | tail -30
    python3 bench/report.py bench/results/throughput_cpu
    stage profile
    python3 bench/profile_step.py --preset fashion16-cond --classifier fashion16-classifier --batch 16 \
        --dtype fp32 --backend eager --reps 5 --device cpu --out bench/results/throughput_cpu ;;
*)
    echo "run_throughput.sh: mode=$mode: expected carry, profile, suite or cpu" >&2; exit 2 ;;
esac
