"""Engine API: seeded noise, cascade, per-sample settings, and clear errors on bad input."""
import numpy as np
import pytest
import torch

import admrt
from admrt.config import DiffusionConfig, ModelConfig
from admrt.diffusion import build_tables
from admrt import core
from gd_reference import random_model


@pytest.fixture(scope="module")
def cond():
    return random_model("tiny-cond")


@pytest.fixture(scope="module")
def clf():
    return random_model("tiny-classifier")


def _schedule(respacing):
    tb = build_tables(DiffusionConfig(), respacing)
    return core.Schedule(tb.tensors(), tb.original_num_steps, tb.rescale_timesteps)


def _zero_model(x, t, y, low_res):
    return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])


def _params(batch, method="ddim", eta=0.0, shape=(3, 8, 8), **kw):
    p = core.default_params()
    p.method = {"ddim": core.Method.DDIM, "ddpm": core.Method.DDPM}[method]
    p.eta, p.batch_size, p.image_shape = eta, batch, list(shape)
    for k, v in kw.items():
        setattr(p, k, v)
    return p


def _seeds(*s):
    return torch.tensor(s, dtype=torch.int64)


@pytest.mark.parametrize("method,steps", [("ddpm", "10"), ("ddim", "ddim10")])
def test_seeded_noise_is_batch_invariant_exactly(method, steps):
    """With a fixed network the sample is a function of the noise only: same seed, same bits,
    whatever the batch size and position."""
    sched = _schedule(steps)
    run = lambda seeds: core.Sampler(_zero_model, None, sched, _params(len(seeds), method, eta=1.0)).sample(
        seeds=_seeds(*seeds))
    big = run([5, 6, 7, 8])
    small = run([8, 5])
    single = run([6])
    assert torch.equal(big[3], small[0]) and torch.equal(big[0], small[1]) and torch.equal(big[1], single[0])
    assert not torch.equal(big[0], big[1])
    assert core.derive_seed(5, 1) != core.derive_seed(5, 2) != core.derive_seed(6, 1)


def test_sampler_context_reuses_its_buffers_and_counts_steps():
    """A context samples batch after batch (its step counter is reset), returns new tensors,
    reports progress from the host loop, and gives the same result for the same inputs."""
    calls = []
    ctx = core.Sampler(_zero_model, None, _schedule("ddim4"), _params(2, eta=0.5))
    a = ctx.sample(seeds=_seeds(1, 2), progress=lambda done, total: calls.append((done, total)))
    b = ctx.sample(seeds=_seeds(3, 4))
    c = ctx.sample(seeds=_seeds(1, 2))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert torch.equal(a, c) and not torch.equal(a, b)
    assert ctx.num_steps == 4 and not ctx.guided and not ctx.uses_graph and not ctx.captured


def test_eta_zero_ddim_is_deterministic_given_x_T():
    """DDIM with eta = 0 draws nothing after x_T: the same x_T gives the same sample whatever the seeds."""
    ctx = core.Sampler(lambda x, t, y, lr: torch.cat([0.1 * x, x], 1), None, _schedule("ddim5"), _params(2))
    x_T = torch.randn(2, 3, 8, 8)
    assert torch.equal(ctx.sample(seeds=_seeds(1, 2), x_T=x_T), ctx.sample(seeds=_seeds(9, 8), x_T=x_T))


def test_engine_same_seed_same_image_any_batch(cond, clf):
    eng = admrt.Engine(cond, classifier=clf, backend="eager")
    kw = dict(steps="ddim5", guidance=[0.0, 2.0, 1.0], keep_float=True)
    a = eng.sample(classes=[1, 4, 9], seeds=[11, 12, 13], batch_size=3, **kw)
    b = eng.sample(classes=[9, 4, 1], seeds=[13, 12, 11], batch_size=2, guidance=[1.0, 2.0, 0.0],
                   steps="ddim5", keep_float=True)
    np.testing.assert_allclose(a.samples, b.samples[::-1], atol=1e-4)
    assert np.abs(a.images.astype(int) - b.images[::-1].astype(int)).max() <= 1
    assert a.labels.tolist() == [1, 4, 9] and a.seeds.tolist() == [11, 12, 13]
    c = eng.sample(classes=[1, 4, 9], seeds=[21, 12, 13], **kw)
    assert not np.allclose(a.samples[0], c.samples[0]) and np.allclose(a.samples[1:], c.samples[1:], atol=1e-4)


def test_guidance_changes_the_sample(cond, clf):
    eng = admrt.Engine(cond, classifier=clf, backend="eager")
    out = eng.sample(classes=[2, 2], seeds=[3, 3], guidance=[0.0, 10.0], steps="ddim5", keep_float=True)
    assert not np.allclose(out.samples[0], out.samples[1], atol=1e-3)


