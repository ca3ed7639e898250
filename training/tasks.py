"""The tasks of ADM's three networks: per-sample losses of one (micro)batch, as the loop
(training/loop.py) calls them, and their means over a data set (`evaluate`).

- `DiffusionTask`: x_t = q_sample(x_0, t, eps); the hybrid loss (training/losses.py), learned-
  range sigma; class labels fed when the model is class-conditional (guided-diffusion's
  TrainLoop + training_losses).
- `UpsamplerTask`: the same on the high-res image, conditioned on its area-downsampled low-res
  version, which the SuperResModel upsamples bilinearly and concatenates (super_res_train.py).
- `ClassifierTask`: cross-entropy of p(y | x_t, t) on inputs noised at a sampled t, with random
  resized crops and flips (classifier_train.py).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from admrt.config import Preset
from admrt.diffusion import build_tables, model_timesteps, q_sample

from .config import TrainConfig
from .losses import classifier_losses, diffusion_losses


@dataclass
class Batch:
    """A (micro)batch and its randomness. x: (B, C, H, W) in [-1, 1]; y: (B,) int64;
    t: (B,) int64 step indices; weights: (B,) importance weights; noise: like x."""

    x: torch.Tensor
    y: torch.Tensor
    t: torch.Tensor
    weights: torch.Tensor
    noise: torch.Tensor
    flip: torch.Tensor   # (B,) bool
    crop: torch.Tensor   # (B, 3): crop fraction, x offset, y offset in [-1, 1]

    def slice(self, start: int, stop: int) -> "Batch":
        return Batch(**{k: v[start:stop] for k, v in self.__dict__.items()})

    def to(self, device) -> "Batch":
        return Batch(**{k: v.to(device, non_blocking=True) for k, v in self.__dict__.items()})


def augment(x: torch.Tensor, flip: torch.Tensor | None, crop: torch.Tensor | None) -> torch.Tensor:
    """Horizontal flips where `flip`, then resized crops: crop[:, 0] = side fraction, crop[:, 1:]
    = where the crop's center sits within the free range, in [-1, 1] (bilinear resampling)."""
    if flip is not None:
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    if crop is not None:
        frac = crop[:, 0]
        theta = torch.zeros(x.shape[0], 2, 3, device=x.device, dtype=torch.float32)
        theta[:, 0, 0] = frac
        theta[:, 1, 1] = frac
        theta[:, 0, 2] = crop[:, 1] * (1 - frac)
        theta[:, 1, 2] = crop[:, 2] * (1 - frac)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return x


class DiffusionTask:
    """Hybrid loss of the ADM UNet (and, with `low_res`, of the upsampler), or the one its
    DiffusionConfig names (predict_xstart, use_kl, rescale_learned_sigmas)."""

    uses_timesteps = True
    metrics = ("loss", "mse", "vb")

    def __init__(self, config, diffusion):
        self.diffusion = diffusion
        self.tables = build_tables(diffusion)
        self.class_cond = config.num_classes is not None

    def conditioning(self, x: torch.Tensor, model) -> dict:
        return {}

    def losses(self, model: nn.Module, b: Batch, cfg: TrainConfig) -> dict[str, torch.Tensor]:
        x0 = augment(b.x, b.flip if cfg.random_flip else None, b.crop if cfg.random_crop else None)
        x_t = q_sample(self.tables, x0, b.t, b.noise)
        kwargs = self.conditioning(x0, model)
        if self.class_cond:
            kwargs["y"] = b.y
        out = model(x_t, model_timesteps(self.tables, b.t), **kwargs)
        return diffusion_losses(self.tables, out, x0, x_t, b.t, b.noise, self.diffusion)


class UpsamplerTask(DiffusionTask):
    """The low-res input is the area-downsampled high-res image (the model upsamples it
    bilinearly and concatenates it to x_t)."""

    def __init__(self, config, diffusion):
        super().__init__(config, diffusion)
        self.low_res_size = config.low_res_size

    def conditioning(self, x: torch.Tensor, model) -> dict:
        return {"low_res": F.interpolate(x, size=(self.low_res_size, self.low_res_size), mode="area")}


class ClassifierTask:
    """Cross-entropy of the noisy classifier p(y | x_t, t)."""

    uses_timesteps = True
    metrics = ("loss", "acc@1")

    def __init__(self, config, diffusion):
        self.tables = build_tables(diffusion)

    def losses(self, model: nn.Module, b: Batch, cfg: TrainConfig) -> dict[str, torch.Tensor]:
        x = augment(b.x, b.flip if cfg.random_flip else None, b.crop if cfg.random_crop else None)
        if cfg.noised:
            x = q_sample(self.tables, x, b.t, b.noise)
            ts = model_timesteps(self.tables, b.t)
        else:
            ts = torch.zeros_like(b.t)
        return classifier_losses(model(x, ts), b.y)


TASK_TYPES = {"diffusion": DiffusionTask, "upsampler": UpsamplerTask, "classifier": ClassifierTask}


def make_task(config: TrainConfig, preset: Preset):
    """The task object of `config.task` for a network of this preset."""
    return TASK_TYPES[config.task](preset.model, preset.diffusion)


@torch.no_grad()
def evaluate(model: nn.Module, dataset, config: TrainConfig, preset: Preset | None = None, *,
             device=None, batch_size: int = 500, seed: int = 1234) -> dict[str, float]:
    """Mean loss terms of `model` on `dataset` (e.g. the test split) at uniformly drawn t with
    fixed noise, no augmentation; for a classifier also the accuracy at t = 0, T/4, T/2."""
    preset = preset or model.preset
    device = torch.device(device) if device is not None else next(model.parameters()).device
    cfg = TrainConfig(**{**asdict(config), "random_flip": False, "random_crop": False})
    task = make_task(cfg, preset)
    was_training = model.training
    model.eval()
    n = len(dataset)
    g = torch.Generator().manual_seed(seed)
    sums: dict[str, float] = {}
    fixed_t = {0: 0, 4: task.tables.num_timesteps // 4, 2: task.tables.num_timesteps // 2}
    for lo in range(0, n, batch_size):
        items = [dataset[i] for i in range(lo, min(n, lo + batch_size))]
        x = torch.stack([it[0] for it in items])
        y = torch.stack([torch.as_tensor(it[1]) for it in items])
        b = len(items)
        t = torch.randint(0, task.tables.num_timesteps, (b,), generator=g)
        batch = Batch(x=x, y=y, t=t, weights=torch.ones(b), noise=torch.randn(x.shape, generator=g),
                      flip=torch.zeros(b, dtype=torch.bool), crop=torch.zeros(b, 3)).to(device)
        for k, v in task.losses(model, batch, cfg).items():
            sums[k] = sums.get(k, 0.0) + float(v.sum())
        if cfg.task == "classifier":
            for name, tv in fixed_t.items():
                bt = Batch(**{**batch.__dict__, "t": torch.full_like(batch.t, tv)})
                acc = task.losses(model, bt, cfg)["acc@1"]
                key = "acc@1_t0" if name == 0 else f"acc@1_tT/{name}"
                sums[key] = sums.get(key, 0.0) + float(acc.sum())
    model.train(was_training)
    return {k: round(v / n, 5) for k, v in sums.items()}
