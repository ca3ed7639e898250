"""The ADM networks, key-for-key compatible with guided-diffusion's released checkpoints, and the
two units every backend compiles from them (units.py: Denoiser, ClassifierGradient, ModelInfo);
guided-diffusion's own networks are taken through guided_diffusion.py."""
from .unet import EncoderUNetModel, SuperResModel, UNetModel, build_model, resolve_dtype
from .units import ClassifierGradient, Denoiser, ModelInfo

__all__ = ["UNetModel", "SuperResModel", "EncoderUNetModel", "build_model", "resolve_dtype",
           "Denoiser", "ClassifierGradient", "ModelInfo"]
