"""Backends: how the Engine runs the two units of admrt.models.units. A backend turns a
`Denoiser` into the callable the C++ core calls, `fn(x_t, t, y, low_res | None) -> out`, and a
`ClassifierGradient` into `grad(x_t, t, y) -> grad_x log p(y | x_t)` (engine/csrc/sampler.h).

The engine's own: "eager" runs the modules as they are; "compile" runs them through
torch.compile(fullgraph=True) (the gradient as its make_fx graph of forward and backward, traced
at the first call of each shape).

The compiled ones, "aoti", "onnxruntime" and "tensorrt", are admrt.export's: its module
admrt.export.backends registers them with `register_backend` (engine never imports export).
PROVIDERS names that module for each of them, and `get_backend` imports it the first time such a
name is asked for, as an entry point is loaded, so `admrt.Engine(model, backend="onnxruntime")`
works right after `import admrt`, with no import of admrt.export by the user. ("aoti" exports each
unit with a dynamic batch, compiles it with AOTInductor when the Engine is built, and the core runs
the C++ units loaded by `load_aoti_denoiser` / `load_aoti_gradient`; "onnxruntime" runs each unit's
ONNX in an onnxruntime session; "tensorrt" builds TensorRT engines from that ONNX.) Others register
with `register_backend`; an unknown name is an error listing what is available.

"auto", the default, is the backend measured fastest for the device (choose_backend; the rule's
numbers: bench/results/fast_default_cpu). The compiled ones keep what they compile in the
persistent compile cache (admrt.engine.cache), so only the first run on a machine pays for it.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from admrt.models.units import ClassifierGradient, Denoiser

DenoiserFn = Callable[..., torch.Tensor]
GradientFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Backend:
    denoiser: Callable[[Denoiser], DenoiserFn]
    classifier_gradient: Callable[[ClassifierGradient], GradientFn]
    capturable: bool = True   # whether its units can run inside the core's CUDA-graph capture
    cached: bool = False      # its callables take (unit, cache: CompileCache) and keep what they compile there


def _compile_denoiser(unit: Denoiser) -> DenoiserFn:
    return torch.compile(unit, fullgraph=True, dynamic=False)


class _CompiledGradient:
    """ClassifierGradient.graph() compiled with fullgraph=True, one per input shape (the core
    calls it with one fixed batch per context)."""

    def __init__(self, unit: ClassifierGradient):
        self.unit = unit
        self.compiled: dict[tuple, Callable] = {}

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        key = (tuple(x_t.shape), x_t.device)
        fn = self.compiled.get(key)
        if fn is None:
            fn = torch.compile(self.unit.graph(x_t, t, y), fullgraph=True, dynamic=False)
            self.compiled[key] = fn
        return fn(x_t, t, y)


_BACKENDS: dict[str, Backend] = {
    "eager": Backend(denoiser=lambda unit: unit, classifier_gradient=lambda unit: unit),
    "compile": Backend(denoiser=_compile_denoiser, classifier_gradient=_CompiledGradient),
}
# Built-in backends that another admrt package provides: name -> the module whose import registers
# it (with register_backend), imported by get_backend the first time the name is asked for.
PROVIDERS = {"aoti": "admrt.export.backends", "onnxruntime": "admrt.export.backends",
             "openvino": "admrt.export.backends", "tensorrt": "admrt.export.backends"}


def register_backend(name: str, denoiser: Callable[[Denoiser], DenoiserFn],
                     classifier_gradient: Callable[[ClassifierGradient], GradientFn], capturable: bool = True,
                     cached: bool = False) -> None:
    """Make `Engine(..., backend=name)` run `denoiser(unit)` and `classifier_gradient(unit)`;
    capturable=False: the core runs its steps uncaptured on CUDA; cached=True: they are called as
    (unit, cache) with the Engine's CompileCache (admrt.engine.cache)."""
    if name == AUTO:
        raise ValueError(f"backend name {AUTO!r} is reserved for the automatic choice")
    _BACKENDS[name] = Backend(denoiser, classifier_gradient, capturable, cached)


def backend_names() -> list[str]:
    """Every backend name the Engine takes: "auto", the registered ones and the PROVIDERS'."""
    return [AUTO] + sorted(set(_BACKENDS) | set(PROVIDERS))


