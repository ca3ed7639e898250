"""Multi-head QKV attention of ADM, reading the fused qkv conv output (B, 3*H*C, T).

Two channel orders, both in guided-diffusion's unet.py:
- legacy (QKVAttentionLegacy): per head [q|k|v], i.e. qkv.reshape(B*H, 3*C, T);
- new (QKVAttention, also the classifier's AttentionPool2d with T = HW + 1):
  [q of all heads | k of all heads | v of all heads].
Both scale q and k by C**-1/4 each (so the logits carry 1/sqrt(C)) and take the softmax in fp32.
Output is (B, H*C, T), the layout proj_out expects.

The fused path is flash attention (Dao et al. 2022; the Triton tutorial's online softmax in the
log2 domain) with loads strided straight out of the qkv tensor: no reshapes, no T x T matrix.
Forward keeps the row log-sum-exp for the backward; the backward is one launch (`_attn_bwd_kernel`: dk/dv of a
key block, then dq of a query block, per program; the softmax row term formed in the kernel;
no atomics, so results are deterministic) and writes dq, dk, dv into one (B, 3*H*C, T) tensor
in the same channel order as qkv. A backward under create_graph=True (double backward) runs
through `qkv_attention_reference` (kernels/_trace.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._trace import reference_backward, size_hint


def split_qkv(qkv: torch.Tensor, num_heads: int, legacy_order: bool):
    """(B, 3*H*C, T) -> q, k, v each (B*H, C, T), in the given channel order."""
    bs, width, length = qkv.shape
    if width % (3 * num_heads) != 0:
        raise ValueError(f"qkv width={width}: expected a multiple of 3*num_heads={3 * num_heads}")
    ch = width // (3 * num_heads)
    if legacy_order:
        q, k, v = qkv.reshape(bs * num_heads, ch * 3, length).split(ch, dim=1)
    else:
        q, k, v = (t.reshape(bs * num_heads, ch, length) for t in qkv.chunk(3, dim=1))
    return q, k, v


def qkv_attention_reference(qkv: torch.Tensor, num_heads: int, *, legacy_order: bool) -> torch.Tensor:
    """Torch reference: materialises the (T, T) weights like the reference implementation."""
    bs, width, length = qkv.shape
    q, k, v = split_qkv(qkv, num_heads, legacy_order)
    ch = q.shape[1]
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)  # (B*H, T, T)
    ct = torch.promote_types(weight.dtype, torch.float32)  # fp32 softmax; fp64 stays fp64
    weight = torch.softmax(weight.to(ct), dim=-1).type(weight.dtype)
    out = torch.einsum("bts,bcs->bct", weight, v)  # (B*H, C, T)
    return out.reshape(bs, -1, length)


def qkv_attention_sdpa(qkv: torch.Tensor, num_heads: int, *, legacy_order: bool) -> torch.Tensor:
    """The reference's result through F.scaled_dot_product_attention (logits scaled by 1/sqrt(C)
    once instead of q and k by C**-1/4 each): the form the ONNX exporter lowers to one `Attention`
    node at opset 23. Its softmax runs in the input's precision, so admrt exports it for fp32 graphs."""
    bs, _, length = qkv.shape
    q, k, v = (t.reshape(bs, num_heads, -1, length).transpose(-1, -2)       # (B, H, T, C)
               for t in split_qkv(qkv, num_heads, legacy_order))
    out = F.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(q.shape[-1]))  # (B, H, T, C)
    return out.transpose(-1, -2).reshape(bs, -1, length)


try:  # Triton is optional: without it only the reference runs.
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAS_TRITON = False

_LOG2E = 1.4426950408889634


def check_qkv_args(qkv: torch.Tensor, num_heads: int) -> int:
    if qkv.dim() != 3:
        raise ValueError(f"qkv.shape={tuple(qkv.shape)}: expected (B, 3*H*C, T)")
    if num_heads < 1 or qkv.shape[1] % (3 * num_heads) != 0:
        raise ValueError(f"qkv width={qkv.shape[1]}, num_heads={num_heads}: expected width a multiple of 3*num_heads")
    return qkv.shape[1] // (3 * num_heads)


