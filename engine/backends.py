"""Backends: how the Engine runs the two units of admrt.engine.modules. A backend turns a
`Denoiser` into the callable the C++ core calls, `fn(x_t, t, y, low_res | None) -> out`, and a
`ClassifierGradient` into `grad(x_t, t, y) -> grad_x log p(y | x_t)` (engine/csrc/sampler.h).

"eager" runs the modules as they are; "compile" runs them through torch.compile(fullgraph=True)
(the gradient as its make_fx graph of forward and backward, traced at the first call of each
shape). "aoti" exports each unit with a dynamic batch and compiles it with AOTInductor when the
Engine is built (minutes on CPU; admrt.export.aoti), and the core runs the C++ units with no
Python in the loop; a package exported once is loaded with `Engine.from_package` instead. Inductor's default mode captures no CUDA graphs of its own, so the core's whole-step
graph holds the compiled kernels. "onnxruntime" exports each unit to ONNX (admrt.export.onnx)
and runs it in an onnxruntime session, its buffers bound to the core's by pointer; "tensorrt"
builds TensorRT engines from that ONNX (admrt.export.tensorrt; needs TensorRT and a GPU). Neither
runs inside the core's CUDA-graph capture. Others register with `register_backend`; an unknown
name is an error listing what is registered.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .modules import ClassifierGradient, Denoiser, device_of

DenoiserFn = Callable[..., torch.Tensor]
GradientFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Backend:
    denoiser: Callable[[Denoiser], DenoiserFn]
    classifier_gradient: Callable[[ClassifierGradient], GradientFn]
    capturable: bool = True   # whether its units can run inside the core's CUDA-graph capture


def _compile_denoiser(unit: Denoiser) -> DenoiserFn:
    return torch.compile(unit, fullgraph=True, dynamic=False)


def _load_denoiser(path: str, device: str):
    from . import _core
    return _core.aoti_denoiser(path, device)


def _load_gradient(path: str, device: str):
    from . import _core
    return _core.aoti_gradient(path, device)


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


AOTI_MAX_BATCH = 1024  # the batch bound of units compiled by the "aoti" backend


def _aoti_unit(unit, load):
    import tempfile
    from pathlib import Path

    from admrt.export.aoti import compile_unit
    from admrt.export.stack import example_inputs, low_res_size

    info = unit.info
    device = device_of(unit)
    example = example_inputs(info, 2, device, low_res_size(info))   # the Engine fitted the unit's info
    traced = unit.graph(*example, dynamic_batch=True) if isinstance(unit, ClassifierGradient) else unit
    with tempfile.TemporaryDirectory(prefix="admrt-aoti-") as tmp:
        path = Path(tmp) / "unit.pt2"
        compile_unit(traced, example, path, AOTI_MAX_BATCH)
        return load(str(path), str(device))


def _onnxruntime_unit(unit):
    from admrt.export.onnx import onnxruntime_unit
    return onnxruntime_unit(unit)


def _tensorrt_denoiser(unit):
    from admrt.export.tensorrt import tensorrt_denoiser
    return tensorrt_denoiser(unit)


def _tensorrt_gradient(unit):
    from admrt.export.tensorrt import tensorrt_gradient
    return tensorrt_gradient(unit)


_BACKENDS: dict[str, Backend] = {
    "eager": Backend(denoiser=lambda unit: unit, classifier_gradient=lambda unit: unit),
    "compile": Backend(denoiser=_compile_denoiser, classifier_gradient=_CompiledGradient),
    "aoti": Backend(denoiser=lambda unit: _aoti_unit(unit, _load_denoiser),
                    classifier_gradient=lambda unit: _aoti_unit(unit, _load_gradient)),
    # ONNX Runtime runs its kernels on its own terms (allocations, streams): never captured
    "onnxruntime": Backend(denoiser=_onnxruntime_unit, classifier_gradient=_onnxruntime_unit, capturable=False),
    "tensorrt": Backend(denoiser=_tensorrt_denoiser, classifier_gradient=_tensorrt_gradient, capturable=False),
}


def register_backend(name: str, denoiser: Callable[[Denoiser], DenoiserFn],
                     classifier_gradient: Callable[[ClassifierGradient], GradientFn], capturable: bool = True) -> None:
    """Make `Engine(..., backend=name)` run `denoiser(unit)` and `classifier_gradient(unit)`;
    capturable=False: the core runs its steps uncaptured on CUDA."""
    _BACKENDS[name] = Backend(denoiser, classifier_gradient, capturable)


def backend_names() -> list[str]:
    return sorted(_BACKENDS)


def get_backend(name: str) -> Backend:
    if name not in _BACKENDS:
        raise ValueError(f"backend={name!r}: expected one of {backend_names()} "
                         "(compiled packages register theirs through admrt.export)")
    return _BACKENDS[name]
