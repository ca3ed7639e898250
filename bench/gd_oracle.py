"""guided-diffusion (PyPI guided-diffusion-sdk, import name `guided_diffusion`) as an oracle.

Builds the reference's own modules from admrt configs, and runs its own sampling loops, so that
tests and benchmarks can put admrt side by side with it: same weights, same noise.
Nothing here is used for sampling with admrt itself, and it is not installed: the benchmarks
(bench/measure.py, bench/profile_step.py) import it from bench/, the tests (tests/gd_reference.py
and those comparing loops) from here too (tests/conftest.py puts bench/ on sys.path).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from admrt.config import ModelConfig, Preset
from admrt.diffusion import default_variance


def _gd():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            from guided_diffusion import script_util, unet
    except ImportError as exc:
        raise ImportError("the reference needs guided-diffusion-sdk: pip install guided-diffusion-sdk") from exc
    return script_util, unet


def reference_model(config: ModelConfig, use_fp16: bool = False) -> torch.nn.Module:
    """guided_diffusion.unet's UNetModel / SuperResModel / EncoderUNetModel for an admrt config."""
    _, unet = _gd()
    c = config
    kwargs = dict(
        image_size=c.image_size, in_channels=c.in_channels, model_channels=c.model_channels,
        out_channels=c.out_channels, num_res_blocks=c.num_res_blocks,
        attention_resolutions=tuple(c.image_size // r for r in c.attention_resolutions),
        dropout=c.dropout, channel_mult=c.channel_mult, conv_resample=c.conv_resample,
        use_fp16=use_fp16, num_heads=c.num_heads, num_head_channels=c.num_head_channels,
        num_heads_upsample=c.num_heads_upsample, use_scale_shift_norm=c.use_scale_shift_norm,
        resblock_updown=c.resblock_updown, use_new_attention_order=c.use_new_attention_order,
    )
    if c.kind == "classifier":
        return unet.EncoderUNetModel(pool=c.pool, **kwargs)
    cls = unet.SuperResModel if c.kind == "superres" else unet.UNetModel
    return cls(num_classes=c.num_classes, **kwargs)


def set_reference_dtype(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """The reference's mixed precision (its convert_to_fp16: the body's convolutions), for any dtype."""
    model.dtype = dtype
    parts = [model.input_blocks, model.middle_block] + (
        [model.output_blocks] if hasattr(model, "output_blocks") else [])
    for part in parts:
        for layer in part.modules():
            if isinstance(layer, (torch.nn.Conv1d, torch.nn.Conv2d)):
                layer.to(dtype)


def reference_sample(model, classifier, preset: Preset, steps: str, guidance: float, y, shape, device,
                     seed: int | None, variance: str | None = None, method: str | None = None,
                     low_res: torch.Tensor | None = None) -> torch.Tensor:
    """The reference's ddim_sample_loop ("ddimN", or method="ddim": its use_ddim) or p_sample_loop
    with classifier_sample.py's cond_fn and model_fn, after torch.manual_seed(seed) (seed None:
    the global generator as it is), on the process of preset.diffusion (predict_xstart,
    rescale_timesteps and sigma_small included). variance: "learned_range" | "fixed_large" |
    "fixed_small"; None: learned_range for a learned-sigma model, else as sigma_small says.
    low_res: an upsampler's conditioning images in [-1, 1] (super_res_sample.py's model_kwargs).
    Returns the float sample (N, C, H, W) in [-1, 1]."""
    script_util, _ = _gd()
    d = preset.diffusion
    variance = variance or default_variance(preset.model.learn_sigma, d)
    diffusion = script_util.create_gaussian_diffusion(
        steps=d.steps, learn_sigma=variance == "learned_range", sigma_small=variance == "fixed_small",
        noise_schedule=d.noise_schedule, predict_xstart=d.predict_xstart,
        rescale_timesteps=d.rescale_timesteps, timestep_respacing=steps)

    def cond_fn(x, t, y=None):
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t), dim=-1)
            selected = log_probs[range(len(log_probs)), y.view(-1)]
            return torch.autograd.grad(selected.sum(), x_in)[0] * guidance

    class_cond = getattr(model, "num_classes", None) is not None

    def model_fn(x, t, y=None, low_res=None):
        if low_res is not None:   # SuperResModel (super_res_sample.py): conditioned on low_res
            return model(x, t, low_res=low_res, y=y if class_cond else None)
        return model(x, t, y if class_cond else None)

    use_ddim = steps.startswith("ddim") if method is None else method == "ddim"
    loop = diffusion.ddim_sample_loop if use_ddim else diffusion.p_sample_loop
    if seed is not None:
        torch.manual_seed(seed)
    kwargs = {k: v for k, v in (("y", y), ("low_res", low_res)) if v is not None}
    return loop(model_fn, shape, clip_denoised=True, model_kwargs=kwargs,
                cond_fn=cond_fn if (classifier is not None and guidance) else None, device=device)


def reference_cascade(model, classifier, upsampler, preset: Preset, up_preset: Preset, steps: str, up_steps: str,
                      guidance: float, y, shape, up_shape, device, seed: int) -> torch.Tensor:
    """ADM-G then ADM-U as the reference scripts run them: classifier_sample.py's loop, its samples
    quantised to uint8 and read back in [-1, 1] as super_res_sample.py reads its low-res file,
    then the upsampler's loop (unguided); one torch.manual_seed(seed) before both. Returns the
    upsampler's float sample."""
    base = reference_sample(model, classifier, preset, steps, guidance, y, shape, device, seed)
    low_res = to_uint8_nhwc(base).permute(0, 3, 1, 2).float() / 127.5 - 1
    return reference_sample(upsampler, None, up_preset, up_steps, 0.0, y, up_shape, device, None, low_res=low_res)


def to_uint8_nhwc(sample: torch.Tensor) -> torch.Tensor:
    """The reference scripts' quantisation: ((x + 1) * 127.5).clamp(0, 255).to(uint8), NHWC."""
    return ((sample + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
