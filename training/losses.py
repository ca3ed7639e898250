"""Training objectives of ADM and their timestep samplers.

- Diffusion: the hybrid objective of Improved DDPM (Nichol & Dhariwal 2021, sec. 3.1), used by
  ADM: L_hybrid = L_simple + lambda * L_vlb with lambda = 0.001. L_simple is the eps-MSE; L_vlb
  is estimated from one uniformly drawn t as T * L_t, where L_t is KL(q(x_{t-1}|x_t,x_0) ||
  p(x_{t-1}|x_t)) in bits/dim (the discretized Gaussian decoder NLL at t = 0), computed with the
  predicted mean frozen (stop-gradient) so that L_vlb trains only the variance (sec. 3.1).
  At T = 1000 this is guided-diffusion's `training_losses` "mse + vb"; its other settings
  (predict_xstart, use_kl, rescale_learned_sigmas, sigma_small: admrt.DiffusionConfig) too.
- Noisy classifier: cross-entropy of p(y | x_t, t) (Dhariwal & Nichol sec. 4).
- Timestep samplers: uniform, and the loss-second-moment importance sampler (Improved DDPM
  sec. 3.3: p_t proportional to sqrt(E[L_t^2]), with the loss reweighted by 1/(T p_t)),
  implemented with torch (no numpy random state: it works with numpy 2 and is resumable).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from admrt.config import DiffusionConfig
from admrt.diffusion import (DiffusionTables, fixed_variance, learned_range_variance, predict_xstart_from_eps,
                             q_posterior_mean_variance)


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dimension: (B, ...) -> (B,)."""
    return x.mean(dim=tuple(range(1, x.dim())))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats:
    0.5 * (logvar2 - logvar1 + (exp(logvar1) + (mean1 - mean2)^2) / exp(logvar2) - 1)."""
    return 0.5 * (logvar2 - logvar1 - 1.0 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Phi(x) by the tanh approximation 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor,
                                        log_scales: torch.Tensor) -> torch.Tensor:
    """log p(x) of 8-bit data x in [-1, 1] under N(means, exp(log_scales)^2) integrated over
    each pixel's bin of width 2/255 (Ho et al. 2020 eq. 13); the edge bins extend to +-inf.
    Elementwise, in nats."""
    half_bin = 1.0 / 255.0
    inv_std = torch.exp(-log_scales)
    centered = x - means
    cdf_upper = approx_standard_normal_cdf(inv_std * (centered + half_bin))
    cdf_lower = approx_standard_normal_cdf(inv_std * (centered - half_bin))
    log_upper = torch.log(cdf_upper.clamp(min=1e-12))            # bin (-inf, x + 1/255]
    log_one_minus_lower = torch.log((1.0 - cdf_lower).clamp(min=1e-12))  # bin [x - 1/255, inf)
    log_delta = torch.log((cdf_upper - cdf_lower).clamp(min=1e-12))
    return torch.where(x < -0.999, log_upper, torch.where(x > 0.999, log_one_minus_lower, log_delta))


def vlb_terms_bits(tables: DiffusionTables, pred_x0: torch.Tensor, model_log_var: torch.Tensor,
                   x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """L_t in bits/dim, (B,): KL between the true posterior and p(x_{t-1} | x_t) for t > 0, the
    decoder NLL at t = 0 (reference: _vb_terms_bpd with clip_denoised=False). p's mean is the
    posterior mean at the predicted x_0 (not clipped), its log variance `model_log_var`."""
    true_mean, _, true_log_var = q_posterior_mean_variance(tables, x_start, x_t, t)
    model_mean, _, _ = q_posterior_mean_variance(tables, pred_x0, x_t, t)
    kl = mean_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / math.log(2.0)
    nll = -mean_flat(discretized_gaussian_log_likelihood(
        x_start, means=model_mean, log_scales=0.5 * model_log_var)) / math.log(2.0)
    return torch.where(t == 0, nll, kl)


def diffusion_losses(tables: DiffusionTables, model_output: torch.Tensor, x_start: torch.Tensor,
                     x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                     diffusion: DiffusionConfig | None = None) -> dict[str, torch.Tensor]:
    """Per-sample loss terms, each (B,) float32, as guided-diffusion's training_losses for the
    process `diffusion` (default DiffusionConfig()):

    - "mse": L_simple, the MSE to eps (or to x_0 when predict_xstart);
    - "vb": L_t in bits/dim (learned sigma), with the predicted mean frozen so that it trains
      only the variance (Improved DDPM sec. 3.1), weighted by T/1000 if rescale_learned_sigmas;
    - "loss" = mse + vb, or mse alone for a fixed-sigma model (output channels = C);
    - use_kl: "loss" = T * L_t alone (RESCALED_KL), mean and variance both trained.
    """
    diffusion = diffusion or DiffusionConfig()
    model_output = model_output.float()
    c = x_start.shape[1]
    if model_output.shape[1] == 2 * c:
        pred, var_values = model_output[:, :c], model_output[:, c:]
        log_var = learned_range_variance(tables, var_values, t)[1]
    elif model_output.shape[1] == c:
        pred, var_values = model_output, None
        log_var = fixed_variance(tables, t, x_t, "small" if diffusion.sigma_small else "large")[1]
    else:
        raise ValueError(f"model_output: expected {c} or {2 * c} channels, got {model_output.shape[1]}")

    def x0_of(p: torch.Tensor) -> torch.Tensor:
        return p if diffusion.predict_xstart else predict_xstart_from_eps(tables, x_t, t, p)

    if diffusion.use_kl:
        return {"loss": vlb_terms_bits(tables, x0_of(pred), log_var, x_start, x_t, t) * tables.num_timesteps}
    target = x_start if diffusion.predict_xstart else noise.float()
    terms = {"mse": mean_flat((target - pred) ** 2)}
    if var_values is None:
        terms["loss"] = terms["mse"]
        return terms
    # Stop-gradient on the mean: the bound term only trains the variance.
    vb = vlb_terms_bits(tables, x0_of(pred.detach()), log_var, x_start, x_t, t)
    if diffusion.rescale_learned_sigmas:
        vb = vb * (tables.num_timesteps / 1000.0)
    terms["vb"] = vb
    terms["loss"] = terms["mse"] + vb
    return terms


def classifier_losses(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample cross-entropy and top-1 accuracy, (B,) each."""
    logits = logits.float()
    return {"loss": F.cross_entropy(logits, labels, reduction="none"),
            "acc@1": (logits.argmax(dim=-1) == labels).float()}


