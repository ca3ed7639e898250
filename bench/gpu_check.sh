#!/usr/bin/env bash
# The GPU check in one device call (bench/gpu_check.py has the stages, their time boxes and results).
#   bash bench/gpu_check.sh --prepare   # here, once: the packages the GPU machine lacks, as wheels in
#                                       # .whl/ (ignored; ~0.1 MiB): guided-diffusion-sdk (the oracle)
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=570)   # the device call
#   bash bench/gpu_check.sh --dry-run   # on CPU (CI): every stage's code path that runs without CUDA
# Other arguments go to bench/gpu_check.py (--stages, --total, --out, --work).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)   # no cd: relative --out/--work are the caller's
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
CARRIED="guided-diffusion-sdk"   # what the GPU machine's image lacks (the device tool's KINDS.md lists what it has)
if [ "${1:-}" = --prepare ]; then
    mkdir -p "$root/.whl"
    for pkg in $CARRIED; do
        version=$("$PY" -m pip show "$pkg" 2>/dev/null | sed -n 's/^Version: //p')
        "$PY" -m pip wheel -q --no-deps -w "$root/.whl" "$pkg${version:+==$version}" || exit 1
    done
    ls -l "$root/.whl"; du -sh "$root/.whl"
    exit 0
fi
if ls "$root"/.whl/*.whl > /dev/null 2>&1; then   # carried wheels: pure Python, unpacked beside the image's packages
    site=/tmp/admrt-gpu-check-site
    PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" \
        "$root"/.whl/*.whl || { echo "gpu_check.sh: could not install the carried wheels of .whl/ into $site" >&2; exit 1; }
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
exec "$PY" "$root/bench/gpu_check.py" "$@"
