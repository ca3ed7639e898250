"""Configs of admrt: frozen dataclasses, saved as JSON beside the weights.

A `ModelConfig` fixes one network (ADM UNet, its SuperRes variant, or the noisy classifier,
`EncoderUNetModel` in guided-diffusion's unet.py); a `DiffusionConfig` fixes the forward
process the network was trained with (guided-diffusion's `create_gaussian_diffusion`).
A `Preset` pairs the two under a name (see admrt/presets.py).
"""
from __future__ import annotations

import dataclasses
import json
import numbers
from dataclasses import dataclass, field
from typing import Any

MODEL_KINDS = ("unet", "superres", "classifier")
CLASSIFIER_POOLS = ("attention", "adaptive", "spatial", "spatial_v2")
NOISE_SCHEDULES = ("linear", "cosine")


def default_channel_mult(image_size: int) -> tuple[float, ...]:
    """Channel multipliers by image size, as guided-diffusion's script_util chooses them."""
    table = {
        512: (0.5, 1, 1, 2, 2, 4, 4),
        256: (1, 1, 2, 2, 4, 4),
        128: (1, 1, 2, 3, 4),
        64: (1, 2, 3, 4),
    }
    if image_size not in table:
        raise ValueError(
            f"image_size={image_size}: no default channel_mult (known: {sorted(table)}); "
            "pass channel_mult explicitly"
        )
    return table[image_size]