def test_cascade_base_then_upsampler(clf):
    torch.manual_seed(0)
    base_cfg = ModelConfig(kind="unet", image_size=8, model_channels=32, out_channels=6, num_res_blocks=1,
                           attention_resolutions=(4,), channel_mult=(1, 2), num_classes=10, num_head_channels=16)
    base = admrt.create_model(base_cfg)
    up = random_model("tiny-upsample")
    eng = admrt.Engine(base, upsampler=up, backend="eager")
    calls = []
    out = eng.sample(classes=[0, 3, 5], steps="ddim4", upsampler_steps="ddim3", batch_size=2,
                     progress=lambda done, total: calls.append((done, total)))
    assert out.base_images.shape == (3, 8, 8, 3) and out.images.shape == (3, 16, 16, 3)
    assert out.images.dtype == np.uint8 and out.labels.tolist() == [0, 3, 5]
    assert calls[-1] == (14, 14) and len(calls) == 14  # 2 batches x (4 + 3) steps
    with pytest.raises(ValueError, match="conditioned on 8x8 images"):
        admrt.Engine(random_model("tiny-cond"), upsampler=up, backend="eager")


def test_fixed_variance_and_ddpm_run(clf):
    uncond = random_model("tiny-uncond")
    out = admrt.Engine(uncond, classifier=clf, backend="eager").sample(classes=[1], steps="5", guidance=1.0)
    assert out.images.shape == (1, 16, 16, 3)
    out = admrt.Engine(uncond, backend="eager").sample(num=2, steps="ddim3")
    assert out.labels is None and out.images.shape == (2, 16, 16, 3)
    with pytest.raises(ValueError, match="variance='learned_range'"):
        admrt.Engine(uncond, backend="eager").sample(num=1, variance="learned_range")


def test_bad_inputs_give_clear_errors(cond, clf):
    eng = admrt.Engine(cond, backend="eager")
    with pytest.raises(ValueError, match="steps='fast'"):
        eng.sample(classes=[1], steps="fast")
    with pytest.raises(ValueError, match="steps='ddim999'"):
        eng.sample(classes=[1], steps="ddim999")
    with pytest.raises(ValueError, match="needs a classifier"):
        eng.sample(classes=[1], guidance=2.0)
    with pytest.raises(ValueError, match=r"out of range; expected ids in \[0, 10\)"):
        eng.sample(classes=[1, 10])
    with pytest.raises(ValueError, match="seeds: expected 2"):
        eng.sample(classes=[1, 2], seeds=[1, 2, 3])
    with pytest.raises(ValueError, match="noise='fancy'"):
        eng.sample(classes=[1], noise="fancy")
    with pytest.raises(ValueError, match="dtype='fp8'"):
        admrt.Engine(cond, dtype="fp8", backend="eager")
    with pytest.raises(ValueError, match="backend='tvm': expected one of \\['auto', 'aoti', 'compile'"):
        admrt.Engine(cond, backend="tvm")
    with pytest.raises(ValueError, match="expected a noisy classifier"):
        admrt.Engine(cond, classifier=cond, backend="eager")
    with pytest.raises(ValueError, match="guidance: expected one scale or 2"):
        admrt.Engine(cond, classifier=clf, backend="eager").sample(classes=[1, 2], guidance=[1.0, 2.0, 3.0])


def test_nan_from_the_model_is_reported():
    model = random_model("tiny-cond")
    with torch.no_grad():
        model.out[-1].bias.fill_(float("nan"))
    with pytest.raises(RuntimeError, match=r"model output contains NaN or Inf at step index 2 \(timestep t=668\)"):
        admrt.Engine(model, backend="eager").sample(classes=[1], steps="ddim3")


def test_core_checks_its_inputs():
    sched = _schedule("ddim3")
    with pytest.raises(ValueError, match="guidance: this context has no classifier"):
        core.Sampler(_zero_model, None, sched, _params(1)).sample(guidance=torch.ones(1), seeds=_seeds(1))
    with pytest.raises(ValueError, match=r"seeds: expected shape \[2\] \(batch_size=2\)"):
        core.Sampler(_zero_model, None, sched, _params(2)).sample(seeds=_seeds(1))
    with pytest.raises(ValueError, match="seeds: expected 1 \\(one per sample\\) for seeded noise"):
        core.Sampler(_zero_model, None, sched, _params(1)).sample()
    with pytest.raises(RuntimeError, match=r"model output: expected shape \(1, 6, 8, 8\)"):
        core.Sampler(lambda x, t, y, lr: x, None, sched, _params(1)).sample(seeds=_seeds(1))
    with pytest.raises(ValueError, match="image_shape=.*expected \\(C, H, W\\)"):
        core.Sampler(_zero_model, None, sched, _params(1, shape=(3, 8)))
    with pytest.raises(ValueError, match="batch_size=0: expected a positive int"):
        core.Sampler(_zero_model, None, sched, _params(0))
    with pytest.raises(ValueError, match="eta=-1: expected a finite eta >= 0"):
        core.Sampler(_zero_model, None, sched, _params(1, eta=-1.0))
    with pytest.raises(ValueError, match="low_res: expected shape"):
        core.Sampler(_zero_model, None, sched, _params(1, low_res_shape=[3, 4, 4])).sample(seeds=_seeds(1))
    with pytest.raises(ValueError, match="missing table 'log_betas'"):
        tables = build_tables(DiffusionConfig(), "ddim3").tensors()
        del tables["log_betas"]
        core.Schedule(tables, 1000)
    with pytest.raises(TypeError):  # the enums are real types, not strings checked twice
        _params(1).method = "plms"
    with pytest.raises(ValueError, match="method='plms'"):
        admrt.Engine(random_model("tiny-cond"), backend="eager").sample(classes=[1], method="plms")


def test_lazy_engine_export():
    assert admrt.Engine is admrt.engine.Engine
