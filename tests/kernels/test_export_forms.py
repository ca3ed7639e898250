"""The exporters' forms of the fused ops (admrt.kernels): fused="sdpa" (attention through
scaled_dot_product_attention, ONNX's Attention node) and fused="opaque" (one custom op each, the
ONNX custom-domain nodes) against the fp64 reference, forward and gradients: the error is at most
twice the torch reference's in the same dtype plus a small atol (STYLE.md). The opaque form's fused
implementation is checked under the Triton interpreter (interp_checks.py: opaque_ops)."""
import pytest
import torch

import admrt
from admrt import kernels

ATOL = {torch.float32: 1e-6, torch.float16: 1e-3}


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).norm() / ref.norm())


def _forward_and_grad(fn, inp: torch.Tensor, gout: torch.Tensor):
    x = inp.detach().requires_grad_()
    out = fn(x)
    (g,) = torch.autograd.grad(out, x, gout.to(out.dtype))
    return out, g


@pytest.mark.parametrize("form", ["sdpa", "opaque"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("legacy_order", [True, False])
def test_attention_forms_match_reference(form, dtype, legacy_order):
    torch.manual_seed(0)
    heads, ch, length = 2, 16, 21
    qkv = torch.randn(2, 3 * heads * ch, length, dtype=torch.float64)
    gout = torch.randn(2, heads * ch, length, dtype=torch.float64)

    def ref(q):
        return kernels.qkv_attention_reference(q, heads, legacy_order=legacy_order)

    out64, g64 = _forward_and_grad(ref, qkv, gout)
    out_t, g_t = _forward_and_grad(ref, qkv.to(dtype), gout)
    out_f, g_f = _forward_and_grad(
        lambda q: kernels.qkv_attention(q, heads, legacy_order=legacy_order, fused=form), qkv.to(dtype), gout)
    assert out_f.dtype == dtype and out_f.shape == out64.shape
    assert _rel(out_f, out64) <= 2 * _rel(out_t, out64) + ATOL[dtype]
    assert _rel(g_f, g64) <= 2 * _rel(g_t, g64) + ATOL[dtype]


@pytest.mark.parametrize("ada", [False, True])
def test_group_norm_opaque_form_matches_reference_and_traces_as_one_op(ada):
    torch.manual_seed(1)
    x = torch.randn(2, 64, 3, 5)
    w, b = 1 + 0.3 * torch.randn(64), 0.3 * torch.randn(64)
    sc, sh = (0.5 * torch.randn(2, 64), 0.5 * torch.randn(2, 64)) if ada else (None, None)
    out, g = _forward_and_grad(lambda t: kernels.group_norm_act(t, w, b, scale=sc, shift=sh, fused="opaque"), x,
                               torch.ones(2, 64, 3, 5))
    want, g_want = _forward_and_grad(lambda t: kernels.group_norm_act_reference(t, w, b, scale=sc, shift=sh), x,
                                     torch.ones(2, 64, 3, 5))
    # On CPU the opaque op runs the torch reference (bitwise); under TRITON_INTERPRET=1 it runs the
    # Triton kernel: the project's kernel tolerance, error vs fp64 at most 2x torch's own, + atol.
    f64 = lambda t: t.double() if t is not None else None
    exact = kernels.group_norm_act_reference(x.double(), f64(w), f64(b), scale=f64(sc), shift=f64(sh))
    err, err_torch = (out.double() - exact).abs().max(), (want.double() - exact).abs().max()
    assert err <= 2 * err_torch + 1e-6, (err.item(), err_torch.item())
    assert torch.allclose(g, g_want, atol=1e-6)

    class Norm(torch.nn.Module):
        def forward(self, t):
            return kernels.group_norm_act(t, w, b, scale=sc, shift=sh, fused="opaque")

    graph = torch.export.export(Norm(), (x,)).graph
    calls = [n.target for n in graph.nodes if n.op == "call_function"]
    assert calls == [torch.ops.admrt.group_norm_act.default]


def test_models_accept_the_forms_and_reject_others():
    from admrt.models.layers import FusedOpsMixin

    model = admrt.create_model("tiny-cond")
    for form in ("sdpa", "opaque", "auto"):
        model.set_fused_kernels(form)
        assert {m.fused for m in model.modules() if isinstance(m, FusedOpsMixin)} == {form}
    with pytest.raises(ValueError, match="enabled='fast': expected one of"):
        model.set_fused_kernels("fast")
