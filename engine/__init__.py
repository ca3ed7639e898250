"""admrt.engine: the Engine API, the backends that run the two units (Denoiser,
ClassifierGradient: admrt.models.units, re-exported here); the C++ core it drives is admrt.core.

cmake_prefix_path: where libadmrt, its headers, `admrt-sample` and the CMake config for
`find_package(admrt)` are installed (pass it in CMAKE_PREFIX_PATH, as torch.utils.cmake_prefix_path).
"""
from pathlib import Path as _Path

from admrt.models.units import ClassifierGradient, Denoiser, ModelInfo

from .backends import backend_names, register_backend
from .engine import Engine, SampleResult

cmake_prefix_path = str(_Path(__file__).resolve().parent / "cpp")
sample_program = str(_Path(cmake_prefix_path) / "bin" / "admrt-sample")

__all__ = ["Engine", "SampleResult", "Denoiser", "ClassifierGradient", "ModelInfo", "register_backend",
           "backend_names"]
