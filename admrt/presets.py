"""Named presets: one per released guided-diffusion checkpoint, the bundled Fashion-MNIST
models, and tiny configs for tests.

Flags of the released models are those of guided-diffusion's README (MODEL_FLAGS and the
classifier flags); channel multipliers by size as its script_util.
"""
from __future__ import annotations

from .config import DiffusionConfig, ModelConfig, Preset, default_channel_mult

LINEAR = DiffusionConfig(steps=1000, noise_schedule="linear")
COSINE = DiffusionConfig(steps=1000, noise_schedule="cosine")


def _adm(image_size: int, channels: int, *, num_classes: int | None = 1000, num_res_blocks: int = 2,
         attention=(32, 16, 8), num_heads: int = 4, num_head_channels: int = 64,
         new_order: bool = False, dropout: float = 0.0) -> ModelConfig:
    return ModelConfig(
        kind="unet", image_size=image_size, model_channels=channels, out_channels=6,
        num_res_blocks=num_res_blocks, attention_resolutions=attention,
        channel_mult=default_channel_mult(image_size), num_classes=num_classes,
        num_heads=num_heads, num_head_channels=num_head_channels, dropout=dropout,
        use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=new_order,
    )


def _upsampler(large: int, small: int, attention, num_head_channels: int) -> ModelConfig:
    return ModelConfig(
        kind="superres", image_size=large, low_res_size=small, model_channels=192, out_channels=6,
        num_res_blocks=2, attention_resolutions=attention,
        channel_mult=(1, 1, 2, 2, 4, 4), num_classes=1000, num_heads=4,  # script_util's sr_create_model
        num_head_channels=num_head_channels, use_scale_shift_norm=True, resblock_updown=True,
    )


def _classifier(image_size: int, depth: int = 2) -> ModelConfig:
    return ModelConfig(
        kind="classifier", image_size=image_size, model_channels=128, out_channels=1000,
        num_res_blocks=depth, attention_resolutions=(32, 16, 8),
        channel_mult=default_channel_mult(image_size), num_head_channels=64,
        use_scale_shift_norm=True, resblock_updown=True, pool="attention",
    )


_RELEASED = [
    Preset("imagenet64-cond", _adm(64, 192, num_res_blocks=3, num_heads=4, new_order=True, dropout=0.1),
           COSINE, "ImageNet 64x64 class-conditional ADM", "64x64_diffusion.pt", 295.9),
    Preset("imagenet128-cond", _adm(128, 256, num_heads=4, num_head_channels=-1),
           LINEAR, "ImageNet 128x128 class-conditional ADM", "128x128_diffusion.pt", 421.5),
    Preset("imagenet256-cond", _adm(256, 256),
           LINEAR, "ImageNet 256x256 class-conditional ADM", "256x256_diffusion.pt", 553.8),
    Preset("imagenet256-uncond", _adm(256, 256, num_classes=None),
           LINEAR, "ImageNet 256x256 unconditional ADM", "256x256_diffusion_uncond.pt", 552.8),
    Preset("imagenet512-cond", _adm(512, 256),
           LINEAR, "ImageNet 512x512 class-conditional ADM", "512x512_diffusion.pt", 559.0),
    Preset("upsample64-256", _upsampler(256, 64, (32, 16, 8), -1),
           LINEAR, "ImageNet 64->256 upsampler (ADM-U)", "64_256_upsampler.pt", 311.8),
    Preset("upsample128-512", _upsampler(512, 128, (32, 16), 64),
           LINEAR, "ImageNet 128->512 upsampler (ADM-U)", "128_512_upsampler.pt", 308.8),
    Preset("lsun256", _adm(256, 256, num_classes=None, dropout=0.1),
           LINEAR, "LSUN bedroom/cat/horse 256x256 ADM", "lsun_bedroom.pt", 552.8),
    Preset("imagenet64-classifier", _classifier(64, depth=4),
           LINEAR, "ImageNet 64x64 noisy classifier", "64x64_classifier.pt", 65.4),
    Preset("imagenet128-classifier", _classifier(128),
           LINEAR, "ImageNet 128x128 noisy classifier", "128x128_classifier.pt", 42.6),
    Preset("imagenet256-classifier", _classifier(256),
           LINEAR, "ImageNet 256x256 noisy classifier", "256x256_classifier.pt", 54.1),
    Preset("imagenet512-classifier", _classifier(512),
           LINEAR, "ImageNet 512x512 noisy classifier", "512x512_classifier.pt", 54.4),
]

