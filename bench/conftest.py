"""Options of the throughput suite (bench/test_throughput.py), run with pytest-benchmark:

    pytest bench/ --benchmark-json=bench/results/throughput.json   # the matrix for this machine
    pytest bench/ --bench-matrix gpu -k "imagenet256 and b64"       # one configuration's rows

bench/ goes on sys.path (pytest runs with --import-mode=importlib), so the suite imports its
modules (measure, gd_oracle) as a script run from here does.
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_addoption(parser):
    group = parser.getgroup("admrt throughput suite")
    group.addoption("--bench-matrix", default=None, choices=("gpu", "cpu", "smoke"),
                    help="which configurations (bench/test_throughput.py MATRICES); default: gpu with CUDA, else cpu")
    group.addoption("--bench-dtype", default=None, choices=("fp16", "bf16", "fp32"),
                    help="the networks' precision on every side; default: fp16 on CUDA, fp32 on CPU")
    group.addoption("--bench-reps", type=int, default=5, help="timed rounds per configuration, implementations alternating")
    group.addoption("--bench-out", default=None,
                    help="folder for one `admrt bench` JSON per configuration; default: "
                         "bench/results/throughput_<cuda|cpu>")
    group.addoption("--bench-skip-done", action="store_true",
                    help="skip a configuration whose JSON in --bench-out already has every implementation selected "
                         "(a run cut short by a time limit goes on where it stopped)")


def pytest_configure(config):
    reps = config.getoption("--bench-reps")
    if reps <= 0:
        raise pytest.UsageError(f"--bench-reps={reps}: expected a positive int")
    cuda = torch.cuda.is_available()
    if config.getoption("--bench-matrix") is None:
        config.option.bench_matrix = "gpu" if cuda else "cpu"
    if config.getoption("--bench-dtype") is None:
        config.option.bench_dtype = "fp16" if cuda else "fp32"
