"""Multi-head QKV attention of ADM, reading the fused qkv conv output (B, 3*H*C, T).

Two channel orders, both in guided-diffusion's unet.py:
- legacy (QKVAttentionLegacy): per head [q|k|v], i.e. qkv.reshape(B*H, 3*C, T);
- new (QKVAttention): [q of all heads | k of all heads | v of all heads].
Both scale q and k by C**-1/4 each (so the logits carry 1/sqrt(C)) and take the softmax in fp32.
Output is (B, H*C, T), the layout proj_out expects.
"""
from __future__ import annotations

import math

import torch


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
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    out = torch.einsum("bts,bcs->bct", weight, v)  # (B*H, C, T)
    return out.reshape(bs, -1, length)
