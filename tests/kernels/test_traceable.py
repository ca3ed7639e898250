"""The fused ops' bodies trace with a symbolic batch, the way Inductor and AOTInductor see them.

Inductor (and AOTInductor, through torch.export) decomposes each `triton_op` into its Triton
kernels by running the op's Python body on FakeTensors with SymInt shapes. In an ordinary CPU
process the kernels are `triton.jit` functions, so `wrap_triton` records them as
`triton_kernel_wrapper_functional` nodes without launching anything, on meta tensors: no GPU is
needed up to the graph Inductor lowers (generating and running the kernels needs one; see
test_kernels_gpu.py). Under TRITON_INTERPRET=1 this path cannot run at all (see
interp_checks.compile_fullgraph_aot_eager_case).
"""
from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import pytest
import torch

import admrt.kernels as K

pytest.importorskip("triton", reason="the fused kernels need triton")
pytestmark = pytest.mark.skipif(K.INTERPRET, reason="needs triton.jit kernels (TRITON_INTERPRET is set)")

_spec = importlib.util.spec_from_file_location("admrt_interp_checks",
                                               Path(__file__).resolve().parent / "interp_checks.py")
checks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(checks)


@pytest.fixture(autouse=True)
def ttir_target(monkeypatch):
    """Tracing analyses which arguments each kernel writes by lowering it to TTIR for the active
    Triton target; with no GPU there is none and every argument counts as written (so inputs get
    cloned and the partitioner fails). A CUDA target stands in: nothing is compiled past TTIR."""
    import triton
    from triton.backends.compiler import GPUTarget
    try:
        triton.runtime.driver.active.get_current_target()
    except RuntimeError:
        class _Target:
            def get_current_target(self):
                return GPUTarget("cuda", 90, 32)
        monkeypatch.setattr(triton.runtime.driver, "_active", _Target())


class FusedBlock(torch.nn.Module):
    """interp_checks.block_module with the fused ops called directly (no device dispatch)."""

    def forward(self, x, weight, bias, scale, shift, qkv):
        h = K.group_norm_act_fused(x, weight, bias, num_groups=4, scale=scale, shift=shift, act="silu")
        legacy = K.qkv_attention_fused(qkv, checks.HEADS, legacy_order=True)
        new = K.qkv_attention_fused(qkv, checks.HEADS, legacy_order=False)
        return h, legacy + new