@dataclass(frozen=True)
class ModelConfig:
    """One ADM network. Field names follow guided-diffusion's UNetModel arguments.

    kind: "unet" (UNetModel), "superres" (SuperResModel: the low-res image is bilinearly
        upsampled and concatenated to x_t), or "classifier" (EncoderUNetModel + pool head).
    attention_resolutions: feature-map sizes in pixels where attention blocks sit
        (the "32,16,8" of the reference's flags, not its downsample rates).
    channel_mult: per-level multipliers of model_channels (floats: the 512 model uses 0.5).
    out_channels: 2*in_channels for a learned-sigma UNet (eps and the variance values v);
        the number of classes for a classifier.
    num_classes: class-conditional UNet when set (label embedding); None otherwise.
    low_res_size: SuperRes only: the size of the conditioning low-res image.
    """

    kind: str
    image_size: int
    model_channels: int
    out_channels: int
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]
    channel_mult: tuple[float, ...]
    in_channels: int = 3
    dropout: float = 0.0
    num_classes: int | None = None
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    use_new_attention_order: bool = False
    conv_resample: bool = True
    pool: str | None = None
    low_res_size: int | None = None

    def __post_init__(self) -> None:
        _check(self.kind in MODEL_KINDS, "kind", self.kind, f"one of {MODEL_KINDS}")
        _check(self.image_size > 0, "image_size", self.image_size, "a positive int")
        _check(self.model_channels > 0, "model_channels", self.model_channels, "a positive int")
        _check(self.num_res_blocks > 0, "num_res_blocks", self.num_res_blocks, "a positive int")
        _check(len(self.channel_mult) > 0, "channel_mult", self.channel_mult, "a non-empty tuple")
        _check(
            self.image_size % 2 ** (len(self.channel_mult) - 1) == 0,
            "image_size",
            self.image_size,
            f"divisible by 2**(len(channel_mult)-1) = {2 ** (len(self.channel_mult) - 1)}",
        )
        _check(
            self.num_heads > 0 or self.num_head_channels > 0,
            "num_heads/num_head_channels",
            (self.num_heads, self.num_head_channels),
            "num_heads > 0 or num_head_channels > 0",
        )
        if self.kind == "classifier":
            _check(self.pool in CLASSIFIER_POOLS, "pool", self.pool, f"one of {CLASSIFIER_POOLS}")
            _check(self.num_classes is None, "num_classes", self.num_classes,
                   "None for a classifier (its classes are out_channels)")
        else:
            _check(self.pool is None, "pool", self.pool, f"None for kind={self.kind!r}")
        if self.kind == "superres":
            _check(self.low_res_size is not None and 0 < self.low_res_size <= self.image_size,
                   "low_res_size", self.low_res_size, f"an int in (0, {self.image_size}]")
        else:
            _check(self.low_res_size is None, "low_res_size", self.low_res_size,
                   f"None for kind={self.kind!r}")
        # JSON round trips give lists; keep tuples so configs stay hashable and comparable.
        object.__setattr__(self, "attention_resolutions", tuple(int(r) for r in self.attention_resolutions))
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))

    @property
    def learn_sigma(self) -> bool:
        """True for a UNet that outputs eps and the learned-range variance values."""
        return self.kind != "classifier" and self.out_channels == 2 * self.in_channels

    @property
    def class_cond(self) -> bool:
        return self.num_classes is not None

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class DiffusionConfig:
    """The forward process a model was trained with, and its parameterisation: the arguments of
    guided-diffusion's create_gaussian_diffusion, with its defaults (timestep_respacing is a
    sampling choice: `steps=` of Engine.sample).

    steps: T, the number of training timesteps. noise_schedule: "linear" (Ho et al.) or
        "cosine" (Nichol & Dhariwal).
    predict_xstart: the network outputs x_0 instead of eps (ModelMeanType.START_X); sampling
        and training honour it.
    rescale_timesteps: the network is fed t * 1000 / T (float) instead of t.
    sigma_small: a fixed-sigma model samples with beta~_t (FIXED_SMALL) instead of beta_t
        (FIXED_LARGE); a learned-sigma model ignores it.
    use_kl: train on the variational bound alone (LossType.RESCALED_KL: T * L_t).
    rescale_learned_sigmas: weight the learned-sigma bound term by T/1000 (RESCALED_MSE, the
        lambda = 0.001 of Improved DDPM) instead of 1 (MSE); the two agree at T = 1000.
    The last two change training only. The released models all predict eps, feed the original
    timesteps and have learned sigmas (every default here).
    """

    steps: int = 1000
    noise_schedule: str = "linear"
    predict_xstart: bool = False
    rescale_timesteps: bool = False
    sigma_small: bool = False
    use_kl: bool = False
    rescale_learned_sigmas: bool = False

    def __post_init__(self) -> None:
        _check(isinstance(self.steps, numbers.Integral) and not isinstance(self.steps, bool) and self.steps > 0,
               "steps", self.steps, "a positive int")
        object.__setattr__(self, "steps", int(self.steps))
        _check(self.noise_schedule in NOISE_SCHEDULES, "noise_schedule", self.noise_schedule,
               f"one of {NOISE_SCHEDULES}")
        for name in ("predict_xstart", "rescale_timesteps", "sigma_small", "use_kl", "rescale_learned_sigmas"):
            _check(isinstance(getattr(self, name), bool), name, getattr(self, name), "True or False")


@dataclass(frozen=True)
class Preset:
    """A named model: the network, its diffusion, and where the weights come from."""

    name: str
    model: ModelConfig
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    description: str = ""
    checkpoint: str | None = None  # file name of the released checkpoint, if any
    params_m: float | None = None  # parameter count of the released network, millions

    def to_json(self) -> str:
        return json.dumps(
            {"name": self.name, "model": dataclasses.asdict(self.model),
             "diffusion": dataclasses.asdict(self.diffusion), "description": self.description},
            sort_keys=True,
        )

    @staticmethod
    def from_json(text: str) -> "Preset":
        try:
            data = json.loads(text)
            return Preset(
                name=data["name"],
                model=ModelConfig(**data["model"]),
                diffusion=DiffusionConfig(**data.get("diffusion", {})),
                description=data.get("description", ""),
            )
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"config JSON is not an admrt preset: {exc}") from exc


def _check(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r}: expected {expected}")
