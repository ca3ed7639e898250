"""ONNX export of the units every backend compiles (admrt.engine: Denoiser, ClassifierGradient),
and the onnxruntime backend that runs them.

`admrt export onnx` writes a folder:
    denoiser.onnx        (x (B,C,H,W), t (B,), y (B,) int64) -> out: [eps | v], fp32
    classifier.onnx      (x, t) -> logits (B, classes), fp32           (with a classifier)
    classifier_grad.onnx (x, t, y) -> grad: grad_x log p(y | x_t)      (with a classifier)
    upsampler.onnx       (x, t, y, low_res (B,C,h,w)) -> out           (with an upsampler)
Every file has a dynamic batch, fp32/int64 inputs and outputs, and its body in the export's
dtype: fp32, or fp16 convolutions with fp32 norm statistics, softmax, embeddings and head
(DESIGN.md's precision policy, as explicit Casts: what a strongly typed TensorRT consumes).
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
a transposed convolution, silu_backward, avg_pool2d_backward (2x2, stride 2: ADM's pooling).

Export writes into a temporary folder, passes onnx.checker on every file and runs each in
onnxruntime against eager at batch 1 and 5, and only then renames the folder into place.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import MissingPackageError
from .stack import check_stack, example_inputs, model_entry, parse_step_plans, weights_fingerprint

log = logging.getLogger(__name__)

FORMAT = "admrt-onnx"
FORMAT_VERSION = 1
FILES = {"model": "denoiser.onnx", "classifier": "classifier.onnx", "classifier_grad": "classifier_grad.onnx",
         "upsampler": "upsampler.onnx"}
OPSETS = (21, 22, 23)   # GroupNormalization with per-channel scale needs 21; Attention 23
DEFAULT_OPSET = 23
DTYPES = ("fp32", "fp16")
# Agreement of onnxruntime with eager on random inputs: max |diff| / max(1, max |eager|).
CHECK_TOLERANCE = {"fp32": 1e-5, "fp16": 2e-2}
CHECK_BATCHES = (1, 5)


@dataclass(frozen=True)
class ExportReport:
    """What export_onnx wrote: per file, the export seconds and the error against eager
    (max |diff| / max(1, max |eager|)), or None where onnxruntime could not run it."""

    out: Path
    seconds: dict
    errors: dict


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

def _convolution_backward(grad_output, input, weight, bias_sizes, stride, padding, dilation, transposed,
                          output_padding, groups, output_mask):
    """The input gradient of a convolution as the transposed convolution of grad_output."""
    if transposed or output_mask[1] or output_mask[2]:
        raise NotImplementedError("admrt's ONNX gradient graph takes input gradients of convolutions only")
    spatial = weight.dim() - 2
    # output_padding restores the input size that the strided forward rounded down
    extra = [input.shape[2 + i] - ((grad_output.shape[2 + i] - 1) * stride[i] - 2 * padding[i]
                                   + dilation[i] * (weight.shape[2 + i] - 1) + 1) for i in range(spatial)]
    transpose = F.conv_transpose2d if spatial == 2 else F.conv_transpose1d
    return transpose(grad_output, weight, None, stride, padding, extra, groups, dilation), None, None


def _silu_backward(grad_output, x):
    s = torch.sigmoid(x)
    return grad_output * s * (1 + x * (1 - s))


def _avg_pool2d_backward(grad_output, x, kernel_size, stride, padding, ceil_mode, count_include_pad,
                         divisor_override):
    if list(kernel_size) != [2, 2] or list(stride or kernel_size) != [2, 2] or any(padding) or divisor_override:
        raise NotImplementedError(f"avg_pool2d_backward: admrt's ONNX gradient graph takes 2x2 pooling of stride 2 "
                                  f"(ADM's), got kernel {kernel_size}, stride {stride}, padding {padding}")
    return F.interpolate(grad_output, scale_factor=2, mode="nearest") / 4


def gradient_decompositions() -> dict:
    aten = torch.ops.aten
    return {aten.convolution_backward.default: _convolution_backward,
            aten.silu_backward.default: _silu_backward,
            aten.avg_pool2d_backward.default: _avg_pool2d_backward}


# -- one unit -> one .onnx file -----------------------------------------------------------------

def signature(unit: nn.Module) -> tuple[list[str], str]:
    """(input names, output name) of a unit's ONNX graph."""
    from admrt.engine.modules import ClassifierGradient

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
        raise ValueError(f"opset={opset!r}: expected one of {OPSETS} (GroupNormalization needs opset 21, the "
                         "Attention node 23)")


@contextlib.contextmanager
def _ops_form(net: nn.Module, form):
    """Temporarily set the fused-op form (admrt.kernels) of every block of an admrt network."""
    from admrt.models.layers import FusedOpsMixin

    blocks = [m for m in net.modules() if isinstance(m, FusedOpsMixin)]
    before = [m.fused for m in blocks]
    for m in blocks:
        m.fused = form
    try:
        yield
    finally:
        for m, value in zip(blocks, before):
            m.fused = value


