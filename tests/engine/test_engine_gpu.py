"""The engine on CUDA: parity with guided-diffusion's loops on the same device, and seeded noise
that does not depend on the batch. Skipped without a GPU."""
import pytest
import torch

import admrt
from admrt import core
from gd_oracle import reference_sample
from gd_reference import oracle_twin, random_model


def _random_pair(name):
    ours = random_model(name)
    return ours.cuda(), oracle_twin(ours).cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("steps", ["25", "ddim10"])
@pytest.mark.parametrize("fused", [False, True])
def test_guided_loop_matches_reference_on_cuda(steps, fused):
    model, ref_model = _random_pair("tiny-cond")
    clf, ref_clf = _random_pair("tiny-classifier")
    model.set_fused_kernels(fused)
    clf.set_fused_kernels(fused)
    classes = [1, 2, 3, 4]
    y = torch.tensor(classes, device="cuda")
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        torch.backends.cuda.matmul.allow_tf32 = False
        expected = reference_sample(ref_model, ref_clf, model.preset, steps, 2.0, y, (4, 3, 16, 16),
                                    torch.device("cuda"), seed=5)
        out = admrt.Engine(model, classifier=clf).sample(classes=classes, steps=steps, guidance=2.0, seeds=5,
                                                         batch_size=4, noise="reference", keep_float=True)
    diff = (torch.as_tensor(out.samples).cuda() - expected).abs()
    # fp32 on both sides; cuDNN algorithms (and the fused kernels' summation order) differ, and
    # 10-25 guided steps amplify rounding: far below one uint8 level (2/255) on average.
    assert diff.mean() < 1e-3 and diff.max() < 2e-2, (diff.mean().item(), diff.max().item())


@pytest.mark.gpu
def test_seeded_noise_is_batch_invariant_on_cuda():
    model, _ = _random_pair("tiny-cond")
    eng = admrt.Engine(model)
    a = eng.sample(classes=[1, 2, 3, 4], seeds=[10, 11, 12, 13], steps="ddim5", batch_size=4,
                   keep_float=True).samples
    b = eng.sample(classes=[3, 1], seeds=[12, 10], steps="ddim5", batch_size=1, keep_float=True).samples
    # The noise is the same bit for bit; cuDNN may pick other algorithms at another batch size, so
    # the network's outputs may differ by rounding (exact equality of uint8 images failed on an
    # H100 for that reason). Other noise would differ by O(1).
    assert abs(a[2] - b[0]).max() < 1e-3 and abs(a[0] - b[1]).max() < 1e-3


