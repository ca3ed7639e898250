"""One training run's settings (TrainConfig) and the three tasks' names: what the loop
(training/loop.py), the tasks (training/tasks.py) and checkpoints (training/checkpoints.py, which
record it as JSON) share."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import torch

TASKS = ("diffusion", "classifier", "upsampler")
DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
KIND_OF_TASK = {"diffusion": "unet", "classifier": "classifier", "upsampler": "superres"}
# TrainConfig fields a resumed run may change: they do not change the math of a step.
RESUMABLE_CHANGES = ("steps", "microbatch", "fused_kernels")


def resumable_changes(config: "TrainConfig") -> tuple[str, ...]:
    """RESUMABLE_CHANGES for this run: not `steps` when the learning rate anneals over them."""
    return tuple(k for k in RESUMABLE_CHANGES if not (k == "steps" and config.anneal_lr))



@dataclass(frozen=True)
class TrainConfig:
    """One training run.

    batch_size: the global batch of one optimizer step (all ranks, all microbatches).
    microbatch: per-rank microbatch (0: batch_size / world_size, no accumulation).
    ema_rates: EMA rates kept beside the model (the paper: 0.9999; none for the classifier).
    dtype: "fp32" | "fp16" (autocast + dynamic loss scaling) | "bf16" (autocast).
    schedule_sampler: "uniform" | "loss-second-moment" (diffusion and upsampler).
    anneal_lr: decay the learning rate linearly to 0 at `steps` (the reference's classifier).
    random_flip / random_crop: horizontal flips (p = 0.5) / random resized crops (80-100% of
        the side) applied to the batch. noised: the classifier sees x_t at a sampled t (True)
        or clean images at t = 0.
    """

    task: str
    steps: int
    batch_size: int = 64
    microbatch: int = 0
    lr: float = 1e-4
    weight_decay: float = 0.0
    ema_rates: tuple[float, ...] = (0.9999,)
    dtype: str = "fp32"
    schedule_sampler: str = "uniform"
    anneal_lr: bool = False
    grad_clip: float = 0.0
    random_flip: bool = True
    random_crop: bool = False
    noised: bool = True
    fused_kernels: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        def check(ok, name, expected):
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected {expected}")

        check(self.task in TASKS, "task", f"one of {TASKS}")
        check(self.steps > 0, "steps", "a positive int")
        check(self.batch_size > 0, "batch_size", "a positive int")
        check(self.microbatch >= 0, "microbatch", "0 (no accumulation) or a positive int")
        check(self.lr > 0 and math.isfinite(self.lr), "lr", "a finite positive float")
        check(self.weight_decay >= 0, "weight_decay", "a float >= 0")
        check(self.dtype in DTYPES, "dtype", f"one of {tuple(DTYPES)}")
        check(self.grad_clip >= 0, "grad_clip", "a float >= 0 (0: no clipping)")
        object.__setattr__(self, "ema_rates", tuple(float(r) for r in self.ema_rates))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)
