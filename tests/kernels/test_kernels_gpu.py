"""Fused kernels on a GPU (marked gpu; skipped without CUDA): at every ADM shape of
bench/bench_kernels.py (both group norm paths and layouts; attention head dims 32..256, both
orders, the classifier's T = HW + 1), batch invariance, and through Inductor and AOTInductor
with a dynamic batch.

Same tolerance rule as the interpreter checks: relative error against fp64 at most twice the
torch reference's error in the same dtype, plus a small atol.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

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


# (B, C, H, W) of every group norm shape in bench/bench_kernels.py (ADM-256, ADM-128, ADM-64)
GN_SHAPES = [(2, 256, 256, 256), (4, 256, 128, 128), (4, 512, 64, 64), (4, 512, 32, 32), (4, 1024, 16, 16),
             (4, 1024, 8, 8), (8, 256, 64, 64), (8, 512, 32, 32), (8, 192, 64, 64), (8, 384, 32, 32),
             (8, 576, 16, 16), (16, 768, 8, 8)]


def _gn_inputs(shape):
    B, C = shape[:2]
    x = torch.randn(shape, device="cuda", dtype=torch.float64)
    w = 1 + 0.3 * torch.randn(C, device="cuda", dtype=torch.float64)
    b = 0.3 * torch.randn(C, device="cuda", dtype=torch.float64)
    sc = 0.5 * torch.randn(B, C, device="cuda", dtype=torch.float64)
    sh = 0.5 * torch.randn(B, C, device="cuda", dtype=torch.float64)
    sc._keep32 = sh._keep32 = True
    return [x, w, b, sc, sh]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", GN_SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_adagn_silu_full_shapes(shape, dtype, channels_last):
    mf = torch.channels_last if channels_last else torch.contiguous_format

    def fused(x, w, b, sc, sh):
        return K.group_norm_act(x.to(memory_format=mf), w, b, scale=sc, shift=sh, fused="require")

    def ref(x, w, b, sc, sh):
        return K.group_norm_act_reference(x.to(memory_format=mf), w, b, scale=sc, shift=sh)
    _check(fused, ref, _gn_inputs(shape), dtype)


@pytest.mark.parametrize("path", ["onepass", "twopass"])
@pytest.mark.parametrize("act,ada", [("silu", True), ("none", False)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_both_paths(path, act, ada, channels_last):
    """Each path forced at an ADM-256 res-32 shape (one-pass by the plan's rule)."""
    mf = torch.channels_last if channels_last else torch.contiguous_format
    inputs = _gn_inputs((4, 512, 32, 32))

    def fused(x, w, b, sc=None, sh=None):
        return K.group_norm_act(x.to(memory_format=mf), w, b, scale=sc, shift=sh, act=act, fused="require")

    def ref(x, w, b, sc=None, sh=None):
        return K.group_norm_act_reference(x.to(memory_format=mf), w, b, scale=sc, shift=sh, act=act)
    with checks.forced_gn_path(path):
        for direction in ("forward", "backward"):
            assert checks.group_norm_path(512, 32 * 32, 32, channels_last, direction) == path
        _check(fused, ref, inputs if ada else inputs[:3], torch.float16)


@pytest.mark.parametrize("shape", [(3, 512, 32, 32), (3, 256, 128, 128)])   # one-pass, two-pass
def test_group_norm_batch_invariant(shape):
    """Each sample's output is bitwise the same alone and inside a batch (the plan ignores B)."""
    x = torch.randn(shape, device="cuda", dtype=torch.float16)
    w, b = torch.randn(shape[1], device="cuda"), torch.randn(shape[1], device="cuda")
    sc, sh = torch.randn(shape[:2], device="cuda"), torch.randn(shape[:2], device="cuda")
    whole = K.group_norm_act(x, w, b, scale=sc, shift=sh, fused="require")
    alone = K.group_norm_act(x[1:2], w, b, scale=sc[1:2], shift=sh[1:2], fused="require")
    assert torch.equal(whole[1:2], alone)


# (B, H, D, T, legacy): every attention shape of bench/bench_kernels.py, head dims 32..256, both
# orders, the classifier's AttentionPool2d (T = HW + 1, new order)
ATTN_SHAPES = [(4, 8, 64, 1024, True), (4, 16, 64, 256, True), (4, 16, 64, 64, True), (8, 6, 64, 1024, False),
               (8, 9, 64, 256, True), (8, 12, 64, 64, True), (4, 32, 32, 256, True), (2, 4, 128, 1024, True),
               (4, 4, 128, 64, False), (8, 8, 64, 65, False), (2, 4, 192, 257, False), (2, 2, 256, 65, True)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("B,H,D,T,legacy", ATTN_SHAPES)
def test_attention_full_shapes(B, H, D, T, legacy, dtype):
    qkv = torch.randn(B, 3 * H * D, T, device="cuda", dtype=torch.float64)

    def fused(qkv):
        return K.qkv_attention(qkv, H, legacy_order=legacy, fused="require")

    def ref(qkv):
        return K.qkv_attention_reference(qkv, H, legacy_order=legacy)
    _check(fused, ref, [qkv], dtype)


def test_attention_backward_batch_invariant():
    qkv = torch.randn(3, 3 * 8 * 64, 256, device="cuda", dtype=torch.float16, requires_grad=True)
    dout = torch.randn(3, 8 * 64, 256, device="cuda", dtype=torch.float16)
    (whole,) = torch.autograd.grad(K.qkv_attention(qkv, 8, legacy_order=True, fused="require"), qkv, dout)
    one = qkv[1:2].detach().requires_grad_()
    (alone,) = torch.autograd.grad(K.qkv_attention(one, 8, legacy_order=True, fused="require"), one, dout[1:2])
    assert torch.equal(whole[1:2], alone)


# torch.compile / AOTInductor with a dynamic batch, and double backward, on the block of
# interp_checks.py (AdaGN + SiLU group norm, attention in both channel orders), fp32.
_spec = importlib.util.spec_from_file_location("admrt_interp_checks",
                                               Path(__file__).resolve().parent / "interp_checks.py")
checks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(checks)


def test_inductor_compile_dynamic_batch():
    """Inductor inlines the ops' Triton kernels (forward and backward); new batches reuse the graphs."""
    from torch._inductor.utils import run_and_get_code
    # batch 1 is left out: dynamo specialises sizes 0 and 1; no caches, so the code is generated
    with torch._inductor.config.patch(force_disable_caches=True):
        errs, code = run_and_get_code(checks.compile_block, "inductor", "cuda", (2, 5, 33))
    code = "\n".join(code)
    for name in ("_gn_onepass_fwd_kernel", "_attn_fwd_kernel", "_gn_onepass_bwd_kernel", "_attn_bwd_kernel"):
        assert name in code, name
    assert max(errs.values()) < 1e-5, errs


def _aoti_roundtrip(module, tmp_path, name):
    ep = torch.export.export(module, checks.block_inputs(2, "cuda"), dynamic_shapes=checks.block_dynamic_shapes())
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / f"{name}.pt2"))
    return ep, torch._inductor.aoti_load_package(path)


