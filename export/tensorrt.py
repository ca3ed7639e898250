"""TensorRT engines of admrt's ONNX exports (admrt.export.onnx), and the TensorRT backend's units.

Built on TensorRT's documented Python API (docs.nvidia.com/deeplearning/tensorrt, Python API:
Builder, OnnxParser, IBuilderConfig, Runtime, IExecutionContext), nothing else:
- `build_engine`: trt.OnnxParser into a network created with
  NetworkDefinitionCreationFlag.STRONGLY_TYPED (TensorRT 11 is always strongly typed and removed
  BuilderFlag.FP16: an fp16 engine comes from an ONNX whose body is fp16, as admrt exports it);
  one optimisation profile setting every dynamic input's batch to [min, opt, max] with the other
  dims from the ONNX; the timing cache loaded (config.create_timing_cache / set_timing_cache) and
  saved (serialize()); builder.build_serialized_network. Engines are cached under
  `engine_cache_key`: sha256 of the ONNX bytes (and external data), the TensorRT version, the GPU
  name and compute capability, the batch profile and the plugin set, so a cached engine is reused
  exactly when all of those match and a stale one is never loaded.
- `TensorRTUnit`: trt.Runtime.deserialize_cuda_engine, one execution context; a call sets each
  input's shape and address (set_input_shape, set_tensor_address), allocates the outputs with
  torch and runs execute_async_v3 on torch's current CUDA stream (no synchronisation).
- ONNX graphs with admrt's fused nodes (export with fused_ops=True) are rewritten into the AOT
  plugins of admrt.export.trt_plugins (use_plugins); plugins' kernels are embedded in the engine,
  so nothing is listed in config.plugins_to_serialize (that is for plugin libraries).
- `export_tensorrt`: one engine per .onnx file of an export folder, with a JSON manifest.
- `tensorrt_denoiser` / `tensorrt_gradient`: what the Engine's "tensorrt" backend calls.

TensorRT is imported inside the functions: this module imports without it, and every entry point
raises one RuntimeError (`require_tensorrt`) saying how to get it. Nothing here has run on a GPU
with TensorRT yet (none could be installed where it was written); the plain-Python parts are
tested (tests/export/test_tensorrt.py).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import onnx
import torch

from admrt.io import atomic_write, hash_file

from . import require_tensorrt
from .stack import staging_folder

log = logging.getLogger(__name__)

FORMAT = "admrt-tensorrt"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
BUILD_VERSION = 1          # bump when build_engine's settings change: part of the cache key
DEFAULT_MAX_BATCH = 32
ONNX_OPSET = 23
TIMING_CACHE = "timing.cache"


def default_cache_dir() -> Path:
    """tensorrt/ under admrt's one cache root (admrt.io.cache_root: $ADMRT_CACHE_DIR, else
    $XDG_CACHE_HOME/admrt, else ~/.cache/admrt)."""
    from admrt.io import cache_root
    return cache_root() / "tensorrt"


@dataclass(frozen=True)
class BatchProfile:
    """The batch range of the engine's optimisation profile: min <= opt <= max."""

    min: int
    opt: int
    max: int

    def __post_init__(self):
        for name in ("min", "opt", "max"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}_batch={value!r}: expected an int >= 1")
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"batch profile (min, opt, max)=({self.min}, {self.opt}, {self.max}): "
                             "expected min <= opt <= max")


def profile_shapes(inputs: dict[str, Sequence[int]], batch: BatchProfile) -> dict[str, tuple]:
    """Per dynamic input, its (min, opt, max) shapes: the batch (dim 0, -1 in `inputs`) over the
    profile, the other dims as given. Inputs without a dynamic dim need no entry."""
    shapes = {}
    for name, shape in inputs.items():
        shape = tuple(int(d) for d in shape)
        if all(d >= 0 for d in shape):
            continue
        if len(shape) == 0 or shape[0] >= 0 or any(d < 0 for d in shape[1:]):
            raise ValueError(f"input {name!r}: shape {shape}; expected only the batch (dimension 0) dynamic")
        rest = shape[1:]
        shapes[name] = tuple((b,) + rest for b in (batch.min, batch.opt, batch.max))
    return shapes


def _external_data_files(onnx_path: Path) -> list[Path]:
    model = onnx.load(str(onnx_path), load_external_data=False)
    files = set()
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            files.add(onnx_path.parent / onnx.external_data_helper.ExternalDataInfo(t).location)
    return sorted(files)


