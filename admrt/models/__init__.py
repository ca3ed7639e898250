"""The ADM networks, key-for-key compatible with guided-diffusion's released checkpoints."""
from .unet import EncoderUNetModel, SuperResModel, UNetModel, build_model, resolve_dtype

__all__ = ["UNetModel", "SuperResModel", "EncoderUNetModel", "build_model", "resolve_dtype"]
