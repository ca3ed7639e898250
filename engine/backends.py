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
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch

from admrt.models.units import ClassifierGradient, Denoiser

DenoiserFn = Callable[..., torch.Tensor]
GradientFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Backend:
    denoiser: Callable[[Denoiser], DenoiserFn]
    classifier_gradient: Callable[[ClassifierGradient], GradientFn]
    capturable: bool = True   # whether its units can run inside the core's CUDA-graph capture


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
             "tensorrt": "admrt.export.backends"}


def register_backend(name: str, denoiser: Callable[[Denoiser], DenoiserFn],
                     classifier_gradient: Callable[[ClassifierGradient], GradientFn], capturable: bool = True) -> None:
    """Make `Engine(..., backend=name)` run `denoiser(unit)` and `classifier_gradient(unit)`;
    capturable=False: the core runs its steps uncaptured on CUDA."""
    _BACKENDS[name] = Backend(denoiser, classifier_gradient, capturable)


def backend_names() -> list[str]:
    """Every backend name `get_backend` takes: the registered ones and the PROVIDERS'."""
    return sorted(set(_BACKENDS) | set(PROVIDERS))


def get_backend(name: str) -> Backend:
    if name not in _BACKENDS and name in PROVIDERS:
        importlib.import_module(PROVIDERS[name])   # registers it
    if name not in _BACKENDS:
        raise ValueError(f"backend={name!r}: expected one of {backend_names()} "
                         "(or a name registered with admrt.engine.register_backend)")
    return _BACKENDS[name]


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