def engine_cache_key(onnx_path: str | os.PathLike, trt_version: str, gpu_name: str, *,
                     compute_capability: tuple[int, int], batch: BatchProfile, plugins: str = "") -> str:
    """sha256 (hex) over everything the engine depends on: the ONNX file and its external data,
    the TensorRT version, the GPU name and compute capability, the batch profile, the plugin set
    (`trt_plugins.plugin_fingerprint()`, "" without plugins) and BUILD_VERSION."""
    onnx_path = Path(onnx_path)
    header = {"build": BUILD_VERSION, "tensorrt": str(trt_version), "gpu": str(gpu_name),
              "compute_capability": [int(c) for c in compute_capability],
              "batch": [batch.min, batch.opt, batch.max], "plugins": plugins}
    h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for path in [onnx_path, *_external_data_files(onnx_path)]:
        h.update(path.name.encode())
        hash_file(path, h)
    return h.hexdigest()


def _engine_file(cache_dir: Path, onnx_path: Path, key: str) -> Path:
    return cache_dir / f"{onnx_path.stem}-{key}.engine"


@functools.lru_cache(maxsize=None)
def _logger():
    trt = require_tensorrt()
    return trt.Logger(trt.Logger.WARNING)


def _gpu() -> tuple[str, tuple[int, int]]:
    if not torch.cuda.is_available():
        raise RuntimeError("TensorRT needs a CUDA GPU: torch.cuda.is_available() is False")
    return torch.cuda.get_device_name(), torch.cuda.get_device_capability()


def _use_plugins(model: onnx.ModelProto, use_plugins: Optional[bool], onnx_path: Path) -> bool:
    from .trt_plugins import has_fused_nodes

    fused = has_fused_nodes(model)
    if use_plugins is None:
        return fused
    if fused and not use_plugins:
        raise ValueError(f"{onnx_path}: has admrt fused-op nodes, which TensorRT runs only as plugins; pass "
                         "use_plugins=True (or None), or export with fused_ops=False")
    return bool(use_plugins)


def build_engine(onnx_path: str | os.PathLike, *, min_batch: int = 1, opt_batch: Optional[int] = None,
                 max_batch: int = DEFAULT_MAX_BATCH, cache_dir: str | os.PathLike | None = None,
                 timing_cache_path: str | os.PathLike | None = None,
                 use_plugins: Optional[bool] = None) -> Path:
    """Build (or reuse from `cache_dir`) the engine of one ONNX file; returns its path.

    opt_batch: the batch TensorRT tunes for (default max_batch). timing_cache_path: default
    cache_dir/timing.cache. use_plugins: None = exactly when the graph has admrt fused-op nodes.
    """
    trt = require_tensorrt()
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"onnx_path={str(onnx_path)!r}: no such file")
    batch = BatchProfile(min_batch, max_batch if opt_batch is None else opt_batch, max_batch)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    timing_cache_path = Path(timing_cache_path) if timing_cache_path is not None else cache_dir / TIMING_CACHE
    gpu_name, capability = _gpu()
    model = onnx.load(str(onnx_path), load_external_data=False)
    plugins = _use_plugins(model, use_plugins, onnx_path)
    fingerprint = ""
    if plugins:
        from . import trt_plugins

        trt_plugins.register_plugins()
        fingerprint = trt_plugins.plugin_fingerprint()
    key = engine_cache_key(onnx_path, trt.__version__, gpu_name, compute_capability=capability, batch=batch,
                           plugins=fingerprint)
    engine_path = _engine_file(cache_dir, onnx_path, key)
    if engine_path.is_file():
        log.info("%s: reusing the cached engine %s", onnx_path.name, engine_path)
        return engine_path

    logger = _logger()
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if plugins:
        from .trt_plugins import rewrite_for_tensorrt

        ok = parser.parse(rewrite_for_tensorrt(model).SerializeToString(), str(onnx_path))
    else:
        ok = parser.parse_from_file(str(onnx_path))
    if not ok:
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{onnx_path}: the TensorRT ONNX parser failed: {errors}")

    config = builder.create_builder_config()
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    shapes = profile_shapes(inputs, batch)
    if shapes:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    cached = timing_cache_path.read_bytes() if timing_cache_path.is_file() else b""
    timing = config.create_timing_cache(cached)
    if not config.set_timing_cache(timing, False):   # made on another device or TensorRT version
        log.warning("%s: the timing cache %s does not match this GPU / TensorRT; starting a new one",
                    onnx_path.name, timing_cache_path)
        config.set_timing_cache(config.create_timing_cache(b""), False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"{onnx_path}: TensorRT could not build an engine (see the TensorRT log above)")
    timing_cache = bytes(config.get_timing_cache().serialize())
    atomic_write(timing_cache_path, lambda tmp: Path(tmp).write_bytes(timing_cache))
    atomic_write(engine_path, lambda tmp: Path(tmp).write_bytes(bytes(serialized)))
    log.info("%s: built %s (batch %s..%s, plugins: %s)", onnx_path.name, engine_path, batch.min, batch.max, plugins)
    return engine_path


