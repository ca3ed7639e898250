"""ONNX export of the units every backend compiles (admrt.engine: Denoiser, ClassifierGradient),
and the onnxruntime backend that runs them.

`admrt export onnx` writes a folder:
    denoiser.onnx        (x (B,C,H,W), t (B,), y (B,) int64) -> out: [eps | v], fp32
    classifier.onnx      (x, t) -> logits (B, classes), fp32           (with a classifier)
    classifier_grad.onnx (x, t, y) -> grad: grad_x log p(y | x_t)      (with a classifier)
    upsampler.onnx       (x, t, y, low_res (B,C,h,w)) -> out           (with an upsampler)
Every file has a dynamic batch, fp32/int64 inputs and outputs, and its body in the export's
dtype: fp32, or fp16 convolutions with fp32 norm statistics, softmax, embeddings and head
(docs/design.md's precision policy, as explicit Casts: what a strongly typed TensorRT consumes).
Its metadata_props["admrt"] is JSON: format, versions, role, dtype, opset, the model's preset,
and for diffusion models the diffusion process and the coefficient tables of each step plan.

Forms of the fused ops in the graph (admrt.kernels' exporter forms):
- default: group norm + AdaGN + SiLU as GroupNormalization (opset >= 21) and elementwise nodes;
  attention as one `Attention` node (opset 23, through scaled_dot_product_attention) in fp32
  graphs, else the plain path (MatMul/Einsum, Softmax in fp32), as the exporter cannot set
  Attention's softmax precision;
- fused_ops=True: custom-domain nodes admrt.GroupNormAct / AdaGroupNormAct / QKVAttention
  (schemas in admrt.export.onnx_ops) for runtimes that supply the kernels.
The gradient graph is ClassifierGradient.graph() (make_fx of forward and backward) with the
backward ops the ONNX exporter lacks decomposed here: convolution_backward's input gradient as
a plain convolution with the flipped, channel-swapped weight (not ConvTranspose: OpenVINO's CPU
plugin computes a ConvTranspose wrongly in fp32 when it shares a square weight initializer with a
forward Conv, as the gradient graph's would), silu_backward, avg_pool2d_backward (2x2, stride 2:
ADM's pooling).

Export writes into a temporary folder, passes onnx.checker on every file and runs each in
onnxruntime against eager at batch 1 and 5, and only then renames the folder into place.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence, TypeVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import MissingPackageError
from .stack import (ExportReport, check_stack, example_inputs, low_res_size, model_entry, parse_step_plans,
                    relative_error, staging_folder, weights_fingerprint)

T = TypeVar("T")

log = logging.getLogger(__name__)

FORMAT = "admrt-onnx"
FORMAT_VERSION = 1
FILES = {"model": "denoiser.onnx", "classifier": "classifier.onnx", "classifier_grad": "classifier_grad.onnx",
         "upsampler": "upsampler.onnx"}
OPSETS = (21, 22, 23)   # GroupNormalization with per-channel scale needs 21; Attention 23
DEFAULT_OPSET = 23
DTYPES = ("fp32", "fp16")
# Agreement of onnxruntime with eager on random inputs: max |diff| / max |eager| (stack.relative_error).
CHECK_TOLERANCE = {"fp32": 1e-5, "fp16": 2e-2}
CHECK_BATCHES = (1, 5)


class ExportCheckError(ValueError):
    """An exported graph disagrees with eager (nothing is written)."""


class ClassifierLogits(nn.Module):
    """The classifier of a ClassifierGradient unit as (x_t, t) -> fp32 logits (B, classes),
    sharing its inference copy."""

    def __init__(self, unit):
        super().__init__()
        self.info, self.dtype, self.memory_format = unit.info, unit.dtype, unit.memory_format
        self.net = unit.net

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x_t.contiguous(memory_format=self.memory_format), t).float()


# -- the gradient graph's decompositions ------------------------------------------------------

def _zero_stuff(x, dim, stride):
    """s - 1 zeros between consecutive elements of x along dim (length L -> (L - 1) * s + 1)."""
    if stride == 1:
        return x
    length = x.shape[dim]
    x = x.unsqueeze(dim + 1)   # (cat of zeros, not F.pad: a 5-D pad's trace fixes the symbolic batch)
    x = torch.cat([x] + [torch.zeros_like(x)] * (stride - 1), dim + 1).flatten(dim, dim + 1)
    return x.narrow(dim, 0, (length - 1) * stride + 1)


def _convolution_backward(grad_output, input, weight, bias_sizes, stride, padding, dilation, transposed,
                          output_padding, groups, output_mask):
    """The input gradient of a convolution as a plain convolution of grad_output (zero-stuffed by
    the stride) with the weight flipped in space and its input / output channels swapped per group.
    Not a ConvTranspose of the weight itself: that node would share the forward Conv's weight
    initializer, and OpenVINO's CPU plugin (2026.4, fp32) then feeds one of the two the other's
    packed weights when the weight is square (in == out channels): a silent wrong gradient."""
    if transposed or output_mask[1] or output_mask[2]:
        raise NotImplementedError(f"convolution_backward: admrt's ONNX gradient graph takes the input gradient of "
                                  f"a plain convolution only (got transposed={transposed}, output_mask={output_mask})")
    spatial = weight.dim() - 2
    kernel = weight.shape[2:]
    if groups == 1:
        w = weight.transpose(0, 1)
    else:
        out_channels, in_per_group = weight.shape[:2]
        w = weight.reshape(groups, out_channels // groups, in_per_group, *kernel).transpose(1, 2) \
            .reshape(groups * in_per_group, out_channels // groups, *kernel)
    if any(k > 1 for k in kernel):
        w = w.flip(list(range(2, 2 + spatial)))
    g = grad_output
    for i in range(spatial):
        g = _zero_stuff(g, 2 + i, stride[i])
    # padding before / after each side: the full correlation's d * (k - 1), less the forward's padding;
    # after also gets the rows / columns the strided forward rounded off (the input size decides)
    before = [dilation[i] * (kernel[i] - 1) - padding[i] for i in range(spatial)]
    after = [input.shape[2 + i] - g.shape[2 + i] - before[i] + dilation[i] * (kernel[i] - 1) for i in range(spatial)]
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    if before == after and min(before) >= 0:
        return conv(g, w, None, 1, before, dilation, groups), None, None
    for i in range(spatial):   # a negative side crops
        if before[i] < 0 or after[i] < 0:
            start, stop = max(-before[i], 0), g.shape[2 + i] - max(-after[i], 0)
            g = g.narrow(2 + i, start, stop - start)
    pad = [p for i in reversed(range(spatial)) for p in (max(before[i], 0), max(after[i], 0))]
    if any(pad):
        g = F.pad(g, pad)
    return conv(g, w, None, 1, 0, dilation, groups), None, None


def _silu_backward(grad_output, x):
    s = torch.sigmoid(x)
    return grad_output * s * (1 + x * (1 - s))


def _avg_pool2d_backward(grad_output, x, kernel_size, stride, padding, ceil_mode, count_include_pad,
                         divisor_override):
    if (list(kernel_size) != [2, 2] or list(stride or kernel_size) != [2, 2] or any(padding) or ceil_mode
            or divisor_override):
        raise NotImplementedError(f"avg_pool2d_backward: admrt's ONNX gradient graph takes 2x2 pooling of stride 2 "
                                  f"(ADM's), got kernel {kernel_size}, stride {stride}, padding {padding}, "
                                  f"ceil_mode {ceil_mode}")
    spread = F.interpolate(grad_output, scale_factor=2, mode="nearest") / 4
    extra_h, extra_w = x.shape[-2] - spread.shape[-2], x.shape[-1] - spread.shape[-1]
    if extra_h or extra_w:   # an odd side's last row / column fell outside every window: gradient zero
        spread = F.pad(spread, (0, extra_w, 0, extra_h))
    return spread


def gradient_decompositions() -> dict:
    aten = torch.ops.aten
    return {aten.convolution_backward.default: _convolution_backward,
            aten.silu_backward.default: _silu_backward,
            aten.avg_pool2d_backward.default: _avg_pool2d_backward}


# -- one unit -> one .onnx file -----------------------------------------------------------------

def signature(unit: nn.Module) -> tuple[list[str], str]:
    """(input names, output name) of a unit's ONNX graph."""
    from admrt.models.units import ClassifierGradient

    if isinstance(unit, ClassifierLogits):
        return ["x", "t"], "logits"
    if isinstance(unit, ClassifierGradient):
        return ["x", "t", "y"], "grad"
    return (["x", "t", "y", "low_res"] if unit.info.kind == "superres" else ["x", "t", "y"]), "out"


