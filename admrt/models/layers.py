"""Building blocks of ADM: timestep embedding, ResBlock (with AdaGN and BigGAN up/down),
AttentionBlock, Upsample/Downsample, and the classifier's AttentionPool2d.

Module names and nesting mirror guided-diffusion's unet.py (`in_layers.0`, `emb_layers.1`,
`out_layers.3`, `qkv`, `proj_out`, ...) so that released state dicts load key for key. The
forward passes call admrt.kernels, which fuse GroupNorm + AdaGN + SiLU and attention on CUDA.

Precision (docs/design.md): convolutions run in the block's dtype (fp32|fp16|bf16); group-norm
statistics, softmax, timestep/class embeddings and the output head stay fp32.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from admrt import kernels


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim), fp32 (Vaswani et al.; ADM uses
    [cos | sin] halves, as guided-diffusion's nn.timestep_embedding)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                           device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with 32 groups, computed in fp32 and returned in the input dtype."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.group_norm_act_reference(x, self.weight, self.bias, num_groups=32,
                                                eps=self.eps, act="none")


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.detach().zero_()
    return module


class FusedOpsMixin:
    """A block that calls admrt.kernels. `fused`: "auto" (fused kernels where they can run, i.e.
    on CUDA; the torch reference elsewhere), True (fused, warn once when it cannot run),
    "require" (fused or an error), False (the torch reference)."""

    fused: bool | str = "auto"

    def norm_act(self, norm: nn.GroupNorm, x: torch.Tensor, act: str = "silu",
                 scale: torch.Tensor | None = None, shift: torch.Tensor | None = None) -> torch.Tensor:
        return kernels.group_norm_act(x, norm.weight, norm.bias, num_groups=norm.num_groups,
                                      eps=norm.eps, scale=scale, shift=shift, act=act,
                                      fused=self.fused)


class TimestepBlock(nn.Module):
    """A block whose forward takes the embedding (B, E) as a second argument."""


class TimestepEmbedSequential(nn.Sequential):
    """Runs its children in order, passing the embedding to the TimestepBlocks among them."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest 2x upsampling, then a 3x3 conv when use_conv."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        else:
            self.conv = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.conv is not None else x


class Downsample(nn.Module):
    """A stride-2 3x3 conv when use_conv, else 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=1)
        else:
            if self.out_channels != channels:
                raise ValueError(f"out_channels={out_channels}: pooling keeps channels={channels}")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock, FusedOpsMixin):
    """ADM residual block (guided-diffusion ResBlock).

    h = conv(SiLU(GN(x)))  [BigGAN: resample between SiLU and conv, and on the skip]
    AdaGN (use_scale_shift_norm): h = SiLU(GN(h) * (1 + y_s) + y_b), (y_s, y_b) = Linear(SiLU(emb))
    otherwise: h = SiLU(GN(h + Linear(SiLU(emb))))
    out = skip(x) + conv(dropout(h))
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 use_conv: bool = False, use_scale_shift_norm: bool = False, up: bool = False,
                 down: bool = False):
        super().__init__()
        out_ch = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_ch, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_ch if use_scale_shift_norm else out_ch))
        self.out_layers = nn.Sequential(GroupNorm32(out_ch), nn.SiLU(), nn.Dropout(p=dropout),
                                        zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1)))
        if out_ch == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, out_ch, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        in_conv = self.in_layers[2]
        h = self.norm_act(self.in_layers[0], x)
        if self.updown:
            h, x = self.h_upd(h), self.x_upd(x)
        h = in_conv(h)                                   # (B, C_out, H, W), block dtype
        emb_out = self.emb_layers(emb)                   # (B, 2*C_out | C_out), fp32
        out_norm, dropout, out_conv = self.out_layers[0], self.out_layers[2], self.out_layers[3]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)       # AdaGN: y_s - 1, y_b
            h = self.norm_act(out_norm, h, scale=scale, shift=shift)
        else:
            h = h + emb_out.to(h.dtype)[:, :, None, None]
            h = self.norm_act(out_norm, h)
        h = out_conv(dropout(h))
        return self.skip_connection(x) + h


def attention_heads(channels: int, num_heads: int, num_head_channels: int) -> int:
    """Number of heads: num_heads, or channels // num_head_channels when that is set."""
    if num_head_channels == -1:
        return num_heads
    if channels % num_head_channels:
        raise ValueError(f"channels={channels}: expected a multiple of num_head_channels={num_head_channels}")
    return channels // num_head_channels


class AttentionBlock(nn.Module, FusedOpsMixin):
    """Self-attention over the spatial positions: x + proj_out(attn(qkv(GN(x)))).

    use_new_attention_order picks QKVAttention ([q|k|v] over all heads) over the legacy
    per-head [q|k|v] layout of QKVAttentionLegacy. No activation checkpointing here: the
    reference forces it, which breaks double backward.
    """

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 use_new_attention_order: bool = False):
        super().__init__()
        self.channels = channels
        self.num_heads = attention_heads(channels, num_heads, num_head_channels)
        self.legacy_order = not use_new_attention_order
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)                               # (B, C, T)
        qkv = self.qkv(self.norm_act(self.norm, x, act="none"))  # (B, 3C, T)
        h = kernels.qkv_attention(qkv, self.num_heads, legacy_order=self.legacy_order,
                                  fused=self.fused)           # (B, C, T)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


class AttentionPool2d(nn.Module, FusedOpsMixin):
    """The classifier head's attention pooling (CLIP-style): the mean token, plus positional
    embeddings, attends over all positions; returns the mean token's output (B, out)."""

    def __init__(self, spatial_dim: int, embed_dim: int, num_head_channels: int, output_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(
            torch.randn(embed_dim, spatial_dim ** 2 + 1) / embed_dim ** 0.5)
        self.qkv_proj = nn.Conv1d(embed_dim, 3 * embed_dim, 1)
        self.c_proj = nn.Conv1d(embed_dim, output_dim, 1)
        self.num_heads = attention_heads(embed_dim, 1, num_head_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *_ = x.shape
        x = x.reshape(b, c, -1)                                               # (B, C, HW)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)              # (B, C, HW+1)
        x = x + self.positional_embedding[None].to(x.dtype)
        qkv = self.qkv_proj(x)                                                # (B, 3C, HW+1)
        h = kernels.qkv_attention(qkv, self.num_heads, legacy_order=False, fused=self.fused)
        return self.c_proj(h)[:, :, 0]
