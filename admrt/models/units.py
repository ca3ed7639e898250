"""The two units every backend compiles (EDM's preconditioning-wrapper role; docs/design.md):

    Denoiser(model):              fp32 (x_t, t, y[, low_res]) -> fp32 [eps | v]
    ClassifierGradient(clf):      fp32 (x_t, t, y) -> grad_x log p(y | x_t), by autograd

They own the precision policy (convolutions in fp16/bf16, norms, embeddings and heads fp32:
guided-diffusion's convert_to_fp16) and the memory layout, and make no data-dependent checks
(labels are validated once, by the Engine), so that torch.compile(fullgraph=True), torch.export
and CUDA-graph capture take them as they are. Both work on an inference copy of the network:
the caller's module is never changed (fp32 weights are shared, not copied).

They sit beside the networks (admrt.models), below the Engine (admrt.engine) and the exporters
(admrt.export), which both build on them. They take admrt's networks and guided-diffusion's own
(admrt.models.guided_diffusion says what differs).
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import guided_diffusion
from .unet import resolve_dtype


@dataclass(frozen=True)
class ModelInfo:
    """What the sampler needs to know about a network (from its ModelConfig, or read off a
    guided-diffusion module's constructor attributes: guided_diffusion.network_fields)."""

    kind: str                  # "unet" | "superres" | "classifier"
    image_size: Optional[int]  # None: a guided-diffusion classifier whose pool takes any size
    in_channels: int
    out_channels: int
    num_classes: Optional[int]  # conditional UNet / SuperRes: label embedding size
    low_res_size: Optional[int] = None

    @property
    def learn_sigma(self) -> bool:
        return self.kind != "classifier" and self.out_channels == 2 * self.in_channels

    @staticmethod
    def of(module: nn.Module, role: str) -> "ModelInfo":
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "kind"):
            return ModelInfo(cfg.kind, cfg.image_size, cfg.in_channels, cfg.out_channels, cfg.num_classes,
                             cfg.low_res_size)
        fields = guided_diffusion.network_fields(module)  # a guided-diffusion network: its attributes
        if fields is None:
            raise TypeError(f"{role}: expected an admrt model (with .config) or a guided-diffusion UNetModel, "
                            f"SuperResModel or EncoderUNetModel, got {type(module).__name__}")
        return ModelInfo(**fields)

    def fitted(self, image_size: Optional[int] = None, low_res_size: Optional[int] = None) -> "ModelInfo":
        """This info with the sizes the module leaves open set from the stack it runs in: image_size
        (a guided-diffusion classifier's pool takes any size) and an upsampler's low_res_size (a
        guided-diffusion SuperResModel records none: the base model's image size)."""
        return dataclasses.replace(
            self, image_size=self.image_size if self.image_size is not None else image_size,
            low_res_size=self.low_res_size if self.low_res_size is not None or self.kind != "superres"
            else low_res_size)


