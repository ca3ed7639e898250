"""The Engine's compiled backends, which export provides: "aoti", "onnxruntime", "tensorrt".

Importing this module registers them with admrt.engine.register_backend; admrt.engine.backends
imports it (its PROVIDERS) the first time one of these names is asked for, so
`admrt.Engine(model, backend="onnxruntime")` works right after `import admrt`. The dependency
points one way: export builds on engine, engine names this module only as a string.

- "aoti": each unit exported with a dynamic batch and compiled with AOTInductor (admrt.export.aoti)
  when the Engine is built (minutes on CPU), then run by the core as a C++ unit with no Python in
  the loop; a package exported once is loaded with `Engine.from_package` instead. Inductor's
  default mode captures no CUDA graphs of its own, so the core's whole-step graph holds the
  compiled kernels.
- "onnxruntime": each unit exported to ONNX (admrt.export.onnx) and run in an onnxruntime session,
  its buffers bound to the core's by pointer.
- "tensorrt": TensorRT engines built from that ONNX (admrt.export.tensorrt; needs TensorRT and a GPU).
Neither of the last two runs inside the core's CUDA-graph capture (they allocate and pick streams
on their own terms).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from admrt.engine.backends import load_aoti_denoiser, load_aoti_gradient, register_backend
from admrt.models.units import ClassifierGradient, device_of

AOTI_MAX_BATCH = 1024  # the batch bound of units compiled by the "aoti" backend


def aoti_unit(unit, load):
    """`unit` (a Denoiser or ClassifierGradient whose info the Engine fitted to its stack) compiled
    to a temporary .pt2 with a dynamic batch up to AOTI_MAX_BATCH, loaded by `load(path, device)`."""
    from .aoti import compile_unit
    from .stack import example_inputs, low_res_size

    info = unit.info
    device = device_of(unit)
    example = example_inputs(info, 2, device, low_res_size(info))
    traced = unit.graph(*example, dynamic_batch=True) if isinstance(unit, ClassifierGradient) else unit
    with tempfile.TemporaryDirectory(prefix="admrt-aoti-") as tmp:
        path = Path(tmp) / "unit.pt2"
        compile_unit(traced, example, path, AOTI_MAX_BATCH)
        return load(str(path), str(device))


def onnxruntime_unit(unit):
    from .onnx import onnxruntime_unit as build
    return build(unit)


def tensorrt_denoiser(unit):
    from .tensorrt import tensorrt_denoiser as build
    return build(unit)


def tensorrt_gradient(unit):
    from .tensorrt import tensorrt_gradient as build
    return build(unit)


register_backend("aoti", lambda unit: aoti_unit(unit, load_aoti_denoiser),
                 lambda unit: aoti_unit(unit, load_aoti_gradient))
register_backend("onnxruntime", onnxruntime_unit, onnxruntime_unit, capturable=False)
register_backend("tensorrt", tensorrt_denoiser, tensorrt_gradient, capturable=False)
