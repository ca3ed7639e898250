"""Feature networks for the evaluator: pool features (FID, precision/recall), logits (Inception
Score) and spatial features (sFID), from uint8 NHWC images of any size.

Two networks share one interface (`FeatureNetwork`):

- `InceptionV3FID`: the Inception-v3 graph that openai/guided-diffusion's evaluations/evaluator.py
  runs (TF `classify_image_graph_def.pb`, "inception-2015-12-05"), written in torch and loaded from
  the user's local copy of pytorch-fid's `pt_inception-2015-12-05-*.pth` (same state-dict keys as
  torchvision's Inception3 with num_classes=1008, no aux head). As the reference:
    * input: float pixels in [0, 255], resized to 299x299 with TF1's legacy bilinear resize
      (align_corners=False, no half-pixel centers), then (x - 128) / 128;
    * pool features: `pool_3` (2048, global average after Mixed_7c);
    * spatial features: `mixed_6/conv` = the ReLU output of Mixed_6d's 1x1 branch, first 7
      channels, 17x17, flattened in NHWC order (7 * 17 * 17 = 2023 values);
    * logits for IS: `pool_3 @ W` with W the `softmax/logits/MatMul` weight, no bias (the
      reference's `_create_softmax_graph`).
  The FID-specific blocks follow pytorch-fid (avg pools that exclude padding; max pool in the
  last block's pool branch), which reproduces the TF graph.
- `FashionFeatureNet`: a small CNN classifier trained by admrt on Fashion-MNIST's training split
  and bundled as admrt/bundled/fashion_features.safetensors (see train_features.py). Its figures
  are NOT comparable with Inception-based FID/IS/precision/recall: they only rank models on
  Fashion-MNIST against each other.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from admrt.io import hash_file

BUNDLED_FASHION_FEATURES = Path(__file__).resolve().parent.parent / "bundled" / "fashion_features.safetensors"


@dataclass(frozen=True)
class Activations:
    """Features of N images. pool: (N, D) float32; spatial: (N, S) float32; logits: (N, K) float32."""

    pool: np.ndarray
    spatial: np.ndarray
    logits: np.ndarray

    def __len__(self) -> int:
        return len(self.pool)


class FeatureNetwork(nn.Module):
    """Base: `forward(images uint8 (B, H, W, C))` -> (pool (B, D), spatial (B, S), logits (B, K)).

    Subclasses set `name` (short, used in cache keys and reports) and `fingerprint` (a hash of
    the weights, so that cached reference statistics never outlive the network that made them)."""

    name: str = "features"
    fingerprint: str = ""

    @torch.no_grad()
    def activations(self, batches, device: str | torch.device = "cpu") -> Activations:
        """Run the network over an iterable of uint8 NHWC numpy batches."""
        self.eval().to(device)
        pools, spatials, logits = [], [], []
        for batch in batches:
            batch = np.asarray(batch)
            if batch.dtype != np.uint8 or batch.ndim != 4:
                raise ValueError(f"images: expected uint8 (N, H, W, C), got {batch.dtype} {batch.shape}")
            if not batch.flags.writeable or not batch.flags.c_contiguous:  # streamed from an .npz
                batch = np.array(batch, copy=True, order="C")
            x = torch.from_numpy(batch).to(device)
            p, s, l = self(x)
            pools.append(p.float().cpu().numpy())
            spatials.append(s.float().cpu().numpy())
            logits.append(l.float().cpu().numpy())
        if not pools:
            raise ValueError("images: got no batches (an empty set has no statistics)")
        return Activations(np.concatenate(pools), np.concatenate(spatials), np.concatenate(logits))


def _nhwc_uint8_to_float(images: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float32 (B, channels, H, W) in [0, 255]; gray <-> RGB as needed."""
    if images.dim() != 4:
        raise ValueError(f"images: expected (B, H, W, C), got shape {tuple(images.shape)}")
    x = images.permute(0, 3, 1, 2).to(torch.float32)
    c = x.shape[1]
    if c == channels:
        return x
    if c == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1)
    if c == 3 and channels == 1:  # ITU-R BT.601 luma, as PIL's convert("L")
        w = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
        return (x * w).sum(1, keepdim=True)
    raise ValueError(f"images: expected 1 or 3 channels, got {c}")