_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64,
                 "INT32": torch.int32, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}


class TensorRTUnit:
    """A deserialized engine with one execution context, called like the unit it was built from:
    `unit(*tensors)` with CUDA tensors in `input_names` order (default: the engine's) returns the
    output (a tuple if there are several), computed on torch's current stream.

    input_names: the ONNX graph's inputs in call order; an input TensorRT dropped from the engine
    (unused by the graph) is accepted and ignored.
    """

    def __init__(self, engine: str | os.PathLike | bytes, *, input_names: Optional[Sequence[str]] = None):
        trt = require_tensorrt()
        _gpu()
        torch.cuda.init()   # TensorRT then runs in torch's (primary) CUDA context
        data = engine if isinstance(engine, (bytes, bytearray)) else Path(engine).read_bytes()
        self.runtime = trt.Runtime(_logger())
        self.engine = self.runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise RuntimeError(f"engine={engine if not isinstance(engine, (bytes, bytearray)) else '<bytes>'}: "
                               "TensorRT could not deserialize it (other TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.engine_inputs = [n for n in names if is_input[n]]
        self.outputs = [n for n in names if not is_input[n]]
        self.input_names = list(input_names) if input_names is not None else list(self.engine_inputs)
        missing = set(self.engine_inputs) - set(self.input_names)
        if missing:
            raise ValueError(f"input_names={self.input_names}: the engine's inputs {sorted(missing)} are missing")
        self.dtypes = {n: _TORCH_DTYPES[self.engine.get_tensor_dtype(n).name] for n in names}

    def __call__(self, *tensors: Optional[torch.Tensor]):
        while tensors and tensors[-1] is None:   # the core passes low_res=None to a base denoiser
            tensors = tensors[:-1]
        if len(tensors) != len(self.input_names):
            raise TypeError(f"TensorRTUnit: got {len(tensors)} tensors, expected {len(self.input_names)} "
                            f"({', '.join(self.input_names)})")
        device = tensors[0].device
        keep = []
        for name, t in zip(self.input_names, tensors):
            if name not in self.engine_inputs:
                continue
            if t.device != device or device.type != "cuda":
                raise ValueError(f"input {name!r}: on {t.device}; expected every input on one CUDA device")
            if t.dtype != self.dtypes[name]:
                raise TypeError(f"input {name!r}: dtype {t.dtype}; the engine expects {self.dtypes[name]}")
            t = t.contiguous()
            keep.append(t)
            if not self.context.set_input_shape(name, tuple(t.shape)):
                raise ValueError(f"input {name!r}: shape {tuple(t.shape)} is outside the engine's profile")
            self.context.set_tensor_address(name, t.data_ptr())
        outs = []
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            out = torch.empty(shape, dtype=self.dtypes[name], device=device)
            self.context.set_tensor_address(name, out.data_ptr())
            outs.append(out)
        with torch.cuda.device(device):
            stream = torch.cuda.current_stream(device)
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRTUnit: execute_async_v3 failed (see the TensorRT log)")
        return outs[0] if len(outs) == 1 else tuple(outs)


def onnx_entry(onnx_path: str | os.PathLike) -> dict:
    """The manifest entry of one ONNX file: its inputs and outputs (name, elem type, shape with the
    batch symbol as -1) and its metadata_props["admrt"] (JSON), if any."""
    model = onnx.load(str(onnx_path), load_external_data=False)

    def io(v):
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                "shape": dims}

    meta = {p.key: p.value for p in model.metadata_props}
    entry = {"inputs": [io(v) for v in model.graph.input], "outputs": [io(v) for v in model.graph.output]}
    if "admrt" in meta:
        entry["admrt"] = json.loads(meta["admrt"])
    return entry


