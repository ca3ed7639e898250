#!/usr/bin/env bash
# Installs admrt and what it needs on a fresh machine; keeps a torch that is already installed.
#   bash scripts/install.sh          # runtime
#   bash scripts/install.sh test     # runtime + test oracle (guided-diffusion-sdk), pytest, triton
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=${1:-}

# torch: keep the user's (>= 2.6); on a machine with none, take the local CPU build 2.13.0.
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "torch==2.13.0"
fi
# Real data: Debian's Fashion-MNIST (IDX .gz under /usr/share/datasets/fashion-mnist/).
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
        || echo "install.sh: could not install Debian's dataset-fashion-mnist (training/eval on it will say so)" >&2
fi
# Build tools for the C++ core (no build isolation: it links against the installed torch).
"$PY" -m pip install -q "setuptools>=64" wheel "pybind11>=2.11" "cmake>=3.18" ninja
if [ "$extras" = "test" ]; then
    "$PY" -m pip install -q --no-build-isolation -e ".[test]"
else
    "$PY" -m pip install -q --no-build-isolation -e .
fi
# admrt-sample (the Python-free C++ program, built with the core) on PATH beside the `admrt` command.
program=$("$PY" -c "import admrt.engine as e; print(e.sample_program)")
scripts=$("$PY" -c "import sysconfig; print(sysconfig.get_path('scripts'))")
ln -sf "$program" "$scripts/admrt-sample"
if command -v pyenv >/dev/null; then pyenv rehash; fi