# Bundled Fashion-MNIST stack (trained by admrt.training; weights in admrt/bundled/):
# a 16x16 class-conditional base, its noisy classifier, and a 16->32 upsampler, mirroring
# the paper's ADM-G (64x64) + ADM-U (64->256) cascade at a size that trains in minutes.
_BUNDLED = [
    # 3.97M + 0.58M + 1.38M parameters = 23.7 MB of fp32 weights in all (the budget is 25 MB).
    Preset("fashion16-cond", ModelConfig(
        kind="unet", image_size=16, in_channels=1, model_channels=64, out_channels=2,
        num_res_blocks=1, attention_resolutions=(8, 4), channel_mult=(1, 1, 2), num_classes=10,
        num_head_channels=32, dropout=0.1), COSINE, "Fashion-MNIST 16x16 class-conditional base"),
    Preset("fashion16-classifier", ModelConfig(
        kind="classifier", image_size=16, in_channels=1, model_channels=32, out_channels=10,
        num_res_blocks=1, attention_resolutions=(8, 4), channel_mult=(1, 2, 2),
        num_head_channels=32, pool="attention"), COSINE, "Fashion-MNIST 16x16 noisy classifier"),
    Preset("fashion-upsample16-32", ModelConfig(
        kind="superres", image_size=32, low_res_size=16, in_channels=1, model_channels=32,
        out_channels=2, num_res_blocks=2, attention_resolutions=(8,), channel_mult=(1, 1, 2),
        num_classes=10, num_head_channels=32), LINEAR, "Fashion-MNIST 16->32 upsampler"),
]

# Tiny configs for tests (CPU, milliseconds per forward).
_TINY = [
    Preset("tiny-cond", ModelConfig(
        kind="unet", image_size=16, model_channels=32, out_channels=6, num_res_blocks=1,
        attention_resolutions=(8,), channel_mult=(1, 2), num_classes=10, num_head_channels=16),
        LINEAR, "tiny class-conditional UNet for tests"),
    Preset("tiny-uncond", ModelConfig(
        kind="unet", image_size=16, model_channels=32, out_channels=3, num_res_blocks=1,
        attention_resolutions=(8,), channel_mult=(1, 2), num_heads=2, use_scale_shift_norm=False,
        resblock_updown=False), LINEAR, "tiny unconditional UNet (fixed sigma) for tests"),
    Preset("tiny-classifier", ModelConfig(
        kind="classifier", image_size=16, model_channels=32, out_channels=10, num_res_blocks=1,
        attention_resolutions=(8,), channel_mult=(1, 2), num_head_channels=16, pool="attention"),
        LINEAR, "tiny noisy classifier for tests"),
    Preset("tiny-upsample", ModelConfig(
        kind="superres", image_size=16, low_res_size=8, model_channels=32, out_channels=6,
        num_res_blocks=1, attention_resolutions=(8,), channel_mult=(1, 2), num_classes=10,
        num_head_channels=16), LINEAR, "tiny upsampler for tests"),
]

PRESETS: dict[str, Preset] = {p.name: p for p in _RELEASED + _BUNDLED + _TINY}


def get_preset(name: str) -> Preset:
    """The preset called `name`; a clear error listing the known names otherwise."""
    if isinstance(name, Preset):
        return name
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"preset={name!r}: unknown preset; expected one of {sorted(PRESETS)}") from None
