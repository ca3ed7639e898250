"""Backends: how the Engine calls a network. Each backend turns a torch module into the Denoiser
callable the C++ core expects, `fn(x_t, t, y | None, low_res | None) -> output` (see
engine/csrc/sampler.h), and the classifier into `grad(x_t, t, y) -> grad_x log p(y | x_t)`.

"eager" runs the module as is; "compile" runs it through torch.compile. Compiled packages
(AOTInductor, ONNX Runtime, TensorRT) register themselves with `register_backend` from
admrt.export; an unknown name is an error listing what is registered.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

DenoiserFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class ModelInfo:
    """What the sampler needs to know about a network (from its ModelConfig, or read off a
    guided-diffusion module with the same attributes)."""

    kind: str                  # "unet" | "superres" | "classifier"
    image_size: int
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
        # guided-diffusion modules (the oracle) carry the same fields as attributes.
        try:
            name = type(module).__name__
            kind = {"SuperResModel": "superres", "EncoderUNetModel": "classifier"}.get(name, "unet")
            num_classes = getattr(module, "num_classes", None)
            return ModelInfo(kind, int(module.image_size), int(module.in_channels), int(module.out_channels),
                             None if kind == "classifier" else num_classes)
        except AttributeError:
            raise TypeError(f"{role}: expected an admrt model (with .config) or a guided-diffusion module, "
                            f"got {type(module).__name__}") from None


def channels_last(module: nn.Module) -> bool:
    """Whether the module's convolutions are in channels_last (NHWC) memory format."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            return m.weight.is_contiguous(memory_format=torch.channels_last) and m.weight.shape[-1] > 1
    return False


def _eager_denoiser(module: nn.Module, info: ModelInfo) -> DenoiserFn:
    cond = info.num_classes is not None
    # A channels_last model gets channels_last inputs (cuDNN's fast fp16/bf16 path); the core
    # receives a contiguous NCHW output either way.
    fmt = torch.channels_last if channels_last(module) else torch.contiguous_format
    if info.kind == "superres":
        def fn(x, t, y, low_res):
            return module(x.contiguous(memory_format=fmt), t, low_res=low_res,
                          y=y if cond else None).contiguous()
    else:
        def fn(x, t, y, low_res):
            return module(x.contiguous(memory_format=fmt), t, y=y if cond else None).contiguous()
    return fn


def _compiled_denoiser(module: nn.Module, info: ModelInfo) -> DenoiserFn:
    return _eager_denoiser(torch.compile(module, dynamic=False), info)


_BACKENDS: dict[str, Callable[[nn.Module, ModelInfo], DenoiserFn]] = {
    "eager": _eager_denoiser,
    "compile": _compiled_denoiser,
}


def register_backend(name: str, factory: Callable[[nn.Module, ModelInfo], DenoiserFn]) -> None:
    """Make `Engine(..., backend=name)` call `factory(module, info)` for its Denoiser callable."""
    _BACKENDS[name] = factory


def backend_names() -> list[str]:
    return sorted(_BACKENDS)


def make_denoiser(module: nn.Module, info: ModelInfo, backend: str) -> DenoiserFn:
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {backend_names()} "
                         "(compiled packages register theirs through admrt.export)")
    return _BACKENDS[backend](module, info)


def classifier_grad(classifier: nn.Module) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """grad_x log softmax(classifier(x_t, t))[y], per sample (the reference's cond_fn without its
    scale: the core multiplies by each sample's guidance scale). Autograd runs through the
    classifier, custom backward of fused kernels included."""
    fmt = torch.channels_last if channels_last(classifier) else torch.contiguous_format

    def grad(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x_in = x.detach().contiguous(memory_format=fmt).requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t).float(), dim=-1)  # (B, classes)
            selected = log_probs.gather(1, y.view(-1, 1)).sum()
            return torch.autograd.grad(selected, x_in)[0].contiguous()
    return grad
