"""Step batching in the core: slots of a Sampler (enter / iterate / take / release / move) and the
StepBatcher over a stack. An image that shares the batch with others, entering at any step and
following its own plan, equals the same image sampled alone: bitwise, for a network that computes
each sample on its own (the sampler's own arithmetic is per slot), and for the bundled models
whenever the network ran at the same batch sizes (oneDNN's convolutions round differently at
different batch sizes, about 1e-6: then within one uint8 level)."""
import numpy as np
import pytest
import torch

import admrt
from admrt import core
from admrt.config import DiffusionConfig
from admrt.diffusion import build_tables
from admrt.engine import Engine


def _schedule(plan):
    tb = build_tables(DiffusionConfig(), plan)
    return core.Schedule(tb.tensors(), tb.original_num_steps, tb.rescale_timesteps)


def _model(x, t, y, low_res):
    """Per-sample: eps and variance values from x, t and y alone."""
    s = (t / 1000).view(-1, 1, 1, 1)
    yy = (y.float() / 10).view(-1, 1, 1, 1)
    return torch.cat([0.3 * x * (1 - s) + 0.1 * torch.sin(3 * x + yy), torch.tanh(x * s + yy)], 1)


def _gradient(x, t, y):
    return torch.cos(2 * x + (y.float() / 7).view(-1, 1, 1, 1)) * (t / 1000).view(-1, 1, 1, 1)


def _params(method, batch, eta=0.0, **kw):
    p = core.default_params()
    p.method = getattr(core.Method, method.upper().replace("-", "_"))
    p.eta, p.batch_size, p.image_shape = eta, batch, [2, 6, 6]
    for k, v in kw.items():
        setattr(p, k, v)
    return p


CASES = [  # method, plans, eta, options
    ("ddpm", ["10", "6"], 0.0, {}),
    ("ddim", ["ddim10", "ddim7"], 0.5, {}),
    ("ddim", ["ddim8", "ddim12"], 0.0, {"guidance_t_min": 300, "guidance_t_max": 800, "guidance_every": 2}),
    ("dpmpp2m_sde", ["t8", "t5"], 0.0, {}),
    ("unipc3m", ["t9", "logsnr6"], 0.0, {"dynamic_threshold": 0.9}),
    ("dpmpp3m", ["t10", "t4"], 0.0, {}),
]


@pytest.mark.parametrize("method,plans,eta,options", CASES, ids=[c[0] + "-" + c[1][0] for c in CASES])
def test_slots_equal_each_image_alone_bitwise(method, plans, eta, options):
    """Images enter at different iterations, follow two plans, with guidance scales 0 and not:
    each equals its own batch-of-one sample() exactly."""
    scheds = [_schedule(p) for p in plans]
    # (enter at iteration, plan, label, scale, seed)
    images = [(0, 0, 3, 1.0, 11), (0, 1, 5, 0.0, 12), (2, 0, 7, 2.5, 13), (3, 1, 1, 1.0, 14), (9, 0, 2, 0.5, 15)]
    pool = core.Sampler(_model, _gradient, scheds, _params(method, 3, eta, **options))
    waiting, results, slot_of, it = list(range(len(images))), {}, {}, 0
    while waiting or slot_of:
        for i in [i for i in waiting if images[i][0] <= it]:
            free = [s for s in range(3) if not pool.slot_busy(s)]
            if not free:
                break
            _, plan, label, scale, seed = images[i]
            pool.enter(free[0], plan=plan, label=label, guidance=scale, seed=seed)
            slot_of[free[0]] = i
            waiting.remove(i)
        for slot in pool.iterate():
            results[slot_of.pop(slot)] = pool.take(slot)
        it += 1
    for i, (_, plan, label, scale, seed) in enumerate(images):
        alone = core.Sampler(_model, _gradient, scheds[plan], _params(method, 1, eta, **options)).sample(
            y=torch.tensor([label]), guidance=torch.tensor([scale]), seeds=torch.tensor([seed]))
        assert torch.equal(results[i], alone[0]), f"image {i} ({plans[plan]}) differs from its run alone"


