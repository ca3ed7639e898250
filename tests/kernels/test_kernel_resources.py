"""Every launch plan of the fused kernels at the ADM shapes compiles for sm_90a without register
spills (bench/kernel_resources.py: the real launchers on meta tensors, each kernel compiled by its
own `warmup` against a stand-in Hopper target and assembled by Triton's bundled ptxas). No GPU is
needed; a plan rule that would spill on an H100 fails here."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import admrt.kernels as K

pytest.importorskip("triton", reason="the fused kernels need triton")
pytestmark = pytest.mark.skipif(K.INTERPRET, reason="needs triton.jit kernels (TRITON_INTERPRET is set)")

_spec = importlib.util.spec_from_file_location(
    "admrt_kernel_resources", Path(__file__).resolve().parents[2] / "bench" / "kernel_resources.py")
resources = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(resources)


@pytest.fixture(scope="module", autouse=True)
def ptxas():
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(90).path
    except Exception as e:  # noqa: BLE001 - a triton without its CUDA backend
        pytest.skip(f"triton's ptxas is not available: {e}")


def _spilling(rows):
    return [(r["shape"], r.get("layout"), r["dtype"], r["direction"], r["kernel"], r["registers"],
             r["spill_store_bytes"]) for r in rows if r["spill_store_bytes"]]


def test_group_norm_plans_do_not_spill():
    G, A = resources._modules()
    rows = resources.group_norm_reports(G, A)
    assert {r["path"] for r in rows} == {"onepass", "twopass"}
    assert not _spilling(rows)


def test_attention_blocks_do_not_spill():
    G, A = resources._modules()
    rows = resources.attention_reports(G, A)
    assert {r["kernel"] for r in rows} == {"_attn_fwd_kernel", "_attn_bwd_kernel"}
    assert not _spilling(rows)
