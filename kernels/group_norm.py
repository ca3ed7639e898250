"""Group norm with optional AdaGN modulation and SiLU: y = act(GN(x) * gamma + beta) or
y = act(GN(x) * gamma + beta) * (1 + scale) + shift ... folded as described below.

Matches guided-diffusion's GroupNorm32 (statistics and affine in fp32, then cast back)
followed by SiLU, and the AdaGN of ResBlock._forward with use_scale_shift_norm
(paper, Sec. 3: AdaGN(h, y) = y_s GroupNorm(h) + y_b, with y_s = 1 + scale).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

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
    if act not in ACTIVATIONS:
        raise ValueError(f"act={act!r}: expected one of {ACTIVATIONS}")
    if (scale is None) != (shift is None):
        raise ValueError("scale and shift: expected both or neither (AdaGN)")
    h = F.group_norm(x.float(), num_groups, weight.float(), bias.float(), eps)
    if scale is not None:
        view = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
        h = h * (1 + scale.float().reshape(view)) + shift.float().reshape(view)
    if act == "silu":
        h = F.silu(h)
    return h.to(x.dtype)
