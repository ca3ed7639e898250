"""Fused kernels vs their torch references under the Triton interpreter (CPU), and the fused ops
under torch.export / make_fx / torch.compile(fullgraph=True) with a dynamic batch, and double
backward through them.

The interpreter must be on before the kernels are defined, and other test folders share this
pytest process, so the checks run in one subprocess (interp_checks.py) with TRITON_INTERPRET=1;
each case is reported here as its own test.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("admrt_interp_checks", HERE / "interp_checks.py")
checks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(checks)  # case tables only; the kernels are imported in the subprocess

CASES = [*checks.GN_CASES, *checks.ATTN_CASES, *checks.OTHER_CASES]

pytest.importorskip("triton", reason="the fused kernels need triton")


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(HERE / "interp_checks.py"), *CASES], env=env,
                          capture_output=True, text=True, timeout=600)
    out = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            out[rec["name"]] = rec
    if not out:
        pytest.fail(f"interp_checks.py produced no results (rc={proc.returncode}):\n{proc.stderr[-3000:]}")
    return out


@pytest.mark.parametrize("case", CASES)
def test_fused_matches_reference(results, case):
    assert case in results, f"{case}: no result (the subprocess stopped early?)"
    rec = results[case]
    assert rec["ok"], f"{case}: {rec['detail']}"
