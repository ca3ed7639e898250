"""The throughput suite (pytest-benchmark): guided sampling end to end, one parametrised case per
(model, batch, steps, dtype, implementation), guided-diffusion and admrt in the same run.

    pytest bench/ --benchmark-json=bench/results/throughput_gpu/benchmark.json
    python bench/report.py bench/results/throughput_gpu          # markdown table + plot

Every case of one configuration shares one measurement, `measure()` of bench/measure.py (what
`admrt bench` runs): the same random weights, labels and noise on every side; each
implementation first run once cold (compile, capture, autotuning: reported apart), then the
implementations timed alternately, A B C A B C ..., the device synchronised around each whole
loop; peak memory per implementation. A case's pytest-benchmark record is its implementation's
timed rounds from that alternation (not a block of its own, which machine drift would skew), with
images/s, ms/step, achieved TFLOP/s, % of the matmul rate, peak memory and the speed-up over
guided-diffusion in `extra_info`. Each configuration is also written as the JSON `admrt bench`
writes (`--bench-out`), which bench/report.py turns into the committed table and plot.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import measure as bm

DEVICE = torch.device(bm.parse_args([]).device)   # admrt bench's default: cuda when available

# (model, classifier, batches, steps, upsampler): the throughput issue's matrix, most important
# first (a device call that runs out of time has done those), and matrices a CPU can run. With an
# upsampler the case is the cascade: the guided model's loop, then the upsampler's on its samples.
MATRICES = {
    "gpu": [
        ("imagenet256-cond", "imagenet256-classifier", (64, 1), "ddim25", ""),
        ("imagenet64-cond", "imagenet64-classifier", (64,), "ddim25", ""),
        ("imagenet256-cond", "imagenet256-classifier", (8,), "ddim25", ""),
        ("imagenet64-cond", "imagenet64-classifier", (1, 8), "ddim25", ""),
        ("imagenet128-cond", "imagenet128-classifier", (1, 8, 64), "ddim25", ""),
        ("imagenet64-cond", "imagenet64-classifier", (1, 8, 64), "ddim25", "upsample64-256"),
        ("imagenet512-cond", "imagenet512-classifier", (1, 8, 16), "ddim25", ""),
        ("imagenet256-cond", "imagenet256-classifier", (64,), "250", ""),
    ],
    "cpu": [
        ("fashion16-cond", "fashion16-classifier", (1, 16), "ddim25", ""),
        ("tiny-cond", "tiny-classifier", (1, 8), "ddim25", ""),
        ("fashion16-cond", "fashion16-classifier", (4,), "ddim25", "fashion-upsample16-32"),
    ],
    "smoke": [("tiny-cond", "tiny-classifier", (2,), "ddim2", "")],
}
IMPLS = {"gpu": ("gd", "gd-compile", "eager", "graphs", "compile"),
         "cpu": ("gd", "gd-compile", "eager", "compile"),
         "smoke": ("gd", "gd-compile", "eager", "compile")}
EXTRA = ("images_per_s", "ms_per_step", "median_s", "cold_minus_warm_s", "peak_mem_gib", "achieved_tflops",
         "pct_of_matmul_peak", "speedup_vs_reference")

_measured: dict[str, dict] = {}   # configuration id -> results, shared by its cases


def _config_id(model, upsampler, batch, steps, dtype) -> str:
    return f"{model}{'+' + upsampler if upsampler else ''}-b{batch}-{steps}-{dtype}"


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    matrix, dtype = metafunc.config.getoption("--bench-matrix"), metafunc.config.getoption("--bench-dtype")
    cases = [(model, clf, up, batch, steps, dtype, impl) for model, clf, batches, steps, up in MATRICES[matrix]
             for batch in batches for impl in IMPLS[matrix]]
    metafunc.parametrize("case", cases, ids=[f"{_config_id(m, u, b, s, d)}-{i}" for m, _c, u, b, s, d, i in cases])


def _out(config) -> Path:
    out = config.getoption("--bench-out")
    return Path(out) if out else Path(__file__).parent / "results" / f"throughput_{config.getoption('--bench-matrix')}"


def _selected_impls(session, case) -> list[str]:
    """The implementations of this case's configuration that the run selected (-k may take some)."""
    cases = [item.callspec.params["case"] for item in session.items
             if hasattr(item, "callspec") and "case" in item.callspec.params]
    return [c[-1] for c in cases if c[:-1] == case[:-1]]


def _measure(request, case) -> dict:
    model, clf, up, batch, steps, dtype, _impl = case
    key = _config_id(model, up, batch, steps, dtype)
    if key in _measured:
        return _measured[key]
    config = request.config
    impls = _selected_impls(request.session, case)
    args = bm.parse_args(["--preset", model, "--classifier", clf, "--batch", str(batch), "--steps", steps,
                          "--dtype", dtype, "--reps", str(config.getoption("--bench-reps")),
                          "--impls", ",".join(impls), "--upsampler", up])
    bm._check(args)
    path = bm.result_path(_out(config), args)
    if config.getoption("--bench-skip-done") and path.exists():
        done = json.loads(path.read_text())
        names = {r["impl"] for r in done["rows"] if "median_s" in r}
        if all(bm.impl_name(i, DEVICE) in names for i in impls):
            _measured[key] = done
            return done
    results = bm.measure(args)
    bm.write_results(results, _out(config), args)
    _measured[key] = results
    return results


def _record(benchmark, row: dict, group: str) -> None:
    """pytest-benchmark's record of this case, filled with the case's rounds of the alternating
    measurement (its own timing loop would time the implementations one block after another)."""
    benchmark.group = group
    benchmark.extra_info.update({k: row[k] for k in EXTRA if row.get(k) is not None})
    # pytest-benchmark 5 has no public call for times measured elsewhere: its pedantic() fills
    # the same record through these two members (tests/bench_smoke checks the JSON it writes)
    benchmark._mode = "bench/measure.py measure() (implementations alternating)"
    stats = benchmark._make_stats(1)
    for seconds in row["times_s"]:
        stats.update(seconds)


def test_guided_sampling(benchmark, request, case):
    model, _clf, up, batch, steps, dtype, impl = case
    results = _measure(request, case)
    name = bm.impl_name(impl, DEVICE)
    row = next((r for r in results["rows"] if r["impl"] == name), None)
    assert row is not None, f"{name}: no row in the measurement"
    if "error" in row:
        pytest.fail(f"{name} failed: {row['error']}")
    diff = results.get("image_diff_vs_reference")
    if diff is not None:
        benchmark.extra_info["image_diff_vs_reference"] = diff
    _record(benchmark, row, _config_id(model, up, batch, steps, dtype))