def test_aoti_package_dynamic_batch(tmp_path):
    m = checks.block_module()
    ep, runner = _aoti_roundtrip(m, tmp_path, "block")
    assert checks.admrt_ops(ep.graph) == checks.FWD_OPS
    for b in (1, 3, 64):
        inputs = checks.block_inputs(b, "cuda", seed=b)
        assert checks.max_err(runner(*inputs), m(*inputs)) < 1e-5, b


def test_aoti_package_of_make_fx_gradient(tmp_path):
    """The classifier-gradient path: make_fx of torch.autograd.grad, exported, AOTInductor."""
    from torch.fx.experimental.proxy_tensor import make_fx
    grads = checks.block_grads(checks.block_module())
    gm = make_fx(grads, tracing_mode="symbolic")(*checks.block_inputs(2, "cuda"))
    ep, runner = _aoti_roundtrip(gm, tmp_path, "block_grad")
    assert checks.admrt_ops(ep.graph) == {**checks.FWD_OPS, **checks.BWD_OPS}
    for b in (1, 5):
        inputs = checks.block_inputs(b, "cuda", seed=b)
        assert checks.max_err(runner(*inputs), grads(*inputs)) < 1e-5, b


def test_double_backward_matches_reference():
    inputs = checks.block_inputs(2, "cuda")
    cases = [
        (lambda *a: K.group_norm_act(*a[:3], num_groups=4, scale=a[3], shift=a[4], fused="require"),
         lambda *a: K.group_norm_act_reference(*a[:3], num_groups=4, scale=a[3], shift=a[4]), inputs[:5]),
        *[(lambda q, legacy=legacy: K.qkv_attention(q, checks.HEADS, legacy_order=legacy, fused="require"),
           lambda q, legacy=legacy: K.qkv_attention_reference(q, checks.HEADS, legacy_order=legacy), inputs[5:])
          for legacy in (True, False)],
    ]
    for fused, ref, args in cases:
        fp, ff, fs = checks.double_backward(fused, args)
        rp, rf, rs = checks.double_backward(ref, args)
        assert checks.max_err((ff, fs), (rf, rs)) < 1e-6
        assert checks.max_err(fp, rp) < 1e-5