if HAS_TRITON:

    @triton.jit
    def _mm(a, b, acc, PREC: tl.constexpr):
        """a @ b (+ acc) in fp32. PREC 0: tensor-core inputs as given; 1: fp32 in IEEE precision
        (fp32 inputs: no tf32); 2: operands upcast to fp32 first (bf16 under the Triton
        interpreter, whose bf16 dot is wrong in triton 3.7)."""
        if PREC == 2:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        elif PREC == 1:
            return tl.dot(a, b, acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)

    @triton.jit
    def _head_offsets(bh, H, CH, T, LEGACY: tl.constexpr):
        """Element offsets of q, k, v of (batch, head) = divmod(bh, H) inside qkv, and of o in out."""
        b = bh // H
        h = bh % H
        base = b.to(tl.int64) * (3 * H * CH * T)
        if LEGACY:
            q = base + h * (3 * CH * T)
            k = q + CH * T
            v = k + CH * T
        else:
            q = base + h * (CH * T)
            k = q + H * CH * T
            v = k + H * CH * T
        o = b.to(tl.int64) * (H * CH * T) + h * (CH * T)
        return q, k, v, o

    @triton.jit
    def _attn_fwd_kernel(QKV, O, LSE, T, H, CH, qk_scale,
                         LEGACY: tl.constexpr, PREC: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        q_off, k_off, v_off, o_off = _head_offsets(bh, H, CH, T, LEGACY)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rd = tl.arange(0, BLOCK_D)
        dmask = rd < CH
        mmask = rm < T
        # q tile (BLOCK_M, D): element (t, c) sits at c * T + t
        q = tl.load(QKV + q_off + rd[None, :] * T + rm[:, None], mask=mmask[:, None] & dmask[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, T, BLOCK_N):
            rn = start_n + tl.arange(0, BLOCK_N)
            nmask = rn < T
            kt = tl.load(QKV + k_off + rd[:, None] * T + rn[None, :], mask=dmask[:, None] & nmask[None, :], other=0.0)
            s = _mm(q, kt, None, PREC)
            s = tl.where(nmask[None, :], s * qk_scale, float("-inf"))   # log2 domain
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(QKV + v_off + rd[None, :] * T + rn[:, None], mask=nmask[:, None] & dmask[None, :], other=0.0)
            acc = _mm(p.to(v.dtype), v, acc * alpha[:, None], PREC)
            m_i = m_new
        acc = acc / l_i[:, None]
        tl.store(O + o_off + rd[None, :] * T + rm[:, None], acc.to(O.dtype.element_ty),
                 mask=mmask[:, None] & dmask[None, :])
        tl.store(LSE + bh * T + rm, m_i + tl.log2(l_i), mask=mmask)

    @triton.jit
    def _attn_bwd_kernel(QKV, O, DO, LSE, DQKV, T, H, CH, qk_scale, sm_scale,
                         LEGACY: tl.constexpr, PREC: tl.constexpr,
                         BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr,
                         BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr, BLOCK_D: tl.constexpr):
        """dq, dk, dv of one (batch, head) in one launch (FlashAttention-2's backward split, Dao 2023,
        Alg. 2, without atomics): program j computes dk, dv of key block j (phase 1, looping over
        the query blocks) and then dq of query block j (phase 2, looping over the key blocks).
        BLOCK_N1 == BLOCK_M2, so both phases cover T with one grid. The softmax backward's row term
        delta_i = sum_c dO_ic O_ic is formed from the dO and O tiles each phase loads anyway (no
        pre-pass); P is recomputed from the forward's log-sum-exp (log2 domain)."""
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        q_off, k_off, v_off, o_off = _head_offsets(bh, H, CH, T, LEGACY)
        rd = tl.arange(0, BLOCK_D)
        dmask = rd < CH
        # -- phase 1: dk, dv of keys rn (BLOCK_N1) --------------------------------------------
        rn = pid * BLOCK_N1 + tl.arange(0, BLOCK_N1)
        nmask = rn < T
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(QKV + k_off + rd[None, :] * T + rn[:, None], mask=kv_mask, other=0.0)   # (N1, D)
        v = tl.load(QKV + v_off + rd[None, :] * T + rn[:, None], mask=kv_mask, other=0.0)   # (N1, D)
        dk = tl.zeros([BLOCK_N1, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N1, BLOCK_D], tl.float32)
        for start_m in range(0, T, BLOCK_M1):
            rm = start_m + tl.arange(0, BLOCK_M1)
            mmask = rm < T
            md_mask = mmask[:, None] & dmask[None, :]
            qt = tl.load(QKV + q_off + rd[:, None] * T + rm[None, :], mask=dmask[:, None] & mmask[None, :], other=0.0)  # (D, M1)
            do = tl.load(DO + o_off + rd[None, :] * T + rm[:, None], mask=md_mask, other=0.0)   # (M1, D)
            o = tl.load(O + o_off + rd[None, :] * T + rm[:, None], mask=md_mask, other=0.0)     # (M1, D)
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)                             # (M1,)
            lse = tl.load(LSE + bh * T + rm, mask=mmask, other=0.0)
            st = _mm(k, qt, None, PREC)                                                         # S^T (N1, M1)
            pt = tl.where(nmask[:, None] & mmask[None, :], tl.exp2(st * qk_scale - lse[None, :]), 0.0)
            dv = _mm(pt.to(do.dtype), do, dv, PREC)                                             # dV += P^T dO
            dpt = _mm(v, tl.trans(do), None, PREC)                                              # dP^T = V dO^T
            dst = pt * (dpt - delta[None, :])                                                   # dS^T
            dk = _mm(dst.to(qt.dtype), tl.trans(qt), dk, PREC)                                  # dK += dS^T Q
        dk = dk * sm_scale
        tl.store(DQKV + k_off + rd[None, :] * T + rn[:, None], dk.to(DQKV.dtype.element_ty), mask=kv_mask)
        tl.store(DQKV + v_off + rd[None, :] * T + rn[:, None], dv.to(DQKV.dtype.element_ty), mask=kv_mask)
        # -- phase 2: dq of queries rm (BLOCK_M2) ----------------------------------------------
        rm = pid * BLOCK_M2 + tl.arange(0, BLOCK_M2)
        mmask = rm < T
        qm = mmask[:, None] & dmask[None, :]
        q = tl.load(QKV + q_off + rd[None, :] * T + rm[:, None], mask=qm, other=0.0)   # (M2, D)
        do = tl.load(DO + o_off + rd[None, :] * T + rm[:, None], mask=qm, other=0.0)   # (M2, D)
        o = tl.load(O + o_off + rd[None, :] * T + rm[:, None], mask=qm, other=0.0)     # (M2, D)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        lse = tl.load(LSE + bh * T + rm, mask=mmask, other=0.0)
        dq = tl.zeros([BLOCK_M2, BLOCK_D], tl.float32)
        for start_n in range(0, T, BLOCK_N2):
            rk = start_n + tl.arange(0, BLOCK_N2)   # not rn: phase 1's rn has BLOCK_N1 lanes
            kmask = rk < T
            tmask = dmask[:, None] & kmask[None, :]
            kt = tl.load(QKV + k_off + rd[:, None] * T + rk[None, :], mask=tmask, other=0.0)   # (D, N2)
            vt = tl.load(QKV + v_off + rd[:, None] * T + rk[None, :], mask=tmask, other=0.0)   # (D, N2)
            s = _mm(q, kt, None, PREC)
            dp = _mm(do, vt, None, PREC)
            p = tl.where(mmask[:, None] & kmask[None, :], tl.exp2(s * qk_scale - lse[:, None]), 0.0)
            ds = p * (dp - delta[:, None])
            dq = _mm(ds.to(kt.dtype), tl.trans(kt), dq, PREC)                                 # dQ += dS K
        dq = dq * sm_scale
        tl.store(DQKV + q_off + rd[None, :] * T + rm[:, None], dq.to(DQKV.dtype.element_ty), mask=qm)

    INTERPRET = not isinstance(_attn_fwd_kernel, triton.runtime.jit.JITFunction)
else:
    INTERPRET = False


def _prec(dtype: torch.dtype) -> int:
    if dtype == torch.float32:
        return 1
    return 2 if (INTERPRET and dtype == torch.bfloat16) else 0


def _attn_blocks(ch: int, T, dtype: torch.dtype, kind: str):
    """Launch blocks for head dim ch and length T; the rule:

    kind "fwd": (BLOCK_M, BLOCK_N, num_warps, num_stages): 128 x 64, 4 warps (8 above head dim
    64), 3 stages, as measured on the H100 (bench/README.md).
    kind "bwd": (BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, num_warps, num_stages), with
    BLOCK_N1 == BLOCK_M2 (one grid for both phases of `_attn_bwd_kernel`): 32 queries against
    64 keys for dk/dv and the transpose for dq, 4 warps (8 above head dim 64), 2 stages; the
    wider 128-key block spills at 4 warps on sm_90 (bench/results/kernel_resources_sm90.md).
    T not a multiple of 16 (the classifier's T = HW + 1) gets no vectorised loads and spills at
    those blocks: 8 warps, 32-key forward blocks, one backward stage.
    fp32 or head dims above 128 take small square blocks (their tiles must fit shared memory).
    Every block is clipped to T rounded up to a power of two (>= 16). T may be a SymInt: the
    blocks come from its example value (the kernels mask any T)."""
    bd = max(16, triton.next_power_of_2(ch))
    t = size_hint(T)
    small_t = max(16, triton.next_power_of_2(t))
    wide = bd > 128 or dtype == torch.float32
    unaligned = t % 16 != 0
    if kind == "fwd":
        if INTERPRET:
            return min(32, small_t), min(32, small_t), 4, 1
        if bd > 128 and dtype == torch.float32:   # keep q, k, v tiles inside shared memory
            return min(32, small_t), min(32, small_t), 8, 1
        if wide:
            bm, bn, w, st = 64, 32, 8, 2
        elif unaligned:
            bm, bn, w, st = 128, 32, 8, 2
        else:
            bm, bn, w, st = 128, 64, 8 if bd > 64 else 4, 3
        return min(bm, small_t), min(bn, small_t), w, st
    if kind != "bwd":
        raise ValueError(f"kind={kind!r}: expected 'fwd' or 'bwd'")
    if INTERPRET:
        narrow, broad, w, st = 16, 32, 4, 1
    elif wide:
        narrow, broad, w, st = 32, 32, 8, 1
    else:
        narrow, broad = 32, 64
        w = 8 if (bd > 64 or unaligned) else 4
        st = 1 if unaligned else 2
    narrow, broad = min(narrow, small_t), min(broad, small_t)
    return narrow, broad, broad, narrow, w, st


if HAS_TRITON:

    @triton_op("admrt::qkv_attention_fwd", mutates_args=())
    def _qkv_attention_fwd(qkv: torch.Tensor, num_heads: int, legacy_order: bool
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        B, width, T = qkv.shape
        ch = width // (3 * num_heads)
        out = qkv.new_empty((B, num_heads * ch, T))
        lse = torch.empty((B * num_heads, T), device=qkv.device, dtype=torch.float32)
        bm, bn, w, st = _attn_blocks(ch, T, qkv.dtype, "fwd")
        grid = (triton.cdiv(T, bm), B * num_heads)
        wrap_triton(_attn_fwd_kernel)[grid](
            qkv, out, lse, T, num_heads, ch, _LOG2E / math.sqrt(ch),
            LEGACY=legacy_order, PREC=_prec(qkv.dtype),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=max(16, triton.next_power_of_2(ch)),
            num_warps=w, num_stages=st)
        return out, lse

    @_qkv_attention_fwd.register_fake
    def _(qkv, num_heads, legacy_order):
        B, width, T = qkv.shape
        ch = width // (3 * num_heads)
        return qkv.new_empty((B, num_heads * ch, T)), qkv.new_empty((B * num_heads, T), dtype=torch.float32)

    @triton_op("admrt::qkv_attention_bwd", mutates_args=())
    def _qkv_attention_bwd(dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor,
                           lse: torch.Tensor, num_heads: int, legacy_order: bool) -> torch.Tensor:
        B, width, T = qkv.shape
        ch = width // (3 * num_heads)
        dout = dout.contiguous()
        dqkv = torch.empty_like(qkv)
        bm1, bn1, bm2, bn2, w, st = _attn_blocks(ch, T, qkv.dtype, "bwd")
        wrap_triton(_attn_bwd_kernel)[(triton.cdiv(T, bn1), B * num_heads)](
            qkv, out, dout, lse, dqkv, T, num_heads, ch, _LOG2E / math.sqrt(ch), 1 / math.sqrt(ch),
            LEGACY=legacy_order, PREC=_prec(qkv.dtype), BLOCK_M1=bm1, BLOCK_N1=bn1, BLOCK_M2=bm2,
            BLOCK_N2=bn2, BLOCK_D=max(16, triton.next_power_of_2(ch)), num_warps=w, num_stages=st)
        return dqkv

    @_qkv_attention_bwd.register_fake
    def _(dout, qkv, out, lse, num_heads, legacy_order):
        return torch.empty_like(qkv)

    def _attn_setup_context(ctx, inputs, output):
        qkv, num_heads, legacy_order = inputs
        out, lse = output
        ctx.save_for_backward(qkv, out, lse)
        ctx.num_heads = num_heads
        ctx.legacy_order = legacy_order
        ctx.mark_non_differentiable(lse)

    def _attn_backward(ctx, dout, _dlse):
        qkv, out, lse = ctx.saved_tensors
        if torch.is_grad_enabled():   # create_graph=True: the fused backward has no derivative
            def ref(qkv):
                return qkv_attention_reference(qkv, ctx.num_heads, legacy_order=ctx.legacy_order)
            (dqkv,) = reference_backward("qkv_attention", ref, (qkv,), dout)
            return dqkv, None, None
        return torch.ops.admrt.qkv_attention_bwd(dout, qkv, out, lse, ctx.num_heads, ctx.legacy_order), None, None

    _qkv_attention_fwd.register_autograd(_attn_backward, setup_context=_attn_setup_context)


def qkv_attention_fused(qkv: torch.Tensor, num_heads: int, *, legacy_order: bool) -> torch.Tensor:
    """Fused Triton path of `qkv_attention_reference` (same arguments, same result)."""
    if not HAS_TRITON:
        raise RuntimeError("qkv_attention_fused: triton is not installed")
    check_qkv_args(qkv, num_heads)
    out, _ = torch.ops.admrt.qkv_attention_fwd(qkv.contiguous(), num_heads, bool(legacy_order))
    return out