def _guided_engine(**kw):
    model, _ = _random_pair("tiny-cond")
    clf, _ = _random_pair("tiny-classifier")
    return admrt.Engine(model, classifier=clf, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("steps,options", [
    ("ddim10", {}), ("10", {}), ("dpmpp2m10", {}), ("dpmpp3m10", {}), ("unipc3m8", {}), ("dpmpp2m-sde10", {}),
    ("unipc2m8", {"guidance_interval": (300, 999), "dynamic_threshold": 0.99}), ("dpmpp2m10", {"guidance_every": 2})])
def test_captured_steps_equal_the_uncaptured_loop(steps, options):
    """The whole step (network, classifier gradient with its backward, update, noise; a solver's
    history) captured once and replayed gives the samples of the step run eagerly, batch after
    batch; with guidance on part of the steps, the steps with and without the classifier are
    two graphs."""
    kw = dict(classes=[1, 2, 3, 4, 5], steps=steps, guidance=2.0, seeds=[5, 6, 7, 8, 9], batch_size=2,
              keep_float=True, eta=0.5, **options)
    with torch.backends.cudnn.flags(enabled=True, deterministic=True, benchmark=False):
        graphed = _guided_engine()
        a = graphed.sample(**kw).samples
        ctx = graphed.context(steps, batch_size=2, eta=0.5, keep_float=True, **options)   # the one kept by sample()
        assert ctx.uses_graph("model") and ctx.captured("model")
        b = _guided_engine(cuda_graphs=False).sample(**kw).samples
    assert abs(a - b).max() <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("plan", ["ddim5", "unipc3m5"])
def test_no_host_synchronisation_inside_the_steps(plan):
    """Neither the first batch of a context (eager warm-up step, then capture) nor later batches
    (replays) synchronise with the host; the inputs are on the device before the mode is set.
    The solver runs with dynamic thresholding and guidance on part of its steps (two graphs)."""
    model, _ = _random_pair("tiny-cond")
    clf, _ = _random_pair("tiny-classifier")
    from admrt.diffusion import build_tables
    parsed = core.StepPlan.parse(plan)
    tables = build_tables(model.preset.diffusion, parsed)
    schedule = core.Schedule(tables.tensors(), tables.original_num_steps, tables.rescale_timesteps)
    p = core.default_params()
    p.batch_size, p.image_shape, p.check_finite, p.device = 2, [3, 16, 16], False, torch.device("cuda")
    if parsed.solver:
        p.method = getattr(core.Method, parsed.method.upper())
        p.dynamic_threshold, p.guidance_t_min = 0.99, 400
    units = (admrt.engine.Denoiser(model), admrt.engine.ClassifierGradient(clf))
    warm, fresh = core.Sampler(*units, schedule, p), core.Sampler(*units, schedule, p)
    y = torch.tensor([3, 4], device="cuda")
    g = torch.ones(2, device="cuda")
    seeds = torch.tensor([7, 8], device="cuda")
    warm.sample(y=y, guidance=g, seeds=seeds)  # capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x = warm.sample(y=y, guidance=g, seeds=seeds)        # replays
        x2 = fresh.sample(y=y, guidance=g, seeds=seeds)      # warm-up + capture
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert fresh.captured
    torch.testing.assert_close(x, x2, rtol=0, atol=1e-5)


@pytest.mark.gpu
def test_compile_backend_with_fused_ops_and_graphs():
    kw = dict(classes=[1, 2, 3], steps="ddim5", guidance=1.0, seeds=[1, 2, 3], keep_float=True)
    eager = _guided_engine().sample(**kw).samples
    compiled = _guided_engine(backend="compile").sample(**kw).samples
    assert abs(eager - compiled).max() < 1e-3


@pytest.mark.gpu
def test_aoti_packages_of_both_units_with_a_dynamic_batch(tmp_path):
    from torch.export import Dim, export
    from admrt.engine import ClassifierGradient, Denoiser
    model, _ = _random_pair("tiny-cond")
    clf, _ = _random_pair("tiny-classifier")
    den, grad = Denoiser(model), ClassifierGradient(clf)
    batch = Dim("batch", min=1, max=32)
    dyn = ({0: batch},) * 3
    x, t, y = torch.randn(3, 3, 16, 16, device="cuda"), torch.tensor([1.0, 500, 900], device="cuda"), \
        torch.tensor([1, 2, 3], device="cuda")
    for name, unit in (("den", den), ("grad", grad.graph(x, t, y, dynamic_batch=True))):
        ep = export(unit, (x, t, y), dynamic_shapes=dyn)
        path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / f"{name}.pt2"))
        loaded = torch._inductor.aoti_load_package(path)
        for b in (1, 5):
            xb = torch.randn(b, 3, 16, 16, device="cuda")
            tb, yb = torch.full((b,), 300.0, device="cuda"), torch.arange(b, device="cuda")
            want = den(xb, tb, yb) if name == "den" else grad(xb, tb, yb)
            torch.testing.assert_close(loaded(xb, tb, yb), want, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("method,plans", [("ddim", ["ddim10", "ddim6"]), ("dpmpp2m_sde", ["t8", "t5"])])
def test_step_batching_captured_equals_uncaptured(method, plans):
    """Slots on CUDA: one graph per (bucket, kind of step), replayed while images enter and leave;
    every image equals the same slots run uncaptured, and the captured step reads nothing back."""
    from test_step_batching import _gradient, _model, _params, _schedule
    scheds = [_schedule(p) for p in plans]
    images = [(0, 0, 3, 1.0, 11), (1, 1, 5, 0.0, 12), (2, 0, 7, 2.5, 13), (4, 1, 1, 1.0, 14), (9, 0, 2, 0.5, 15)]

    def run(graphs):
        p = _params(method, 4, 0.3 if method == "ddim" else 0.0, cuda_graphs=graphs, device=torch.device("cuda"))
        pool = core.Sampler(_model, _gradient, scheds, p)
        waiting, out, slot_of, it = list(range(len(images))), {}, {}, 0
        while waiting or slot_of:
            for i in [i for i in waiting if images[i][0] <= it]:
                free = [s for s in range(4) if not pool.slot_busy(s)]
                _, plan, label, scale, seed = images[i]
                pool.enter(free[0], plan=plan, label=label, guidance=scale, seed=seed)
                slot_of[free[0]] = i
                waiting.remove(i)
            for slot in pool.iterate():
                out[slot_of.pop(slot)] = pool.take(slot).cpu()
            it += 1
        return out, pool.captured

    captured, was_captured = run(True)
    plain, _ = run(False)
    assert was_captured
    for i in plain:
        assert torch.equal(captured[i], plain[i]), f"image {i}"
