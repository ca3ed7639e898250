"""bench/gpu_check.sh --dry-run end to end on CPU (every stage's code path that runs without CUDA,
the three result files, the skipped stages named) and bench/gpu_report.py on what it wrote, so
the first GPU call is not spent on a bug in them; and the pieces a dry run cannot reach: the
pytest output parser, the time boxes, the argument checks."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import gpu_check
import gpu_report

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    out, work = tmp / "out", tmp / "work"
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", "out", "--work", "work"], cwd=tmp,   # the caller's
                          capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHON": sys.executable})
    return proc, out, work


@pytest.mark.slow
def test_dry_run_runs_every_stage_it_can_and_names_what_it_skipped(dry_run):
    proc, out, work = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.md", "logs.tgz"]  # <= 8 come back
    result = json.loads((out / "gpu_check.json").read_text())
    stages = result["stages"]
    assert result["dry_run"] is True and list(stages) == [s.name for s in gpu_check.STAGES]
    assert stages["build"]["status"] == "skipped" and "dry run" in stages["build"]["summary"]
    assert stages["correctness"]["status"] == "skipped" and stages["correctness"]["collected"] >= 100
    paths = stages["smoke"]["paths"]
    assert paths["admrt sample (default)"]["status"] == "ok"
    assert paths["admrt sample (default)"]["images"]["images"] == 2
    assert list((work / "smoke" / "base").glob("samples_2x*.npz"))   # the compiled paths' reference
    assert [p["line"] for k, p in paths.items() if k != "admrt sample (default)"] == ["needs CUDA"] * 2
    rows = stages["throughput"]["rows"]
    assert [r["status"] for r in rows.values()] == ["ok", "ok"]
    for row in rows.values():
        res = row["result"]
        assert res["matmul_tflops"] > 0   # measured in the run
        ours = next(r for r in res["rows"] if r["impl"] == "admrt eager")
        assert 0 < ours["pct_of_matmul_peak"] < 100
    assert rows["tiny b1"]["result"]["image_diff_vs_reference"]["max_abs_uint8"] == 0
    assert "image_diff_vs_reference" not in rows["tiny b2"]["result"]     # --skip-image-check
    assert stages["kernels"]["status"] == "ok" and stages["kernels"]["rows"]
    assert {t["target"] for t in stages["kernels"]["targets"]} >= {"gn_small_launch", "attn_bwd_over_fwd"}
    assert stages["profile"]["status"] == "ok" and stages["profile"]["result"]["categories"]
    md = (out / "gpu_check.md").read_text()
    assert "dry run on CPU" in md and "needs CUDA" in md and "| throughput | ok |" in md
    assert "| build | skipped |" in proc.stdout                       # the summary is printed last
    assert {"logs/correctness.log", "logs/throughput_tiny_b1.log", "kernels.json"} <= set(
        subprocess.run(["tar", "tzf", str(out / "logs.tgz")], capture_output=True, text=True).stdout.split())


@pytest.mark.slow
def test_report_writes_results_and_readme_block_and_refuses_a_dry_run(dry_run, tmp_path):
    _, out, _ = dry_run
    readme = tmp_path / "README.md"
    shutil.copyfile(ROOT / "README.md", readme)
    before = readme.read_text()
    report = [sys.executable, str(ROOT / "bench" / "gpu_report.py"), str(out), "--results-root",
              str(tmp_path / "results"), "--readme", str(readme)]
    refused = subprocess.run(report, capture_output=True, text=True)
    assert refused.returncode == 2 and "a dry run (CPU): not GPU figures; refused" in refused.stderr
    assert readme.read_text() == before and not (tmp_path / "results").exists()
    done = subprocess.run(report + ["--allow-dry-run"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    folder = next((tmp_path / "results").iterdir())
    assert folder.name.startswith("gpu_20")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "call1_gpu_check.json", "call1_gpu_check.md",
                                                        "call1_logs.tgz"]
    text = folder.joinpath("README.md").read_text()
    assert "DRY RUN ON CPU" in text and "## Verdicts" in text and "ADM-256 guided DDIM-25 b64" in text
    after = readme.read_text()
    block = after.split(gpu_report.BEGIN)[1].split(gpu_report.END)[0]
    assert f"bench/results/{folder.name}" in block and "tiny b1" in block
    assert after.replace(block, "") == before.replace(before.split(gpu_report.BEGIN)[1].split(gpu_report.END)[0], "")


def test_a_later_call_replaces_only_the_stages_it_ran():
    first = {"dry_run": False, "started": "2026-12-06T10:00:00+00:00", "total_s": 480, "env": {"device": "H200"},
             "stages": {"build": {"status": "ok"}, "throughput": {"status": "partial", "summary": "a"},
                        "profile": {"status": "skipped", "summary": "no time left"}}}
    second = {"dry_run": False, "started": "2026-12-06T10:10:00+00:00", "total_s": 200, "env": {},
              "stages": {"build": {"status": "ok"}, "throughput": {"status": "skipped", "summary": "not chosen"},
                         "profile": {"status": "ok", "summary": "b"}}}
    both = gpu_report.combine([first, second])
    assert both["stages"]["throughput"]["summary"] == "a" and both["stages"]["profile"]["summary"] == "b"
    assert both["started"] == first["started"] and both["env"]["device"] == "H200" and both["calls"] == 2


PYTEST_OUTPUT = """\
created: 6/6 workers
6 workers [5 items]
[gw0] [ 20%] PASSED tests/engine/test_noise.py::test_cpu_and_cuda_give_the_same_noise
[gw1] [ 40%] FAILED tests/engine/test_engine_gpu.py::test_captured_steps_equal_the_uncaptured_loop[ddim10-options0]
[gw2] [ 60%] SKIPPED tests/export/test_aoti_gpu.py::test_cuda_package_with_graphs_equals_eager
[gw3] [ 80%] ERROR tests/kernels/test_kernels_gpu.py::test_double_backward_matches_reference
tests/models/test_models_fused.py::test_adm64_fused_matches_unfused_on_gpu[fp16] PASSED [100%]
=========================== short test summary info ============================
FAILED tests/engine/test_engine_gpu.py::test_captured_steps_equal_the_uncaptured_loop[ddim10-options0] - AssertionError: max 3.1e-2
ERROR tests/kernels/test_kernels_gpu.py::test_double_backward_matches_reference - RuntimeError: CUDA error
"""


def test_pytest_output_parsed_per_test_with_reasons():
    out = gpu_check.pytest_outcomes(PYTEST_OUTPUT)
    assert out["counts"] == {"passed": 2, "failed": 1, "skipped": 1, "error": 1}
    assert [(f["outcome"], f["reason"]) for f in out["failures"]] == [
        ("FAILED", "AssertionError: max 3.1e-2"), ("ERROR", "RuntimeError: CUDA error")]


def test_a_command_past_its_box_is_killed_with_its_children_and_says_so(tmp_path):
    start = time.monotonic()
    ran = gpu_check.run(["bash", "-c", "echo started; trap '' TERM; sleep 30 & sleep 30; wait"], tmp_path / "x.log",
                        timeout=1)   # SIGTERM ignored: SIGKILL follows
    assert ran.rc is None and time.monotonic() - start < 15
    assert ran.error_line().startswith("stopped at its time limit after ")
    assert "(last: started)" in ran.error_line()
    assert "killed at its time limit" in (tmp_path / "x.log").read_text()
    assert subprocess.run(["pgrep", "-f", "sleep 30"], capture_output=True).returncode == 1   # none left


def test_a_program_that_cannot_start_fails_that_command_only(tmp_path):
    ran = gpu_check.run([str(tmp_path / "no-such-program")], tmp_path / "y.log", timeout=5)
    assert ran.rc == 127 and "cannot start" in ran.error_line()


def test_no_time_left_skips_the_stage_and_still_writes_the_results(tmp_path):
    check = gpu_check.Check(tmp_path / "out", tmp_path / "work", dry=True, total=5)
    called = []
    stage = gpu_check.Stage("profile", 60, 50, lambda c, box: called.append(box) or {"status": "ok", "summary": ""},
                            min_s=40)
    result = gpu_check.run_stage(check, stage)
    assert not called and result["status"] == "skipped" and "s left of the check's 5 s; it needs 40" in result["summary"]
    assert json.loads((tmp_path / "out" / "gpu_check.json").read_text())["stages"]["profile"]["status"] == "skipped"


def test_a_stage_that_raises_fails_alone(tmp_path):
    check = gpu_check.Check(tmp_path / "out", tmp_path / "work", dry=True, total=100)
    stage = gpu_check.Stage("kernels", 60, 50, lambda c, box: 1 / 0)
    result = gpu_check.run_stage(check, stage)
    assert result["status"] == "failed" and result["summary"] == "gpu_check.py: ZeroDivisionError: division by zero"


@pytest.mark.parametrize("argv,expected", [
    (["--stages", "throughput,bogus"], "--stages='throughput,bogus': expected some of"),
    (["--total", "0"], "--total=0.0: expected a positive number of seconds"),
    ([], "no GPU here (nvidia-smi lists none): run it on the GPU machine, or pass --dry-run"),
])
def test_bad_arguments_are_one_line(argv, expected, tmp_path):
    if not argv and gpu_check._gpu_present():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run(["bash", str(SCRIPT), *argv, "--out", str(tmp_path / "o")], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 2 and expected in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert not (tmp_path / "o").exists()


def test_the_check_runs_every_gpu_marked_test_file():
    """A GPU test added in a file the check does not list would never run on a GPU (TensorRT's need
    TensorRT, which cannot be installed here or there)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                           "tests"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:]
    files = {line.split("::")[0] for line in proc.stdout.splitlines() if "::" in line}
    assert files - {"tests/export/test_tensorrt.py"} == set(gpu_check.GPU_TESTS)