def export_tensorrt(onnx_folder: str | os.PathLike, out: str | os.PathLike, *, min_batch: int = 1,
                    opt_batch: Optional[int] = None, max_batch: int = DEFAULT_MAX_BATCH,
                    use_plugins: Optional[bool] = None, cache_dir: str | os.PathLike | None = None,
                    overwrite: bool = False) -> Path:
    """An engine per .onnx file of `onnx_folder` (an `admrt export onnx` folder) into the new folder
    `out`: <name>.engine and manifest.json (format, TensorRT version, GPU, batch profile, and per
    model its engine file, cache key, inputs, outputs and admrt metadata). Written into a
    temporary folder beside `out` and renamed into place; an existing `out` is an error unless
    overwrite."""
    trt = require_tensorrt()
    onnx_folder, out = Path(onnx_folder), Path(out)
    files = sorted(onnx_folder.glob("*.onnx"))
    if not files:
        raise FileNotFoundError(f"onnx_folder={str(onnx_folder)!r}: no .onnx files")
    if out.exists() and not overwrite:
        raise FileExistsError(f"out={str(out)!r}: exists; choose another folder or pass overwrite (--force) to "
                              "replace it")
    batch = BatchProfile(min_batch, max_batch if opt_batch is None else opt_batch, max_batch)
    gpu_name, capability = _gpu()
    with staging_folder(out, overwrite) as tmp:
        models = {}
        for path in files:
            engine = build_engine(path, min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch,
                                  cache_dir=cache_dir, use_plugins=use_plugins)
            shutil.copyfile(engine, tmp / f"{path.stem}.engine")
            models[path.stem] = {"engine": f"{path.stem}.engine", "cache_key": engine.stem.rsplit("-", 1)[-1],
                                 **onnx_entry(path)}
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "tensorrt": trt.__version__,
                    "gpu": gpu_name, "compute_capability": list(capability),
                    "batch": {"min": batch.min, "opt": batch.opt, "max": batch.max}, "models": models}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out


def _unit_on_cuda(unit, expected: type, role: str) -> None:
    from admrt.models.units import device_of

    if not isinstance(unit, expected):
        raise TypeError(f"{role}: expected an admrt.engine.{expected.__name__}, got {type(unit).__name__}")
    device = device_of(unit)
    if device.type != "cuda":
        raise ValueError(f"{role}: the unit is on {device}; TensorRT needs it on a CUDA device "
                         "(build it with device='cuda')")


def _tensorrt_unit(unit, *, max_batch: int, opt_batch: Optional[int], cache_dir) -> TensorRTUnit:
    from .onnx import export_unit_onnx, signature

    with tempfile.TemporaryDirectory(prefix="admrt-trt-") as tmp:
        path = Path(tmp) / "unit.onnx"
        export_unit_onnx(unit, path, opset=ONNX_OPSET, fused_ops=False)
        engine = build_engine(path, min_batch=1, opt_batch=opt_batch, max_batch=max_batch, cache_dir=cache_dir,
                              use_plugins=False)
    return TensorRTUnit(engine, input_names=signature(unit)[0])


def tensorrt_denoiser(unit, *, max_batch: int = DEFAULT_MAX_BATCH, opt_batch: Optional[int] = None,
                      cache_dir: str | os.PathLike | None = None) -> TensorRTUnit:
    """A TensorRT engine of an admrt.engine.Denoiser (on CUDA): (x_t, t, y[, low_res]) -> output."""
    require_tensorrt()
    from admrt.models.units import Denoiser

    _unit_on_cuda(unit, Denoiser, "tensorrt_denoiser")
    return _tensorrt_unit(unit, max_batch=max_batch, opt_batch=opt_batch, cache_dir=cache_dir)


def tensorrt_gradient(unit, *, max_batch: int = DEFAULT_MAX_BATCH, opt_batch: Optional[int] = None,
                      cache_dir: str | os.PathLike | None = None) -> TensorRTUnit:
    """A TensorRT engine of an admrt.engine.ClassifierGradient (on CUDA): (x_t, t, y) -> grad."""
    require_tensorrt()
    from admrt.models.units import ClassifierGradient

    _unit_on_cuda(unit, ClassifierGradient, "tensorrt_gradient")
    return _tensorrt_unit(unit, max_batch=max_batch, opt_batch=opt_batch, cache_dir=cache_dir)
