"""The C++ readers and package loader under AddressSanitizer + UndefinedBehaviorSanitizer.

Skipped unless ADMRT_SANITIZED_BUILD names a build folder made with -DADMRT_SANITIZE=ON (it holds
admrt-read-check and admrt-sample instrumented; libtorch itself is not). Build it once, apart
from the normal build:

    cmake -S . -B /tmp/build-asan -DADMRT_SANITIZE=ON -DADMRT_PYTHON=OFF \\
          -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g" \\
          -DCMAKE_PREFIX_PATH="$(python -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"
    cmake --build /tmp/build-asan -j2
    ADMRT_SANITIZED_BUILD=/tmp/build-asan python -m pytest -q tests/engine/test_sanitizers.py

The package suites (tests/engine/test_package_safety.py, tests/export/test_aoti.py) also run with
the instrumented admrt-sample in place of the installed one (a few minutes: they export packages).
Optionally ADMRT_SANITIZED_PACKAGE names an exported package (`admrt export aoti`) for a full
sampling run of the sanitized admrt-sample. Leak detection is off (libtorch's static allocations
are never freed); any other sanitizer report is fatal (exit code 86) and fails the test."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import test_fuzz_readers as fuzz  # noqa: E402

BUILD = os.environ.get("ADMRT_SANITIZED_BUILD")
PACKAGE = os.environ.get("ADMRT_SANITIZED_PACKAGE")
pytestmark = pytest.mark.skipif(
    not BUILD, reason="set ADMRT_SANITIZED_BUILD to a -DADMRT_SANITIZE=ON build folder (see this file's docstring)")

SANITIZER_EXIT = 86
ENV = {**os.environ,
       "ASAN_OPTIONS": f"detect_leaks=0:exitcode={SANITIZER_EXIT}:abort_on_error=0:detect_odr_violation=0",
       "UBSAN_OPTIONS": f"print_stacktrace=1:halt_on_error=1:exitcode={SANITIZER_EXIT}"}


def _program(name: str) -> str:
    path = Path(BUILD) / name
    if not path.is_file():
        pytest.fail(f"{path}: not built (ADMRT_SANITIZED_BUILD must be a -DADMRT_SANITIZE=ON build folder)")
    return str(path)


def _run(args, **kw):
    res = subprocess.run(args, capture_output=True, text=True, timeout=600, env=ENV, **kw)
    assert "ERROR: AddressSanitizer" not in res.stderr and "runtime error:" not in res.stderr, res.stderr[-5000:]
    assert res.returncode >= 0 and res.returncode != SANITIZER_EXIT, (res.returncode, res.stderr[-5000:])
    return res


def test_programs_are_instrumented():
    for name in ("admrt-read-check", "admrt-sample"):
        res = subprocess.run(["ldd", _program(name)], capture_output=True, text=True)
        assert "libasan" in res.stdout and "libubsan" in res.stdout, (name, res.stdout)


@pytest.mark.parametrize("kind", ["json", "package", "npz"])
def test_fuzz_corpus_under_sanitizers(tmp_path, kind):
    """The fuzz corpus of tests/test_fuzz_readers.py, all of it, through the instrumented readers."""
    paths = fuzz.corpus("npz" if kind == "npz" else "package", tmp_path / kind, fuzz.MAX_CASES)
    if kind == "json":
        paths = [p / "manifest.json" for p in paths]
    results = fuzz.run_read_check(_program("admrt-read-check"), kind, paths, 10 * fuzz.SECONDS + 600, env=ENV,
                                  memory_bound=False)  # ASan reserves terabytes of shadow address space
    assert len(results) == len(paths)
    fuzz.check_results(results, f"{kind} reader under ASan/UBSan", names_file=kind != "package")


def test_admrt_sample_on_damaged_manifests_under_sanitizers(tmp_path):
    """admrt-sample itself on some of those packages and a manifest nested 20000 deep: each one
    line and an error exit, nothing written, no sanitizer report."""
    cases = fuzz.corpus("package", tmp_path / "cases", 40)
    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / "manifest.json").write_text("[" * 20000 + "]" * 20000)
    for i, pkg in enumerate([*cases, deep]):
        out = tmp_path / f"out{i}"
        res = _run([_program("admrt-sample"), "--package", str(pkg), "--num", "2", "--out", str(out)])
        line = res.stderr.strip()
        assert res.returncode in (1, 2) and "\n" not in line and line.startswith("admrt-sample: "), (pkg, line)
        assert not out.exists(), pkg


@pytest.mark.skipif(not PACKAGE, reason="set ADMRT_SANITIZED_PACKAGE to an exported package folder")
def test_sampling_a_package_under_sanitizers(tmp_path):
    out = tmp_path / "out"
    args = [_program("admrt-sample"), "--package", PACKAGE, "--num", "3", "--batch-size", "2", "--shard-size", "2",
            "--out", str(out)]
    res = _run(args)
    assert res.returncode == 0, res.stderr[-3000:]
    (final,) = out.glob("samples_*.npz")
    with np.load(final) as z:
        images = z["arr_0"]
    assert images.dtype == np.uint8 and len(images) == 3
    # a rerun without the final file assembles it again from the shards: read_npz of every shard
    # and the run record's JSON under the sanitizers
    final.unlink()
    res = _run(args)
    assert res.returncode == 0, res.stderr[-3000:]
    with np.load(final) as z:
        assert np.array_equal(z["arr_0"], images)
    assert json.loads((out / "run.json").read_text())


RUNNER = """
import sys, resource
resource.setrlimit = lambda *a: None   # the suites bound memory with RLIMIT_AS; ASan needs terabytes of it
import admrt.engine
admrt.engine.sample_program = sys.argv[1]  # before the test modules import it
import pytest
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", *sys.argv[2:]]))
"""


def test_package_suites_with_the_sanitized_program(tmp_path):
    """The package tests (damaged, swapped, escaping and malformed packages; sampling, resuming and
    sharing run folders across the cascade) with the instrumented admrt-sample."""
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, "-c", RUNNER, _program("admrt-sample"),
                          str(root / "tests/engine/test_package_safety.py"), str(root / "tests/export/test_aoti.py"),
                          "-k", "not embedding and not torchrun"],
                         capture_output=True, text=True, timeout=3000, env=ENV, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-3000:]