def test_release_and_move_keep_the_others_exact():
    """A slot released mid-run (cancel) frees it; an image moved to another slot (compaction)
    goes on exactly; the slot's state (step) moves with it."""
    sched = _schedule("ddim10")
    pool = core.Sampler(_model, _gradient, sched, _params("ddim", 4, 0.3))
    for slot, seed in ((0, 1), (1, 2), (3, 3)):
        pool.enter(slot, label=slot, guidance=1.0, seed=seed)
    for _ in range(4):
        assert pool.iterate() == []
    pool.release(1)
    assert pool.occupied == 2 and not pool.slot_busy(1)
    pool.move(3, 1)
    assert pool.slot_step(1) == 4 and not pool.slot_busy(3)
    done = []
    while len(done) < 2:
        done += pool.iterate()
    assert sorted(done) == [0, 1]
    got = {0: pool.take(0), 1: pool.take(1)}
    for slot, label, seed in ((0, 0, 1), (1, 3, 3)):
        alone = core.Sampler(_model, _gradient, sched, _params("ddim", 1, 0.3)).sample(
            y=torch.tensor([label]), guidance=torch.tensor([1.0]), seeds=torch.tensor([seed]))
        assert torch.equal(got[slot], alone[0])
    assert pool.occupied == 0 and pool.iterate() == []


def test_slot_errors_name_what_is_wrong():
    pool = core.Sampler(_model, None, [_schedule("ddim4")], _params("ddim", 2))
    pool.enter(0, seed=1)
    with pytest.raises(ValueError, match="slot 0 is busy"):
        pool.enter(0, seed=2)
    with pytest.raises(ValueError, match=r"plan=1: expected 0..0"):
        pool.enter(1, plan=1)
    with pytest.raises(ValueError, match="no classifier"):
        pool.enter(1, guidance=1.0)
    with pytest.raises(ValueError, match="slot=5"):
        pool.enter(5)
    with pytest.raises(ValueError, match="is not done"):
        pool.take(0)
    ref = core.Sampler(_model, None, [_schedule("ddim4")], _params("ddim", 2, noise=core.NoiseMode.REFERENCE))
    with pytest.raises(ValueError, match="seeded noise"):
        ref.enter(0)


def test_a_non_finite_image_fails_alone():
    """A NaN in one slot's model output is that image's error, found when it is taken."""
    def model(x, t, y, low_res):
        out = _model(x, t, y, low_res)
        return torch.where((y == 9).view(-1, 1, 1, 1), torch.full_like(out, float("nan")), out)
    pool = core.Sampler(model, None, [_schedule("ddim4")], _params("ddim", 2))
    pool.enter(0, label=9, seed=1)
    pool.enter(1, label=2, seed=2)
    done = []
    while len(done) < 2:
        done += pool.iterate()
    with pytest.raises(RuntimeError, match="model output contains NaN or Inf at step index 3"):
        pool.take(0)
    assert torch.isfinite(pool.take(1)).all()


# -------------------------------------------------------------------------------------------------
# StepBatcher over the bundled stack


@pytest.fixture(scope="module")
def engine():
    return Engine(admrt.load_model("fashion16-cond"), classifier=admrt.load_model("fashion16-classifier"),
                  upsampler=admrt.load_model("fashion-upsample16-32"), backend="eager")


def _batcher(engine, slots, plans=("ddim6", "ddim10"), step=True, up="ddim3"):
    ctx = engine.context(plans[0], up, slots, keep=False)
    return core.StepBatcher(engine.stack, ctx.params, list(plans), step)


def _drain(b, watch=None):
    finished = []
    while b.busy:
        finished += b.iterate()
        if watch is not None:
            watch.append(b.stats())
    return finished