# ----------------------------------------------------------------------------------------------
# Inception-v3 (FID weights)


def tf1_resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TF1 `tf.image.resize_bilinear(align_corners=False)` (legacy, no half-pixel centers):
    output pixel i samples the input at i * in/out. x: (B, C, H, W) float."""

    def axis(n_in: int, n_out: int):
        src = torch.arange(n_out, dtype=torch.float64, device=x.device) * (n_in / n_out)
        i0 = src.floor().long().clamp_(max=n_in - 1)
        i1 = (i0 + 1).clamp_(max=n_in - 1)
        return i0, i1, (src - i0).to(x.dtype)

    (h, w), (oh, ow) = x.shape[-2:], size
    if (h, w) == (oh, ow):
        return x
    i0, i1, wy = axis(h, oh)
    x = x[:, :, i0] * (1 - wy)[:, None] + x[:, :, i1] * wy[:, None]
    j0, j1, wx = axis(w, ow)
    return x[..., j0] * (1 - wx) + x[..., j1] * wx


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU; keys `conv.*`, `bn.*` as torchvision."""

    def __init__(self, cin: int, cout: int, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x):
    # TF's 3x3 SAME average pool divides by the number of real (unpadded) inputs.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x, return_branch1x1: bool = False):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                     self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = conv(bd)
        bp = self.branch_pool(_avg_pool_tf(x))
        out = torch.cat([b1, b7, bd, bp], 1)
        return (out, b1) if return_branch1x1 else out


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """`max_pool_branch`: the FID graph's last block pools its pool branch with max, not avg."""

    def __init__(self, cin: int, max_pool_branch: bool):
        super().__init__()
        self.max_pool_branch = max_pool_branch
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        if self.max_pool_branch:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _avg_pool_tf(x)
        return torch.cat([b1, b3, bd, self.branch_pool(pooled)], 1)


