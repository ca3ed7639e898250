"""admrt.diffusion against the oracle (guided_diffusion.gaussian_diffusion / respace)."""
import numpy as np
import pytest
import torch

from admrt import diffusion as D
from admrt.config import DiffusionConfig

gd = pytest.importorskip("guided_diffusion.gaussian_diffusion")
respace = pytest.importorskip("guided_diffusion.respace")

TABLE_NAMES = [
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "alphas_cumprod_next", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2",
]


def _reference(schedule, steps, respacing, var_type=None):
    betas = gd.get_named_beta_schedule(schedule, steps)
    kept = respace.space_timesteps(steps, respacing or [steps])  # as create_gaussian_diffusion
    return respace.SpacedDiffusion(
        use_timesteps=kept, betas=betas, model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=var_type or gd.ModelVarType.LEARNED_RANGE, loss_type=gd.LossType.MSE)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [1000, 37])
def test_betas_equal_reference(schedule, steps):
    ours = D.betas_for_schedule(schedule, steps)
    np.testing.assert_array_equal(ours, gd.get_named_beta_schedule(schedule, steps))


@pytest.mark.parametrize("spec", ["25", "250", "1000", "10,15,20", "3,1,7", "ddim25", "ddim50", "ddim10",
                                  "ddim250", "1"])
def test_space_timesteps_equal_reference(spec):
    assert D.space_timesteps(1000, spec) == sorted(respace.space_timesteps(1000, spec))


def test_space_timesteps_known_values():
    kept = D.space_timesteps(1000, "25")
    assert len(kept) == 25 and 166 in kept and kept[:5] == [0, 42, 83, 125, 166] and kept[-1] == 999
    assert D.space_timesteps(1000, [10, 15, 20]) == D.space_timesteps(1000, "10,15,20")
    assert D.space_timesteps(1000, 25) == kept


@pytest.mark.parametrize("bad", ["foo", "ddim", "ddimx", "ddim999", "10,,2", "0", "2000", ""])
def test_space_timesteps_bad_strings(bad):
    with pytest.raises(ValueError, match="steps="):
        D.space_timesteps(1000, bad)


@pytest.mark.parametrize("schedule,respacing", [("linear", None), ("cosine", "25"), ("linear", "ddim10"),
                                                 ("cosine", "10,5,3")])
def test_tables_equal_reference(schedule, respacing):
    ref = _reference(schedule, 1000, respacing)
    tb = D.build_tables(DiffusionConfig(steps=1000, noise_schedule=schedule), respacing)
    assert tb.num_timesteps == ref.num_timesteps and tb.original_num_steps == 1000
    for name in TABLE_NAMES:
        ours = getattr(tb, name)
        assert ours.dtype == torch.float64, name
        np.testing.assert_array_equal(ours.numpy(), getattr(ref, name), err_msg=name)
    assert tb.timestep_map.tolist() == list(ref.timestep_map)
    np.testing.assert_array_equal(tb.log_betas.numpy(), np.log(ref.betas))
    assert D.build_tables(DiffusionConfig(steps=1000, noise_schedule=schedule), respacing) is tb  # cached


def test_torch_functions_equal_reference():
    torch.manual_seed(0)
    ref = _reference("cosine", 1000, "50")
    tb = D.build_tables(DiffusionConfig(noise_schedule="cosine"), "50")
    B = 4
    x0, noise, xt = (torch.randn(B, 3, 8, 8) for _ in range(3))
    t = torch.tensor([0, 1, 17, 49])
    torch.testing.assert_close(D.q_sample(tb, x0, t, noise), ref.q_sample(x0, t, noise), rtol=0, atol=0)
    for a, b in zip(D.q_mean_variance(tb, x0, t), ref.q_mean_variance(x0, t)):
        torch.testing.assert_close(a.expand_as(b), b, rtol=0, atol=0)
    for a, b in zip(D.q_posterior_mean_variance(tb, x0, xt, t), ref.q_posterior_mean_variance(x0, xt, t)):
        torch.testing.assert_close(a.expand_as(b), b, rtol=0, atol=0)
    torch.testing.assert_close(D.predict_xstart_from_eps(tb, xt, t, noise),
                               ref._predict_xstart_from_eps(xt, t, noise), rtol=0, atol=0)
    torch.testing.assert_close(D.predict_eps_from_xstart(tb, xt, t, x0),
                               ref._predict_eps_from_xstart(xt, t, x0), rtol=0, atol=0)

    # model variance: learned range and fixed small / large, through p_mean_variance
    v = torch.rand(B, 3, 8, 8) * 2 - 1
    out = ref.p_mean_variance(lambda x, ts: torch.cat([noise, v], 1), xt, t)
    var, log_var = D.learned_range_variance(tb, v, t)
    torch.testing.assert_close(var, out["variance"], rtol=0, atol=0)
    torch.testing.assert_close(log_var, out["log_variance"], rtol=0, atol=0)
    for kind, vt in [("small", gd.ModelVarType.FIXED_SMALL), ("large", gd.ModelVarType.FIXED_LARGE)]:
        ref_fixed = _reference("cosine", 1000, "50", vt)
        out = ref_fixed.p_mean_variance(lambda x, ts: noise, xt, t)
        var, log_var = D.fixed_variance(tb, t, xt, kind)
        torch.testing.assert_close(var.expand_as(xt), out["variance"], rtol=0, atol=0)
        torch.testing.assert_close(log_var.expand_as(xt), out["log_variance"], rtol=0, atol=0)


def test_model_timesteps_map_to_original():
    tb = D.build_tables(DiffusionConfig(), "25")
    t = torch.tensor([0, 4, 24])
    assert D.model_timesteps(tb, t).tolist() == [0, 166, 999]
    tb_r = D.build_tables(DiffusionConfig(rescale_timesteps=True, steps=500), "ddim10")
    assert D.model_timesteps(tb_r, torch.tensor([1])).dtype == torch.float32
    assert D.model_timesteps(tb_r, torch.tensor([1])).item() == pytest.approx(50 * 2.0)


def test_bad_arguments():
    tb = D.build_tables(DiffusionConfig(), None)
    with pytest.raises(ValueError, match="t: expected an int64"):
        D.q_sample(tb, torch.zeros(2, 1, 2, 2), torch.tensor([0.0, 1.0]), torch.zeros(2, 1, 2, 2))
    with pytest.raises(ValueError, match="noise_schedule='quadratic'"):
        D.betas_for_schedule("quadratic", 10)
    with pytest.raises(ValueError, match="kind='medium'"):
        D.fixed_variance(tb, torch.tensor([0]), torch.zeros(1, 1), "medium")
