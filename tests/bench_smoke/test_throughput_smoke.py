"""The throughput suite end to end on CPU at a tiny configuration (bench/test_throughput.py under
pytest-benchmark, bench/report.py, bench/profile_step.py), and the FLOP count its TFLOP/s rest
on, so a GPU session spends no device time on a bug in them."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

import measure as bm

ROOT = Path(__file__).resolve().parents[2]
IMPLS = ("gd", "gd-compile", "eager", "compile")


def _suite(tmp_path, *extra):
    cmd = [sys.executable, "-m", "pytest", str(ROOT / "bench"), "-q", "-p", "no:cacheprovider", "--bench-matrix",
           "smoke", "--bench-reps", "2", "--bench-out", str(tmp_path / "out"), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_suite_report_and_resume(tmp_path):
    _suite(tmp_path, f"--benchmark-json={tmp_path / 'bench.json'}")
    result = tmp_path / "out" / "sampling_tiny-cond_fp32_b2_ddim2.json"
    run = json.loads(result.read_text())
    rows = {r["impl"]: r for r in run["rows"]}
    assert set(rows) == {bm.impl_name(i, torch.device("cpu")) for i in IMPLS}
    assert run["config"]["impls"] == list(IMPLS) and run["config"]["batch"] == "2"
    assert run["image_diff_vs_reference"] == {"max_abs_uint8": 0, "mean_abs_uint8": 0.0}   # fp32, same noise
    assert run["env"]["device"].startswith("cpu")

    # pytest-benchmark's record of each case is its rounds of the alternating measurement
    cases = {b["param"].rsplit("-fp32-", 1)[1]: b for b in json.loads((tmp_path / "bench.json").read_text())["benchmarks"]}
    assert set(cases) == set(IMPLS)
    for impl, case in cases.items():
        row = rows[bm.impl_name(impl, torch.device("cpu"))]
        assert case["stats"]["rounds"] == 2 == len(row["times_s"])
        assert case["stats"]["median"] == pytest.approx(statistics.median(row["times_s"]))
        assert case["group"] == "tiny-cond-b2-ddim2-fp32"
        assert case["extra_info"]["images_per_s"] == pytest.approx(2 / row["median_s"])
        flops = run["flops_per_image_step"]["total"] * 2 * 2   # batch 2, two steps
        assert case["extra_info"]["achieved_tflops"] == pytest.approx(flops / row["median_s"] / 1e12)
        assert case["extra_info"]["speedup_vs_reference"] > 0

    # the committed table and plot
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    table = (tmp_path / "out" / "table.md").read_text()
    assert sum(line.startswith("| tiny-cond + tiny-classifier | 2 | ddim2 | fp32 |") for line in table.splitlines()) == 4
    assert "| images vs guided-diffusion: mean difference < 0.1 uint8 levels | worst mean 0.000, max 0 | yes |" in table
    svg = ET.parse(tmp_path / "out" / "images_per_s.svg").getroot()
    assert len([e for e in svg.iter() if e.tag.endswith("circle")]) == 4

    # a rerun skips the finished configuration: nothing measured again, the file untouched
    before = result.stat().st_mtime_ns
    proc = _suite(tmp_path, "--bench-skip-done", "-k", "eager or compile")
    assert "3 passed" in proc.stdout and result.stat().st_mtime_ns == before


def test_profile_step_on_cpu(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "profile_step.py"), "--preset", "tiny-cond", "--classifier",
           "tiny-classifier", "--batch", "2", "--steps", "ddim2", "--dtype", "fp32", "--backend", "eager",
           "--reps", "2", "--device", "cpu", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "profile_tiny-cond_fp32_b2_ddim2_eager.json").read_text())
    cats = {r["category"]: r for r in result["categories"]}
    assert {"convolution", "group norm", "attention"} <= set(cats)
    assert sum(r["ms_per_step"] for r in result["categories"]) == pytest.approx(result["busy_ms_per_step"])
    assert cats["convolution"]["achieved_tflops"] > 0
    units = [r["unit"] for r in result["units"]]
    assert units[:3] == ["denoiser", "classifier forward", "classifier backward (gradient - forward)"]
    assert sum(r["ms_per_step"] for r in result["units"]) == pytest.approx(result["step_ms"])
    assert (tmp_path / "profile_tiny-cond_fp32_b2_ddim2_eager.md").read_text().startswith("### tiny-cond")


def test_profile_categories_by_kernel_name():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from profile_step import category
    finally:
        sys.path.remove(str(ROOT / "bench"))
    assert category("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nchw") == "convolution"
    assert category("sm90_xmma_dgrad_implicit_gemm_f16f16") == "convolution"
    assert category("triton_poi_fused_convolution_silu_3") == "elementwise and other"   # Inductor's epilogue
    assert category("triton_red_fused_native_group_norm_0") == "group norm"
    assert category("_gn_onepass_fwd_kernel") == "group norm"
    assert category("_attn_bwd_kernel") == "attention"
    assert category("seeded_normal_kernel") == "noise"
    assert category("nchwToNhwcKernel") == "copies and layout transforms"
    assert category("Memcpy DtoH (Device -> Pinned)") == "memcpy/memset"
    assert category("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n") == "matmul"


def test_step_flops_match_the_papers_count():
    """ADM-256's forward is 1120 GMAC (DiT, Table 6); the classifier's input gradient costs about
    its forward (no weight gradients): a guided DDIM-25 image is ~63 TFLOP."""
    flops = bm.step_flops("imagenet256-cond", "imagenet256-classifier")
    assert flops["denoiser"] == pytest.approx(2 * 1120e9, rel=0.005)
    assert flops["classifier_backward"] == pytest.approx(flops["classifier_forward"], rel=0.05)
    assert 25 * flops["total"] == pytest.approx(63e12, rel=0.02)
    assert 0.9 * flops["total"] < flops["convolution"] < flops["total"]
    assert bm.step_flops("imagenet64-cond")["total"] == bm.step_flops("imagenet64-cond")["denoiser"]


def test_cascade_bench_matches_the_reference_scripts(tmp_path):
    """`admrt bench --upsampler`: admrt's cascade against classifier_sample.py then
    super_res_sample.py on its uint8 samples (reference_cascade), the same images with the
    reference noise; the work of both stages counted."""
    args = bm.parse_args(["--preset", "fashion16-cond", "--classifier", "fashion16-classifier", "--upsampler",
                          "fashion-upsample16-32", "--batch", "2", "--steps", "ddim2", "--upsampler-steps", "ddim3",
                          "--dtype", "fp32", "--reps", "1", "--device", "cpu", "--impls", "gd,eager", "--out",
                          str(tmp_path)])
    assert bm.run(args) == 0
    path = tmp_path / "sampling_fashion16-cond+fashion-upsample16-32_fp32_b2_ddim2.json"
    run = json.loads(path.read_text())
    assert run["image_diff_vs_reference"] == {"max_abs_uint8": 0, "mean_abs_uint8": 0.0}
    row = next(r for r in run["rows"] if r["impl"] == "admrt eager")
    work = 2 * run["flops_per_image_step"]["total"] + 3 * run["upsampler_flops_per_image_step"]["total"]
    assert row["achieved_tflops"] == pytest.approx(2 * work / row["median_s"] / 1e12)
    assert row["ms_per_step"] == pytest.approx(1e3 * row["median_s"] / 5)


def test_admrt_bench_without_the_checkout_says_so_in_one_line(monkeypatch, tmp_path, cli_error):
    """bench/ is not installed: `admrt bench` runs it from the source checkout, and says so when
    there is none beside the package."""
    import admrt.cli

    monkeypatch.setattr(admrt.cli, "BENCH", tmp_path / "bench")
    line = cli_error(["bench", "--help"])
    assert "bench/measure.py" in line and str(tmp_path / "bench" / "measure.py") in line
