"""Diffusion math shared by training and sampling: schedules, respacing, coefficient tables.

Follows guided-diffusion's gaussian_diffusion.py and respace.py (Ho et al. 2020; Nichol &
Dhariwal 2021, "Improved DDPM"; Dhariwal & Nichol 2021). Everything the C++ sampler needs is a
float64 table built once here (`DiffusionTables`); the sampler loop itself lives in
engine/csrc and never in Python.

Symbols: beta_t (betas), alpha_t = 1 - beta_t, abar_t = prod_{s<=t} alpha_s (alphas_cumprod),
posterior q(x_{t-1} | x_t, x_0) = N(coef1_t x_0 + coef2_t x_t, beta~_t).

Timesteps `t` passed to the functions below are int64 (B,) indices into the (possibly respaced)
tables; the network is fed `model_timesteps(tables, t)` (the original 0..T-1 timesteps).
Coefficients are gathered in float64 and cast to float32 before they touch a tensor, exactly as
the reference's `_extract_into_tensor`.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np
import torch

from .config import DiffusionConfig

__all__ = [
    "betas_for_schedule", "space_timesteps", "DiffusionTables", "build_tables",
    "model_timesteps", "q_sample", "q_mean_variance", "q_posterior_mean_variance",
    "predict_xstart_from_eps", "predict_eps_from_xstart", "learned_range_variance",
    "fixed_variance", "default_variance",
]


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------

def betas_for_schedule(noise_schedule: str, num_timesteps: int) -> np.ndarray:
    """beta_1..beta_T (float64) of a named schedule (reference: get_named_beta_schedule).

    "linear": Ho et al.'s 1e-4..0.02, rescaled by 1000/T so any T gives a similar process.
    "cosine": Nichol & Dhariwal eq. 17, abar(t) = cos^2(((t/T + s)/(1 + s)) * pi/2), s = 0.008,
    beta_t = min(1 - abar(t+1)/abar(t), 0.999).
    """
    if num_timesteps <= 0:
        raise ValueError(f"num_timesteps={num_timesteps}: expected a positive int")
    if noise_schedule == "linear":
        scale = 1000 / num_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)
    if noise_schedule == "cosine":
        def abar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - abar((i + 1) / num_timesteps) / abar(i / num_timesteps), 0.999)
                 for i in range(num_timesteps)]
        return np.array(betas, dtype=np.float64)
    raise ValueError(f"noise_schedule={noise_schedule!r}: expected 'linear' or 'cosine'")


# ---------------------------------------------------------------------------------------------
# Respacing
# ---------------------------------------------------------------------------------------------



def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int],
                    alphas_cumprod: np.ndarray | None = None) -> list[int]:
    """The original timesteps kept by a respacing, sorted (reference: respace.space_timesteps).

    section_counts: "N" or N (N steps strided over the whole process), "a,b,c" or [a, b, c]
    (the process cut into equal sections, a steps in the first, ...), or "ddimN" (the DDIM
    paper's fixed integer stride giving exactly N steps); text is parsed by the core's StepPlan
    (its grammar: engine/csrc/plan.h), and a parsed StepPlan is taken as is. Within a section the stride is the
    float (size-1)/(count-1), accumulated and rounded with Python's round (half to even), so
    "25" of 1000 keeps 0, 42, 83, 125, 166, ...

    Solver grids (plan.h): "tN" keeps round(linspace(0, T-1, N+1)) without its 0 (diffusers'
    "linspace" spacing); "logsnrN" the same with the N+1 points uniform in log-SNR between
    t = T-1 and t = 0 (it needs the process's `alphas_cumprod`), each rounded to the nearest
    timestep and pushed down where rounding would repeat one. The model is called at these N; the
    respaced process then ends on clean data (its abar_prev is 1 at the smallest).
    """
    if num_timesteps <= 0:
        raise ValueError(f"num_timesteps={num_timesteps}: expected a positive int")
    if isinstance(section_counts, str) or hasattr(section_counts, "ddim_steps"):
        # The one parser of step plans is the core's (engine/csrc/plan.h): "ddimN" or counts.
        from admrt.core import StepPlan

        plan = section_counts if hasattr(section_counts, "ddim_steps") else StepPlan.parse(section_counts)
        if plan.grid_steps:
            return _solver_grid(num_timesteps, plan.grid_steps, plan.spacing, alphas_cumprod)
        if plan.ddim_steps:
            desired = plan.ddim_steps
            for stride in range(1, num_timesteps):
                kept = range(0, num_timesteps, stride)
                if len(kept) == desired:
                    return list(kept)
            if desired == num_timesteps:  # the reference only tries strides >= 1 below T
                return list(range(num_timesteps))
            raise ValueError(f"steps={plan.respacing!r}: no integer stride gives exactly {desired} "
                             f"of {num_timesteps} timesteps")
        counts = list(plan.sections)
    elif isinstance(section_counts, (int, np.integer)):
        counts = [int(section_counts)]
    else:
        counts = [int(x) for x in section_counts]
    if not counts or any(c <= 0 for c in counts):
        raise ValueError(f"steps={section_counts!r}: expected positive step counts")

    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, set()
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"steps={section_counts!r}: cannot take {count} steps from a section "
                             f"of {size} timesteps (T={num_timesteps})")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            kept.add(start + round(cur))
            cur += stride
        start += size
    return sorted(kept)


def _solver_grid(num_timesteps: int, n: int, spacing: str, alphas_cumprod) -> list[int]:
    """The N model timesteps of a "tN" / "logsnrN" grid (space_timesteps), sorted."""
    if n >= num_timesteps:
        raise ValueError(f"steps={spacing}{n}: a solver grid takes fewer than T={num_timesteps} steps")
    if spacing == "t":
        points = np.linspace(0, num_timesteps - 1, n + 1).round()
    else:
        if alphas_cumprod is None:
            raise ValueError(f"steps=logsnr{n}: a log-SNR grid needs the process's alphas_cumprod")
        ac = np.asarray(alphas_cumprod, dtype=np.float64)
        lam = 0.5 * (np.log(ac) - np.log1p(-ac))  # decreasing in t
        targets = np.linspace(lam[-1], lam[0], n + 1)
        # nearest timestep in log-SNR
        points = np.array([int(np.argmin(np.abs(lam - v))) for v in targets], dtype=np.float64)
        points = points[::-1]  # increasing t, like the linspace branch
    kept = [int(v) for v in points[::-1][:-1]]  # t = T-1 first, without the final point
    for i in range(1, n):  # strictly decreasing: push a repeat down
        kept[i] = min(kept[i], kept[i - 1] - 1)
    if kept[-1] < 0:
        raise ValueError(f"steps={spacing}{n}: too many steps for T={num_timesteps}")
    return sorted(kept)


# ---------------------------------------------------------------------------------------------
# Coefficient tables
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class DiffusionTables:
    """Per-step coefficients of one (possibly respaced) process, float64 tensors of shape (N,).

    Index i runs over the N kept steps; `timestep_map[i]` is the original timestep fed to the
    network. A respaced process has betas_i = 1 - abar_{map[i]} / abar_{map[i-1]}, so its
    abar equals the original's at the kept steps (reference: SpacedDiffusion).
    """

    num_timesteps: int          # N, the number of (kept) steps
    original_num_steps: int     # T of the trained process
    rescale_timesteps: bool     # feed t * 1000/T (float) instead of t to the network
    timestep_map: torch.Tensor  # int64 (N,): original timestep of step i
    betas: torch.Tensor
    log_betas: torch.Tensor                      # max log-variance of the learned range
    alphas_cumprod: torch.Tensor                 # abar_t
    alphas_cumprod_prev: torch.Tensor            # abar_{t-1} (1 at t = 0)
    alphas_cumprod_next: torch.Tensor            # abar_{t+1} (0 at the end)
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    log_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor      # 1/sqrt(abar_t)
    sqrt_recipm1_alphas_cumprod: torch.Tensor    # sqrt(1/abar_t - 1)
    posterior_variance: torch.Tensor             # beta~_t
    posterior_log_variance_clipped: torch.Tensor  # log beta~_t, with beta~_0 := beta~_1
    posterior_mean_coef1: torch.Tensor           # coefficient of x_0
    posterior_mean_coef2: torch.Tensor           # coefficient of x_t
    fixed_large_variance: torch.Tensor           # [beta~_1, beta_1, ..., beta_{N-1}]
    fixed_large_log_variance: torch.Tensor

    @staticmethod
    def from_betas(betas: Sequence[float] | np.ndarray, *, timestep_map: Sequence[int] | None = None,
                   original_num_steps: int | None = None,
                   rescale_timesteps: bool = False) -> "DiffusionTables":
        """Tables of the process with these betas (reference: GaussianDiffusion.__init__)."""
        b = np.asarray(betas, dtype=np.float64)
        if b.ndim != 1 or b.size == 0 or not ((b > 0).all() and (b <= 1).all()):
            raise ValueError(f"betas: expected a non-empty 1-D array in (0, 1], got shape {b.shape}")
        n = int(b.size)
        tmap = np.arange(n) if timestep_map is None else np.asarray(timestep_map, dtype=np.int64)
        if tmap.shape != (n,):
            raise ValueError(f"timestep_map: expected {n} entries, got {tmap.shape}")
        alphas = 1.0 - b
        ac = np.cumprod(alphas, axis=0)
        ac_prev = np.append(1.0, ac[:-1])
        ac_next = np.append(ac[1:], 0.0)
        post_var = b * (1.0 - ac_prev) / (1.0 - ac)
        # beta~_0 = 0: the log is clipped by repeating beta~_1 (needs N >= 2, as the reference).
        post_var_1 = post_var[1] if n > 1 else post_var[0]
        large = np.append(post_var_1, b[1:])
        with np.errstate(divide="ignore"):
            post_log = np.log(np.append(post_var_1, post_var[1:]))
            large_log = np.log(large)
        t64 = functools.partial(torch.tensor, dtype=torch.float64)
        return DiffusionTables(
            num_timesteps=n,
            original_num_steps=int(original_num_steps or n),
            rescale_timesteps=bool(rescale_timesteps),
            timestep_map=torch.tensor(tmap, dtype=torch.int64),
            betas=t64(b),
            log_betas=t64(np.log(b)),
            alphas_cumprod=t64(ac),
            alphas_cumprod_prev=t64(ac_prev),
            alphas_cumprod_next=t64(ac_next),
            sqrt_alphas_cumprod=t64(np.sqrt(ac)),
            sqrt_one_minus_alphas_cumprod=t64(np.sqrt(1.0 - ac)),
            log_one_minus_alphas_cumprod=t64(np.log(1.0 - ac)),
            sqrt_recip_alphas_cumprod=t64(np.sqrt(1.0 / ac)),
            sqrt_recipm1_alphas_cumprod=t64(np.sqrt(1.0 / ac - 1)),
            posterior_variance=t64(post_var),
            posterior_log_variance_clipped=t64(post_log),
            posterior_mean_coef1=t64(b * np.sqrt(ac_prev) / (1.0 - ac)),
            posterior_mean_coef2=t64((1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)),
            fixed_large_variance=t64(large),
            fixed_large_log_variance=t64(large_log),
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tables by name (what the C++ core receives)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}

    def to(self, device: torch.device | str) -> "DiffusionTables":
        """A copy with every table on `device` (still float64 / int64)."""
        device = torch.device(device)
        if self.betas.device == device:
            return self
        moved = {name: t.to(device) for name, t in self.tensors().items()}
        return DiffusionTables(num_timesteps=self.num_timesteps,
                               original_num_steps=self.original_num_steps,
                               rescale_timesteps=self.rescale_timesteps, **moved)


@functools.lru_cache(maxsize=64)
def _build_cached(config: DiffusionConfig, respacing: str | tuple[int, ...] | None) -> DiffusionTables:
    base_betas = betas_for_schedule(config.noise_schedule, config.steps)
    # The reference always goes through SpacedDiffusion (create_gaussian_diffusion respaces to
    # [steps] when no respacing is given), so the unspaced betas are recomputed from abar too.
    base_ac = np.cumprod(1.0 - base_betas, axis=0)
    kept = list(range(config.steps)) if respacing is None else space_timesteps(config.steps, respacing, base_ac)
    # betas of the respaced chain: 1 - abar_{t_i} / abar_{t_{i-1}} (SpacedDiffusion.__init__)
    new_betas, last = [], 1.0
    for t in kept:
        new_betas.append(1 - base_ac[t] / last)
        last = base_ac[t]
    return DiffusionTables.from_betas(np.array(new_betas), timestep_map=kept,
                                      original_num_steps=config.steps,
                                      rescale_timesteps=config.rescale_timesteps)


def build_tables(config: DiffusionConfig,
                 respacing: str | int | Sequence[int] | None = None) -> DiffusionTables:
    """Tables of `config`'s process, respaced by `respacing` ("25", "10,10,5", "ddim50"; None: all
    T steps). Built once per (config, respacing) and cached; the tensors are float64 on CPU."""
    if not isinstance(config, DiffusionConfig):
        raise TypeError(f"config: expected an admrt.DiffusionConfig, got {type(config).__name__}")
    if hasattr(respacing, "respacing"):  # a parsed StepPlan: its respacing (the method shares the tables)
        respacing = respacing.respacing
    if respacing is not None and not isinstance(respacing, str):
        respacing = (int(respacing),) if isinstance(respacing, (int, np.integer)) else tuple(
            int(x) for x in respacing)
    return _build_cached(config, respacing)


# ---------------------------------------------------------------------------------------------
# Torch functions (training losses use these; the sampler's copy of this math is in C++)
# ---------------------------------------------------------------------------------------------

def _extract(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """table[t] as float32 of shape (B, 1, ..., 1) broadcastable to `like` (_extract_into_tensor)."""
    if t.dtype != torch.int64 or t.dim() != 1:
        raise ValueError(f"t: expected an int64 tensor of shape (B,), got {t.dtype} {tuple(t.shape)}")
    out = table.to(device=t.device)[t].float()
    return out.view(-1, *([1] * (like.dim() - 1)))


def model_timesteps(tables: DiffusionTables, t: torch.Tensor) -> torch.Tensor:
    """What the network is fed for step indices t: the original timesteps (respace._WrappedModel),
    as float t*1000/T when the process rescales timesteps."""
    mapped = tables.timestep_map.to(t.device)[t]
    if tables.rescale_timesteps:
        return mapped.float() * (1000.0 / tables.original_num_steps)
    return mapped


def q_sample(tables: DiffusionTables, x_start: torch.Tensor, t: torch.Tensor,
             noise: torch.Tensor) -> torch.Tensor:
    """x_t ~ q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise (Ho et al. eq. 4)."""
    if noise.shape != x_start.shape:
        raise ValueError(f"noise: expected shape {tuple(x_start.shape)}, got {tuple(noise.shape)}")
    return (_extract(tables.sqrt_alphas_cumprod, t, x_start) * x_start
            + _extract(tables.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)


def q_mean_variance(tables: DiffusionTables, x_start: torch.Tensor, t: torch.Tensor):
    """(mean, variance, log variance) of q(x_t | x_0)."""
    mean = _extract(tables.sqrt_alphas_cumprod, t, x_start) * x_start
    var = _extract(1.0 - tables.alphas_cumprod, t, x_start)
    log_var = _extract(tables.log_one_minus_alphas_cumprod, t, x_start)
    return mean, var, log_var


def q_posterior_mean_variance(tables: DiffusionTables, x_start: torch.Tensor, x_t: torch.Tensor,
                              t: torch.Tensor):
    """(mean, variance, clipped log variance) of q(x_{t-1} | x_t, x_0) (Ho et al. eq. 6-7)."""
    if x_start.shape != x_t.shape:
        raise ValueError(f"x_start {tuple(x_start.shape)} and x_t {tuple(x_t.shape)}: expected equal shapes")
    mean = (_extract(tables.posterior_mean_coef1, t, x_t) * x_start
            + _extract(tables.posterior_mean_coef2, t, x_t) * x_t)
    var = _extract(tables.posterior_variance, t, x_t)
    log_var = _extract(tables.posterior_log_variance_clipped, t, x_t)
    return mean, var, log_var


def predict_xstart_from_eps(tables: DiffusionTables, x_t: torch.Tensor, t: torch.Tensor,
                            eps: torch.Tensor) -> torch.Tensor:
    """x_0 = x_t / sqrt(abar_t) - sqrt(1/abar_t - 1) eps."""
    return (_extract(tables.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - _extract(tables.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)


def predict_eps_from_xstart(tables: DiffusionTables, x_t: torch.Tensor, t: torch.Tensor,
                            x_start: torch.Tensor) -> torch.Tensor:
    """eps = (x_t / sqrt(abar_t) - x_0) / sqrt(1/abar_t - 1)."""
    return ((_extract(tables.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x_start)
            / _extract(tables.sqrt_recipm1_alphas_cumprod, t, x_t))


def learned_range_variance(tables: DiffusionTables, model_var_values: torch.Tensor,
                           t: torch.Tensor):
    """(variance, log variance) from the network's v in [-1, 1] (Improved DDPM eq. 15):
    log Sigma = frac * log beta_t + (1 - frac) * log beta~_t, frac = (v + 1) / 2."""
    min_log = _extract(tables.posterior_log_variance_clipped, t, model_var_values)
    max_log = _extract(tables.log_betas, t, model_var_values)
    frac = (model_var_values + 1) / 2
    log_var = frac * max_log + (1 - frac) * min_log
    return torch.exp(log_var), log_var


def fixed_variance(tables: DiffusionTables, t: torch.Tensor, like: torch.Tensor, kind: str = "large"):
    """(variance, log variance) of a fixed-variance model, broadcastable to `like`.
    "small": beta~_t (posterior variance); "large": beta_t (beta~_1 at t = 0)."""
    if kind == "small":
        return (_extract(tables.posterior_variance, t, like),
                _extract(tables.posterior_log_variance_clipped, t, like))
    if kind == "large":
        return (_extract(tables.fixed_large_variance, t, like),
                _extract(tables.fixed_large_log_variance, t, like))
    raise ValueError(f"kind={kind!r}: expected 'small' or 'large'")


def default_variance(learn_sigma: bool, config: DiffusionConfig) -> str:
    """The reverse-process variance a model was trained for (create_gaussian_diffusion's
    model_var_type): "learned_range" for a learned-sigma model, else "fixed_small" (sigma_small)
    or "fixed_large"."""
    if learn_sigma:
        return "learned_range"
    return "fixed_small" if config.sigma_small else "fixed_large"
