"""admrt.engine: the Engine API, its backends, and the C++ sampling core (_core)."""
from .backends import ModelInfo, backend_names, register_backend
from .engine import Engine, SampleResult

__all__ = ["Engine", "SampleResult", "ModelInfo", "register_backend", "backend_names"]
