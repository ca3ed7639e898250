"""Interpreter checks of the fused kernels against their torch references (run as a script).

Run in a subprocess with TRITON_INTERPRET=1 (set by test_kernels_interp.py before Python
starts, so the kernels are defined as interpreted functions there and nowhere else).
Tolerance rule (STYLE.md): the kernel's error against an fp64 reference is at most twice the
error of the torch reference run in the same dtype, plus a small atol; errors are relative
Frobenius norms ||out - ref|| / ||ref||. Prints one JSON line per case.

Case tables are plain data so the pytest module can list them without importing the kernels.
"""
from __future__ import annotations

import json
import os
import sys

# name: (dtype, shape, num_groups, channels_last, act, adagn, offset)
GN_CASES = {
    "gn_fp32_nchw_silu": ("float32", (2, 64, 5, 7), 32, False, "silu", False, 0.0),
    "gn_fp16_nchw_silu_ada": ("float16", (2, 64, 3, 5), 32, False, "silu", True, 0.0),
    "gn_bf16_cl_silu_ada": ("bfloat16", (2, 64, 4, 3), 32, True, "silu", True, 0.0),
    "gn_fp32_cl_none": ("float32", (2, 64, 3, 3), 32, True, "none", False, 0.0),
    "gn_fp16_c192_nchw_ada": ("float16", (1, 192, 3, 5), 32, False, "silu", True, 0.0),
    "gn_bf16_c576_cl_none_ada": ("bfloat16", (1, 576, 2, 3), 32, True, "none", True, 0.0),
    "gn_fp32_c1152_nchw": ("float32", (1, 1152, 2, 2), 32, False, "silu", False, 0.0),
    "gn_fp32_1d_tokens": ("float32", (2, 64, 9), 32, False, "none", False, 0.0),
    "gn_fp32_offset_mean": ("float32", (2, 64, 4, 4), 32, False, "silu", True, 300.0),
    "gn_fp32_split_nchw": ("float32", (1, 32, 64, 64), 2, False, "silu", True, 0.0),
    "gn_fp16_split_cl": ("float16", (1, 32, 64, 64), 2, True, "silu", False, 0.0),
}
# name: (dtype, batch, heads, head_dim, T, legacy_order)
ATTN_CASES = {
    "attn_fp32_legacy_d32_t37": ("float32", 2, 2, 32, 37, True),
    "attn_fp16_new_d64_t33": ("float16", 1, 2, 64, 33, False),
    "attn_bf16_legacy_d64_t64": ("bfloat16", 2, 1, 64, 64, True),
    "attn_fp32_new_d192_t17": ("float32", 1, 1, 192, 17, False),
    "attn_fp16_legacy_d256_t20": ("float16", 1, 1, 256, 20, True),
    "attn_bf16_new_d128_t65": ("bfloat16", 1, 2, 128, 65, False),
}
ATOL = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 8e-3}


def _rel(a, ref):
    import torch
    a, ref = a.double(), ref.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _compare(fn_fused, fn_ref, inputs, dtype_name):
    """Forward and gradients of fused (in dtype), reference (in dtype) and reference (fp64)."""
    import torch
    dt = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(1)

    def run(fn, cast):
        xs = [None if t is None else t.detach().to(cast(t)).requires_grad_() for t in inputs]
        out = fn(*xs)
        return out, xs

    def low(t):  # low-precision copies keep the parameters' fp32 (models keep norms in fp32)
        return dt if t.dtype == torch.float64 and t.dim() != 1 else torch.float32

    out_f, xs_f = run(fn_fused, low)
    out_l, xs_l = run(fn_ref, low)
    out_r, xs_r = run(fn_ref, lambda t: torch.float64)
    gout = torch.randn(out_r.shape, generator=g, dtype=torch.float64)
    errs = {"out": (_rel(out_f, out_r), _rel(out_l, out_r))}
    live = [i for i, t in enumerate(inputs) if t is not None]
    gf = torch.autograd.grad(out_f, [xs_f[i] for i in live], gout.to(out_f.dtype).contiguous())
    gl = torch.autograd.grad(out_l, [xs_l[i] for i in live], gout.to(out_l.dtype).contiguous())
    gr = torch.autograd.grad(out_r, [xs_r[i] for i in live], gout)
    for j, i in enumerate(live):
        errs[f"grad{i}"] = (_rel(gf[j], gr[j]), _rel(gl[j], gr[j]))
    atol = ATOL[dtype_name]
    ok = all(e_k <= 2 * e_t + atol for e_k, e_t in errs.values())
    return ok, errs