class InceptionV3FID(FeatureNetwork):
    """The reference evaluator's Inception-v3 (see the module docstring). Build with
    `InceptionV3FID.from_file(path)`; `InceptionV3FID()` alone has random weights (tests)."""

    name = "inception-v3-fid"
    input_size = 299
    spatial_channels = 7

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool_branch=False)
        self.Mixed_7c = InceptionE(2048, max_pool_branch=True)
        self.fc = nn.Linear(2048, 1008)  # softmax/logits; the evaluator uses its weight only

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "InceptionV3FID":
        """Load pytorch-fid's `pt_inception-2015-12-05-*.pth` (a plain state dict; read with
        weights_only=True) or the same tensors saved as .safetensors."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"inception weights {str(path)!r} not found: pass --inception-weights the local path of "
                f"pytorch-fid's pt_inception-2015-12-05-6726825d.pth (admrt never downloads it)")
        from admrt.checkpoint import checkpoint_format, read_safetensors_state, read_torch_state
        if path.suffix == ".safetensors" or checkpoint_format(path) == "safetensors":
            state = read_safetensors_state(path)[0]
        else:
            state = read_torch_state(path)   # weights_only; one line naming the file when it is not one
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
        net = cls()
        own = {k for k in net.state_dict() if not k.endswith("num_batches_tracked")}
        missing, unexpected = sorted(own - state.keys()), sorted(state.keys() - own)
        if missing or unexpected:
            raise ValueError(
                f"{path}: not pytorch-fid's pt_inception-2015-12-05 layout; missing keys {missing[:5]}"
                f"{'...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                f"{'...' if len(unexpected) > 5 else ''}")
        _load_checked(net, state, path)
        net.fingerprint = hash_file(path).hexdigest()
        return net.eval()

    def forward(self, images: torch.Tensor):
        """images: uint8 (B, H, W, 1|3) -> pool (B, 2048), spatial (B, 2023), logits (B, 1008)."""
        x = _nhwc_uint8_to_float(images, 3)                      # [0, 255]
        x = tf1_resize_bilinear(x, (self.input_size, self.input_size))
        x = (x - 128.0) / 128.0                                   # the graph's Sub/Mul
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))
        x, branch = self.Mixed_6d(x, return_branch1x1=True)     # mixed_6/conv: (B, 192, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))
        pool = x.mean(dim=(2, 3))                                  # pool_3: (B, 2048)
        spatial = branch[:, : self.spatial_channels].permute(0, 2, 3, 1).flatten(1)  # NHWC order
        logits = pool @ self.fc.weight.t()                         # softmax/logits/MatMul, no bias
        return pool, spatial, logits


# ----------------------------------------------------------------------------------------------
# The bundled Fashion-MNIST feature network


@dataclass(frozen=True)
class FashionNetConfig:
    """Architecture of `FashionFeatureNet`: `stages[i]` lists the output widths of the 3x3 convs
    (+ BatchNorm + ReLU) of stage i; stages run at input_size / 2**i pixels (2x2 max pool between
    them). Stored as JSON in the weights' metadata."""

    stages: tuple[tuple[int, ...], ...] = ((16, 16), (32, 32), (64, 64), (128,))
    num_classes: int = 10
    input_size: int = 32
    spatial_stage: int = 2       # the spatial features come from this stage's first conv
    spatial_channels: int = 7    # ... its first 7 channels, as the reference's sFID

    def __post_init__(self):
        if not self.stages or any(not s for s in self.stages):
            raise ValueError(f"stages={self.stages!r}: expected non-empty tuples of conv widths")
        if not 0 <= self.spatial_stage < len(self.stages):
            raise ValueError(f"spatial_stage={self.spatial_stage}: expected 0..{len(self.stages) - 1}")
        if self.spatial_channels > self.stages[self.spatial_stage][0]:
            raise ValueError(f"spatial_channels={self.spatial_channels}: stage {self.spatial_stage} "
                             f"has only {self.stages[self.spatial_stage][0]} channels")

    def to_json(self) -> str:
        return json.dumps({"stages": [list(s) for s in self.stages], "num_classes": self.num_classes,
                           "input_size": self.input_size, "spatial_stage": self.spatial_stage,
                           "spatial_channels": self.spatial_channels})

    @classmethod
    def from_json(cls, text: str) -> "FashionNetConfig":
        d = json.loads(text)
        return cls(stages=tuple(tuple(int(c) for c in s) for s in d["stages"]),
                   num_classes=int(d["num_classes"]), input_size=int(d["input_size"]),
                   spatial_stage=int(d["spatial_stage"]), spatial_channels=int(d["spatial_channels"]))