# ---------------------------------------------------------------------------------------------
# Timestep samplers
# ---------------------------------------------------------------------------------------------

class UniformSampler:
    """t ~ U{0..T-1}, weights 1."""

    name = "uniform"

    def __init__(self, num_timesteps: int):
        if num_timesteps <= 0:
            raise ValueError(f"num_timesteps={num_timesteps}: expected a positive int")
        self.num_timesteps = num_timesteps

    def probabilities(self) -> torch.Tensor:
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(t int64 (B,), importance weights float32 (B,) = 1 / (T p_t)), on the CPU."""
        p = self.probabilities()
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        w = 1.0 / (self.num_timesteps * p[t])
        return t, w.float()

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record the losses of a global batch (every rank must pass the same values)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


class LossSecondMomentSampler(UniformSampler):
    """Importance sampling by sqrt(E[L_t^2]) over the last `history` losses of each t, mixed
    with `uniform_prob` of the uniform distribution; uniform until every t has `history`
    losses (Improved DDPM sec. 3.3; guided-diffusion's LossSecondMomentResampler)."""

    name = "loss-second-moment"

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001):
        super().__init__(num_timesteps)
        if history <= 0:
            raise ValueError(f"history={history}: expected a positive int")
        if not 0.0 <= uniform_prob <= 1.0:
            raise ValueError(f"uniform_prob={uniform_prob}: expected a value in [0, 1]")
        self.history, self.uniform_prob = history, uniform_prob
        self.loss_history = torch.zeros(num_timesteps, history, dtype=torch.float64)
        self.loss_counts = torch.zeros(num_timesteps, dtype=torch.int64)

    def warmed_up(self) -> bool:
        return bool((self.loss_counts == self.history).all())

    def probabilities(self) -> torch.Tensor:
        if not self.warmed_up():
            return super().probabilities()
        w = self.loss_history.pow(2).mean(dim=-1).sqrt()
        w = w / w.sum()
        return w * (1.0 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        for ti, li in zip(t.tolist(), losses.detach().double().cpu().tolist()):
            n = int(self.loss_counts[ti])
            if n == self.history:  # drop the oldest
                self.loss_history[ti, :-1] = self.loss_history[ti, 1:].clone()
                self.loss_history[ti, -1] = li
            else:
                self.loss_history[ti, n] = li
                self.loss_counts[ti] = n + 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"loss_history": self.loss_history.clone(), "loss_counts": self.loss_counts.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.loss_history = state["loss_history"].to(torch.float64).clone()
        self.loss_counts = state["loss_counts"].to(torch.int64).clone()


SAMPLERS = {"uniform": UniformSampler, "loss-second-moment": LossSecondMomentSampler}


def make_sampler(name: str, num_timesteps: int) -> UniformSampler:
    if name not in SAMPLERS:
        raise ValueError(f"schedule_sampler={name!r}: expected one of {sorted(SAMPLERS)}")
    return SAMPLERS[name](num_timesteps)