def _low_res_size(info) -> Optional[int]:
    if info.kind != "superres":
        return None
    if info.low_res_size is None:
        raise ValueError("upsampler: it records no low_res_size; load it with an admrt preset")
    return info.low_res_size


def export_unit_onnx(unit: nn.Module, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET,
                     fused_ops: bool = False, metadata: Optional[dict] = None) -> float:
    """Export one unit (Denoiser, ClassifierGradient or ClassifierLogits) to `path` with a dynamic
    batch; metadata goes to metadata_props["admrt"] as JSON. Returns the seconds it took."""
    from torch.export import Dim

    from admrt.engine.modules import ClassifierGradient

    require_onnx()
    check_options(unit.dtype, opset)
    info = unit.info
    example = example_inputs(info, 2, _device(unit), _low_res_size(info))
    names, output = signature(unit)
    example = example[:len(names)]
    gradient = isinstance(unit, ClassifierGradient)
    attention_node = opset >= 23 and unit.dtype == "fp32" and not gradient
    form = "opaque" if fused_ops else ("sdpa" if attention_node else False)
    batch = Dim("batch", min=1)
    t0 = time.perf_counter()
    with _ops_form(unit.net, form), warnings.catch_warnings(), _quiet_registration():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter
        traced = unit.graph(*example, dynamic_batch=True, decompositions=gradient_decompositions()) \
            if gradient else unit
        program = torch.onnx.export(
            traced, tuple(example), dynamo=True, opset_version=opset, verbose=False,
            dynamic_shapes=tuple({0: batch} for _ in example), input_names=names, output_names=[output],
            custom_translation_table=_translations() if fused_ops else None)
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
    from admrt.engine.modules import device_of
    return device_of(unit)


# -- onnxruntime: sessions and the backend -------------------------------------------------------

def providers_for(device: torch.device) -> list:
    """onnxruntime's execution providers for a device; an error naming what is installed when
    the device's provider is not."""
    import onnxruntime as ort

    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    if device.type != "cuda" or "CUDAExecutionProvider" not in available:
        raise RuntimeError(f"backend='onnxruntime' on {device}: needs onnxruntime-gpu's CUDAExecutionProvider; the "
                           f"installed onnxruntime offers {available} (pip install onnxruntime-gpu)")
    stream = torch.cuda.current_stream(device).cuda_stream   # ORT's kernels queue behind torch's work
    return [("CUDAExecutionProvider", {"device_id": device.index or 0, "user_compute_stream": str(stream)}),
            "CPUExecutionProvider"]


def session(path: str | os.PathLike, device: torch.device | str = "cpu", *, fused_ops: bool = False):
    """An onnxruntime InferenceSession of an exported file on `device` (CPU, or CUDA with
    onnxruntime-gpu); custom-node graphs through admrt.export.onnx_ops.reference_session."""
    import onnxruntime as ort

    providers = providers_for(torch.device(device))
    if fused_ops:
        from .onnx_ops import reference_session
        return reference_session(path, providers)
    return ort.InferenceSession(str(path), providers=providers)


_NUMPY_TYPES = {torch.float32: "float32", torch.float16: "float16", torch.int64: "int64"}


class OnnxRuntimeUnit:
    """An exported unit in an onnxruntime session, called as the C++ core calls units:
    unit(x_t, t, y[, low_res]) -> fp32 tensor on the inputs' device. Inputs and the output are
    bound to torch's buffers by pointer (I/O binding): nothing is copied per step."""

    def __init__(self, ort_session, output_shape):
        import numpy as np
        self.np = np
        self.session = ort_session
        self.inputs = [i.name for i in ort_session.get_inputs()]
        self.output = ort_session.get_outputs()[0].name
        self.output_shape = output_shape   # (x_t shape) -> output shape

    def __call__(self, *args: Optional[torch.Tensor]) -> torch.Tensor:
        tensors = [a.contiguous() for a in args if a is not None][:len(self.inputs)]
        x = tensors[0]
        binding = self.session.io_binding()
        for name, a in zip(self.inputs, tensors):
            binding.bind_input(name, a.device.type, a.device.index or 0, self.np.dtype(_NUMPY_TYPES[a.dtype]),
                               tuple(a.shape), a.data_ptr())
        out = torch.empty(self.output_shape(x.shape), dtype=torch.float32, device=x.device)
        binding.bind_output(self.output, out.device.type, out.device.index or 0, self.np.float32, tuple(out.shape),
                            out.data_ptr())
        self.session.run_with_iobinding(binding)
        return out


def _output_shape(unit):
    """(x_t's shape) -> the unit's output shape."""
    from admrt.engine.modules import ClassifierGradient

    classes = unit.info.out_channels
    if isinstance(unit, ClassifierLogits):
        return lambda shape: (shape[0], classes)
    if isinstance(unit, ClassifierGradient):
        return tuple
    return lambda shape: (shape[0], classes, *shape[2:])


