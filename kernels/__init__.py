"""admrt.kernels: fused ops used by the models, each with its torch reference beside it.

`group_norm_act` and `qkv_attention` are the entry points the models call (the classifier's
AttentionPool2d calls `qkv_attention` with the new channel order and T = HW + 1).

Dispatch, per call:
- fused=True: the fused Triton op (a torch custom op, `torch.ops.admrt.*`, with autograd and
  fake implementations, so torch.compile / torch.export / AOTInductor capture it) when the
  tensor is on CUDA, or on CPU while the Triton interpreter is active (TRITON_INTERPRET=1 set
  before this package is imported). Otherwise the torch reference runs and a warning is
  logged once per op and reason: never a silent fallback.
- fused="auto" (the models' default): the fused op where it can run, else the reference with
  no warning (on a CPU without the interpreter the reference is the documented path).
- fused="require": the fused op or a RuntimeError.
- fused=False: the torch reference.

Tracing (kernels/_trace.py): launch choices read SymInt sizes through their example values, so
a dynamic batch traces without guards; the fused backwards are not differentiable, so a backward
under create_graph=True (double backward) runs through the torch reference (logged once at INFO).
Under TRITON_INTERPRET=1, torch.export and make_fx keep the ops opaque and work, but
torch.compile's AOTAutograd (Inductor, aot_eager) cannot decompose them: wrap_triton passes
interpreted kernels through unwrapped, so the op bodies would run the interpreter on FakeTensors.
"""
from __future__ import annotations

import logging

import torch

from . import attention as _attention
from . import group_norm as _group_norm
from .attention import qkv_attention_fused, qkv_attention_reference
from .group_norm import group_norm_act_fused, group_norm_act_reference

__all__ = [
    "group_norm_act", "group_norm_act_fused", "group_norm_act_reference",
    "qkv_attention", "qkv_attention_fused", "qkv_attention_reference",
    "fused_available", "INTERPRET",
]

log = logging.getLogger(__name__)
INTERPRET = _group_norm.INTERPRET
_warned: set[tuple[str, str]] = set()


def _unavailable_reason(t: torch.Tensor) -> str | None:
    if not (_group_norm.HAS_TRITON and _attention.HAS_TRITON):
        return "triton is not installed"
    if INTERPRET:
        return None if t.device.type == "cpu" else f"the Triton interpreter is active but the tensor is on {t.device}"
    if t.device.type != "cuda":
        return f"the tensor is on {t.device} (fused kernels need CUDA or TRITON_INTERPRET=1)"
    return None


def fused_available(t: torch.Tensor) -> bool:
    """Whether the fused kernels can run on tensors like t."""
    return _unavailable_reason(t) is None


def _use_fused(op: str, t: torch.Tensor, fused) -> bool:
    if fused is False:
        return False
    if fused is not True and fused not in ("auto", "require"):
        raise ValueError(f"fused={fused!r}: expected True, False, 'auto' or 'require'")
    reason = _unavailable_reason(t)
    if reason is None:
        return True
    if fused == "auto":
        return False
    if fused == "require":
        raise RuntimeError(f"{op}: fused kernel required (fused='require') but {reason}")
    if (op, reason) not in _warned:
        _warned.add((op, reason))
        log.warning("%s: fused kernel requested but %s; running the torch reference "
                    "(pass fused=False to choose it explicitly)", op, reason)
    return False


def group_norm_act(x, weight, bias, *, num_groups=32, eps=1e-5, scale=None, shift=None,
                   act="silu", fused=True) -> torch.Tensor:
    """act(GroupNorm(x) * weight + bias [* (1 + scale) + shift]) with fp32 statistics.

    x: (B, C, *spatial) fp32/fp16/bf16, NCHW or channels_last; weight, bias: (C,);
    scale, shift: (B, C) AdaGN modulation or None; act: "silu" | "none". Output: x.dtype.
    """
    if _use_fused("group_norm_act", x, fused):
        return group_norm_act_fused(x, weight, bias, num_groups=num_groups, eps=eps,
                                    scale=scale, shift=shift, act=act)
    return group_norm_act_reference(x, weight, bias, num_groups=num_groups, eps=eps,
                                    scale=scale, shift=shift, act=act)


def qkv_attention(qkv, num_heads, *, legacy_order, fused=True) -> torch.Tensor:
    """(B, 3*H*C, T) -> (B, H*C, T) ADM attention (legacy [q|k|v]-per-head or new order)."""
    if _use_fused("qkv_attention", qkv, fused):
        return qkv_attention_fused(qkv, num_heads, legacy_order=legacy_order)
    return qkv_attention_reference(qkv, num_heads, legacy_order=legacy_order)
