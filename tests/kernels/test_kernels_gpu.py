"""Fused kernels at full ADM-256 / ADM-64 shapes on a GPU (marked gpu; skipped without CUDA).

Same tolerance rule as the interpreter checks: relative error against fp64 at most twice the
torch reference's error in the same dtype, plus a small atol.
"""
from __future__ import annotations

import pytest
import torch

import admrt.kernels as K

pytestmark = pytest.mark.gpu
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _rel(a, ref):
    a, ref = a.double(), ref.double()
    assert torch.isfinite(a).all()
    return ((a - ref).norm() / ref.norm()).item()


def _check(fused, ref, inputs, dtype):
    def run(fn, cast):
        xs = [t.detach().to(cast(t)).requires_grad_() for t in inputs]
        return fn(*xs), xs
    low = lambda t: dtype if t.dim() > 1 and not getattr(t, "_keep32", False) else torch.float32  # noqa: E731
    of, xf = run(fused, low)
    ol, xl = run(ref, low)
    orf, xr = run(ref, lambda t: torch.float64)
    g = torch.randn_like(orf)
    gf = torch.autograd.grad(of, xf, g.to(of.dtype))
    gl = torch.autograd.grad(ol, xl, g.to(ol.dtype))
    gr = torch.autograd.grad(orf, xr, g)
    pairs = [("out", of, ol, orf)] + [(f"grad{i}", a, b, c) for i, (a, b, c) in enumerate(zip(gf, gl, gr))]
    for name, a, b, c in pairs:
        ek, et = _rel(a, c), _rel(b, c)
        assert ek <= 2 * et + ATOL[dtype], f"{name}: kernel {ek:.3g} vs torch {et:.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 256, 256, 256), (4, 512, 32, 32), (4, 1024, 8, 8), (8, 192, 64, 64), (8, 576, 16, 16)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_adagn_silu_full_shapes(shape, dtype, channels_last):
    B, C = shape[:2]
    dev = "cuda"
    x = torch.randn(shape, device=dev, dtype=torch.float64)
    w = 1 + 0.3 * torch.randn(C, device=dev, dtype=torch.float64)
    b = 0.3 * torch.randn(C, device=dev, dtype=torch.float64)
    sc = 0.5 * torch.randn(B, C, device=dev, dtype=torch.float64)
    sh = 0.5 * torch.randn(B, C, device=dev, dtype=torch.float64)
    mf = torch.channels_last if channels_last else torch.contiguous_format

    def fused(x, w, b, sc, sh):
        return K.group_norm_act(x.to(memory_format=mf), w, b, scale=sc, shift=sh, fused="require")

    def ref(x, w, b, sc, sh):
        return K.group_norm_act_reference(x.to(memory_format=mf), w, b, scale=sc, shift=sh)
    sc._keep32 = sh._keep32 = True
    _check(fused, ref, [x, w, b, sc, sh], dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("B,H,D,T,legacy", [(4, 8, 64, 1024, True), (4, 16, 64, 256, True), (4, 16, 64, 64, True),
                                            (8, 6, 64, 1024, False), (2, 4, 192, 257, False), (2, 2, 256, 65, True),
                                            (2, 4, 128, 1024, True)])
def test_attention_full_shapes(B, H, D, T, legacy, dtype):
    qkv = torch.randn(B, 3 * H * D, T, device="cuda", dtype=torch.float64)

    def fused(qkv):
        return K.qkv_attention(qkv, H, legacy_order=legacy, fused="require")

    def ref(qkv):
        return K.qkv_attention_reference(qkv, H, legacy_order=legacy)
    _check(fused, ref, [qkv], dtype)