def require_onnx() -> None:
    """Raise MissingPackageError naming what ONNX export and the onnxruntime backend lack."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingPackageError(f"ONNX export and the onnxruntime backend need {', '.join(missing)}, not installed "
                                  "here: pip install onnx onnxscript onnxruntime (or `pip install -e '.[export]'`; "
                                  "onnxruntime-gpu for CUDA)")


def check_options(dtype: str, opset: int) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {DTYPES} for ONNX (onnxruntime's CPU provider runs no "
                         "bf16 attention, so a bf16 export could not be checked)")
    if opset not in OPSETS:
        raise ValueError(f"opset={opset!r}: expected one of {', '.join(map(str, OPSETS))} (GroupNormalization "
                         "needs opset 21, the Attention node 23)")
    import onnx
    if opset > onnx.defs.onnx_opset_version():
        raise MissingPackageError(f"opset={opset}: the installed onnx {onnx.__version__} knows opsets up to "
                                  f"{onnx.defs.onnx_opset_version()}; upgrade it (pip install -U onnx onnxruntime)")


@contextlib.contextmanager
def _ops_form(net: nn.Module, form):
    """Temporarily set the fused-op form (admrt.kernels) of every block of an admrt network."""
    from admrt.models.layers import FusedOpsMixin

    blocks = [m for m in net.modules() if isinstance(m, FusedOpsMixin)]
    if form == "opaque" and not blocks:
        raise ValueError(f"fused_ops: {type(net).__name__} is not an admrt model, so it has no fused ops to export "
                         "as custom nodes; load the weights with admrt.load_model(..., preset=...)")
    before = [m.fused for m in blocks]
    for m in blocks:
        m.fused = form
    try:
        yield
    finally:
        for m, value in zip(blocks, before):
            m.fused = value


def export_unit_onnx(unit: nn.Module, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET,
                     fused_ops: bool = False, metadata: Optional[dict] = None) -> float:
    """Export one unit (Denoiser, ClassifierGradient or ClassifierLogits) to `path` with a dynamic
    batch; metadata goes to metadata_props["admrt"] as JSON. Returns the seconds it took. The
    unit's info must give the image size (and an upsampler's low-res size): ModelInfo.fitted."""
    require_onnx()
    import onnx_ir
    from torch.export import Dim

    from admrt.models.units import ClassifierGradient

    check_options(unit.dtype, opset)
    info = unit.info
    example = example_inputs(info, 2, _device(unit), low_res_size(info))
    names, output = signature(unit)
    example = example[:len(names)]
    gradient = isinstance(unit, ClassifierGradient)
    attention_node = opset >= 23 and unit.dtype == "fp32" and not gradient
    form = "opaque" if fused_ops else ("sdpa" if attention_node else False)
    batch = Dim("batch", min=1)
    t0 = time.perf_counter()
    with _ops_form(unit.net, form), warnings.catch_warnings(), _quiet_registration():
        for category in (DeprecationWarning, FutureWarning):  # the exporter's own deprecation notices
            warnings.filterwarnings("ignore", category=category)
        warnings.filterwarnings("ignore", module=r"(torch\.onnx|torch\.export|torch\._export|onnxscript|onnx_ir)")
        traced = unit.graph(*example, dynamic_batch=True, decompositions=gradient_decompositions()) \
            if gradient else unit
        traced.eval()   # the wrappers' own mode (their networks are inference copies, already in eval)
        program = torch.onnx.export(
            traced, tuple(example), dynamo=True, opset_version=opset, verbose=False,
            dynamic_shapes=tuple({0: batch} for _ in example), input_names=names, output_names=[output],
            custom_translation_table=_translations() if fused_ops else None)
    fixed = [v.name for v in program.model.graph.inputs if not isinstance(v.shape[0], onnx_ir.SymbolicDim)]
    if fixed:
        raise ValueError(f"{type(unit.net).__name__}: the ONNX exporter fixed the batch of inputs {fixed} to "
                         f"{example[0].shape[0]} (it could not trace this module with a dynamic batch); load the "
                         "weights into an admrt model (admrt.load_model(..., preset=...)) to export it")
    program.model.metadata_props["admrt"] = json.dumps(metadata or {})
    program.save(str(path))
    return time.perf_counter() - t0


@contextlib.contextmanager
def _quiet_registration():
    """The exporter logs a warning per torchvision op it skips when torchvision is absent."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        yield
    finally:
        registration.setLevel(level)