def gn_case(name):
    import torch
    from admrt.kernels import group_norm_act, group_norm_act_reference
    dtype, shape, groups, cl, act, ada, offset = GN_CASES[name]
    torch.manual_seed(hash(name) % 1000)
    B, C = shape[:2]
    x = torch.randn(shape, dtype=torch.float64) * 1.5 + offset
    w = 1 + 0.3 * torch.randn(C, dtype=torch.float64)
    b = 0.3 * torch.randn(C, dtype=torch.float64)
    sc = 0.5 * torch.randn(B, C, dtype=torch.float64) if ada else None
    sh = 0.5 * torch.randn(B, C, dtype=torch.float64) if ada else None

    def prep(x):
        return x.to(memory_format=torch.channels_last) if cl else x

    def fused(x, w, b, sc, sh):
        x = prep(x)
        y = group_norm_act(x, w, b, num_groups=groups, scale=sc, shift=sh, act=act, fused="require")
        assert y.dtype == x.dtype and y.stride() == x.stride(), (y.dtype, y.stride(), x.stride())
        return y

    def ref(x, w, b, sc, sh):
        return group_norm_act_reference(prep(x), w, b, num_groups=groups, scale=sc, shift=sh, act=act)

    return _compare(fused, ref, [x, w, b, sc, sh], dtype)


def attn_case(name):
    import torch
    from admrt.kernels import qkv_attention, qkv_attention_reference
    dtype, B, H, D, T, legacy = ATTN_CASES[name]
    torch.manual_seed(hash(name) % 1000)
    qkv = torch.randn(B, 3 * H * D, T, dtype=torch.float64) * 1.5

    def fused(qkv):
        return qkv_attention(qkv, H, legacy_order=legacy, fused="require")

    def ref(qkv):
        return qkv_attention_reference(qkv, H, legacy_order=legacy)

    return _compare(fused, ref, [qkv], dtype)


def export_case():
    """torch.export captures the fused op (the graph holds the Triton kernels)."""
    import torch
    from admrt.kernels import group_norm_act

    class M(torch.nn.Module):
        def forward(self, x, w, b):
            return group_norm_act(x, w, b, num_groups=4, act="silu", fused="require")

    args = (torch.randn(1, 8, 3, 3), torch.ones(8), torch.zeros(8))
    ep = torch.export.export(M(), args)
    text = str(ep.graph)
    captured = "triton_kernel_wrapper" in text or "admrt.group_norm_act_fwd" in text
    err = (ep.module()(*args) - M()(*args)).abs().max().item()
    return captured and err < 1e-6, {"captured": captured, "err": err}


def main(names):
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("interp_checks.py: run with TRITON_INTERPRET=1")
    import torch
    torch.set_num_threads(2)
    import admrt.kernels as K
    assert K.INTERPRET, "kernels were not defined under the interpreter"
    for name in names:
        try:
            if name in GN_CASES:
                ok, detail = gn_case(name)
            elif name in ATTN_CASES:
                ok, detail = attn_case(name)
            elif name == "export":
                ok, detail = export_case()
            else:
                raise KeyError(name)
        except Exception as e:  # reported per case, not a crash of the whole run
            ok, detail = False, f"{type(e).__name__}: {e}"
        print(json.dumps({"name": name, "ok": ok, "detail": detail}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or [*GN_CASES, *ATTN_CASES, "export"])