def onnxruntime_unit(unit: nn.Module, *, opset: int = DEFAULT_OPSET) -> OnnxRuntimeUnit:
    """The Engine backend "onnxruntime": export the unit to a temporary file, load it in a
    session on the unit's device, and return the callable the core runs."""
    require_onnx()
    device = _device(unit)
    providers_for(device)   # fail before the export's minute when the device has no provider
    with tempfile.TemporaryDirectory(prefix="admrt-onnx-") as tmp:
        path = Path(tmp) / "unit.onnx"
        export_unit_onnx(unit, path, opset=opset)
        return OnnxRuntimeUnit(session(path, device), _output_shape(unit))


# -- the stack -> a folder -------------------------------------------------------------------------

def export_onnx(model: nn.Module, classifier: Optional[nn.Module] = None, upsampler: Optional[nn.Module] = None,
                *, out: str | os.PathLike, steps: str | Sequence[str] = "ddim25",
                upsampler_steps: str | Sequence[str] | None = None, dtype: str = "fp32",
                opset: int = DEFAULT_OPSET, fused_ops: bool = False, device: str | torch.device | None = None,
                overwrite: bool = False, log=print) -> ExportReport:
    """Export the stack (base model, optional classifier and upsampler) as ONNX files in the
    folder `out` (see the module docstring), checked against eager in onnxruntime.

    steps / upsampler_steps: the step plans whose tables the metadata carries (the first is the
    default). dtype: the bodies' precision, "fp32" | "fp16". fused_ops: the custom-node form.
    """
    from admrt import __version__
    from admrt.engine import ClassifierGradient, Denoiser
    from admrt.engine.modules import device_of

    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"out={str(out)!r}: exists; choose another folder or pass overwrite (--force) "
                              "to replace it")
    require_onnx()
    check_options(dtype, opset)
    plans = parse_step_plans(steps)
    up_plans = plans if upsampler_steps is None else parse_step_plans(upsampler_steps)
    device = device_of(model, device)
    roles, infos = check_stack(model, classifier, upsampler)
    common = {"format": FORMAT, "format_version": FORMAT_VERSION, "admrt_version": __version__,
              "torch_version": torch.__version__, "dtype": dtype, "opset": opset, "fused_ops": fused_ops,
              "weights": weights_fingerprint(dict(roles))}

    units = {}
    for role, module in roles:
        if role == "classifier":
            grad = ClassifierGradient(module, dtype, device=device)
            units["classifier"] = (module, ClassifierLogits(grad))
            units["classifier_grad"] = (module, grad)
        else:
            units[role] = (module, Denoiser(module, dtype, device=device))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide the folder from other users
    seconds, errors = {}, {}
    try:
        for name, (module, unit) in units.items():
            role = "classifier" if name.startswith("classifier") else name
            names, output = signature(unit)
            entry = model_entry(module, infos[role], role, FILES[name], up_plans if role == "upsampler" else plans)
            metadata = {**common, "role": name, "inputs": names, "output": output, "model": entry}
            log(f"admrt export: {name}: exporting {FILES[name]} ({dtype}, opset {opset}"
                f"{', custom-domain fused ops' if fused_ops else ''})")
            seconds[name] = export_unit_onnx(unit, tmp / FILES[name], opset=opset, fused_ops=fused_ops,
                                             metadata=metadata)
            errors[name] = check_file(tmp / FILES[name], unit, dtype, device, fused_ops=fused_ops, log=log)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return ExportReport(out, seconds, errors)


def check_file(path: Path, unit: nn.Module, dtype: str, device: torch.device, *, fused_ops: bool = False,
               log=print) -> Optional[float]:
    """onnx.checker on the file, then onnxruntime against the eager unit at batch 1 and 5 from the
    one file; raises if they disagree. None where onnxruntime cannot run it here (a custom-node
    graph without onnxruntime-extensions, or fp16 custom nodes: its Python ops are fp32)."""
    import onnx

    onnx.checker.check_model(str(path), full_check=not fused_ops)
    if fused_ops and dtype != "fp32":
        log(f"admrt export: {path.name}: checked by onnx.checker only (the reference custom ops run fp32 graphs)")
        return None
    if fused_ops:
        try:
            import onnxruntime_extensions  # noqa: F401
        except ImportError:
            log(f"admrt export: {path.name}: checked by onnx.checker only (onnxruntime-extensions, which runs the "
                "custom nodes, is not installed)")
            return None
    runner = OnnxRuntimeUnit(session(path, device, fused_ops=fused_ops), _output_shape(unit))
    info = unit.info
    worst = 0.0
    for batch in CHECK_BATCHES:
        example = example_inputs(info, batch, device, _low_res_size(info), seed=batch)
        names, _ = signature(unit)
        example = example[:len(names)]
        want = unit(*example)
        got = runner(*example)
        worst = max(worst, float((got - want).abs().max()) / max(1.0, float(want.abs().max())))
    if not worst <= CHECK_TOLERANCE[dtype]:
        raise RuntimeError(f"admrt export: {path.name}: onnxruntime differs from eager by {worst:.3g} (relative), more "
                           f"than {CHECK_TOLERANCE[dtype]} for {dtype}; nothing was written")
    return worst