def _translations() -> dict:
    from .onnx_ops import translations
    return translations()


def _device(unit: nn.Module) -> torch.device:
    from admrt.models.units import device_of
    return device_of(unit)


# -- onnxruntime: sessions and the backend -------------------------------------------------------

def providers_for(device: torch.device) -> list:
    """onnxruntime's execution providers for a device; MissingPackageError naming what is
    installed when the device's provider is not."""
    import onnxruntime as ort

    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    if device.type != "cuda" or "CUDAExecutionProvider" not in available:
        raise MissingPackageError(f"backend='onnxruntime' on {device}: needs onnxruntime-gpu's CUDAExecutionProvider; "
                                  f"the installed onnxruntime offers {available} (pip install onnxruntime-gpu)")
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(index).cuda_stream   # ORT's kernels queue behind torch's work
    return [("CUDAExecutionProvider", {"device_id": index, "user_compute_stream": str(stream)}),
            "CPUExecutionProvider"]


def session_options():
    """onnxruntime's CPU threads share torch's budget (torch.get_num_threads()) and sleep between
    calls: the core's torch ops run between two unit calls, and spinning workers would hold
    their cores (on 2 cores, guided sampling at batch 16 ran 0.8x eager with spinning on)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def session(path: str | os.PathLike, device: torch.device | str = "cpu", *, fused_ops: bool = False):
    """An onnxruntime InferenceSession of an exported file on `device` (CPU, or CUDA with
    onnxruntime-gpu); custom-node graphs through admrt.export.onnx_ops.reference_session."""
    import onnxruntime as ort

    providers = providers_for(torch.device(device))
    if fused_ops:
        from .onnx_ops import reference_session
        return reference_session(path, providers, session_options())
    return ort.InferenceSession(str(path), session_options(), providers=providers)


# an ONNX input's type -> (the torch dtype the core passes, the numpy type I/O binding names)
_ONNX_TYPES = {"tensor(float)": (torch.float32, np.float32), "tensor(float16)": (torch.float16, np.float16),
               "tensor(int64)": (torch.int64, np.int64)}


class OnnxRuntimeUnit:
    """An exported unit in an onnxruntime session, called as the C++ core calls units:
    unit(x_t, t, y[, low_res]) -> fp32 tensor on the inputs' device (a trailing None, the core's
    absent low_res, is dropped). Inputs and the output are bound to torch's buffers by pointer
    (I/O binding): nothing is copied per step. On CUDA the session runs on the stream that was
    current when it was made, with no host synchronisation at the end of a call."""

    def __init__(self, ort_session, output_shape):
        import onnxruntime as ort

        self.session = ort_session
        self.inputs = [(i.name, _ONNX_TYPES[i.type]) for i in ort_session.get_inputs()]
        self.output = ort_session.get_outputs()[0].name
        self.output_shape = output_shape   # (x_t shape) -> output shape
        options = dict(ort_session.get_provider_options()).get("CUDAExecutionProvider")
        self.stream = int(options["user_compute_stream"]) if options and options.get("user_compute_stream") else None
        self.run_options = ort.RunOptions()
        if self.stream is not None:
            self.run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")

    def __call__(self, *args: Optional[torch.Tensor]) -> torch.Tensor:
        while args and args[-1] is None:
            args = args[:-1]
        if len(args) != len(self.inputs):
            raise TypeError(f"onnxruntime unit: got {len(args)} inputs, expected {len(self.inputs)} "
                            f"({', '.join(name for name, _ in self.inputs)})")
        x = args[0]
        if self.stream is not None and torch.cuda.current_stream(x.device).cuda_stream != self.stream:
            raise RuntimeError("onnxruntime unit: called on another CUDA stream than the one its session was made "
                               "on (user_compute_stream); sample on the stream the Engine was built on")
        binding = self.session.io_binding()
        kept = []
        for (name, (dtype, np_type)), a in zip(self.inputs, args):
            if a.dtype != dtype or a.device != x.device:
                raise TypeError(f"onnxruntime unit: input {name!r} is {a.dtype} on {a.device}; the graph takes "
                                f"{dtype} on {x.device}")
            a = a.contiguous()
            kept.append(a)
            binding.bind_input(name, a.device.type, a.device.index or 0, np_type, tuple(a.shape), a.data_ptr())
        out = torch.empty(self.output_shape(x.shape), dtype=torch.float32, device=x.device)
        binding.bind_output(self.output, out.device.type, out.device.index or 0, np.float32, tuple(out.shape),
                            out.data_ptr())
        self.session.run_with_iobinding(binding, self.run_options)
        return out


class OpenVinoUnit:
    """An exported unit compiled by OpenVINO for the CPU in fp32 (INFERENCE_PRECISION_HINT f32:
    OpenVINO's own default on a CPU with bf16 units is bf16, which changes the images), called as
    the core calls units. Inputs are shared with torch's CPU tensors; the output is copied out."""

    def __init__(self, path: Path, names: list[str]):
        import openvino as ov

        self.compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        self.request = self.compiled.create_infer_request()
        self.names = names

    def __call__(self, *args: Optional[torch.Tensor]) -> torch.Tensor:
        while args and args[-1] is None:
            args = args[:-1]
        if len(args) != len(self.names):
            raise TypeError(f"openvino unit: got {len(args)} inputs, expected {len(self.names)} ({', '.join(self.names)})")
        inputs = {name: a.contiguous().numpy() for name, a in zip(self.names, args)}
        self.request.infer(inputs, share_inputs=True)
        return torch.from_numpy(self.request.get_output_tensor(0).data.copy())


def openvino_unit(unit: nn.Module, cache, *, opset: int = DEFAULT_OPSET) -> OpenVinoUnit:
    """The Engine backend "openvino" (CPU): the unit's checked ONNX file (cached_onnx: the same file
    as the onnxruntime backend's) compiled by OpenVINO, as the callable the core runs."""
    import importlib.util

    device = _device(unit)
    if device.type != "cpu":
        raise ValueError(f"backend='openvino' runs on the CPU; the models are on {device}")
    if importlib.util.find_spec("openvino") is None:
        raise MissingPackageError("backend='openvino' needs OpenVINO: pip install openvino")
    names = signature(unit)[0]
    return cached_onnx(unit, cache, lambda folder: OpenVinoUnit(folder / "unit.onnx", names), opset=opset)


def _output_shape(unit):
    """(x_t's shape) -> the unit's output shape."""
    from admrt.models.units import ClassifierGradient

    classes = unit.info.out_channels
    if isinstance(unit, ClassifierLogits):
        return lambda shape: (shape[0], classes)
    if isinstance(unit, ClassifierGradient):
        return tuple
    return lambda shape: (shape[0], classes, *shape[2:])


def cached_onnx(unit: nn.Module, cache, load: Callable[[Path], T], *, opset: int = DEFAULT_OPSET) -> T:
    """load(folder holding unit.onnx): the unit exported to ONNX and checked in onnxruntime against
    eager at batch 1 and 5, once per key of the compile cache (`cache`: admrt.engine.cache.CompileCache).
    The unit's info must be complete (the Engine fits it: ModelInfo.fitted, the upsampler's low-res size)."""
    import importlib.metadata

    require_onnx()
    from admrt.engine.cache import describe, unit_fields

    device = _device(unit)

    def build(folder: Path) -> dict:
        path = folder / "unit.onnx"
        seconds = export_unit_onnx(unit, path, opset=opset)
        error = check_file(path, unit, device)[0]
        return {"export_s": round(seconds, 2), "check_relative_error": error}

    what, params = describe(unit)
    # the versions from the packages' metadata: importing onnx and onnxscript only to read them cost
    # ~1.7 s of every start that finds the file cached
    fields = {**unit_fields(unit), "opset": opset,
              **{m: importlib.metadata.version(m) for m in ("onnx", "onnxscript", "onnxruntime")}}
    return cache.get_or_build("onnxruntime", fields, build, load, what=what, size_hint=params)


def onnxruntime_unit(unit: nn.Module, cache, *, opset: int = DEFAULT_OPSET) -> OnnxRuntimeUnit:
    """The Engine backend "onnxruntime": the unit's checked ONNX file (cached_onnx) in an
    onnxruntime session, as the callable the core runs."""
    require_onnx()
    device = _device(unit)
    providers_for(device)   # fail before the export's minute when the device has no provider
    return cached_onnx(unit, cache, lambda folder: OnnxRuntimeUnit(session(folder / "unit.onnx", device),
                                                                    _output_shape(unit)), opset=opset)


# -- the stack -> a folder -------------------------------------------------------------------------

def export_onnx(model: nn.Module, classifier: Optional[nn.Module] = None, upsampler: Optional[nn.Module] = None,
                *, out: str | os.PathLike, steps: str | Sequence[str] = "ddim25",
                upsampler_steps: str | Sequence[str] | None = None, dtype: str = "fp32",
                opset: int = DEFAULT_OPSET, fused_ops: bool = False, device: str | torch.device | None = None,
                check: bool = True, overwrite: bool = False, log=print) -> ExportReport:
    """Export the stack (base model, optional classifier and upsampler) as ONNX files in the
    folder `out` (see the module docstring), each checked against eager in onnxruntime.

    steps / upsampler_steps: the step plans whose tables the metadata carries (the first is the
    default). dtype: the bodies' precision, "fp32" | "fp16". fused_ops: the custom-node form
    (checked in onnxruntime through onnxruntime-extensions' fp32 reference ops). check=False:
    onnx.checker only (e.g. fp16 custom-node graphs, which no runtime here can run).
    """
    from admrt import __version__
    from admrt.models.units import ClassifierGradient, Denoiser, device_of

    require_onnx()
    check_options(dtype, opset)
    plans = parse_step_plans(steps)
    up_plans = plans if upsampler_steps is None else parse_step_plans(upsampler_steps)
    device = device_of(model, device)
    if check:
        providers_for(device)
        if fused_ops and dtype != "fp32":
            raise ValueError(f"dtype={dtype!r} with fused_ops: the custom nodes' reference ops "
                             "(onnxruntime-extensions) run fp32 graphs only, so the export cannot be checked here; "
                             "pass check=False (--no-check) to write it checked by onnx.checker only")
        if fused_ops:
            from .onnx_ops import require_extensions
            require_extensions()
    roles, infos = check_stack(model, classifier, upsampler)
    common = {"format": FORMAT, "format_version": FORMAT_VERSION, "admrt_version": __version__,
              "torch_version": torch.__version__, "dtype": dtype, "opset": opset, "fused_ops": fused_ops,
              "weights": weights_fingerprint(dict(roles))}

    units = {}
    for role, module in roles:
        if role == "classifier":
            grad = ClassifierGradient(module, dtype, device=device)
            grad.info = infos[role]   # fitted to the stack (check_stack)
            units["classifier"] = (module, ClassifierLogits(grad))
            units["classifier_grad"] = (module, grad)
        else:
            unit = Denoiser(module, dtype, device=device)
            unit.info = infos[role]
            units[role] = (module, unit)

    seconds, errors = {}, {}
    with staging_folder(Path(out), overwrite) as tmp:
        for name, (module, unit) in units.items():
            role = "classifier" if name.startswith("classifier") else name
            names, output = signature(unit)
            entry = model_entry(module, unit.info, role, FILES[name], up_plans if role == "upsampler" else plans)
            metadata = {**common, "role": name, "inputs": names, "output": output, "model": entry}
            log(f"admrt export: {name}: exporting {FILES[name]} ({dtype}, opset {opset}"
                f"{', custom-domain fused ops' if fused_ops else ''})")
            seconds[name] = export_unit_onnx(unit, tmp / FILES[name], opset=opset, fused_ops=fused_ops,
                                             metadata=metadata)
            if check:
                errors[name] = check_file(tmp / FILES[name], unit, device, fused_ops=fused_ops)[0]
            else:
                import onnx
                onnx.checker.check_model(str(tmp / FILES[name]), full_check=True)
                errors[name] = None
    return ExportReport(Path(out), seconds, errors)


def check_file(path: Path, unit: nn.Module, device: torch.device, *,
               fused_ops: bool = False) -> tuple[float, OnnxRuntimeUnit]:
    """onnx.checker on the file, then onnxruntime against the eager unit at batch 1 and 5 from the
    one file: (the error, the checked runner); ExportCheckError if they disagree
    (stack.relative_error above CHECK_TOLERANCE)."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)
    runner = OnnxRuntimeUnit(session(path, device, fused_ops=fused_ops), _output_shape(unit))
    names, _ = signature(unit)
    worst = 0.0
    for batch in CHECK_BATCHES:
        example = example_inputs(unit.info, batch, device, low_res_size(unit.info), seed=batch)[:len(names)]
        worst = max(worst, relative_error(runner(*example), unit(*example)))
    tolerance = CHECK_TOLERANCE[unit.dtype]
    if not worst <= tolerance:
        raise ExportCheckError(f"{path.name}: onnxruntime differs from eager by {worst:.3g} (relative to the largest "
                               f"output), more than {tolerance} for {unit.dtype}; nothing was written")
    return worst, runner