def is_channels_last(module: nn.Module) -> bool:
    """Whether the module's 3x3 convolutions are in channels_last (NHWC) memory format."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d) and m.weight.shape[-1] > 1:
            return m.weight.is_contiguous(memory_format=torch.channels_last)
    return False


def inference_copy(module: nn.Module, *, device: torch.device, dtype: str = "fp32",
                   channels_last: bool = False) -> nn.Module:
    """The module in eval mode on `device`, its body in `dtype`, optionally channels_last, without
    touching the caller's module: the structure is copied, weights already on `device` are shared
    (new Parameter objects over the same storage), converted ones are new tensors."""
    tensors = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    net = copy.deepcopy(module, memo=dict(tensors))  # copies the structure, not the tensors
    for m in net.modules():
        for name, p in m._parameters.items():
            if p is not None:
                m._parameters[name] = nn.Parameter(p.detach().to(device), requires_grad=False)
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = b.detach().to(device)
    net.eval()
    low = resolve_dtype(dtype)
    if hasattr(net, "set_dtype"):
        net.set_dtype(low)
    elif low == torch.float16 and guided_diffusion.network_kind(net) is not None:  # its own policy
        guided_diffusion.convert_to_fp16(net)
    elif low != torch.float32:
        raise ValueError(f"dtype={dtype!r}: {type(module).__name__} has no set_dtype(); 'fp32' (and 'fp16' for a "
                         "guided-diffusion module) is available for it")
    if channels_last:
        net.to(memory_format=torch.channels_last)
    return net


class Denoiser(nn.Module):
    """The network as the sampler calls it: fp32 (x_t (B,C,H,W), t (B,) model timesteps, y (B,)
    int64 labels[, low_res (B,C,h,w)]) -> fp32 (B, C or 2C, H, W) [eps | v].

    An unconditional model ignores y (the core always passes a label tensor, so every backend
    sees one signature). dtype: "fp32" | "fp16" | "bf16" for the body's convolutions.
    channels_last: run the network in NHWC (None: as the model's weights are).
    """

    def __init__(self, model: nn.Module, dtype: str = "fp32", *, channels_last: Optional[bool] = None,
                 device: torch.device | str | None = None):
        super().__init__()
        self.info = ModelInfo.of(model, "model")
        if self.info.kind == "classifier":
            raise ValueError("model: expected a diffusion model (UNet or SuperRes), got a classifier; "
                             "wrap it in ClassifierGradient")
        channels_last = is_channels_last(model) if channels_last is None else channels_last
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.dtype = dtype
        self.net = inference_copy(model, device=device_of(model, device), dtype=dtype, channels_last=channels_last)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                low_res: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x_t.contiguous(memory_format=self.memory_format)
        labels = y if self.info.num_classes is not None else None
        if self.info.kind == "superres":
            out = self.net(x, t, low_res=low_res, y=labels)
        else:
            out = self.net(x, t, labels)
        return out.float().contiguous()


class ClassifierGradient(nn.Module):
    """grad_{x_t} log softmax(classifier(x_t, t))[y] per sample, fp32, shape of x_t: the
    reference's classifier_sample.cond_fn without its scale (the core multiplies by each
    sample's guidance scale). Autograd runs through the classifier, the fused ops' custom
    backward included.

    forward() calls torch.autograd.grad, which torch.export rejects; `graph(x_t, t, y)` traces
    forward and backward into one graph with make_fx (weights as explicit inputs, as
    torch.func.grad fails on the custom ops), which torch.export and torch.compile take.
    """

    def __init__(self, classifier: nn.Module, dtype: str = "fp32", *, channels_last: Optional[bool] = None,
                 device: torch.device | str | None = None):
        super().__init__()
        self.info = ModelInfo.of(classifier, "classifier")
        if self.info.kind != "classifier":
            raise ValueError(f"classifier: expected a noisy classifier (EncoderUNet), got a {self.info.kind!r} model")
        channels_last = is_channels_last(classifier) if channels_last is None else channels_last
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.dtype = dtype
        self.net = inference_copy(classifier, device=device_of(classifier, device), dtype=dtype,
                                  channels_last=channels_last)

    def _grad(self, net_call, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x_in = x_t.detach().contiguous(memory_format=self.memory_format).requires_grad_(True)
            log_probs = F.log_softmax(net_call(x_in, t).float(), dim=-1)   # (B, classes)
            selected = log_probs.gather(1, y.view(-1, 1)).sum()
            return torch.autograd.grad(selected, x_in)[0].float().contiguous()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._grad(self.net, x_t, t, y)

    def graph(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *, dynamic_batch: bool = False,
              decompositions: Optional[dict] = None) -> nn.Module:
        """Forward and backward as one traced graph: a module (x_t, t, y) -> gradient with no
        autograd inside, for torch.export / AOTInductor / ONNX and torch.compile(fullgraph=True).
        dynamic_batch: trace with a symbolic batch dimension, every other dimension static
        (export with a dynamic batch). Making only the batch symbolic keeps the trace fast: with
        all dimensions symbolic (make_fx's "symbolic" mode) sympy spends minutes on the floor
        divisions of attention's head split and the down-sampling."""
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.proxy_tensor import make_fx
        from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

        state = {**dict(self.net.named_parameters()), **dict(self.net.named_buffers())}
        names = list(state)
        weights = [state[n] for n in names]

        def fn(weights, x, timesteps, labels):
            call = lambda inp, ts: torch.func.functional_call(self.net, dict(zip(names, weights)), (inp, ts))  # noqa: E731
            return self._grad(call, x, timesteps, labels)

        if not dynamic_batch:
            gm = make_fx(fn, decomposition_table=decompositions, tracing_mode="fake")(weights, x_t, t, y)
            return _GradientGraph(gm, weights)
        mode = FakeTensorMode(shape_env=ShapeEnv())

        def batch_symbolic(a: torch.Tensor) -> torch.Tensor:
            sizes = [DimDynamic.DYNAMIC] + [DimDynamic.STATIC] * (a.dim() - 1)
            return mode.from_tensor(a, symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes))

        fake_weights = [mode.from_tensor(w, static_shapes=True) for w in weights]
        with mode:  # make_fx takes the fake inputs' symbols (as AOTAutograd traces)
            gm = make_fx(fn, decomposition_table=decompositions, tracing_mode="real")(fake_weights, *(batch_symbolic(a) for a in (x_t, t, y)))
        return _GradientGraph(gm, weights)


class _GradientGraph(nn.Module):
    """A make_fx graph of ClassifierGradient with its weights held as buffers."""

    def __init__(self, gm: nn.Module, weights: list[torch.Tensor]):
        super().__init__()
        self.gm = gm
        self.num_weights = len(weights)
        for i, w in enumerate(weights):
            self.register_buffer(f"w{i}", w)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.gm([getattr(self, f"w{i}") for i in range(self.num_weights)], x_t, t, y)


def device_of(module: nn.Module, device=None) -> torch.device:
    """`device` if given, else where the module's weights are (CPU for a module without any)."""
    if device is not None:
        return torch.device(device)
    for p in module.parameters():
        return p.device
    return torch.device("cpu")