def test_batcher_request_alone_equals_engine_sample_bitwise(engine):
    """Alone in the batcher, a request runs at its own batch size: its images (both stages of the
    cascade) equal Engine.sample's (admrt sample's driver) bit for bit."""
    b = _batcher(engine, 4)
    rid = b.submit([3, 5, 7], [1.0, 0.0, 2.0], [11, 12, 13], None, "ddim10")
    assert _drain(b) == [rid]
    images, labels, base, seeds = b.take(rid)
    ref = engine.sample(classes=[3, 5, 7], steps="ddim10", upsampler_steps="ddim3", guidance=[1.0, 0.0, 2.0],
                        seeds=[11, 12, 13], batch_size=3)
    assert np.array_equal(images.numpy(), ref.images) and np.array_equal(base.numpy(), ref.base_images)
    assert labels.tolist() == [3, 5, 7] and list(seeds) == [11, 12, 13]


def test_batcher_shares_the_batch_across_steps(engine):
    """Requests at different steps of different plans share the batch, and each still gets the
    images it gets alone (base stage bitwise here; the cascade within one uint8 level)."""
    b = _batcher(engine, 4)
    first = b.submit([1, 2], [1.0], [100], None, "ddim10")
    stats = []
    for _ in range(3):
        b.iterate()
    second = b.submit([4], [1.5], [200], None, "ddim6")
    third = b.submit([8, 9, 0], [], [300], None, "")
    finished = _drain(b, stats)
    assert sorted(finished) == [first, second, third]
    assert any(s["base_slots"] > 1 and len(set(s["base_steps"])) > 1 for s in stats), "no mixed-step batch seen"
    assert max(s["base_slots"] for s in stats) == 4 and any(s["queued_images"] > 0 for s in stats)
    for rid, (classes, guidance, seed, plan) in {first: ([1, 2], 1.0, 100, "ddim10"), second: ([4], 1.5, 200, "ddim6"),
                                                 third: ([8, 9, 0], 1.0, 300, "ddim6")}.items():
        images, _, base, _ = b.take(rid)
        ref = engine.sample(classes=classes, steps=plan, upsampler_steps="ddim3", guidance=guidance, seeds=seed)
        assert np.abs(base.numpy().astype(int) - ref.base_images).max() <= 1
        assert np.abs(images.numpy().astype(int) - ref.images).max() <= 1


def test_batcher_cancel_frees_slots_and_static_waits(engine):
    b = _batcher(engine, 2, step=False)
    first = b.submit([1, 2], [], [1], None, "")
    b.iterate()
    second = b.submit([3], [], [2], None, "")
    b.iterate()
    s = b.stats()
    assert s["base_slots"] == 2 and s["queued_images"] == 1  # static: the second waits for the batch
    b.cancel(first)
    assert b.iterate() == [first]
    assert b.stats()["base_slots"] == 1  # the freed slots take the waiting request at once
    with pytest.raises(core.Cancelled):
        b.take(first)
    assert _drain(b) == [second] and b.take(second)[0].shape == (1, 32, 32, 1)
    assert b.progress(b.submit([1], [], [1], None, ""))["steps"] == 6 + 3


def test_batcher_refuses_bad_requests_and_plans(engine):
    b = _batcher(engine, 2)
    with pytest.raises(ValueError, match=r"classes: \[10\] out of range; expected ids in \[0, 10\)"):
        b.submit([10], [], [], None, "")
    with pytest.raises(ValueError, match=r"steps='ddim25': this server runs \('ddim6', 'ddim10'\)"):
        b.submit([1], [], [], None, "ddim25")
    with pytest.raises(ValueError, match="guidance=nan"):
        b.submit([1], [float("nan")], [], None, "")
    with pytest.raises(ValueError, match="share one method"):
        _batcher(engine, 2, plans=("ddim6", "10"))
    with pytest.raises(ValueError, match="seeded noise"):
        core.StepBatcher(engine.stack, engine.context("ddim6", "ddim3", 2, noise="reference", keep=False).params,
                         ["ddim6"], True)
    assert not b.busy
