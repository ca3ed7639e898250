"""admrt.engine: the Engine API, the two compiled units (Denoiser, ClassifierGradient), their
backends, and the C++ sampling core (_core)."""
from .backends import backend_names, register_backend
from .engine import Engine, SampleResult
from .modules import ClassifierGradient, Denoiser, ModelInfo

__all__ = ["Engine", "SampleResult", "Denoiser", "ClassifierGradient", "ModelInfo", "register_backend",
           "backend_names"]
