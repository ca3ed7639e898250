"""The multistep solvers of the core (plan.h) against diffusers' schedulers fed the same guided eps.

Oracle: diffusers' DPMSolverMultistepScheduler (dpmsolver++ orders 2 and 3, sde-dpmsolver++ order 2,
midpoint) and UniPCMultistepScheduler (bh1, predict_x0, orders 2 and 3), over the same discrete
timesteps and the same noise, with final_sigmas_type="zero" (the last step lands on clean data).
The model function returns guidance as guided-diffusion's condition_score does it:
eps - s * sqrt(1 - abar_t) * grad. diffusers' thresholding with sample_max_value=1 is the clamp of
clip_denoised; with a large maximum it is Imagen's dynamic thresholding.
"""
import numpy as np
import pytest
import torch

from admrt import core
from admrt.config import DiffusionConfig
from admrt.diffusion import build_tables

diffusers = pytest.importorskip("diffusers", reason="the solver oracle needs diffusers (pip install -e '.[test]')")

SHAPE = (3, 8, 8)
SCALES = torch.tensor([0.0, 2.0])
LABELS = torch.tensor([1, 4])


def eps_model(x, t):
    """A smooth, non-linear stand-in for a network: eps(x_t, t)."""
    t = t.float().view(-1, 1, 1, 1) if torch.is_tensor(t) and t.dim() else torch.as_tensor(float(t))
    return torch.tanh(0.7 * x + 0.0013 * t) * 0.9 + 0.05 * torch.sin(3 * x)


def grad_fn(x, t, y):
    """A stand-in for grad_x log p(y | x_t): depends on x, t and the label."""
    tt = t.float().view(-1, 1, 1, 1)
    return -0.3 * x + 0.02 * y.float().view(-1, 1, 1, 1) * torch.cos(x + 0.001 * tt)


def _tables(config, plan):
    tb = build_tables(config, core.StepPlan.parse(plan))
    return tb, core.Schedule(tb.tensors(), tb.original_num_steps, tb.rescale_timesteps)


def _params(method, batch, **kw):
    p = core.default_params()
    p.method = getattr(core.Method, method.upper().replace("-", "_"))
    p.batch_size, p.image_shape, p.variance = batch, list(SHAPE), core.Variance.FIXED_LARGE
    p.noise = core.NoiseMode.REFERENCE
    for k, v in kw.items():
        setattr(p, k, v)
    return p


def _scheduler(method, config, timesteps, threshold):
    base = np.cumprod(1 - build_tables(config).betas.numpy())
    kw = dict(num_train_timesteps=config.steps, trained_betas=build_tables(config).betas.numpy(),
              final_sigmas_type="zero", lower_order_final=True)
    if threshold is not None:
        kw.update(thresholding=True, dynamic_thresholding_ratio=threshold[0], sample_max_value=threshold[1])
    if method.startswith("unipc"):
        sch = diffusers.UniPCMultistepScheduler(solver_order=2 if method == "unipc2m" else 3, solver_type="bh1",
                                                predict_x0=True, **kw)
    else:
        sch = diffusers.DPMSolverMultistepScheduler(
            solver_order=3 if method == "dpmpp3m" else 2, solver_type="midpoint",
            algorithm_type="sde-dpmsolver++" if method == "dpmpp2m-sde" else "dpmsolver++", **kw)
    sch.set_timesteps(len(timesteps))
    # The plan's own grid (the oracle's set_timesteps has no log-SNR grid on integer timesteps).
    sigmas = np.sqrt((1 - base[timesteps]) / base[timesteps])
    sch.timesteps = torch.tensor(timesteps, dtype=torch.int64)
    sch.sigmas = torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))
    return sch


def _oracle(method, config, tb, x_T, seed, threshold):
    timesteps = tb.timestep_map.numpy()[::-1].copy()   # loop order: T-1 first
    abar = np.cumprod(1 - build_tables(config).betas.numpy())
    sch = _scheduler(method, config, timesteps, threshold)
    gen = torch.Generator().manual_seed(seed)
    x = x_T.clone()
    for t in timesteps:
        tt = torch.full((x.shape[0],), int(t))
        eps = eps_model(x, tt) - SCALES.view(-1, 1, 1, 1) * float(np.sqrt(1 - abar[t])) * grad_fn(x, tt, LABELS)
        noise = dict(variance_noise=torch.randn(x.shape, generator=gen)) if method == "dpmpp2m-sde" else {}
        x = sch.step(eps, int(t), x, **noise).prev_sample
    return _final(sch, x)


def _final(sch, x):
    """diffusers' UniPC with B(h) = h is NaN on its last step to sigma = 0 (B(h) = -inf times a zero
    residual); the step's limit there is its own x_0 prediction, the last of its model outputs."""
    if isinstance(sch, diffusers.UniPCMultistepScheduler) and not torch.isfinite(x).all():
        return sch.model_outputs[-1]
    return x


@pytest.mark.parametrize("method", ["dpmpp2m", "dpmpp3m", "dpmpp2m-sde", "unipc2m", "unipc3m"])
@pytest.mark.parametrize("grid", ["t5", "t8", "logsnr10", "t16"])
def test_solver_matches_diffusers(method, grid):
    """Same timesteps, same guided eps, same noise: the final samples agree within 1e-4, from the
    warm-up orders through the lowered last steps (N < 15 and N >= 15)."""
    config = DiffusionConfig(steps=200, noise_schedule="linear")
    tb, sched = _tables(config, f"{method}:{grid}")
    x_T = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(3))
    ctx = core.Sampler(lambda x, t, y, lr: eps_model(x, t), grad_fn, sched, _params(method, 2, clip_denoised=False))
    ours = ctx.sample(y=LABELS, guidance=SCALES, x_T=x_T, generator=torch.Generator().manual_seed(11))
    ref = _oracle(method, config, tb, x_T, 11, None)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)  # float32; |x| reaches ~300 unclipped


