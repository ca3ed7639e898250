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
Two more forms exist for graph exporters (admrt.export.onnx sets them while it traces; they run,
but "sdpa" runs group norm as the torch reference even on CUDA):
- fused="sdpa": group norm as the reference; attention through F.scaled_dot_product_attention
  (`qkv_attention_sdpa`), which the ONNX exporter lowers to one `Attention` node (opset 23).
- fused="opaque": each op as one torch custom op, `torch.ops.admrt.group_norm_act` /
  `torch.ops.admrt.qkv_attention` (implementation: the fused kernel where it can run, else the
  reference; gradients through the reference), which exporters keep as one node each (the ONNX
  custom-domain nodes of admrt.export.onnx_ops).

Tracing (kernels/_trace.py): launch choices read SymInt sizes through their example values, so
a dynamic batch traces without guards; the fused backwards are not differentiable, so a backward
under create_graph=True (double backward) runs through the torch reference (logged once at INFO).
Under TRITON_INTERPRET=1, torch.export and make_fx keep the ops opaque and work, but
torch.compile's AOTAutograd (Inductor, aot_eager) cannot decompose them: wrap_triton passes
interpreted kernels through unwrapped, so the op bodies would run the interpreter on FakeTensors.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from . import attention as _attention
from . import group_norm as _group_norm
from ._trace import reference_backward
from .attention import qkv_attention_fused, qkv_attention_reference, qkv_attention_sdpa
from .group_norm import group_norm_act_fused, group_norm_act_reference

__all__ = [
    "group_norm_act", "group_norm_act_fused", "group_norm_act_reference",
    "qkv_attention", "qkv_attention_fused", "qkv_attention_reference", "qkv_attention_sdpa",
    "fused_available", "INTERPRET", "FUSED_MODES",
]
FUSED_MODES = (True, False, "auto", "require", "sdpa", "opaque")

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
        raise ValueError(f"fused={fused!r}: expected one of {FUSED_MODES}")
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
    if fused == "opaque":
        return torch.ops.admrt.group_norm_act(x, weight, bias, scale, shift, num_groups, float(eps), act)
    if fused == "sdpa":
        fused = False
    if _use_fused("group_norm_act", x, fused):
        return group_norm_act_fused(x, weight, bias, num_groups=num_groups, eps=eps,
                                    scale=scale, shift=shift, act=act)
    return group_norm_act_reference(x, weight, bias, num_groups=num_groups, eps=eps,
                                    scale=scale, shift=shift, act=act)


def qkv_attention(qkv, num_heads, *, legacy_order, fused=True) -> torch.Tensor:
    """(B, 3*H*C, T) -> (B, H*C, T) ADM attention (legacy [q|k|v]-per-head or new order)."""
    if fused == "opaque":
        return torch.ops.admrt.qkv_attention(qkv, num_heads, bool(legacy_order))
    if fused == "sdpa":
        return qkv_attention_sdpa(qkv, num_heads, legacy_order=legacy_order)
    if _use_fused("qkv_attention", qkv, fused):
        return qkv_attention_fused(qkv, num_heads, legacy_order=legacy_order)
    return qkv_attention_reference(qkv, num_heads, legacy_order=legacy_order)


# -- the opaque forms (fused="opaque"): one custom op each, for graph exporters ---------------

@torch.library.custom_op("admrt::group_norm_act", mutates_args=())
def _group_norm_act_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: Optional[torch.Tensor],
                       shift: Optional[torch.Tensor], num_groups: int, eps: float, act: str) -> torch.Tensor:
    return group_norm_act(x, weight, bias, num_groups=num_groups, eps=eps, scale=scale, shift=shift, act=act,
                          fused="auto")


@_group_norm_act_op.register_fake
def _(x, weight, bias, scale, shift, num_groups, eps, act):
    return torch.empty_like(x)


def _group_norm_act_op_setup(ctx, inputs, output):
    x, weight, bias, scale, shift, num_groups, eps, act = inputs
    ctx.save_for_backward(x, weight, bias, scale, shift)
    ctx.num_groups, ctx.eps, ctx.act = num_groups, eps, act


def _group_norm_act_op_backward(ctx, dy):
    def ref(x, weight, bias, scale, shift):
        return group_norm_act_reference(x, weight, bias, num_groups=ctx.num_groups, eps=ctx.eps, scale=scale,
                                        shift=shift, act=ctx.act)
    return (*reference_backward("group_norm_act (opaque)", ref, ctx.saved_tensors, dy), None, None, None)


_group_norm_act_op.register_autograd(_group_norm_act_op_backward, setup_context=_group_norm_act_op_setup)


@torch.library.custom_op("admrt::qkv_attention", mutates_args=())
def _qkv_attention_op(qkv: torch.Tensor, num_heads: int, legacy_order: bool) -> torch.Tensor:
    return qkv_attention(qkv, num_heads, legacy_order=legacy_order, fused="auto")


@_qkv_attention_op.register_fake
def _(qkv, num_heads, legacy_order):
    b, width, t = qkv.shape
    return qkv.new_empty((b, width // 3, t))


def _qkv_attention_op_setup(ctx, inputs, output):
    qkv, num_heads, legacy_order = inputs
    ctx.save_for_backward(qkv)
    ctx.num_heads, ctx.legacy_order = num_heads, legacy_order


def _qkv_attention_op_backward(ctx, dout):
    def ref(qkv):
        return qkv_attention_reference(qkv, ctx.num_heads, legacy_order=ctx.legacy_order)
    return (*reference_backward("qkv_attention (opaque)", ref, ctx.saved_tensors, dout), None, None)


_qkv_attention_op.register_autograd(_qkv_attention_op_backward, setup_context=_qkv_attention_op_setup)
