"""The Engine's compiled backends, which export provides: "aoti", "onnxruntime", "openvino", "tensorrt".

Importing this module registers them with admrt.engine.register_backend; admrt.engine.backends
imports it (its PROVIDERS) the first time one of these names is asked for, so
`admrt.Engine(model, backend="onnxruntime")` works right after `import admrt`. The dependency
points one way: export builds on engine, engine names this module only as a string.

- "aoti": each unit exported with a dynamic batch and compiled with AOTInductor (admrt.export.aoti)
  when the Engine is built (a minute per unit on 2 CPU cores, once: the .pt2 is kept in the compile
  cache, admrt.engine.cache), then run by the core as a C++ unit with no Python in
  the loop; a package exported once is loaded with `Engine.from_package` instead. Inductor's
  default mode captures no CUDA graphs of its own, so the core's whole-step graph holds the
  compiled kernels.
- "onnxruntime": each unit exported to ONNX (admrt.export.onnx; the checked file kept in the compile
  cache) and run in an onnxruntime session, its buffers bound to the core's by pointer.
- "openvino" (CPU): the same checked ONNX file compiled by OpenVINO in fp32; the fastest of them
  per step at full-size ADM-64 on 2 CPU cores (bench/results/fast_default_cpu).
- "tensorrt": TensorRT engines built from that ONNX (admrt.export.tensorrt; needs TensorRT and a GPU).
None of the last three runs inside the core's CUDA-graph capture (they allocate and pick streams
on their own terms).
"""
from __future__ import annotations

from pathlib import Path

from admrt.engine.backends import load_aoti_denoiser, load_aoti_gradient, register_backend
from admrt.engine.cache import CompileCache, describe, unit_fields
from admrt.models.units import ClassifierGradient, device_of

AOTI_MAX_BATCH = 1024  # the batch bound of units compiled by the "aoti" backend


def aoti_unit(unit, cache: CompileCache, load):
    """`unit` (a Denoiser or ClassifierGradient whose info the Engine fitted to its stack) compiled
    to a .pt2 with a dynamic batch up to AOTI_MAX_BATCH (once per cache key), loaded by
    `load(path, device)`."""
    from .aoti import compile_unit
    from .stack import example_inputs, low_res_size

    device = device_of(unit)

    def build(folder: Path) -> dict:
        example = example_inputs(unit.info, 2, device, low_res_size(unit.info))
        traced = unit.graph(*example, dynamic_batch=True) if isinstance(unit, ClassifierGradient) else unit
        export_s, compile_s = compile_unit(traced, example, folder / "unit.pt2", AOTI_MAX_BATCH)
        return {"export_s": round(export_s, 2), "aoti_compile_s": round(compile_s, 2)}

    what, params = describe(unit)
    fields = {**unit_fields(unit), "max_batch": AOTI_MAX_BATCH}
    return cache.get_or_build("aoti", fields, build, lambda folder: load(str(folder / "unit.pt2"), str(device)),
                              what=what, size_hint=params)


def onnxruntime_unit(unit, cache: CompileCache):
    from .onnx import onnxruntime_unit as build
    return build(unit, cache)


def openvino_unit(unit, cache: CompileCache):
    from .onnx import openvino_unit as build
    return build(unit, cache)


def tensorrt_denoiser(unit):
    from .tensorrt import tensorrt_denoiser as build
    return build(unit)


def tensorrt_gradient(unit):
    from .tensorrt import tensorrt_gradient as build
    return build(unit)


register_backend("aoti", lambda unit, cache: aoti_unit(unit, cache, load_aoti_denoiser),
                 lambda unit, cache: aoti_unit(unit, cache, load_aoti_gradient), cached=True)
register_backend("onnxruntime", onnxruntime_unit, onnxruntime_unit, capturable=False, cached=True)
register_backend("openvino", openvino_unit, openvino_unit, capturable=False, cached=True)
register_backend("tensorrt", tensorrt_denoiser, tensorrt_gradient, capturable=False)
