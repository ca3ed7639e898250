"""The ADM networks: UNetModel, SuperResModel and EncoderUNetModel (the noisy classifier).

Architecture of Dhariwal & Nichol (2021), Sec. 3 and Appendix A, with the state-dict layout of
guided-diffusion's unet.py: `time_embed`, `label_emb`, `input_blocks`, `middle_block`,
`output_blocks`, `out`. Built from a ModelConfig (admrt/config.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from admrt import kernels
from admrt.config import ModelConfig

from .layers import (AttentionBlock, AttentionPool2d, Downsample, FusedOpsMixin, GroupNorm32,
                     ResBlock, TimestepEmbedSequential, Upsample, timestep_embedding, zero_module)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          torch.float32: torch.float32, torch.float16: torch.float16, torch.bfloat16: torch.bfloat16}


def resolve_dtype(dtype) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of 'fp32', 'fp16', 'bf16' or the torch dtypes")
    return DTYPES[dtype]


class ADMBase(nn.Module):
    """What the three networks share: the encoder half (time embedding, input blocks,
    middle block), input checks, precision and the fused-kernel switch."""

    def __init__(self, config: ModelConfig, in_channels: int):
        super().__init__()
        self.config = config
        self.dtype = torch.float32
        c = config
        emb_dim = c.model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(c.model_channels, emb_dim), nn.SiLU(),
                                        nn.Linear(emb_dim, emb_dim))
        if c.num_classes is not None:  # class-conditional UNet: y -> embedding added to emb
            self.label_emb = nn.Embedding(c.num_classes, emb_dim)
        attention_ds = {c.image_size // res for res in c.attention_resolutions}

        def attention(ch: int, num_heads: int) -> AttentionBlock:
            return AttentionBlock(ch, num_heads, c.num_head_channels, c.use_new_attention_order)

        ch = int(c.channel_mult[0] * c.model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        self.skip_channels = [ch]  # channels of each input block's output, for the decoder
        ds = 1
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                out_ch = int(mult * c.model_channels)
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, c.dropout, out_ch,
                                                    use_scale_shift_norm=c.use_scale_shift_norm)]
                ch = out_ch
                if ds in attention_ds:
                    layers.append(attention(ch, c.num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                self.skip_channels.append(ch)
            if level != len(c.channel_mult) - 1:
                down = (ResBlock(ch, emb_dim, c.dropout, ch, use_scale_shift_norm=c.use_scale_shift_norm,
                                 down=True)
                        if c.resblock_updown else Downsample(ch, c.conv_resample, ch))
                self.input_blocks.append(TimestepEmbedSequential(down))
                self.skip_channels.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, c.dropout, use_scale_shift_norm=c.use_scale_shift_norm),
            attention(ch, c.num_heads),
            ResBlock(ch, emb_dim, c.dropout, use_scale_shift_norm=c.use_scale_shift_norm),
        )
        self._ch, self._ds, self._emb_dim, self._attention_ds = ch, ds, emb_dim, attention_ds

    # -- guided-diffusion's attributes (code written against its modules reads them) ----------
    image_size = property(lambda self: self.config.image_size)
    model_channels = property(lambda self: self.config.model_channels)
    out_channels = property(lambda self: self.config.out_channels)
    num_res_blocks = property(lambda self: self.config.num_res_blocks)
    dropout = property(lambda self: self.config.dropout)
    channel_mult = property(lambda self: self.config.channel_mult)
    conv_resample = property(lambda self: self.config.conv_resample)
    num_heads = property(lambda self: self.config.num_heads)
    num_head_channels = property(lambda self: self.config.num_head_channels)
    # resolved as guided-diffusion resolves it (-1: num_heads)
    num_heads_upsample = property(lambda self: self.config.num_heads_upsample if self.config.num_heads_upsample != -1
                                  else self.config.num_heads)
    use_checkpoint = False  # gradient checkpointing is not implemented; guided-diffusion's flag is accepted off

    @property
    def in_channels(self) -> int:
        """The first convolution's input channels (a SuperRes model's are x_t's and low_res's)."""
        return self.input_blocks[0][0].in_channels

    @property
    def attention_resolutions(self) -> tuple[int, ...]:
        """As guided-diffusion's modules hold them: downsample rates (image_size // pixels), where
        ModelConfig.attention_resolutions holds the pixel sizes of its flags."""
        return tuple(self.config.image_size // r for r in self.config.attention_resolutions)

    # -- precision and kernels ------------------------------------------------------------
    def convert_to_fp16(self) -> None:
        """guided-diffusion's convert_to_fp16: set_dtype(torch.float16) (it sets .dtype too)."""
        self.set_dtype(torch.float16)

    def convert_to_fp32(self) -> None:
        """guided-diffusion's convert_to_fp32: set_dtype(torch.float32)."""
        self.set_dtype(torch.float32)

    def body(self) -> list[nn.Module]:
        """The modules whose convolutions run in the low precision."""
        return [self.input_blocks, self.middle_block]

    def set_dtype(self, dtype) -> "ADMBase":
        """Run the body's convolutions in dtype (fp32|fp16|bf16); norms, embeddings and the
        output head stay fp32 (guided-diffusion's convert_to_fp16, with bf16 as well)."""
        self.dtype = resolve_dtype(dtype)
        for part in self.body():
            for m in part.modules():
                if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                    m.to(self.dtype)
        return self

    def set_fused_kernels(self, enabled: bool | str) -> "ADMBase":
        """Fused Triton kernels (GroupNorm/AdaGN/SiLU, attention): True | False | "auto" (default:
        fused on CUDA, torch reference elsewhere) | "require", or an exporter's form "sdpa" | "opaque"
        (see admrt.kernels)."""
        if enabled not in kernels.FUSED_MODES:
            raise ValueError(f"enabled={enabled!r}: expected one of {kernels.FUSED_MODES}")
        for m in self.modules():
            if isinstance(m, FusedOpsMixin):
                m.fused = enabled
        return self

    # -- input checks ---------------------------------------------------------------------
    def _check_inputs(self, x: torch.Tensor, timesteps: torch.Tensor, channels: int, size: int) -> None:
        if x.dim() != 4 or x.shape[1] != channels or x.shape[2] != size or x.shape[3] != size:
            raise ValueError(f"x.shape={tuple(x.shape)}: expected (B, {channels}, {size}, {size}) "
                             f"for preset image_size={size}")
        if timesteps.shape != (x.shape[0],):
            raise ValueError(f"timesteps.shape={tuple(timesteps.shape)}: expected ({x.shape[0]},)")

    def _embed(self, timesteps: torch.Tensor) -> torch.Tensor:
        return self.time_embed(timestep_embedding(timesteps, self.config.model_channels))  # (B, E)

    def _encode(self, x: torch.Tensor, emb: torch.Tensor, collect: bool) -> tuple[torch.Tensor, list]:
        hs = []
        h = x.to(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            if collect:
                hs.append(h)
        return self.middle_block(h, emb), hs


class UNetModel(ADMBase, FusedOpsMixin):
    """The ADM diffusion UNet: model(x_t (B,C,H,W), t (B,), y (B,) | None) -> (B, out, H, W),
    out = [eps | v] for a learned-sigma model (v: the learned-range interpolation values)."""

    num_classes = property(lambda self: self.config.num_classes)

    def __init__(self, config: ModelConfig, extra_in_channels: int = 0):
        super().__init__(config, config.in_channels + extra_in_channels)
        c = config
        emb_dim = self._emb_dim
        ch, ds = self._ch, self._ds
        skips = list(self.skip_channels)
        heads_up = c.num_heads_upsample if c.num_heads_upsample != -1 else c.num_heads
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(c.channel_mult))[::-1]:
            for i in range(c.num_res_blocks + 1):
                out_ch = int(mult * c.model_channels)
                layers: list[nn.Module] = [ResBlock(ch + skips.pop(), emb_dim, c.dropout, out_ch,
                                                    use_scale_shift_norm=c.use_scale_shift_norm)]
                ch = out_ch
                if ds in self._attention_ds:
                    layers.append(AttentionBlock(ch, heads_up, c.num_head_channels, c.use_new_attention_order))
                if level and i == c.num_res_blocks:
                    layers.append(ResBlock(ch, emb_dim, c.dropout, ch, use_scale_shift_norm=c.use_scale_shift_norm,
                                           up=True)
                                  if c.resblock_updown else Upsample(ch, c.conv_resample, ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(),
                                 zero_module(nn.Conv2d(int(c.channel_mult[0] * c.model_channels),
                                                       c.out_channels, 3, padding=1)))

    def body(self) -> list[nn.Module]:
        return [self.input_blocks, self.middle_block, self.output_blocks]

    def _check_labels(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        n = self.config.num_classes
        if n is None:
            if y is not None:
                raise ValueError("y: this model is unconditional (num_classes=None); expected y=None")
            return
        if y is None:
            raise ValueError(f"y=None: this model is class-conditional ({n} classes); expected y of shape "
                             f"({x.shape[0]},)")
        if y.shape != (x.shape[0],):
            raise ValueError(f"y.shape={tuple(y.shape)}: expected ({x.shape[0]},)")
        # The range of the ids is not checked here: that would read y on the host at every call
        # (a sync, and a data-dependent guard that torch.export rejects). admrt.Engine validates
        # labels once, before sampling; label_emb raises on a bad id in eager mode on the CPU.

    def _run(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        emb = self._embed(timesteps)
        if y is not None:
            emb = emb + self.label_emb(y)
        h, hs = self._encode(x, emb, collect=True)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
        h = self.norm_act(self.out[0], h.to(x.dtype))  # output head in fp32
        return self.out[2](h)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        self._check_inputs(x, timesteps, c.in_channels, c.image_size)
        self._check_labels(x, y)
        return self._run(x, timesteps, y)


class SuperResModel(UNetModel):
    """The ADM upsampler (ADM-U): the low-res image is upsampled bilinearly to x_t's size and
    concatenated as extra input channels. model(x_t, t, low_res=(B,C,h,w), y=None)."""

    def __init__(self, config: ModelConfig):
        super().__init__(config, extra_in_channels=config.in_channels)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, low_res: torch.Tensor | None = None,
                y: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        self._check_inputs(x, timesteps, c.in_channels, c.image_size)
        self._check_labels(x, y)
        expected = (x.shape[0], c.in_channels, c.low_res_size, c.low_res_size)
        if low_res is None or tuple(low_res.shape) != expected:
            got = None if low_res is None else tuple(low_res.shape)
            raise ValueError(f"low_res.shape={got}: expected {expected}")
        upsampled = F.interpolate(low_res, x.shape[2:], mode="bilinear")
        return self._run(torch.cat([x, upsampled], dim=1), timesteps, y)


class EncoderUNetModel(ADMBase, FusedOpsMixin):
    """The noisy classifier: the UNet's encoder half and a pooling head.
    clf(x_t (B,C,H,W), t (B,)) -> logits (B, out_channels).

    pool: "attention" (AttentionPool2d), "adaptive" (global average + 1x1 conv), "spatial" /
    "spatial_v2" (MLP over the spatial means of every input block and the middle block).
    """

    num_classes = None  # as guided-diffusion's EncoderUNetModel: its classes are out_channels
    pool = property(lambda self: self.config.pool)

    def __init__(self, config: ModelConfig):
        super().__init__(config, config.in_channels)
        c, ch = config, self._ch
        if c.pool == "adaptive":
            self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.AdaptiveAvgPool2d((1, 1)),
                                     zero_module(nn.Conv2d(ch, c.out_channels, 1)), nn.Flatten())
        elif c.pool == "attention":
            if c.num_head_channels == -1:
                raise ValueError("num_head_channels=-1: the attention pool needs num_head_channels > 0")
            self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(),
                                     AttentionPool2d(c.image_size // self._ds, ch, c.num_head_channels,
                                                     c.out_channels))
        else:
            features = sum(self.skip_channels) + ch
            if c.pool == "spatial":
                self.out = nn.Sequential(nn.Linear(features, 2048), nn.ReLU(), nn.Linear(2048, c.out_channels))
            else:  # spatial_v2
                self.out = nn.Sequential(nn.Linear(features, 2048), GroupNorm32(2048), nn.SiLU(),
                                         nn.Linear(2048, c.out_channels))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        c = self.config
        self._check_inputs(x, timesteps, c.in_channels, c.image_size)
        emb = self._embed(timesteps)
        spatial = c.pool.startswith("spatial")
        h, hs = self._encode(x, emb, collect=spatial)
        if spatial:
            means = [t.to(x.dtype).mean(dim=(2, 3)) for t in hs + [h]]
            return self.out(torch.cat(means, dim=-1))
        h = self.norm_act(self.out[0], h.to(x.dtype))
        return self.out[2:](h)


def build_model(config: ModelConfig) -> nn.Module:
    """The network for a config: UNetModel, SuperResModel or EncoderUNetModel."""
    return {"unet": UNetModel, "superres": SuperResModel, "classifier": EncoderUNetModel}[config.kind](config)