def get_backend(name: str) -> Backend:
    if not isinstance(name, str):
        raise ValueError(f"backend={name!r}: expected one of {backend_names()}")
    if name not in _BACKENDS and name in PROVIDERS:
        importlib.import_module(PROVIDERS[name])   # registers it
    if name not in _BACKENDS:
        raise ValueError(f"backend={name!r}: expected one of {backend_names()} "
                         "(or a name registered with admrt.engine.register_backend)")
    return _BACKENDS[name]


# -- backend="auto" ----------------------------------------------------------------------------------

AUTO = "auto"


# CPU: at or above this many parameters in the base model, "auto" takes the ONNX runtimes. Measured
# (bench/results/fast_default_cpu): at the bundled models (4.0M parameters) aoti is the fastest per
# step at batch 1 and 16; at full-size ADM-64 (296M) OpenVINO then onnxruntime are, and aoti is
# slower than eager. Where between the two the order turns was not measured: 50M is a round number
# between them.
LARGE_MODEL_PARAMS = 50_000_000


def choose_backend(device: torch.device, modules: Sequence[Optional[nn.Module]]) -> tuple[str, Optional[str]]:
    """backend="auto": (the backend to run, why it is not the rule's first choice, or None).

    The rule, from the committed benchmark (bench/results/fast_default_cpu, bench/README.md):
    - CUDA: "eager", whose steps the core captures as whole-step CUDA graphs (no GPU run has yet
      compared the compiled backends there);
    - CPU, a base model under LARGE_MODEL_PARAMS: "aoti", the units compiled by AOTInductor and run
      by the core with no Python in the loop (needs only torch and a C++ compiler; without one:
      "eager");
    - CPU, a larger one: "openvino" if installed, else "onnxruntime" if installed (both run the same
      checked ONNX files), else "eager" (saying what to install);
    - a guided-diffusion module (not an admrt model) runs "eager": its networks do not trace with a
      dynamic batch (load its weights with admrt.load_model(path, preset=...) to compile it).
    The compiled backends compile once per machine into the compile cache (admrt.engine.cache).
    """
    import importlib.util

    if device.type != "cpu":
        return "eager", None
    foreign = [type(m).__name__ for m in modules if m is not None and getattr(m, "config", None) is None]
    if foreign:
        return "eager", (f"{', '.join(foreign)} is not an admrt model, which the compiled backends need; load its "
                         "weights with admrt.load_model(path, preset=...) to compile it")
    params = sum(p.numel() for p in modules[0].parameters())
    if params >= LARGE_MODEL_PARAMS:
        export = ("onnx", "onnxscript", "onnxruntime")   # the export and its check (admrt.export.onnx)
        for name, needs in (("openvino", export + ("openvino",)), ("onnxruntime", export)):
            if all(importlib.util.find_spec(m) is not None for m in needs):
                return name, None
        return "eager", (f"a model of {params / 1e6:.0f}M parameters runs fastest on CPU in OpenVINO or onnxruntime "
                         "(bench/results/fast_default_cpu), not installed here: pip install onnx onnxscript "
                         "onnxruntime openvino")
    if not _cpp_compiler():
        return "eager", "AOTInductor needs a C++ compiler (c++, g++ or clang++ on PATH, or $CXX) and none was found"
    return "aoti", None


def _cpp_compiler() -> Optional[str]:
    import shutil
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    return next((c for c in candidates if shutil.which(c)), None)


# -- the C++ core's loaders of compiled units (the "aoti" backend hands its .pt2 files to them) --

def load_aoti_denoiser(path: str, device: str):
    """An AOTInductor-compiled Denoiser (.pt2) as the core's C++ unit, run with no Python."""
    from admrt import core
    return core.aoti_denoiser(path, device)


def load_aoti_gradient(path: str, device: str):
    """An AOTInductor-compiled ClassifierGradient graph (.pt2) as the core's C++ unit."""
    from admrt import core
    return core.aoti_gradient(path, device)


def load_package(folder: str, device: str):
    """An exported package folder (admrt export aoti) as the C++ runtime loads it (engine/csrc/
    admrt.h's Stack: manifest, tables and compiled units; `run(role, inputs)` runs one unit)."""
    from admrt import core
    return core.Stack.load_package(folder, device)