@pytest.mark.parametrize("method", ["dpmpp2m", "unipc3m"])
@pytest.mark.parametrize("threshold", [(0.995, 1.0), (0.9, 1e9)], ids=["clamp", "dynamic"])
def test_solver_thresholding_matches_diffusers(method, threshold):
    """clip_denoised is diffusers' thresholding at sample_max_value=1; dynamic_threshold=p is Imagen's
    percentile rule (diffusers' thresholding with no maximum)."""
    config = DiffusionConfig(steps=200, noise_schedule="cosine")
    tb, sched = _tables(config, f"{method}:t8")
    x_T = 2 * torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(5))
    kw = dict(clip_denoised=True) if threshold[1] == 1.0 else dict(dynamic_threshold=threshold[0])
    model = lambda x, t, y, lr: 3 * eps_model(x, t)  # pushes x_0 outside [-1, 1]
    ctx = core.Sampler(model, grad_fn, sched, _params(method, 2, **kw))
    ours = ctx.sample(y=LABELS, guidance=SCALES, x_T=x_T)

    abar = np.cumprod(1 - build_tables(config).betas.numpy())
    timesteps = tb.timestep_map.numpy()[::-1].copy()
    sch = _scheduler(method, config, timesteps, threshold)
    x = x_T.clone()
    for t in timesteps:
        tt = torch.full((2,), int(t))
        eps = 3 * eps_model(x, tt) - SCALES.view(-1, 1, 1, 1) * float(np.sqrt(1 - abar[t])) * grad_fn(x, tt, LABELS)
        x = sch.step(eps, int(t), x).prev_sample
    torch.testing.assert_close(ours, _final(sch, x), rtol=1e-5, atol=1e-4)


def test_solver_grids():
    """"tN" is diffusers' linspace spacing; "logsnrN" is monotone, starts at T-1 and has N distinct
    timesteps; both end on clean data (abar_prev = 1 at the smallest)."""
    config = DiffusionConfig(steps=1000, noise_schedule="cosine")
    t10 = build_tables(config, "t10")
    expect = np.linspace(0, 999, 11).round()[::-1][:-1]
    assert t10.timestep_map.tolist() == sorted(int(v) for v in expect)
    for n in (5, 8, 25):
        tb = build_tables(config, f"logsnr{n}")
        m = tb.timestep_map.tolist()
        assert len(set(m)) == n and m[-1] == 999 and m == sorted(m)
        assert tb.alphas_cumprod_prev[0].item() == 1.0
    assert str(core.StepPlan.parse("dpmpp2m:t10")) == "dpmpp2m10"
    assert str(core.StepPlan.parse("unipc3m:logsnr8")) == "unipc3m8-logsnr"
    assert str(core.StepPlan.parse("dpmpp2m:250")) == "dpmpp2m:250"
    with pytest.raises(ValueError, match="steps='unipc8'"):
        core.StepPlan.parse("unipc8")


def test_guidance_interval_skips_the_classifier():
    """Outside the interval, or off the every-k-th call, the classifier is not called at all; with
    the whole range and every call it is the plain guided run."""
    config = DiffusionConfig(steps=200)
    tb, sched = _tables(config, "dpmpp2m10")
    calls = []

    def counted(x, t, y):
        calls.append(int(t[0]))
        return grad_fn(x, t, y)

    model = lambda x, t, y, lr: eps_model(x, t)
    x_T = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(1))
    run = lambda **kw: core.Sampler(model, counted, sched, _params("dpmpp2m", 2, **kw)).sample(
        y=LABELS, guidance=SCALES, x_T=x_T)
    full = run()
    assert len(calls) == 10
    calls.clear()
    same = run(guidance_t_min=0, guidance_t_max=199, guidance_every=1)
    assert torch.equal(full, same) and len(calls) == 10
    calls.clear()
    part = run(guidance_t_min=50, guidance_t_max=150)
    kept = [t for t in tb.timestep_map.tolist() if 50 <= t <= 150]
    assert sorted(calls) == sorted(kept) and 0 < len(calls) < 10
    assert not torch.equal(part, full)
    calls.clear()
    ctx = core.Sampler(model, counted, sched, _params("dpmpp2m", 2, guidance_every=3))
    ctx.sample(y=LABELS, guidance=SCALES, x_T=x_T)
    assert ctx.guided_steps == [k % 3 == 0 for k in range(10)] and len(calls) == 4
    # no guidance anywhere equals the unguided run
    none = core.Sampler(model, None, sched, _params("dpmpp2m", 2)).sample(y=LABELS, x_T=x_T)
    empty = run(guidance_t_min=190, guidance_t_max=195)  # no step of t10 (199 > 195 > 179)
    assert torch.equal(none, empty)


@pytest.mark.parametrize("method", ["dpmpp2m-sde", "unipc2m"])
def test_solver_seeded_noise_is_batch_invariant(method):
    """Seeded noise for the SDE solver (and none drawn for the deterministic ones): an image
    depends only on its seed, at any batch size."""
    config = DiffusionConfig(steps=200)
    _, sched = _tables(config, f"{method}:t6")
    model = lambda x, t, y, lr: eps_model(x, t)
    run = lambda seeds: core.Sampler(model, None, sched, _params(method, len(seeds), noise=core.NoiseMode.SEEDED)
                                     ).sample(seeds=torch.tensor(seeds))
    big, small = run([5, 6, 7]), run([7, 5])
    assert torch.equal(big[2], small[0]) and torch.equal(big[0], small[1])
    assert torch.isfinite(big).all() and not torch.equal(big[0], big[1])
