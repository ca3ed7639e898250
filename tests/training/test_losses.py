"""Losses and timestep samplers against guided-diffusion (the oracle) and by their definitions."""
from __future__ import annotations

import math

import pytest
import torch

from admrt.config import DiffusionConfig
from admrt.diffusion import build_tables, q_sample
from admrt.training import losses as L

gd = pytest.importorskip("guided_diffusion.gaussian_diffusion")
gd_losses = pytest.importorskip("guided_diffusion.losses")


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_hybrid_loss_matches_reference(schedule):
    tables = build_tables(DiffusionConfig(steps=1000, noise_schedule=schedule))
    ref = gd.GaussianDiffusion(betas=gd.get_named_beta_schedule(schedule, 1000),
                               model_mean_type=gd.ModelMeanType.EPSILON,
                               model_var_type=gd.ModelVarType.LEARNED_RANGE,
                               loss_type=gd.LossType.RESCALED_MSE)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 256, (6, 2, 8, 8), generator=g).float() / 127.5 - 1
    t = torch.tensor([0, 1, 7, 250, 640, 999])
    noise = torch.randn(x0.shape, generator=g)
    out = 0.5 * torch.randn(6, 4, 8, 8, generator=g)

    class Fixed(torch.nn.Module):
        def forward(self, x, t, **kw):
            return out

    expected = ref.training_losses(Fixed(), x0, t, noise=noise)
    got = L.diffusion_losses(tables, out, x0, q_sample(tables, x0, t, noise), t, noise)
    for k in ("mse", "vb", "loss"):
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6)


def test_vlb_term_trains_only_the_variance():
    tables = build_tables(DiffusionConfig(steps=100))
    x0 = torch.rand(3, 1, 4, 4) * 2 - 1
    t = torch.tensor([0, 10, 99])
    noise = torch.randn_like(x0)
    out = torch.randn(3, 2, 4, 4, requires_grad=True)
    terms = L.diffusion_losses(tables, out, x0, q_sample(tables, x0, t, noise), t, noise)
    (grad,) = torch.autograd.grad(terms["vb"].sum(), out)
    assert grad[:, :1].abs().max() == 0  # eps half: stop-gradient
    assert grad[:, 1:].abs().max() > 0
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])  # guided-diffusion's MSE
    # rescale_learned_sigmas: lambda * T = T / 1000 on the bound term (Improved DDPM; RESCALED_MSE)
    rescaled = L.diffusion_losses(tables, out, x0, q_sample(tables, x0, t, noise), t, noise,
                                  DiffusionConfig(steps=100, rescale_learned_sigmas=True))
    torch.testing.assert_close(rescaled["loss"], terms["mse"] + 0.001 * 100 * terms["vb"])


@pytest.mark.parametrize("learn_sigma,sigma_small,predict_xstart,use_kl,rescale,steps", [
    (True, False, True, False, False, 1000), (True, False, False, True, False, 1000),
    (True, False, True, True, False, 400), (True, False, False, False, True, 400),
    (True, False, False, False, False, 400), (False, False, True, False, False, 1000),
    (False, True, False, True, False, 1000), (False, False, True, True, False, 250),
])
def test_every_loss_setting_matches_reference(learn_sigma, sigma_small, predict_xstart, use_kl, rescale, steps):
    """training_losses of create_gaussian_diffusion with each of its loss-changing arguments."""
    from guided_diffusion.script_util import create_gaussian_diffusion

    d = DiffusionConfig(steps=steps, noise_schedule="cosine", predict_xstart=predict_xstart, use_kl=use_kl,
                        rescale_learned_sigmas=rescale, sigma_small=sigma_small)
    ref = create_gaussian_diffusion(steps=steps, learn_sigma=learn_sigma, sigma_small=sigma_small,
                                    noise_schedule="cosine", use_kl=use_kl, predict_xstart=predict_xstart,
                                    rescale_learned_sigmas=rescale)
    tables = build_tables(d)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 256, (6, 2, 8, 8), generator=g).float() / 127.5 - 1
    t = torch.tensor([0, 1, 7, steps // 4, steps // 2, steps - 1])
    noise = torch.randn(x0.shape, generator=g)
    out = 0.5 * torch.randn(6, 4 if learn_sigma else 2, 8, 8, generator=g)

    class Fixed(torch.nn.Module):
        def forward(self, x, t, **kw):
            return out

    expected = ref.training_losses(Fixed(), x0, t, noise=noise)
    got = L.diffusion_losses(tables, out, x0, q_sample(tables, x0, t, noise), t, noise, d)
    assert sorted(got) == sorted(expected)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6)


def test_fixed_sigma_output_is_simple_loss():
    tables = build_tables(DiffusionConfig(steps=10, noise_schedule="cosine"))
    x0, noise = torch.zeros(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = torch.tensor([1, 2])
    terms = L.diffusion_losses(tables, torch.zeros_like(x0), x0, x0, t, noise)
    assert "vb" not in terms
    torch.testing.assert_close(terms["loss"], (noise ** 2).mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match="channels"):
        L.diffusion_losses(tables, torch.zeros(2, 5, 4, 4), x0, x0, t, noise)


def test_kl_and_likelihood_match_reference():
    g = torch.Generator().manual_seed(1)
    m1, m2, v1, v2 = (torch.randn(50, generator=g) for _ in range(4))
    torch.testing.assert_close(L.normal_kl(m1, v1, m2, v2), gd_losses.normal_kl(m1, v1, m2, v2))
    x = torch.randint(0, 256, (200,), generator=g).float() / 127.5 - 1
    means, log_scales = 0.3 * torch.randn(200, generator=g), torch.randn(200, generator=g) - 2
    torch.testing.assert_close(L.discretized_gaussian_log_likelihood(x, means, log_scales),
                               gd_losses.discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales))
    # KL of identical Gaussians is zero; the likelihood of a bin is a probability
    assert L.normal_kl(m1, v1, m1, v1).abs().max() < 1e-6
    assert (L.discretized_gaussian_log_likelihood(x, means, log_scales) <= 1e-6).all()


def test_uniform_sampler():
    s = L.make_sampler("uniform", 50)
    t, w = s.sample(1000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and 0 <= t.min() and t.max() < 50 and len(t.unique()) > 40
    assert torch.all(w == 1)


def test_loss_second_moment_sampler():
    T = 4
    s = L.make_sampler("loss-second-moment", T)
    g = torch.Generator().manual_seed(0)
    assert not s.warmed_up()
    losses = torch.tensor([1.0, 2.0, 4.0, 8.0])
    for _ in range(s.history + 3):  # overfill: the oldest values are dropped
        s.update(torch.arange(T), losses)
    assert s.warmed_up()
    p = s.probabilities()
    expected = losses.double() / losses.sum() * (1 - s.uniform_prob) + s.uniform_prob / T
    torch.testing.assert_close(p, expected)
    t, w = s.sample(20000, g)
    freq = torch.bincount(t, minlength=T).double() / 20000
    assert (freq - p).abs().max() < 0.02
    torch.testing.assert_close(w.double(), 1.0 / (T * p[t]), rtol=1e-6, atol=0)
    # importance weights make the estimate unbiased: E_p[w * L_t] = mean_t L_t
    assert math.isclose(float((p * (1.0 / (T * p)) * losses.double()).sum()), float(losses.mean()), rel_tol=1e-9)
    # state round trip
    s2 = L.make_sampler("loss-second-moment", T)
    s2.load_state_dict(s.state_dict())
    torch.testing.assert_close(s2.probabilities(), p)
    with pytest.raises(ValueError, match="schedule_sampler"):
        L.make_sampler("lossaware", T)
