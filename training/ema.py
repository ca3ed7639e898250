"""Exponential moving averages of a model's parameters (guided-diffusion's update_ema):
theta_ema <- rate * theta_ema + (1 - rate) * theta, one copy per rate (ADM uses 0.9999)."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


class EMA:
    """EMA copies of `model`, one per rate in `rates`. Each copy is a full module (eval mode,
    no gradients), so it can be sampled from and saved with admrt.save_model directly."""

    def __init__(self, model: nn.Module, rates: tuple[float, ...] | list[float]):
        rates = tuple(float(r) for r in rates)
        for r in rates:
            if not 0.0 <= r < 1.0:
                raise ValueError(f"ema rate={r}: expected a value in [0, 1)")
        if len(set(rates)) != len(rates):
            raise ValueError(f"ema rates={rates}: expected distinct values")
        self.rates = rates
        self.models: dict[float, nn.Module] = {}
        for r in rates:
            m = copy.deepcopy(model).eval()
            m.requires_grad_(False)
            self.models[r] = m

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        src = [p.detach() for p in model.parameters()]
        for rate, ema_model in self.models.items():
            dst = list(ema_model.parameters())
            # lerp(dst, src, 1 - rate) = rate * dst + (1 - rate) * src
            torch._foreach_lerp_(dst, [s.to(d.dtype) for s, d in zip(src, dst)], 1.0 - rate)

    @staticmethod
    def name(rate: float) -> str:
        """File-name tag of a rate: 0.9999 -> "0.9999"."""
        return repr(float(rate))

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for rate, m in self.models.items():
            for k, v in m.state_dict().items():
                out[f"{self.name(rate)}/{k}"] = v
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for rate, m in self.models.items():
            prefix = f"{self.name(rate)}/"
            sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if not sub:
                raise ValueError(f"EMA state has no entries for rate {rate} (keys start with "
                                 f"{sorted({k.split('/')[0] for k in state})})")
            m.load_state_dict(sub, strict=True)
