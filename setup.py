"""Build and install admrt.

The card's top-level folders are subpackages of the single import root `admrt`
(engine/ -> admrt.engine, ...). The C++ sampling core (engine/csrc) is built by CMake against
the torch that is already installed: the pybind11 module `admrt.core`, and installed
under admrt/engine/cpp/ the Python-free side (libadmrt, its headers, the `admrt-sample` program
and the CMake config for `find_package(admrt)`; scripts/install.sh puts admrt-sample on PATH).
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: Path):
        super().__init__(name, sources=[])
        self.source_dir = str(source_dir)


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt; the module lands where setuptools expects it."""

    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11
        import torch

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = "Debug" if self.debug else "Release"
        args = [
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path};{pybind11.get_cmake_dir()}",
        ]
        args += _cuda_args(torch)
        gen = ["-G", "Ninja"] if _has_ninja() else []
        subprocess.run(["cmake", ext.source_dir, *gen, *args], cwd=build_dir, check=True)
        jobs = str(os.cpu_count() or 2)
        subprocess.run(["cmake", "--build", ".", "--config", cfg, "-j", jobs], cwd=build_dir, check=True)
        # Editable installs build in a temporary folder and link back only the module, so the C++
        # side is installed into the source tree (engine/cpp) there; into the built package otherwise.
        editable = getattr(self, "editable_mode", False) or self.inplace
        prefix = ROOT / "engine" / "cpp" if editable else out_dir / "engine" / "cpp"
        subprocess.run(["cmake", "--install", ".", "--config", cfg, "--prefix", str(prefix)], cwd=build_dir,
                       check=True, stdout=subprocess.DEVNULL)


def _cuda_args(torch) -> list[str]:
    """ADMRT_WITH_CUDA=ON for a CUDA build of torch (the seeded-noise kernel and graph capture).
    torch's own CMake config then needs a full CUDA toolkit (nvcc, headers, libraries): it is
    pointed at CUDA_HOME, and the architectures go through TORCH_CUDA_ARCH_LIST (torch's CMake
    overrides CMAKE_CUDA_ARCHITECTURES): those torch was built for, or ADMRT_CUDA_ARCH_LIST."""
    if torch.version.cuda is None:
        return ["-DADMRT_WITH_CUDA=OFF"]
    from torch.utils.cpp_extension import CUDA_HOME
    nvcc = Path(CUDA_HOME or "", "bin", "nvcc")
    if not CUDA_HOME or not nvcc.exists():
        raise RuntimeError(f"admrt: torch {torch.__version__} is a CUDA build, and building against it needs the "
                           f"CUDA toolkit (nvcc, headers, libraries) of CUDA {torch.version.cuda}; none was found "
                           f"(CUDA_HOME={CUDA_HOME}). Install it and set CUDA_HOME, or use a CPU build of torch.")
    archs = sorted({a[3:] for a in torch.cuda.get_arch_list() if a.startswith("sm_") and a[3:].isdigit()}, key=int)
    dotted = ";".join(f"{a[:-1]}.{a[-1]}" for a in archs) or "9.0"
    archs = os.environ.get("ADMRT_CUDA_ARCH_LIST", dotted)
    return ["-DADMRT_WITH_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCUDA_TOOLKIT_ROOT_DIR={CUDA_HOME}",
            f"-DCUDAToolkit_ROOT={CUDA_HOME}", f"-DTORCH_CUDA_ARCH_LIST={archs}"]


def _has_ninja() -> bool:
    try:
        subprocess.run(["ninja", "--version"], check=True, capture_output=True)
        return True
    except (OSError, subprocess.CalledProcessError):
        return False


setup(
    name="admrt",
    version="0.1.0",
    description="Compiled, GPU-fast sampling engine for ADM (guided diffusion) models",
    python_requires=">=3.10",
    packages=[
        "admrt",
        "admrt.models",
        "admrt.evaluation",
        "admrt.engine",
        "admrt.kernels",
        "admrt.export",
        "admrt.training",
    ],
    package_dir={
        "admrt": "admrt",
        "admrt.engine": "engine",
        "admrt.kernels": "kernels",
        "admrt.export": "export",
        "admrt.training": "training",
    },
    package_data={"admrt": ["bundled/*.safetensors", "bundled/*.json"]},
    ext_modules=[CMakeExtension("admrt.core", ROOT)],
    cmdclass={"build_ext": CMakeBuild},
    # starlette, uvicorn, prometheus-client: admrt serve (engine/serve.py). onnx, onnxscript, onnxruntime,
    # openvino: backend "auto" runs models of 50M parameters and more in OpenVINO on CPU (engine/backends.py).
    install_requires=["torch>=2.6", "numpy", "safetensors", "tqdm", "pillow", "starlette>=0.40", "uvicorn>=0.30",
                      "prometheus-client>=0.20", "onnx>=1.18", "onnxscript", "onnxruntime>=1.22", "openvino>=2025.0"],
    extras_require={
        "test": ["pytest", "pytest-benchmark>=5,<6", "guided-diffusion-sdk==1.0.0", "diffusers>=0.30", "scipy",
                 "triton>=3.6,<3.8; platform_system=='Linux'", "onnxruntime-extensions"],
        "export": ["onnxruntime-extensions"],
    },
    entry_points={"console_scripts": ["admrt=admrt.cli:main"]},
    zip_safe=False,
)