def fashion_input(images: torch.Tensor, input_size: int) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float32 (B, 1, S, S) in [-1, 1], S = input_size.

    28x28 images (raw Fashion-MNIST) are first padded with 2 black pixels to 32x32, the framing
    admrt's training data uses (training/data.py); other sizes are resized as they are
    (bilinear; antialiased when shrinking)."""
    x = _nhwc_uint8_to_float(images, 1) / 127.5 - 1.0
    if x.shape[-2:] == (28, 28) and input_size == 32:
        x = F.pad(x, (2, 2, 2, 2), value=-1.0)
    if x.shape[-2:] != (input_size, input_size):
        shrink = x.shape[-1] > input_size or x.shape[-2] > input_size
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False,
                          antialias=shrink)
    return x


class FashionFeatureNet(FeatureNetwork):
    """A small VGG-style CNN classifier of Fashion-MNIST (trained by train_features.py).

    pool: global average of the last stage (stages[-1][-1] values); logits: its linear head
    (10 classes); spatial: the first `spatial_channels` channels of the first conv of stage
    `spatial_stage` (8x8 by default; ReLU output, NHWC order), in the role of the reference's
    `mixed_6/conv`."""

    name = "fashion-cnn"

    def __init__(self, config: FashionNetConfig = FashionNetConfig()):
        super().__init__()
        self.config = config
        cin, stages = 1, []
        for widths in config.stages:
            convs = []
            for cout in widths:
                convs.append(nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)))
                cin = cout
            stages.append(nn.ModuleList(convs))
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(cin, config.num_classes)

    def forward_float(self, x: torch.Tensor):
        """x: float (B, 1, S, S) in [-1, 1] -> pool, spatial, logits (used by training too)."""
        spatial = None
        for i, convs in enumerate(self.stages):
            if i > 0:
                x = F.max_pool2d(x, 2)
            for j, conv in enumerate(convs):
                x = F.relu(conv(x))
                if i == self.config.spatial_stage and j == 0:
                    spatial = x[:, : self.config.spatial_channels].permute(0, 2, 3, 1).flatten(1)
        pool = x.mean(dim=(2, 3))
        return pool, spatial, self.head(pool)

    def forward(self, images: torch.Tensor):
        """images: uint8 (B, H, W, 1|3) of any size."""
        return self.forward_float(fashion_input(images, self.config.input_size))

    def save(self, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
        from safetensors.torch import save_file
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()
                 if not k.endswith("num_batches_tracked")}
        meta = {"format": "admrt-fashion-features", "config": self.config.to_json(), **(metadata or {})}
        save_file(state, str(path), metadata=meta)

    @classmethod
    def from_file(cls, path: str | os.PathLike | None = None) -> "FashionFeatureNet":
        """Load the bundled network (default) or another file written by `save`."""
        from admrt.checkpoint import checkpoint_format, read_safetensors_state
        path = Path(path) if path is not None else BUNDLED_FASHION_FEATURES
        if not path.is_file():
            raise FileNotFoundError(
                f"fashion feature network {str(path)!r} not found (the bundled one is written by "
                f"`python -m admrt.evaluation.train_features`)")
        if checkpoint_format(path) != "safetensors":
            raise ValueError(f"{path}: not a .safetensors file (a fashion feature network is one, written by "
                             "FashionFeatureNet.save)")
        state, meta = read_safetensors_state(path)   # one line naming the file when it is not one
        if meta.get("format") != "admrt-fashion-features":
            raise ValueError(f"{path}: metadata format={meta.get('format')!r}, expected 'admrt-fashion-features' "
                             "(a file written by FashionFeatureNet.save)")
        try:
            config = FashionNetConfig.from_json(meta["config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: its metadata 'config' is not a FashionNetConfig ({exc})") from None
        net = cls(config)
        own = {k for k in net.state_dict() if not k.endswith("num_batches_tracked")}
        missing, unexpected = sorted(own - state.keys()), sorted(state.keys() - own)
        if missing or unexpected:
            raise ValueError(f"{path}: does not match its config; missing {missing[:5]}, unexpected {unexpected[:5]}")
        _load_checked(net, state, path)
        net.fingerprint = hash_file(path).hexdigest()
        net.metadata = meta
        return net.eval()


def _load_checked(net: nn.Module, state: dict, path: Path) -> None:
    """Assign `state` (keys already checked) to `net`; a tensor of another shape is named in one line."""
    own = net.state_dict()
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        k, got, want = wrong[0]
        raise ValueError(f"{path}: {len(wrong)} tensors of another shape than the network's (first: {k}: file {got}, "
                         f"network {want})")
    net.load_state_dict(state, strict=False)


def load_feature_network(kind: str = "fashion", weights: str | os.PathLike | None = None) -> FeatureNetwork:
    """`kind` "fashion" (bundled CNN, or `weights`) or "inception" (`weights` required)."""
    if kind == "fashion":
        return FashionFeatureNet.from_file(weights)
    if kind == "inception":
        if weights is None:
            raise ValueError("features='inception' needs weights: the local path of pytorch-fid's "
                             "pt_inception-2015-12-05-6726825d.pth (--inception-weights)")
        return InceptionV3FID.from_file(weights)
    raise ValueError(f"features={kind!r}: expected 'fashion' or 'inception'")
