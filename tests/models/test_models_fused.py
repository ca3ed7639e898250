"""The models with fused kernels equal the unfused models (tolerance rule of the kernels).

CPU: under the Triton interpreter in a subprocess (TRITON_INTERPRET=1 must be set before the
kernels are defined), a tiny UNet forward and a classifier gradient. GPU: the ADM-64 network.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import admrt

_SCRIPT = textwrap.dedent("""
    import torch, admrt
    torch.manual_seed(0)
    def randomise(m):
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn_like(p) * 0.2)
        return m
    unet = randomise(admrt.create_model("tiny-cond"))
    clf = randomise(admrt.create_model("tiny-classifier"))
    x = torch.randn(1, 3, 16, 16); t = torch.tensor([500]); y = torch.tensor([3])
    def run(fused):
        unet.set_fused_kernels(fused); clf.set_fused_kernels(fused)
        out = unet(x, t, y)
        xg = x.clone().requires_grad_(True)
        lp = torch.log_softmax(clf(xg, t), -1)[0, 3]
        (g,) = torch.autograd.grad(lp, xg)
        return out.detach(), g
    (o_ref, g_ref), (o_f, g_f) = run(False), run("require")
    rel = lambda a, b: float((a - b).norm() / b.norm())
    print("REL", rel(o_f, o_ref), rel(g_f, g_ref))
""")


def test_tiny_models_fused_under_interpreter_match_reference():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("REL"))
    out_rel, grad_rel = map(float, line.split()[1:])
    assert out_rel < 1e-4 and grad_rel < 1e-4, line  # fp32: both paths exact to rounding


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_adm64_fused_matches_unfused_on_gpu(dtype):
    """Fused vs unfused, both against an fp32 run: fused error <= 2x unfused error + atol."""
    torch.manual_seed(0)
    model = admrt.create_model("imagenet64-cond", device="cuda")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
    x = torch.randn(4, 3, 64, 64, device="cuda")
    t = torch.tensor([10, 300, 600, 999], device="cuda")
    y = torch.tensor([1, 2, 3, 4], device="cuda")
    with torch.no_grad():
        exact = model.set_fused_kernels(False)(x, t, y).double()
        model.set_dtype(dtype)
        unfused = model(x, t, y).double()
        fused = model.set_fused_kernels("require")(x, t, y).double()
    err = lambda a: ((a - exact).norm() / exact.norm()).item()  # noqa: E731
    assert err(fused) <= 2 * err(unfused) + 1e-3, (err(fused), err(unfused))