def test_a_failed_build_is_named_by_its_first_compiler_error(tmp_path):
    log = tmp_path / "build.log"
    log.write_text("$ pip install -e .\n[3/15] Building CUDA object noise_cuda.cu.o\n"
                   "/repo/engine/csrc/noise_cuda.cu(41): error: identifier \"at::cuda::getCurrentCUDAStream\" is undefined\n"
                   "ninja: build stopped: subcommand failed.\n  error: subprocess-exited-with-error\n")
    ran = gpu_check.Ran(["pip"], 1, 3.0, log)
    assert gpu_check._first_build_error(ran).startswith("/repo/engine/csrc/noise_cuda.cu(41): error: identifier")


def test_a_used_work_folder_is_refused_in_one_line(tmp_path):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "throughput").mkdir()
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", "o", "--work", "w"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].endswith(
        "--work=w: expected a new or empty folder (an earlier check's run folders and results there would be taken "
        "for this one's)")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_sigterm_stops_every_command_and_keeps_what_was_measured(tmp_path):
    work = tmp_path / "work"
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--stages", "kernels",
                             "--out", str(tmp_path / "out"), "--work", str(work)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:   # the kernels benchmark (about 30 s under the interpreter) has started
        if line.startswith("== kernels: up to"):
            break
    time.sleep(3)
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().splitlines()[-1].startswith("gpu_check: interrupted;")
    result = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert result["interrupted"] and result["stages"]["kernels"]["status"] != "ok"
    assert subprocess.run(["pgrep", "-f", str(work)], capture_output=True).returncode == 1   # no command left
