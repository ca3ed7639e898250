"""The two compiled units (admrt.engine.Denoiser, ClassifierGradient): what they compute, that
they leave the caller's modules alone, and that make_fx / torch.export (dynamic batch) and
torch.compile(fullgraph=True) take them."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim, export

import admrt
from admrt.engine import ClassifierGradient, Denoiser
from gd_reference import oracle_twin, random_model

ROOT = Path(__file__).resolve().parents[2]


def _inputs(b, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 3, size, size, generator=g), torch.randint(0, 1000, (b,), generator=g).float(),
            torch.randint(0, 10, (b,), generator=g))


def test_denoiser_is_the_model_in_fp32():
    model = random_model("tiny-cond")
    x, t, y = _inputs(3)
    with torch.no_grad():
        assert torch.equal(Denoiser(model)(x, t, y), model(x, t, y))
        uncond = random_model("tiny-uncond")
        assert torch.equal(Denoiser(uncond)(x, t, y), uncond(x, t))  # y ignored
        up = random_model("tiny-upsample")
        low = torch.randn(3, 3, up.config.low_res_size, up.config.low_res_size)
        x_up = torch.randn(3, 3, up.config.image_size, up.config.image_size)
        assert torch.equal(Denoiser(up)(x_up, t, y, low), up(x_up, t, low_res=low, y=y))


def test_classifier_gradient_matches_the_reference_cond_fn():
    clf = random_model("tiny-classifier")
    ref = oracle_twin(clf)
    x, t, y = _inputs(4)
    x_in = x.clone().requires_grad_(True)
    log_probs = F.log_softmax(ref(x_in, t), dim=-1)
    expected = torch.autograd.grad(log_probs[range(4), y].sum(), x_in)[0]
    torch.testing.assert_close(ClassifierGradient(clf)(x, t, y), expected, rtol=1e-5, atol=1e-7)


def test_units_leave_the_callers_module_alone():
    model = random_model("tiny-cond").train()
    before = {k: (v.dtype, v.data_ptr()) for k, v in model.state_dict().items()}
    d16 = Denoiser(model, "fp16")
    d32 = Denoiser(model)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert {k: (v.dtype, v.data_ptr()) for k, v in model.state_dict().items()} == before
    assert d16.net.input_blocks[0][0].weight.dtype == torch.float16 and not d16.net.training
    # fp32 on the same device shares the weights' storage (no copy)
    assert d32.net.input_blocks[0][0].weight.data_ptr() == model.input_blocks[0][0].weight.data_ptr()
    admrt.Engine(model, dtype="bf16", backend="eager")
    assert {k: (v.dtype, v.data_ptr()) for k, v in model.state_dict().items()} == before


def test_export_with_a_dynamic_batch():
    model, clf = random_model("tiny-cond"), random_model("tiny-classifier")
    den, grad = Denoiser(model), ClassifierGradient(clf)
    batch = Dim("batch", min=1, max=64)
    dyn = ({0: batch}, {0: batch}, {0: batch})
    x, t, y = _inputs(3)
    den_ep = export(den, (x, t, y), dynamic_shapes=dyn)
    grad_ep = export(grad.graph(x, t, y, dynamic_batch=True), (x, t, y), dynamic_shapes=dyn)
    for b in (1, 5):
        xb, tb, yb = _inputs(b, seed=b)
        torch.testing.assert_close(den_ep.module()(xb, tb, yb), den(xb, tb, yb), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad_ep.module()(xb, tb, yb), grad(xb, tb, yb), rtol=1e-5, atol=1e-8)
    # the gradient graph holds forward and backward, with no autograd left to run
    targets = {str(n.target) for n in grad_ep.graph.nodes if n.op == "call_function"}
    assert any("convolution_backward" in s for s in targets)


INTERPRETED = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, "tests")
    from torch.export import Dim, export
    from gd_reference import random_model
    from admrt.engine import ClassifierGradient, Denoiser
    model, clf = random_model("tiny-cond"), random_model("tiny-classifier")
    model.set_fused_kernels("require"); clf.set_fused_kernels("require")
    den, grad = Denoiser(model), ClassifierGradient(clf)
    b = Dim("batch", min=1, max=64)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([10.0, 700.0]), torch.tensor([1, 2])
    ops = lambda g: {str(n.target) for n in g.nodes if n.op == "call_function"}
    den_ops = ops(export(den, (x, t, y), dynamic_shapes=({0: b},) * 3).graph)
    grad_graph = grad.graph(x, t, y, dynamic_batch=True)
    grad_ops = ops(grad_graph.gm.graph) | ops(export(grad_graph, (x, t, y), dynamic_shapes=({0: b},) * 3).graph)
    assert {"admrt.group_norm_act_fwd.default", "admrt.qkv_attention_fwd.default"} <= den_ops, den_ops
    assert {"admrt.group_norm_act_bwd.default", "admrt.qkv_attention_bwd.default"} <= grad_ops, grad_ops
    ref = ClassifierGradient(clf.set_fused_kernels(False))(x, t, y)
    err = (grad_graph(x, t, y) - ref).abs().max().item()
    assert err < 1e-4, err
    print("ok")
""")


def test_export_through_the_fused_ops_under_the_triton_interpreter():
    """With the fused Triton ops forced (interpreter on CPU), the exported denoiser holds the
    custom forward ops and the gradient graph their custom backward."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", INTERPRETED], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_compile_backend_fullgraph_matches_eager():
    """backend='compile': torch.compile(fullgraph=True) of both units (a graph break would raise),
    sampling the same images as eager."""
    model, clf = random_model("tiny-cond"), random_model("tiny-classifier")
    kw = dict(classes=[1, 7], steps="ddim3", guidance=2.0, seeds=[3, 4], keep_float=True)
    eager = admrt.Engine(model, classifier=clf, backend="eager").sample(**kw)
    compiled = admrt.Engine(model, classifier=clf, backend="compile").sample(**kw)
    np.testing.assert_allclose(compiled.samples, eager.samples, atol=1e-4)
