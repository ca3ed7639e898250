"""Group norm with optional AdaGN modulation and SiLU, as one fused op.

    y = act(GN(x) * gamma + beta)                                  (plain)
    y = act((GN(x) * gamma + beta) * (1 + scale) + shift)          (AdaGN)

Matches guided-diffusion's GroupNorm32 (statistics and affine in fp32, then cast back)
followed by SiLU, and the AdaGN of ResBlock._forward with use_scale_shift_norm
(paper, Sec. 3: AdaGN(h, y) = y_s GroupNorm(h) + y_b, with y_s = 1 + scale, y_b = shift).

Layout: x is (B, C, *spatial), NCHW-contiguous or channels_last; the kernels see it as
(B, C, L) with strides (sb, sc, sl), so both layouts run without copies.

Two paths, chosen per shape and direction by `plan_group_norm` (the rule is stated there):

One pass (a (sample, group) slice fits one program): `_gn_onepass_fwd_kernel` loads the
slice once into registers, takes the group mean and then the variance of (x - mean) from the
same registers (exact two-level sums in fp32, no cancellation), and applies the folded affine
y = act(a * x + d) before storing: x is read once, y written once, one launch.
`_gn_onepass_bwd_kernel` likewise loads x and dy once and writes dx (one launch).
Small slices share a program (several whole groups per program), so small shapes are a
single short launch.

Two passes (slices too large for one program):
  1. `_gn_stats_kernel`: grid (B, channel blocks, L splits). Per-channel partial sums of
     (x - K) and (x - K)^2 in fp32, K = the group's first element (a shift that keeps the
     one-pass variance free of cancellation).
  2. `_gn_fwd_kernel`: same grid (after one small sum over the splits), walks its tiles in
     reverse so it starts on what is still in L2. Folds the group reduction, mean/rstd,
     gamma/beta and scale/shift into one per-(b, c) affine y = act(a * x + d).
  Backward (two launches): `_gn_bwd_reduce_kernel` gives per-(b, c) sums S1 = sum dz and
  S2 = sum dz * xhat (dz = dL/d(pre-activation)); `_gn_bwd_dx_kernel` turns them into
  dx = rstd * (A dz - mean_g(A dz) - xhat * mean_g(A dz xhat)), A = gamma * (1 + scale).
Both paths write per-(b, c) dscale = gamma S2 + beta S1, dshift = S1 and the per-sample parts
of dgamma = (1 + scale) S2, dbeta = (1 + scale) S1 (summed over the batch in torch).

Batch invariance: the plan depends on (C, L, groups, layout) only, never on the batch size or
the device, so each sample's result is bitwise the same at any batch size and position.
A backward under create_graph=True (double backward) runs through `group_norm_act_reference`
(kernels/_trace.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._trace import reference_backward, size_hint

try:  # Triton is optional: without it only the reference runs.
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAS_TRITON = False

ACTIVATIONS = ("none", "silu")


def group_norm_act_reference(
    x: torch.Tensor,            # (B, C, *spatial)
    weight: torch.Tensor,       # (C,) gamma
    bias: torch.Tensor,         # (C,) beta
    *,
    num_groups: int = 32,
    eps: float = 1e-5,
    scale: torch.Tensor | None = None,  # (B, C) AdaGN y_s - 1
    shift: torch.Tensor | None = None,  # (B, C) AdaGN y_b
    act: str = "silu",
) -> torch.Tensor:
    """Torch reference: GN in fp32, affine, optional AdaGN, optional SiLU, cast to x.dtype."""
    check_group_norm_args(x, weight, bias, num_groups, scale, shift, act)
    ct = torch.promote_types(x.dtype, torch.float32)  # fp32 as the reference; fp64 stays fp64
    h = F.group_norm(x.to(ct), num_groups, weight.to(ct), bias.to(ct), eps)
    if scale is not None:
        view = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
        h = h * (1 + scale.to(ct).reshape(view)) + shift.to(ct).reshape(view)
    if act == "silu":
        h = F.silu(h)
    return h.to(x.dtype)


def check_group_norm_args(x, weight, bias, num_groups, scale, shift, act) -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"act={act!r}: expected one of {ACTIVATIONS}")
    if (scale is None) != (shift is None):
        raise ValueError("scale and shift: expected both or neither (AdaGN)")
    if x.dim() < 2:
        raise ValueError(f"x.shape={tuple(x.shape)}: expected (B, C, *spatial)")
    c = x.shape[1]
    if c % num_groups != 0:
        raise ValueError(f"num_groups={num_groups}: expected a divisor of the channel count {c}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != (c,):
            raise ValueError(f"{name}.shape={tuple(t.shape)}: expected ({c},)")
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None and t.numel() != x.shape[0] * c:
            raise ValueError(f"{name}.shape={tuple(t.shape)}: expected ({x.shape[0]}, {c}) (per sample, per channel)")


if HAS_TRITON:

    @triton.jit
    def _gn_stats_kernel(X, PSUM, PSQ, C, L, sxb, sxc, sxl, CPG, CPP, TILES, SPLIT,
                         BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
        b = tl.program_id(0)
        cb = tl.program_id(1)
        s = tl.program_id(2)
        rc = tl.arange(0, BLOCK_C)
        c = cb * CPP + rc
        cmask = (rc < CPP) & (c < C)
        xb = X + b.to(tl.int64) * sxb
        # K: the group's first element, a shift against cancellation in E[x^2] - E[x]^2
        k = tl.load(xb + (c // CPG) * CPG * sxc, mask=cmask, other=0.0).to(tl.float32)
        acc_s = tl.zeros([BLOCK_C, BLOCK_L], dtype=tl.float32)
        acc_q = tl.zeros([BLOCK_C, BLOCK_L], dtype=tl.float32)
        for i in range(TILES):
            rl = (s * TILES + i) * BLOCK_L + tl.arange(0, BLOCK_L)
            m = cmask[:, None] & (rl < L)[None, :]
            xv = tl.load(xb + c[:, None] * sxc + rl[None, :] * sxl, mask=m, other=0.0).to(tl.float32)
            dv = tl.where(m, xv - k[:, None], 0.0)
            acc_s += dv
            acc_q += dv * dv
        out = (b * C + c) * SPLIT + s
        tl.store(PSUM + out, tl.sum(acc_s, 1), mask=cmask)
        tl.store(PSQ + out, tl.sum(acc_q, 1), mask=cmask)

    @triton.jit
    def _gn_group_stats(X, PSUM, PSQ, b, c, cmask, C, sxb, sxc, CPG, SPLIT, inv_n, eps,
                        BLOCK_S: tl.constexpr):
        """Per-lane (channel) group mean and rstd from the per-channel partial sums."""
        g = c // CPG
        k = tl.load(X + b.to(tl.int64) * sxb + g * CPG * sxc, mask=cmask, other=0.0).to(tl.float32)
        rs = tl.arange(0, BLOCK_S)
        pm = cmask[:, None] & (rs < SPLIT)[None, :]
        poff = (b * C + c)[:, None] * SPLIT + rs[None, :]
        csum = tl.sum(tl.load(PSUM + poff, mask=pm, other=0.0), 1)
        csq = tl.sum(tl.load(PSQ + poff, mask=pm, other=0.0), 1)
        same = (g[:, None] == g[None, :]) & cmask[None, :]
        gsum = tl.sum(tl.where(same, csum[None, :], 0.0), 1)
        gsq = tl.sum(tl.where(same, csq[None, :], 0.0), 1)
        md = gsum * inv_n
        var = tl.maximum(gsq * inv_n - md * md, 0.0)
        return k + md, 1.0 / tl.sqrt(var + eps)

    @triton.jit
    def _gn_fwd_kernel(X, Y, PSUM, PSQ, W, BIAS, SCALE, SHIFT, MEAN, RSTD,
                       C, L, G, sxb, sxc, sxl, syb, syc, syl, CPG, CPP, TILES, SPLIT, inv_n, eps,
                       HAS_ADA: tl.constexpr, SILU: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_S: tl.constexpr):
        # reverse order over the whole grid: start where the stats pass ended (L2-resident)
        b = tl.num_programs(0) - 1 - tl.program_id(0)
        cb = tl.num_programs(1) - 1 - tl.program_id(1)
        s = tl.num_programs(2) - 1 - tl.program_id(2)
        rc = tl.arange(0, BLOCK_C)
        c = cb * CPP + rc
        cmask = (rc < CPP) & (c < C)
        mean, rstd = _gn_group_stats(X, PSUM, PSQ, b, c, cmask, C, sxb, sxc, CPG, SPLIT, inv_n, eps,
                                     BLOCK_S)
        first = cmask & (c % CPG == 0) & (s == 0)
        tl.store(MEAN + b * G + c // CPG, mean, mask=first)
        tl.store(RSTD + b * G + c // CPG, rstd, mask=first)
        a, d, A, w, bb, sc = _gn_affine(W, BIAS, SCALE, SHIFT, b, c, cmask, C, mean, rstd, HAS_ADA)
        xb = X + b.to(tl.int64) * sxb
        yb = Y + b.to(tl.int64) * syb
        for i in range(TILES):
            rl = (s * TILES + (TILES - 1 - i)) * BLOCK_L + tl.arange(0, BLOCK_L)
            m = cmask[:, None] & (rl < L)[None, :]
            xv = tl.load(xb + c[:, None] * sxc + rl[None, :] * sxl, mask=m, other=0.0).to(tl.float32)
            z = xv * a[:, None] + d[:, None]
            if SILU:
                z = z / (1.0 + tl.exp(-z))
            tl.store(yb + c[:, None] * syc + rl[None, :] * syl, z.to(Y.dtype.element_ty), mask=m)

    @triton.jit
    def _gn_dz(xv, dyv, a, d, SILU: tl.constexpr):
        if SILU:
            z = xv * a[:, None] + d[:, None]
            sig = 1.0 / (1.0 + tl.exp(-z))
            return dyv * (sig * (1.0 + z * (1.0 - sig)))
        else:
            return dyv

    @triton.jit
    def _gn_affine(W, BIAS, SCALE, SHIFT, b, c, cmask, C, mean, rstd, HAS_ADA: tl.constexpr):
        """Returns (a, d, A, w, beta, 1 + scale): z = a x + d, A = gamma (1 + scale)."""
        w = tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)
        bb = tl.load(BIAS + c, mask=cmask, other=0.0).to(tl.float32)
        a = rstd * w
        d = bb - mean * a
        sc = tl.full(w.shape, 1.0, tl.float32)
        if HAS_ADA:
            sc = 1.0 + tl.load(SCALE + b * C + c, mask=cmask, other=0.0).to(tl.float32)
            sh = tl.load(SHIFT + b * C + c, mask=cmask, other=0.0).to(tl.float32)
            a = a * sc
            d = d * sc + sh
        return a, d, w * sc, w, bb, sc

    @triton.jit
    def _gn_bwd_reduce_kernel(X, DY, MEAN, RSTD, W, BIAS, SCALE, SHIFT, PS1, PS2,
                              C, L, G, sxb, sxc, sxl, sdb, sdc, sdl, CPG, CPP, TILES, SPLIT,
                              HAS_ADA: tl.constexpr, SILU: tl.constexpr,
                              BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
        b = tl.program_id(0)
        cb = tl.program_id(1)
        s = tl.program_id(2)
        rc = tl.arange(0, BLOCK_C)
        c = cb * CPP + rc
        cmask = (rc < CPP) & (c < C)
        mean = tl.load(MEAN + b * G + c // CPG, mask=cmask, other=0.0)
        rstd = tl.load(RSTD + b * G + c // CPG, mask=cmask, other=0.0)
        a, d, A, w, bb, sc = _gn_affine(W, BIAS, SCALE, SHIFT, b, c, cmask, C, mean, rstd, HAS_ADA)
        xb = X + b.to(tl.int64) * sxb
        db = DY + b.to(tl.int64) * sdb
        acc1 = tl.zeros([BLOCK_C, BLOCK_L], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_C, BLOCK_L], dtype=tl.float32)
        for i in range(TILES):
            rl = (s * TILES + i) * BLOCK_L + tl.arange(0, BLOCK_L)
            m = cmask[:, None] & (rl < L)[None, :]
            xv = tl.load(xb + c[:, None] * sxc + rl[None, :] * sxl, mask=m, other=0.0).to(tl.float32)
            dyv = tl.load(db + c[:, None] * sdc + rl[None, :] * sdl, mask=m, other=0.0).to(tl.float32)
            dz = tl.where(m, _gn_dz(xv, dyv, a, d, SILU), 0.0)
            xh = (xv - mean[:, None]) * rstd[:, None]
            acc1 += dz
            acc2 += dz * xh
        out = (b * C + c) * SPLIT + s
        tl.store(PS1 + out, tl.sum(acc1, 1), mask=cmask)
        tl.store(PS2 + out, tl.sum(acc2, 1), mask=cmask)

    @triton.jit
    def _gn_bwd_dx_kernel(X, DY, DX, MEAN, RSTD, W, BIAS, SCALE, SHIFT, PS1, PS2,
                          DSCALE, DSHIFT, DWP, DBP,
                          C, L, G, sxb, sxc, sxl, sdb, sdc, sdl, sob, soc, sol,
                          CPG, CPP, TILES, SPLIT, inv_n,
                          HAS_ADA: tl.constexpr, SILU: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_S: tl.constexpr):
        b = tl.num_programs(0) - 1 - tl.program_id(0)
        cb = tl.num_programs(1) - 1 - tl.program_id(1)
        s = tl.num_programs(2) - 1 - tl.program_id(2)
        rc = tl.arange(0, BLOCK_C)
        c = cb * CPP + rc
        cmask = (rc < CPP) & (c < C)
        g = c // CPG
        mean = tl.load(MEAN + b * G + g, mask=cmask, other=0.0)
        rstd = tl.load(RSTD + b * G + g, mask=cmask, other=0.0)
        a, d, A, w, bb, sc = _gn_affine(W, BIAS, SCALE, SHIFT, b, c, cmask, C, mean, rstd, HAS_ADA)
        rs = tl.arange(0, BLOCK_S)
        pm = cmask[:, None] & (rs < SPLIT)[None, :]
        poff = (b * C + c)[:, None] * SPLIT + rs[None, :]
        s1 = tl.sum(tl.load(PS1 + poff, mask=pm, other=0.0), 1)   # sum_l dz
        s2 = tl.sum(tl.load(PS2 + poff, mask=pm, other=0.0), 1)   # sum_l dz * xhat
        same = (g[:, None] == g[None, :]) & cmask[None, :]
        m1 = tl.sum(tl.where(same, (A * s1)[None, :], 0.0), 1) * inv_n   # mean_g(dxhat)
        m2 = tl.sum(tl.where(same, (A * s2)[None, :], 0.0), 1) * inv_n   # mean_g(dxhat * xhat)
        first = cmask & (s == 0)
        tl.store(DWP + b * C + c, sc * s2, mask=first)
        tl.store(DBP + b * C + c, sc * s1, mask=first)
        if HAS_ADA:
            tl.store(DSCALE + b * C + c, w * s2 + bb * s1, mask=first)
            tl.store(DSHIFT + b * C + c, s1, mask=first)
        xb = X + b.to(tl.int64) * sxb
        db = DY + b.to(tl.int64) * sdb
        ob = DX + b.to(tl.int64) * sob
        for i in range(TILES):
            rl = (s * TILES + (TILES - 1 - i)) * BLOCK_L + tl.arange(0, BLOCK_L)
            m = cmask[:, None] & (rl < L)[None, :]
            xv = tl.load(xb + c[:, None] * sxc + rl[None, :] * sxl, mask=m, other=0.0).to(tl.float32)
            dyv = tl.load(db + c[:, None] * sdc + rl[None, :] * sdl, mask=m, other=0.0).to(tl.float32)
            dz = _gn_dz(xv, dyv, a, d, SILU)
            xh = (xv - mean[:, None]) * rstd[:, None]
            dx = rstd[:, None] * (A[:, None] * dz - m1[:, None] - xh * m2[:, None])
            tl.store(ob + c[:, None] * soc + rl[None, :] * sol, dx.to(DX.dtype.element_ty), mask=m)

    @triton.jit
    def _gn_onepass_tile(b, cb, C, L, sxb, sxc, sxl, CPG, CPP,
                         BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
        """Channel lanes c, their masks and offsets of one program's whole slice (BLOCK_C, BLOCK_L)."""
        rc = tl.arange(0, BLOCK_C)
        c = cb * CPP + rc
        cmask = (rc < CPP) & (c < C)
        rl = tl.arange(0, BLOCK_L)
        m = cmask[:, None] & (rl < L)[None, :]
        off = b.to(tl.int64) * sxb + c[:, None] * sxc + rl[None, :] * sxl
        # same[i, j]: lanes i and j belong to one group (several whole groups share a program)
        g = c // CPG
        same = (g[:, None] == g[None, :]) & cmask[None, :]
        return c, cmask, m, off, same

    @triton.jit
    def _gn_onepass_fwd_kernel(X, Y, W, BIAS, SCALE, SHIFT, MEAN, RSTD,
                               C, L, G, sxb, sxc, sxl, syb, syc, syl, CPG, CPP, inv_n, eps,
                               HAS_ADA: tl.constexpr, SILU: tl.constexpr,
                               BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
        b = tl.program_id(0)
        cb = tl.program_id(1)
        c, cmask, m, off, same = _gn_onepass_tile(b, cb, C, L, sxb, sxc, sxl, CPG, CPP, BLOCK_C, BLOCK_L)
        xv = tl.load(X + off, mask=m, other=0.0).to(tl.float32)               # the slice, read once
        # group mean, then the variance of (x - mean) from the same registers (exact, fp32)
        mean = tl.sum(tl.where(same, tl.sum(xv, 1)[None, :], 0.0), 1) * inv_n
        dv = tl.where(m, xv - mean[:, None], 0.0)
        var = tl.sum(tl.where(same, tl.sum(dv * dv, 1)[None, :], 0.0), 1) * inv_n
        rstd = 1.0 / tl.sqrt(var + eps)
        first = cmask & (c % CPG == 0)
        tl.store(MEAN + b * G + c // CPG, mean, mask=first)
        tl.store(RSTD + b * G + c // CPG, rstd, mask=first)
        a, d, A, w, bb, sc = _gn_affine(W, BIAS, SCALE, SHIFT, b, c, cmask, C, mean, rstd, HAS_ADA)
        z = xv * a[:, None] + d[:, None]
        if SILU:
            z = z / (1.0 + tl.exp(-z))
        yoff = b.to(tl.int64) * syb + c[:, None] * syc + tl.arange(0, BLOCK_L)[None, :] * syl
        tl.store(Y + yoff, z.to(Y.dtype.element_ty), mask=m)

    @triton.jit
    def _gn_onepass_bwd_kernel(X, DY, DX, MEAN, RSTD, W, BIAS, SCALE, SHIFT, DSCALE, DSHIFT, DWP, DBP,
                               C, L, G, sxb, sxc, sxl, sdb, sdc, sdl, sob, soc, sol, CPG, CPP, inv_n,
                               HAS_ADA: tl.constexpr, SILU: tl.constexpr,
                               BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
        b = tl.program_id(0)
        cb = tl.program_id(1)
        c, cmask, m, off, same = _gn_onepass_tile(b, cb, C, L, sxb, sxc, sxl, CPG, CPP, BLOCK_C, BLOCK_L)
        mean = tl.load(MEAN + b * G + c // CPG, mask=cmask, other=0.0)
        rstd = tl.load(RSTD + b * G + c // CPG, mask=cmask, other=0.0)
        a, d, A, w, bb, sc = _gn_affine(W, BIAS, SCALE, SHIFT, b, c, cmask, C, mean, rstd, HAS_ADA)
        rl = tl.arange(0, BLOCK_L)
        xv = tl.load(X + off, mask=m, other=0.0).to(tl.float32)
        dyv = tl.load(DY + b.to(tl.int64) * sdb + c[:, None] * sdc + rl[None, :] * sdl,
                      mask=m, other=0.0).to(tl.float32)
        dz = tl.where(m, _gn_dz(xv, dyv, a, d, SILU), 0.0)
        xh = (xv - mean[:, None]) * rstd[:, None]
        s1 = tl.sum(dz, 1)                                                     # sum_l dz
        s2 = tl.sum(dz * xh, 1)                                                # sum_l dz * xhat
        m1 = tl.sum(tl.where(same, (A * s1)[None, :], 0.0), 1) * inv_n         # mean_g(dxhat)
        m2 = tl.sum(tl.where(same, (A * s2)[None, :], 0.0), 1) * inv_n         # mean_g(dxhat * xhat)
        tl.store(DWP + b * C + c, sc * s2, mask=cmask)
        tl.store(DBP + b * C + c, sc * s1, mask=cmask)
        if HAS_ADA:
            tl.store(DSCALE + b * C + c, w * s2 + bb * s1, mask=cmask)
            tl.store(DSHIFT + b * C + c, s1, mask=cmask)
        dx = rstd[:, None] * (A[:, None] * dz - m1[:, None] - xh * m2[:, None])
        tl.store(DX + b.to(tl.int64) * sob + c[:, None] * soc + rl[None, :] * sol,
                 dx.to(DX.dtype.element_ty), mask=m)

    INTERPRET = not isinstance(_gn_stats_kernel, triton.runtime.jit.JITFunction)
else:
    INTERPRET = False


def _bcl_strides(t: torch.Tensor):
    """Strides (sb, sc, sl) of t viewed as (B, C, L), or None if the spatial dims don't flatten."""
    if t.dim() == 2:
        return t.stride(0), t.stride(1), 1
    sp_sizes, sp_strides = t.shape[2:], t.stride()[2:]
    expect = sp_strides[-1]
    for size, stride in zip(reversed(sp_sizes), reversed(sp_strides)):
        if size != 1 and stride != expect:
            return None
        expect = expect * size
    return t.stride(0), t.stride(1), sp_strides[-1]


def _as_bcl(t: torch.Tensor):
    st = _bcl_strides(t)
    if st is None:
        t = t.contiguous()
        st = _bcl_strides(t)
    return t, st


# One-pass budgets, per direction: (largest padded tile of one program, fp32 values per thread
# per tile). A tile above the budget takes the two-pass path. Set from the sm_90a register
# report of every ADM plan (bench/kernel_resources.py; tests/kernels/test_kernel_resources.py
# keeps them free of spills): the forward holds x (and y) as fp32, 64 values per thread; the
# backward holds x, dy, dz and xhat, so it gets half the tile and 32 values per thread.
ONEPASS_BUDGET = {"forward": (16384, 64), "backward": (8192, 32)}
# Two-pass path: each program of a row walks TWOPASS_TILES tiles, so the split of L depends on
# L and the tile only (never on the batch or the device: batch-invariant results).
TWOPASS_TILES = 4


@dataclass(frozen=True)
class GroupNormPlan:
    """How one group norm launches (forward and backward use the same plan).

    onepass: one program per (sample, channel block) holds its whole slice; else two passes.
    block_c x block_l: the program's tile; cpp: channels per program (whole groups);
    n_cblocks: channel blocks per sample; tiles, split: two-pass only, tiles per program and
    programs per row of L (split * tiles * block_l >= L); 1, 1 in the one-pass path.
    The grid is (B, n_cblocks, split).
    """

    onepass: bool
    block_c: int
    block_l: int
    cpp: int
    n_cblocks: int
    tiles: int
    split: int
    num_warps: int

    @property
    def path(self) -> str:
        return "onepass" if self.onepass else "twopass"


def plan_group_norm(C: int, L, num_groups: int, channels_last: bool,
                    direction: str = "forward") -> GroupNormPlan:
    """The launch plan of a (B, C, L) group norm's forward or backward; the rule:

    - One pass when L is a fixed size (not symbolic) and the slice of one group, cpg = C/groups
      channels x L positions, each padded to a power of two, fits the direction's budget
      (ONEPASS_BUDGET: 16384 elements forward, 8192 backward). Whole groups are then packed
      into one program: in channels_last until 64 channels (128 contiguous bytes at fp16) or
      the budget; in NCHW while the tile stays under 2048 elements (a small slice per program
      costs more in launch than in work). num_warps = tile / (32 threads * values per thread),
      between 4 and 16.
    - Two passes otherwise (and for a symbolic L, which any tiling covers): tiles of 4096
      (NCHW) or 2048 (channels_last) elements, whole groups per program, TWOPASS_TILES tiles per
      program along L.
    The batch size plays no part, so the plan is the same at every batch (dynamic batch traces
    without guards, and results do not depend on the batch). The backward may take the two-pass
    path where the forward took one pass (the saved mean and rstd are the same).
    """
    if direction not in ONEPASS_BUDGET:
        raise ValueError(f"direction={direction!r}: expected one of {tuple(ONEPASS_BUDGET)}")
    budget, per_thread = ONEPASS_BUDGET[direction]
    cpg = C // num_groups
    if not isinstance(L, torch.SymInt):
        L = int(L)
        cpg_p, l_p = triton.next_power_of_2(cpg), triton.next_power_of_2(L)
        if cpg_p * l_p <= budget:
            if channels_last:
                gpp = max(1, min(num_groups, 64 // cpg))
            else:
                gpp = max(1, min(num_groups, 2048 // (cpg_p * l_p)))
            while gpp > 1 and triton.next_power_of_2(gpp * cpg) * l_p > budget:
                gpp -= 1
            block_c = triton.next_power_of_2(gpp * cpg)
            warps = min(16, max(4, block_c * l_p // (32 * per_thread)))
            return GroupNormPlan(True, block_c, l_p, gpp * cpg, triton.cdiv(num_groups, gpp), 1, 1,
                                 triton.next_power_of_2(warps))
    block_c, block_l, cpp, n_cb = _two_pass_tiles(C, size_hint(L), num_groups, channels_last)
    n_tiles = triton.cdiv(size_hint(L), block_l)
    split = triton.cdiv(n_tiles, TWOPASS_TILES)
    tiles = triton.cdiv(triton.cdiv(L, block_l), split)   # covers the actual L (a SymInt too)
    return GroupNormPlan(False, block_c, block_l, cpp, n_cb, tiles, split, 4)


def _two_pass_tiles(C: int, l: int, num_groups: int, channels_last: bool):
    """(BLOCK_C, BLOCK_L, channels per program, channel blocks) of the two-pass kernels."""
    cpg = C // num_groups
    if channels_last:   # contiguous along C: several whole groups per program for long rows
        gpp = max(1, min(num_groups, 64 // cpg))
        cpp = gpp * cpg
        block_c = triton.next_power_of_2(cpp)
        block_l = max(16, min(triton.next_power_of_2(l), max(16, 2048 // block_c)))
    else:               # contiguous along L: whole groups per program, rows as long as L allows
        block_l = max(16, min(triton.next_power_of_2(l), max(64, 4096 // triton.next_power_of_2(cpg))))
        gpp = max(1, min(num_groups, (4096 // block_l) // cpg))
        cpp = gpp * cpg
        block_c = triton.next_power_of_2(cpp)
    return block_c, block_l, cpp, triton.cdiv(num_groups, gpp)


if HAS_TRITON:

    @triton_op("admrt::group_norm_act_fwd", mutates_args=())
    def _group_norm_act_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            scale: torch.Tensor | None, shift: torch.Tensor | None,
                            num_groups: int, eps: float, silu: bool
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, C = x.shape[0], x.shape[1]
        L = math.prod(x.shape[2:])
        sxb, sxc, sxl = _bcl_strides(x)
        y = torch.empty_like(x)
        syb, syc, syl = _bcl_strides(y)
        mean = torch.empty((B, num_groups), device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        plan = plan_group_norm(C, L, num_groups, sxc == 1 and C > 1, "forward")
        cpg = C // num_groups
        has_ada = scale is not None
        sc_arg, sh_arg = (scale, shift) if has_ada else (weight, bias)   # unread without AdaGN
        common = dict(HAS_ADA=has_ada, SILU=silu, BLOCK_C=plan.block_c, BLOCK_L=plan.block_l,
                      num_warps=plan.num_warps)
        if plan.onepass:
            wrap_triton(_gn_onepass_fwd_kernel)[(B, plan.n_cblocks)](
                x, y, weight, bias, sc_arg, sh_arg, mean, rstd, C, L, num_groups,
                sxb, sxc, sxl, syb, syc, syl, cpg, plan.cpp, 1.0 / (cpg * L), eps, **common)
            return y, mean, rstd
        grid = (B, plan.n_cblocks, plan.split)
        psum = torch.empty((B, C, plan.split), device=x.device, dtype=torch.float32)
        psq = torch.empty_like(psum)
        wrap_triton(_gn_stats_kernel)[grid](x, psum, psq, C, L, sxb, sxc, sxl, cpg, plan.cpp, plan.tiles,
                                            plan.split, BLOCK_C=plan.block_c, BLOCK_L=plan.block_l,
                                            num_warps=plan.num_warps)
        # fold the split here (one small reduction) so each apply program reads one value per channel
        psum, psq = psum.sum(2), psq.sum(2)
        wrap_triton(_gn_fwd_kernel)[grid](
            x, y, psum, psq, weight, bias, sc_arg, sh_arg, mean, rstd, C, L, num_groups,
            sxb, sxc, sxl, syb, syc, syl, cpg, plan.cpp, plan.tiles, 1, 1.0 / (cpg * L), eps,
            BLOCK_S=2, **common)
        return y, mean, rstd

    @_group_norm_act_fwd.register_fake
    def _(x, weight, bias, scale, shift, num_groups, eps, silu):
        B = x.shape[0]
        stats = x.new_empty((B, num_groups), dtype=torch.float32)
        return torch.empty_like(x), stats, torch.empty_like(stats)

    @triton_op("admrt::group_norm_act_bwd", mutates_args=())
    def _group_norm_act_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                            bias: torch.Tensor, scale: torch.Tensor | None,
                            shift: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor,
                            silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                 torch.Tensor, torch.Tensor]:
        """Returns dx, dweight, dbias, dscale, dshift (the last two empty without AdaGN)."""
        B, C = x.shape[0], x.shape[1]
        G = mean.shape[1]
        L = math.prod(x.shape[2:])
        sxb, sxc, sxl = _bcl_strides(x)
        sdb, sdc, sdl = _bcl_strides(dy)
        dx = torch.empty_like(x)
        sob, soc, sol = _bcl_strides(dx)
        plan = plan_group_norm(C, L, G, sxc == 1 and C > 1, "backward")
        cpg = C // G
        has_ada = scale is not None
        sc_arg, sh_arg = (scale, shift) if has_ada else (weight, bias)   # unread without AdaGN
        dwp = torch.empty((B, C), device=x.device, dtype=torch.float32)  # per-sample dgamma, dbeta
        dbp = torch.empty_like(dwp)
        dscale = torch.empty((B, C) if has_ada else (0,), device=x.device, dtype=torch.float32)
        dshift = torch.empty_like(dscale)
        ds_arg, dh_arg = (dscale, dshift) if has_ada else (dwp, dbp)     # unwritten without AdaGN
        common = dict(HAS_ADA=has_ada, SILU=silu, BLOCK_C=plan.block_c, BLOCK_L=plan.block_l,
                      num_warps=plan.num_warps)
        if plan.onepass:
            wrap_triton(_gn_onepass_bwd_kernel)[(B, plan.n_cblocks)](
                x, dy, dx, mean, rstd, weight, bias, sc_arg, sh_arg, ds_arg, dh_arg, dwp, dbp, C, L, G,
                sxb, sxc, sxl, sdb, sdc, sdl, sob, soc, sol, cpg, plan.cpp, 1.0 / (cpg * L), **common)
        else:
            grid = (B, plan.n_cblocks, plan.split)
            ps1 = torch.empty((B, C, plan.split), device=x.device, dtype=torch.float32)
            ps2 = torch.empty_like(ps1)
            wrap_triton(_gn_bwd_reduce_kernel)[grid](
                x, dy, mean, rstd, weight, bias, sc_arg, sh_arg, ps1, ps2, C, L, G,
                sxb, sxc, sxl, sdb, sdc, sdl, cpg, plan.cpp, plan.tiles, plan.split, **common)
            ps1, ps2 = ps1.sum(2), ps2.sum(2)
            wrap_triton(_gn_bwd_dx_kernel)[grid](
                x, dy, dx, mean, rstd, weight, bias, sc_arg, sh_arg, ps1, ps2, ds_arg, dh_arg, dwp, dbp,
                C, L, G, sxb, sxc, sxl, sdb, sdc, sdl, sob, soc, sol, cpg, plan.cpp, plan.tiles, 1,
                1.0 / (cpg * L), BLOCK_S=2, **common)
        return dx, dwp.sum(0).to(weight.dtype), dbp.sum(0).to(bias.dtype), dscale, dshift

    @_group_norm_act_bwd.register_fake
    def _(dy, x, weight, bias, scale, shift, mean, rstd, silu):
        B, C = x.shape[0], x.shape[1]
        ada = (B, C) if scale is not None else (0,)
        return (torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias),
                x.new_empty(ada, dtype=torch.float32), x.new_empty(ada, dtype=torch.float32))

    def _gn_setup_context(ctx, inputs, output):
        x, weight, bias, scale, shift, num_groups, eps, silu = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
        ctx.num_groups, ctx.eps, ctx.silu = num_groups, eps, silu
        ctx.mark_non_differentiable(mean, rstd)

    def _gn_backward(ctx, dy, _dmean, _drstd):
        x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():   # create_graph=True: the fused backward has no derivative
            act = "silu" if ctx.silu else "none"

            def ref(x, weight, bias, scale, shift):
                return group_norm_act_reference(x, weight, bias, num_groups=ctx.num_groups,
                                                eps=ctx.eps, scale=scale, shift=shift, act=act)
            grads = reference_backward("group_norm_act", ref, (x, weight, bias, scale, shift), dy)
            return (*grads, None, None, None)
        dy, _ = _as_bcl(dy)   # any layout autograd hands over whose spatial dims flatten (else a copy)
        dx, dw, db, dscale, dshift = torch.ops.admrt.group_norm_act_bwd(
            dy, x, weight, bias, scale, shift, mean, rstd, ctx.silu)
        if scale is not None:
            dscale = dscale.reshape(scale.shape).to(scale.dtype)
            dshift = dshift.reshape(shift.shape).to(shift.dtype)
        else:
            dscale = dshift = None
        return dx, dw, db, dscale, dshift, None, None, None

    _group_norm_act_fwd.register_autograd(_gn_backward, setup_context=_gn_setup_context)


def group_norm_act_fused(x, weight, bias, *, num_groups=32, eps=1e-5, scale=None, shift=None,
                         act="silu") -> torch.Tensor:
    """Fused Triton path of `group_norm_act_reference` (same arguments, same result)."""
    if not HAS_TRITON:
        raise RuntimeError("group_norm_act_fused: triton is not installed")
    check_group_norm_args(x, weight, bias, num_groups, scale, shift, act)
    C = x.shape[1]
    if weight is None:
        weight = torch.ones(C, device=x.device, dtype=torch.float32)
    if bias is None:
        bias = torch.zeros(C, device=x.device, dtype=torch.float32)
    x, _ = _as_bcl(x)
    if scale is not None:
        scale = scale.reshape(x.shape[0], C).contiguous()
        shift = shift.reshape(x.shape[0], C).contiguous()
    y, _, _ = torch.ops.admrt.group_norm_act_fwd(x, weight.contiguous(), bias.contiguous(), scale,
                                                 shift, num_groups, float(eps), act == "silu")
    return y
