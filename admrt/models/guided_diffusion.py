"""guided-diffusion's own networks as admrt units: the one module that knows how openai/
guided-diffusion's UNetModel, SuperResModel and EncoderUNetModel (PyPI guided-diffusion-sdk, import
name `guided_diffusion`) differ from admrt's, so that the Engine and the exporters take them as
they take admrt's networks (the role of k-diffusion's external.py).

- `network_kind(module)`: "unet" | "superres" | "classifier" for such a network, else None.
- `network_fields(module)`: ModelInfo's fields, read off the attributes its constructor keeps
  (admrt.models.units.ModelInfo.of calls it for a module without an admrt `.config`).
- `convert_to_fp16(net)`: its own mixed precision (unet.py's convert_to_fp16: the body's
  convolutions in fp16), the only low precision it has.

A network is recognised by its classes' names (guided_diffusion.unet's, or a vendored copy of its
unet.py) and read through attributes, so nothing here imports guided_diffusion; if a check ever
needs its classes, import it here, inside the function, once given such a module: no other
installed module may import it. The flags of its scripts (script_util's defaults and rules) are
translated to admrt presets by admrt.gd_flags, which deals in flags, not modules.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

# guided_diffusion.unet's classes -> the kind of network (a subclass is recognised through its MRO)
KINDS = {"SuperResModel": "superres", "EncoderUNetModel": "classifier", "UNetModel": "unet"}


def network_kind(module: nn.Module) -> Optional[str]:
    """The kind of a guided-diffusion network ("unet", "superres", "classifier"), None for any
    other module (admrt's own networks carry a `.config` and are not asked)."""
    return next((KINDS[c.__name__] for c in type(module).__mro__ if c.__name__ in KINDS), None)


def network_fields(module: nn.Module) -> Optional[dict]:
    """ModelInfo's fields (kind, image_size, in_channels, out_channels, num_classes) of a
    guided-diffusion network, or None if `module` is not one (or lacks what its constructor keeps).

    Its SuperResModel doubles in_channels (x_t's and the upsampled low_res's channels) and records
    no low-res size; its EncoderUNetModel drops image_size, which is read off the attention pool's
    positional embedding ((spatial^2 + 1) tokens at the last level), and is None for the other
    pools (they take any size)."""
    kind = network_kind(module)
    if kind is None:
        return None
    try:
        in_channels, out_channels = int(module.in_channels), int(module.out_channels)
        if kind == "superres":
            in_channels //= 2
        if kind != "classifier":
            return dict(kind=kind, image_size=int(module.image_size), in_channels=in_channels,
                        out_channels=out_channels, num_classes=getattr(module, "num_classes", None))
        image_size = None
        pool = getattr(module.out[-1], "positional_embedding", None) if module.pool == "attention" else None
        if pool is not None:
            spatial = round((pool.shape[1] - 1) ** 0.5)
            image_size = spatial * 2 ** (len(module.channel_mult) - 1)
        return dict(kind=kind, image_size=image_size, in_channels=in_channels, out_channels=out_channels,
                    num_classes=None)
    except (AttributeError, TypeError, IndexError):
        return None


def convert_to_fp16(net: nn.Module) -> None:
    """The network's own convert_to_fp16 (its convolutions in fp16; norms, embeddings and the
    head stay fp32), with `.dtype` set as its use_fp16 constructor sets it."""
    net.convert_to_fp16()
    net.dtype = torch.float16