def _kernels(graph):
    """(kernel name, grid, written arguments) of every Triton kernel node in an FX graph."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    out = []
    for n in graph.nodes:
        if n.op == "call_function" and "triton_kernel_wrapper" in str(n.target):
            kernel = kernel_side_table.get_kernel(n.kwargs["kernel_idx"])
            out.append((kernel.fn.__name__, n.kwargs["grid"], sorted(n.kwargs["tensors_to_clone"])))
    return out


WRITES = {"_gn_stats_kernel": ["PSQ", "PSUM"], "_gn_fwd_kernel": ["MEAN", "RSTD", "Y"],
          "_gn_onepass_fwd_kernel": ["MEAN", "RSTD", "Y"],
          "_attn_fwd_kernel": ["LSE", "O"], "_attn_bwd_kernel": ["DQKV"],
          "_gn_bwd_reduce_kernel": ["PS1", "PS2"],
          "_gn_bwd_dx_kernel": ["DBP", "DSCALE", "DSHIFT", "DWP", "DX"],
          "_gn_onepass_bwd_kernel": ["DBP", "DSCALE", "DSHIFT", "DWP", "DX"]}


class TwoPassNorm(torch.nn.Module):
    """A group norm whose slices (8 channels x 64 x 64) take the two-pass path."""

    def forward(self, x, weight, bias, scale, shift):
        return K.group_norm_act_fused(x, weight, bias, num_groups=1, scale=scale, shift=shift, act="silu")


def two_pass_inputs(batch, device="meta"):
    x, w, b, sc, sh, _ = checks.block_inputs(batch, device=device)
    return (torch.empty(batch, 8, 64, 64, device=device), w, b, sc, sh)


def _decomposed(module, batch, inputs=None, dynamic_shapes=None):
    params = inspect.signature(torch.export.ExportedProgram.run_decompositions).parameters
    if "decompose_custom_triton_ops" not in params:
        pytest.skip("this torch cannot decompose triton_ops in run_decompositions")
    inputs = checks.block_inputs(batch, device="meta") if inputs is None else inputs
    ep = torch.export.export(module, inputs, dynamic_shapes=dynamic_shapes or checks.block_dynamic_shapes())
    return ep.run_decompositions(decompose_custom_triton_ops=True)


def _kernel_names(graph) -> list[str]:
    """Sorted kernel names; checks that every grid scales with the batch and that each kernel
    writes only its outputs (no input is cloned)."""
    kernels = _kernels(graph)
    for name, grid, writes in kernels:
        assert any(isinstance(g, torch.fx.Node) for g in grid[0]), (name, grid)
        assert writes == WRITES[name], (name, writes)
    return sorted(name for name, _, _ in kernels)


def _batch_range(ep):
    return [(int(r.lower), int(r.upper)) for r in ep.range_constraints.values()]


FWD_KERNELS = ["_attn_fwd_kernel"] * 2 + ["_gn_onepass_fwd_kernel"]     # the block's slices fit one program
BWD_KERNELS = ["_attn_bwd_kernel"] * 2 + ["_gn_onepass_bwd_kernel"]


@pytest.mark.parametrize("batch", [2, 7])   # export specialises an example size of 1
def test_forward_bodies_trace_with_symbolic_batch(batch):
    ep = _decomposed(FusedBlock(), batch)
    assert _kernel_names(ep.graph) == sorted(FWD_KERNELS)
    assert _batch_range(ep) == [(1, 64)]


def test_backward_bodies_trace_with_symbolic_batch():
    """The make_fx gradient graph (the classifier-gradient path) decomposes into the backward kernels."""
    from torch.fx.experimental.proxy_tensor import make_fx
    grads = checks.block_grads(FusedBlock())
    gm = make_fx(grads, tracing_mode="symbolic")(*checks.block_inputs(2, device="meta"))
    ep = _decomposed(gm, 2)
    assert _kernel_names(ep.graph) == sorted(FWD_KERNELS + BWD_KERNELS)
    assert _batch_range(ep) == [(1, 64)]


def test_two_pass_bodies_trace_with_symbolic_batch():
    """Forward and backward of the two-pass path (slices too large for one program)."""
    from torch.export import Dim
    from torch.fx.experimental.proxy_tensor import make_fx
    batch = Dim("batch", min=1, max=64)
    dynamic = ({0: batch}, None, None, {0: batch}, {0: batch})
    ep = _decomposed(TwoPassNorm(), 2, two_pass_inputs(2), dynamic)
    assert _kernel_names(ep.graph) == ["_gn_fwd_kernel", "_gn_stats_kernel"]

    def grads(*inputs):
        xs = [t.detach().requires_grad_() for t in inputs]
        return torch.autograd.grad(TwoPassNorm()(*xs).square().sum(), xs)
    gm = make_fx(grads, tracing_mode="symbolic")(*two_pass_inputs(2))
    ep = _decomposed(gm, 2, two_pass_inputs(2), dynamic)
    assert _kernel_names(ep.graph) == sorted(["_gn_stats_kernel", "_gn_fwd_kernel", "_gn_bwd_reduce_kernel",
                                              "_gn_bwd_dx_kernel"])
    assert _batch_range(ep) == [(1, 64)]


def test_dynamic_spatial_size_traces_the_two_pass_path():
    """With the height and width dynamic too, the body traces the two-pass kernels (whose tiles
    cover any L) and keeps the whole declared range."""
    from torch.export import Dim
    batch, side = Dim("batch", min=1, max=64), Dim("side", min=2, max=256)
    ep = _decomposed(TwoPassNorm(), 2, two_pass_inputs(2),
                     ({0: batch, 2: side, 3: side}, None, None, {0: batch}, {0: batch}))
    assert _kernel_names(ep.graph) == ["_gn_fwd_kernel", "_gn_stats_kernel"]
    assert sorted(_batch_range(ep)) == [(1, 64), (2, 256)]


def test_plan_of_a_symbolic_length_is_two_pass_without_guards(monkeypatch):
    """The plan takes no batch; a symbolic L (dynamic spatial size) takes the two-pass path, whose
    tiles cover any L, reading the example value without a guard."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    G = K._group_norm
    env = ShapeEnv()
    symbolic = {}
    for n in (16, 4096):
        L = env.create_symintnode(env.create_symbol(n, ConstantSource(f"L{n}")), hint=n)
        symbolic[n] = G.plan_group_norm(32, L, 2, False)
    assert not env.guards, env.guards
    monkeypatch.setitem(G.ONEPASS_BUDGET, "forward", (0, 64))   # the concrete sizes' two-pass plans
    for n, p in symbolic.items():
        q = G.plan_group_norm(32, n, 2, False)
        assert not p.onepass and isinstance(p.tiles, torch.SymInt), p
        assert (p.block_c, p.block_l, p.cpp, p.n_cblocks, p.split) == (q.block_c, q.block_l, q.cpp, q.n_cblocks,
                                                                        q.split)


def test_compile_joint_graph_holds_every_kernel_with_symbolic_batch():
    """torch.compile(fullgraph=True) with the batch marked dynamic: AOTAutograd's joint graph (what
    Inductor lowers) holds the forward and backward kernels, their grids scaling with the batch."""
    from functorch.compile import min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    joints = []

    def partition(gm, inputs, **kwargs):
        joints.append(gm)
        return min_cut_rematerialization_partition(gm, inputs, **kwargs)

    def stop(gm, example_inputs):   # the joint graph is all we need: meta tensors cannot run
        raise RuntimeError("stop after tracing")

    torch._dynamo.reset()
    compiled = torch.compile(FusedBlock(), fullgraph=True,
                             backend=aot_autograd(fw_compiler=stop, bw_compiler=stop, partition_fn=partition))
    inputs = checks.mark_batch_dynamic([t.requires_grad_() for t in checks.block_inputs(3, device="meta")])
    with pytest.raises(Exception, match="stop after tracing"):
        compiled(*inputs)
    (joint,) = joints
    assert _kernel_names(joint.graph) == sorted(FWD_KERNELS + BWD_KERNELS)
