"""Interpreter checks of the fused kernels against their torch references (run as a script).

Run in a subprocess with TRITON_INTERPRET=1 (set by test_kernels_interp.py before Python
starts, so the kernels are defined as interpreted functions there and nowhere else).
Tolerance rule (STYLE.md): the kernel's error against an fp64 reference is at most twice the
error of the torch reference run in the same dtype, plus a small atol; errors are relative
Frobenius norms ||out - ref|| / ||ref||. Prints one JSON line per case.

Besides the kernel-vs-reference cases: the split of L changes nothing beyond rounding; each
sample's result is bitwise the same at any batch size; the fused
ops under torch.export (dynamic batch), make_fx of torch.autograd.grad, and
torch.compile(fullgraph=True); double backward through them (OTHER_CASES).

Case tables are plain data, and torch is imported inside the functions, so the pytest modules
can list the cases and reuse the helpers without importing the kernels.
"""
from __future__ import annotations

import json
import os
import sys

# name: (dtype, shape, num_groups, channels_last, act, adagn, offset, path); path "auto" takes
# the plan's choice, "onepass" / "twopass" force it (the case fails if the forced path is not the
# one that ran).
GN_CASES = {
    "gn_fp32_nchw_silu": ("float32", (2, 64, 5, 7), 32, False, "silu", False, 0.0, "auto"),
    "gn_fp16_nchw_silu_ada": ("float16", (2, 64, 3, 5), 32, False, "silu", True, 0.0, "auto"),
    "gn_bf16_cl_silu_ada": ("bfloat16", (2, 64, 4, 3), 32, True, "silu", True, 0.0, "auto"),
    "gn_fp32_cl_none": ("float32", (2, 64, 3, 3), 32, True, "none", False, 0.0, "auto"),
    "gn_fp16_c192_nchw_ada": ("float16", (1, 192, 3, 5), 32, False, "silu", True, 0.0, "auto"),
    "gn_bf16_c576_cl_none_ada": ("bfloat16", (1, 576, 2, 3), 32, True, "none", True, 0.0, "auto"),
    "gn_fp32_c1152_nchw": ("float32", (1, 1152, 2, 2), 32, False, "silu", False, 0.0, "auto"),
    "gn_fp32_1d_tokens": ("float32", (2, 64, 9), 32, False, "none", False, 0.0, "auto"),
    "gn_fp32_offset_mean": ("float32", (2, 64, 4, 4), 32, False, "silu", True, 300.0, "auto"),
    "gn_fp32_split_nchw": ("float32", (1, 32, 64, 64), 2, False, "silu", True, 0.0, "auto"),
    "gn_fp16_split_cl": ("float16", (1, 32, 64, 64), 2, True, "silu", False, 0.0, "auto"),
    "gn_fp32_mixed_paths_nchw": ("float32", (2, 32, 32, 32), 2, False, "silu", True, 0.0, "auto"),
    "gn_bf16_mixed_paths_cl": ("bfloat16", (2, 32, 32, 32), 2, True, "silu", False, 0.0, "auto"),
    # each path forced, both layouts, AdaGN and SiLU on and off, odd sizes (cpg 3 or 6, L 35)
    "gn_onepass_fp32_nchw_ada_silu": ("float32", (3, 48, 5, 7), 8, False, "silu", True, 0.0, "onepass"),
    "gn_onepass_fp16_nchw_plain_none": ("float16", (2, 48, 5, 7), 8, False, "none", False, 0.0, "onepass"),
    "gn_onepass_bf16_cl_ada_none": ("bfloat16", (2, 48, 5, 7), 16, True, "none", True, 0.0, "onepass"),
    "gn_onepass_fp32_cl_plain_silu": ("float32", (3, 48, 7, 5), 16, True, "silu", False, 0.0, "onepass"),
    "gn_twopass_fp32_nchw_ada_silu": ("float32", (3, 48, 5, 7), 8, False, "silu", True, 0.0, "twopass"),
    "gn_twopass_fp16_nchw_plain_none": ("float16", (2, 48, 5, 7), 8, False, "none", False, 0.0, "twopass"),
    "gn_twopass_bf16_cl_ada_none": ("bfloat16", (2, 48, 5, 7), 16, True, "none", True, 0.0, "twopass"),
    "gn_twopass_fp32_cl_plain_silu": ("float32", (3, 48, 7, 5), 16, True, "silu", False, 0.0, "twopass"),
    "gn_twopass_fp32_offset_mean": ("float32", (2, 64, 4, 4), 32, False, "silu", True, 300.0, "twopass"),
    # several groups per program with a partial last block: NCHW 8 of 12 groups, cl 21 of 32
    "gn_onepass_fp16_nchw_partial_block": ("float16", (2, 36, 5, 7), 12, False, "silu", True, 0.0, "onepass"),
    "gn_onepass_fp32_cl_partial_block": ("float32", (2, 96, 3, 3), 32, True, "silu", True, 0.0, "onepass"),
}
# "auto" cases whose paths the rule fixes: (forward, backward)
GN_AUTO_PATHS = {
    "gn_fp32_split_nchw": ["twopass", "twopass"],
    "gn_fp32_nchw_silu": ["onepass", "onepass"],
    "gn_fp32_mixed_paths_nchw": ["onepass", "twopass"],   # tile 16384: over the backward's budget
    "gn_bf16_mixed_paths_cl": ["onepass", "twopass"],
}
# name: (dtype, batch, heads, head_dim, T, legacy_order); the interpreter's backward blocks are
# 16 queries x 32 keys, so T = 50, 65, 96 take several blocks of each with a partial last one.
ATTN_CASES = {
    "attn_fp32_legacy_d32_t37": ("float32", 2, 2, 32, 37, True),
    "attn_fp16_new_d64_t33": ("float16", 1, 2, 64, 33, False),
    "attn_bf16_legacy_d64_t64": ("bfloat16", 2, 1, 64, 64, True),
    "attn_fp32_new_d192_t17": ("float32", 1, 1, 192, 17, False),
    "attn_fp16_legacy_d256_t20": ("float16", 1, 1, 256, 20, True),
    "attn_bf16_new_d128_t65": ("bfloat16", 1, 2, 128, 65, False),
    "attn_fp16_legacy_d128_t50": ("float16", 1, 1, 128, 50, True),
    "attn_fp32_new_d32_t65_pool": ("float32", 2, 1, 32, 65, False),   # AttentionPool2d: T = HW + 1
    "attn_bf16_legacy_d32_t96": ("bfloat16", 1, 2, 32, 96, True),
    "attn_fp16_new_d64_t16": ("float16", 2, 3, 64, 16, False),
}
ATOL = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 8e-3}


def _rel(a, ref):
    import torch
    a, ref = a.double(), ref.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _compare(fn_fused, fn_ref, inputs, dtype_name):
    """Forward and gradients of fused (in dtype), reference (in dtype) and reference (fp64)."""
    import torch
    dt = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(1)

    def run(fn, cast):
        xs = [None if t is None else t.detach().to(cast(t)).requires_grad_() for t in inputs]
        out = fn(*xs)
        return out, xs

    def low(t):  # low-precision copies keep the parameters' fp32 (models keep norms in fp32)
        return dt if t.dtype == torch.float64 and t.dim() != 1 else torch.float32

    out_f, xs_f = run(fn_fused, low)
    out_l, xs_l = run(fn_ref, low)
    out_r, xs_r = run(fn_ref, lambda t: torch.float64)
    gout = torch.randn(out_r.shape, generator=g, dtype=torch.float64)
    errs = {"out": (_rel(out_f, out_r), _rel(out_l, out_r))}
    live = [i for i, t in enumerate(inputs) if t is not None]
    gf = torch.autograd.grad(out_f, [xs_f[i] for i in live], gout.to(out_f.dtype).contiguous())
    gl = torch.autograd.grad(out_l, [xs_l[i] for i in live], gout.to(out_l.dtype).contiguous())
    gr = torch.autograd.grad(out_r, [xs_r[i] for i in live], gout)
    for j, i in enumerate(live):
        errs[f"grad{i}"] = (_rel(gf[j], gr[j]), _rel(gl[j], gr[j]))
    atol = ATOL[dtype_name]
    ok = all(e_k <= 2 * e_t + atol for e_k, e_t in errs.values())
    return ok, errs


def gn_case(name):
    import torch
    from admrt.kernels import group_norm_act, group_norm_act_reference
    dtype, shape, groups, cl, act, ada, offset, path = GN_CASES[name]
    torch.manual_seed(hash(name) % 1000)
    B, C = shape[:2]
    x = torch.randn(shape, dtype=torch.float64) * 1.5 + offset
    w = 1 + 0.3 * torch.randn(C, dtype=torch.float64)
    b = 0.3 * torch.randn(C, dtype=torch.float64)
    sc = 0.5 * torch.randn(B, C, dtype=torch.float64) if ada else None
    sh = 0.5 * torch.randn(B, C, dtype=torch.float64) if ada else None

    def prep(x):
        return x.to(memory_format=torch.channels_last) if cl else x

    def fused(x, w, b, sc, sh):
        x = prep(x)
        y = group_norm_act(x, w, b, num_groups=groups, scale=sc, shift=sh, act=act, fused="require")
        assert y.dtype == x.dtype and y.stride() == x.stride(), (y.dtype, y.stride(), x.stride())
        return y

    def ref(x, w, b, sc, sh):
        return group_norm_act_reference(prep(x), w, b, num_groups=groups, scale=sc, shift=sh, act=act)

    L = 1
    for n in shape[2:]:
        L *= n
    with forced_gn_path(path):
        ran = [group_norm_path(shape[1], L, groups, cl, d) for d in ("forward", "backward")]
        ok, errs = _compare(fused, ref, [x, w, b, sc, sh], dtype)
    errs["path"] = ran
    expect = {"auto": GN_AUTO_PATHS.get(name), "onepass": ["onepass"] * 2, "twopass": ["twopass"] * 2}[path]
    return ok and ran == (expect or ran), errs


def group_norm_path(C, L, groups, channels_last, direction="forward") -> str:
    from admrt.kernels import group_norm as G
    return G.plan_group_norm(C, L, groups, channels_last and C > 1, direction).path


class forced_gn_path:
    """Within the block, group norm's forward and backward take the given path ("auto": the
    plan's own choice), through the one-pass budgets."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        from admrt.kernels import group_norm as G
        self.saved = dict(G.ONEPASS_BUDGET)
        if self.path != "auto":
            tile = 1 << 30 if self.path == "onepass" else 0
            for direction, (_, per_thread) in self.saved.items():
                G.ONEPASS_BUDGET[direction] = (tile, per_thread)

    def __exit__(self, *exc):
        from admrt.kernels import group_norm as G
        G.ONEPASS_BUDGET.update(self.saved)


def gn_split_invariance_case():
    """The split of L in the two-pass path changes nothing beyond fp32 rounding."""
    import torch
    from admrt.kernels import group_norm as G
    torch.manual_seed(0)
    x, w, b = torch.randn(1, 32, 64, 64), torch.randn(32), torch.randn(32)
    sc, sh = torch.randn(1, 32), torch.randn(1, 32)
    gy = torch.randn(x.shape)
    results, splits, tiles = [], [], G.TWOPASS_TILES
    try:
        for per_program in (1, 4):
            G.TWOPASS_TILES = per_program
            plan = G.plan_group_norm(32, 64 * 64, 2, False)
            assert not plan.onepass, plan
            splits.append(plan.split)
            xs = [t.clone().requires_grad_() for t in (x, w, b, sc, sh)]
            y = G.group_norm_act_fused(*xs[:3], num_groups=2, scale=xs[3], shift=xs[4])
            results.append([y, *torch.autograd.grad(y, xs, gy)])
    finally:
        G.TWOPASS_TILES = tiles
    errs = [_rel(a, b) for a, b in zip(*results)]
    return splits[0] > splits[1] and max(errs) < 1e-5, {"splits": splits, "errs": errs}


def _batch_invariance(fn, inputs, batched):
    """fn at batch 3, and at batch 1 on sample 1 alone: sample 1's output and input gradients
    (for the same output gradient) must be bitwise equal. inputs: batch-3 tensors; batched: which
    of them carry the batch dim (the others, e.g. weights, are shared)."""
    import torch
    gy = None
    outs = []
    for pick, own in ((slice(None), slice(1, 2)), (slice(1, 2), slice(0, 1))):
        xs = [(t[pick] if bat else t).detach().clone().requires_grad_() for t, bat in zip(inputs, batched)]
        y = fn(*xs)
        if gy is None:
            gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(y.dtype)
        grads = torch.autograd.grad(y, [t for t, bat in zip(xs, batched) if bat], gy[pick].contiguous())
        outs.append([y[own]] + [d[own] for d in grads])
    diffs = [(a.double() - b.double()).abs().max().item() for a, b in zip(*outs)]
    return max(diffs) == 0.0, {"max_abs_diff": diffs}


def gn_batch_invariance_case():
    """Each sample's group norm (output, dx, dscale, dshift) is bitwise the same at batch 1 and 3,
    on both paths and both layouts: the plan never depends on the batch."""
    import torch
    from admrt.kernels import group_norm_act
    torch.manual_seed(4)
    ok, detail = True, {}
    for path in ("onepass", "twopass"):
        for cl in (False, True):
            x = torch.randn(3, 32, 64, 64 if path == "twopass" else 2) * 2 + 1
            if cl:
                x = x.to(memory_format=torch.channels_last)
            w, b = torch.randn(32), torch.randn(32)
            sc, sh = torch.randn(3, 32), torch.randn(3, 32)

            def fn(x, w, b, sc, sh):
                return group_norm_act(x, w, b, num_groups=2, scale=sc, shift=sh, fused="require")
            with forced_gn_path(path):
                assert group_norm_path(32, x.shape[2] * x.shape[3], 2, cl, "backward") == path
                case_ok, detail[f"{path}_{'cl' if cl else 'nchw'}"] = _batch_invariance(
                    fn, [x, w, b, sc, sh], [True, False, False, True, True])
            ok = ok and case_ok
    return ok, detail


def attn_batch_invariance_case():
    """Each sample's attention output and dqkv are bitwise the same at batch 1 and 3."""
    import torch
    from admrt.kernels import qkv_attention
    torch.manual_seed(6)
    ok, detail = True, {}
    for legacy in (True, False):
        qkv = torch.randn(3, 3 * 2 * 32, 50)
        case_ok, detail[f"legacy_{legacy}"] = _batch_invariance(
            lambda t: qkv_attention(t, 2, legacy_order=legacy, fused="require"), [qkv], [True])
        ok = ok and case_ok
    return ok, detail


def attn_case(name):
    import torch
    from admrt.kernels import qkv_attention, qkv_attention_reference
    dtype, B, H, D, T, legacy = ATTN_CASES[name]
    torch.manual_seed(hash(name) % 1000)
    qkv = torch.randn(B, 3 * H * D, T, dtype=torch.float64) * 1.5

    def fused(qkv):
        return qkv_attention(qkv, H, legacy_order=legacy, fused="require")

    def ref(qkv):
        return qkv_attention_reference(qkv, H, legacy_order=legacy)

    return _compare(fused, ref, [qkv], dtype)


# Tracing checks (the fused ops under torch.export, make_fx, torch.compile; double backward) on
# a small block calling both ops; test_traceable.py and test_kernels_gpu.py use the same block.
HEADS, HEAD_DIM, TOKENS = 2, 16, 5


def block_module():
    """Both fused ops as the models call them: AdaGN + SiLU, attention in both channel orders."""
    import torch
    from admrt.kernels import group_norm_act, qkv_attention

    class Block(torch.nn.Module):
        def forward(self, x, weight, bias, scale, shift, qkv):
            h = group_norm_act(x, weight, bias, num_groups=4, scale=scale, shift=shift, act="silu",
                               fused="require")
            legacy = qkv_attention(qkv, HEADS, legacy_order=True, fused="require")
            new = qkv_attention(qkv, HEADS, legacy_order=False, fused="require")
            return h, legacy + new

    return Block()


def block_inputs(batch, device="cpu", seed=0):
    """(x, weight, bias, scale, shift, qkv) for block_module; batch is dim 0 of x, scale, shift, qkv."""
    import torch
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 8, 3, 3, generator=g)
    w, b = 1 + 0.3 * torch.randn(8, generator=g), 0.3 * torch.randn(8, generator=g)
    sc, sh = 0.5 * torch.randn(batch, 8, generator=g), 0.5 * torch.randn(batch, 8, generator=g)
    qkv = torch.randn(batch, 3 * HEADS * HEAD_DIM, TOKENS, generator=g)
    return tuple(t.to(device) for t in (x, w, b, sc, sh, qkv))


def block_dynamic_shapes():
    from torch.export import Dim
    batch = Dim("batch", min=1, max=64)
    return ({0: batch}, None, None, {0: batch}, {0: batch}, {0: batch})


def admrt_ops(graph) -> dict:
    """Counts of admrt custom ops (fwd/bwd) called in an FX graph."""
    counts = {}
    for n in graph.nodes:
        name = str(n.target)
        if n.op == "call_function" and name.startswith("admrt."):
            op = name.split(".")[1]
            counts[op] = counts.get(op, 0) + 1
    return counts


def mark_batch_dynamic(inputs):
    """torch._dynamo.mark_dynamic on the batch dim of block_inputs (a guard on it then raises)."""
    import torch
    for i in (0, 3, 4, 5):
        torch._dynamo.mark_dynamic(inputs[i], 0)
    return inputs


def max_err(got, expected) -> float:
    """Largest max|got - expected| / max|expected| over the tensors of two pytrees."""
    import torch
    got, expected = torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(expected)
    assert len(got) == len(expected), (len(got), len(expected))
    return max(((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()
               for a, b in zip(got, expected))


FWD_OPS = {"group_norm_act_fwd": 1, "qkv_attention_fwd": 2}
BWD_OPS = {"group_norm_act_bwd": 1, "qkv_attention_bwd": 2}


def export_dynamic_batch_case():
    """torch.export with a dynamic batch keeps the custom ops; the program runs at other batches."""
    import torch
    m = block_module()
    ep = torch.export.export(m, block_inputs(2), dynamic_shapes=block_dynamic_shapes())
    ops = admrt_ops(ep.graph)
    ranges = sorted((int(r.lower), int(r.upper)) for r in ep.range_constraints.values())
    errs = {b: max_err(ep.module()(*block_inputs(b, seed=b)), m(*block_inputs(b, seed=b))) for b in (1, 3)}
    ok = ops == FWD_OPS and (1, 64) in ranges and max(errs.values()) < 1e-6
    return ok, {"ops": ops, "ranges": ranges, "errs": errs}


def block_grads(m, dynamic_batch=False):
    """A function of block_inputs returning the gradients of a loss on m's outputs."""
    import torch

    def grads(*inputs):
        xs = [t.detach().requires_grad_() for t in inputs]
        if dynamic_batch:
            mark_batch_dynamic(xs)
        h, a = m(*xs)
        return torch.autograd.grad(h.square().sum() + a.square().sum(), xs)
    return grads


def compile_block(backend, device="cpu", batches=(2, 3)) -> dict:
    """torch.compile(fullgraph=True) of block_module with the batch marked dynamic; per batch, the
    relative error of outputs and gradients against eager. Batches after the first must not
    recompile (torch._dynamo.config.error_on_recompile)."""
    import torch
    m = block_module()
    grads = block_grads(m)
    torch._dynamo.reset()
    compiled = torch.compile(m, backend=backend, fullgraph=True)
    cgrads = block_grads(compiled, dynamic_batch=True)
    errs = {}
    for k, b in enumerate(batches):
        inputs = mark_batch_dynamic(block_inputs(b, device, seed=b))
        with torch._dynamo.config.patch(error_on_recompile=k > 0):
            errs[b] = max(max_err(compiled(*inputs), m(*inputs)),     # inference graph
                          max_err(cgrads(*inputs), grads(*inputs)))   # training graphs
    return errs


def make_fx_grad_case():
    """make_fx of a function calling torch.autograd.grad holds the fused backward ops; the traced
    graph (symbolic shapes) runs at another batch, and exports with a dynamic batch."""
    import torch
    from torch.fx.experimental.proxy_tensor import make_fx
    grads = block_grads(block_module())
    gm = make_fx(grads, tracing_mode="symbolic")(*block_inputs(2))
    ops = admrt_ops(gm.graph)
    inputs = block_inputs(3, seed=3)
    err = max_err(gm(*inputs), grads(*inputs))
    ep = torch.export.export(gm, block_inputs(2), dynamic_shapes=block_dynamic_shapes())
    ep_ops = admrt_ops(ep.graph)
    ep_err = max_err(ep.module()(*inputs), grads(*inputs))
    ok = ops == {**FWD_OPS, **BWD_OPS} and ep_ops == ops and max(err, ep_err) < 1e-6
    return ok, {"ops": ops, "export_ops": ep_ops, "err": err, "export_err": ep_err}


def compile_fullgraph_aot_eager_case():
    """torch.compile(fullgraph=True), batch marked dynamic, AOTAutograd (aot_eager with graph
    capture): no graph break, no recompile for a new batch, the ops in the forward and backward
    graphs, results equal to eager. On a GPU, test_kernels_gpu.py runs the same with Inductor.

    The custom ops stay opaque here (decompose_custom_triton_ops=False, as torch.export does):
    under TRITON_INTERPRET=1 `wrap_triton` returns the interpreted kernel itself
    (torch/_library/triton.py, wrap_triton: "TRITON_INTERPRET=1 makes @triton.jit return
    InterpretedFunction"), so decomposing the op (triton.py, functional_decomp: `with mode:
    return fn(*args, **kwargs)`) would run the interpreter on FakeTensors, which fails in
    triton/runtime/interpreter.py (_init_args_hst -> _to_cpu: untyped_storage().data_ptr()).
    The decomposed bodies are traced with SymInt shapes in test_traceable.py instead.
    """
    import torch
    import torch._functorch.config
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    graphs = {"fw": [], "bw": []}

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)
        return compiler

    with torch._functorch.config.patch(decompose_custom_triton_ops=False):
        errs = compile_block(aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw")), batches=(2, 3, 7))
    fw = [admrt_ops(g.graph) for g in graphs["fw"]]   # inference, training
    bw = [admrt_ops(g.graph) for g in graphs["bw"]]
    ok = fw == [FWD_OPS, FWD_OPS] and bw == [BWD_OPS] and max(errs.values()) < 1e-6
    return ok, {"fw_ops": fw, "bw_ops": bw, "errs": errs}


def compile_fullgraph_inductor_opaque_case():
    """Inductor on CPU, the custom ops kept opaque (as in compile_fullgraph_aot_eager_case): it
    compiles the block fullgraph with a dynamic batch and calls the ops (so the interpreter) from
    its generated code, forward and backward; results equal eager."""
    import torch
    import torch._functorch.config
    from torch._inductor.utils import run_and_get_code
    with torch._functorch.config.patch(decompose_custom_triton_ops=False):
        errs, code = run_and_get_code(compile_block, "inductor", "cpu", (2, 5))
    code = "\n".join(code)
    called = {op: f"admrt.{op}" in code for op in [*FWD_OPS, *BWD_OPS]}
    return all(called.values()) and max(errs.values()) < 1e-6, {"called": called, "errs": errs}


def double_backward(fn, inputs, seed=0):
    """(first-order grads without create_graph, with it, grads of a projection of the latter)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    xs = [None if t is None else t.detach().requires_grad_() for t in inputs]
    live = [t for t in xs if t is not None]
    y = fn(*xs)
    gy = torch.randn(y.shape, generator=g).to(y.device)
    plain = torch.autograd.grad(y, live, gy, retain_graph=True)
    first = torch.autograd.grad(y, live, gy, create_graph=True)
    proj = sum((d * torch.randn(d.shape, generator=g).to(d.device)).sum() for d in first)
    second = torch.autograd.grad(proj, live, allow_unused=True)
    second = [torch.zeros_like(t) if d is None else d for d, t in zip(second, live)]
    return plain, first, second


def _double_backward_case(op, pairs):
    """Double backward through the fused op equals the reference's (it runs through it), and the
    plain backward (fused) agrees; pairs: [(fused, ref, inputs)]. Logged once at INFO per op."""
    import logging
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("admrt.kernels")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    errs = {}
    try:
        for k, (fused, ref, inputs) in enumerate(pairs):
            fp, ff, fs = double_backward(fused, inputs)
            rp, rf, rs = double_backward(ref, inputs)
            errs[k] = {"plain": max_err(fp, rp), "first": max_err(ff, rf), "second": max_err(fs, rs)}
    finally:
        logger.removeHandler(handler)
    logged = [r.getMessage() for r in records if "double backward" in r.getMessage()]
    ok = (len(logged) == 1 and op in logged[0]
          and all(e["plain"] < 1e-5 and max(e["first"], e["second"]) < 1e-6 for e in errs.values()))
    return ok, {"errs": errs, "logged": logged}


def double_backward_gn_case():
    from admrt.kernels import group_norm_act, group_norm_act_reference
    kw = dict(num_groups=4, act="silu")

    def fused(x, w, b, sc, sh):
        return group_norm_act(x, w, b, scale=sc, shift=sh, fused="require", **kw)

    def ref(x, w, b, sc, sh):
        return group_norm_act_reference(x, w, b, scale=sc, shift=sh, **kw)
    inputs = block_inputs(2)[:5]
    plain = [inputs[0], inputs[1], inputs[2], None, None]   # no AdaGN
    return _double_backward_case("group_norm_act", [(fused, ref, inputs), (fused, ref, plain)])


def double_backward_attn_case():
    from admrt.kernels import qkv_attention, qkv_attention_reference

    def pair(legacy):
        return (lambda t: qkv_attention(t, HEADS, legacy_order=legacy, fused="require"),
                lambda t: qkv_attention_reference(t, HEADS, legacy_order=legacy))
    qkv = block_inputs(2)[5]
    return _double_backward_case("qkv_attention", [(*pair(True), [qkv]), (*pair(False), [qkv])])


def opaque_ops_case():
    """fused="opaque" (one custom op each, the form the ONNX export keeps as custom nodes) runs the
    fused kernels under the interpreter and matches the references, gradients included."""
    import torch
    from admrt.kernels import group_norm_act, group_norm_act_reference, qkv_attention, qkv_attention_reference
    torch.manual_seed(3)
    x = torch.randn(2, 64, 3, 5, dtype=torch.float64)
    w, b = 1 + 0.3 * torch.randn(64, dtype=torch.float64), 0.3 * torch.randn(64, dtype=torch.float64)
    sc, sh = 0.5 * torch.randn(2, 64, dtype=torch.float64), 0.5 * torch.randn(2, 64, dtype=torch.float64)
    ok_gn, gn = _compare(
        lambda *a: group_norm_act(*a[:3], num_groups=32, scale=a[3], shift=a[4], fused="opaque"),
        lambda *a: group_norm_act_reference(*a[:3], num_groups=32, scale=a[3], shift=a[4]), [x, w, b, sc, sh],
        "float16")
    qkv = torch.randn(2, 3 * 2 * 32, 37, dtype=torch.float64)
    results, ok = {"group_norm_act": gn}, ok_gn
    for legacy in (True, False):
        ok_attn, attn = _compare(lambda q: qkv_attention(q, 2, legacy_order=legacy, fused="opaque"),
                                 lambda q: qkv_attention_reference(q, 2, legacy_order=legacy), [qkv], "float32")
        results[f"qkv_attention_legacy_{legacy}"], ok = attn, ok and ok_attn
    plain_ok, plain = _compare(lambda *a: group_norm_act(*a, num_groups=32, act="none", fused="opaque"),
                               lambda *a: group_norm_act_reference(*a, num_groups=32, act="none"), [x, w, b],
                               "float32")
    results["group_norm_plain"] = plain
    return ok and plain_ok, results


def onnx_export_vs_fused_case():
    """ONNX export (admrt.export.onnx) of a tiny denoiser and classifier gradient, checked in
    onnxruntime against the eager units running the fused kernels (and their backward)."""
    import tempfile
    from pathlib import Path

    import torch
    from admrt.engine import ClassifierGradient, Denoiser
    from admrt.export.onnx import check_file, export_unit_onnx
    from admrt.kernels import fused_available
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from gd_reference import random_model

    assert fused_available(torch.zeros(1)), "the eager units would run the torch reference"
    errors = {}
    with tempfile.TemporaryDirectory() as d:
        for name, unit in (("denoiser", Denoiser(random_model("tiny-cond"))),
                           ("classifier_grad", ClassifierGradient(random_model("tiny-classifier")))):
            export_unit_onnx(unit, Path(d) / f"{name}.onnx")
            errors[name] = check_file(Path(d) / f"{name}.onnx", unit, torch.device("cpu"))[0]  # raises when off
    return True, errors


OTHER_CASES = {
    "opaque_ops": opaque_ops_case,
    "onnx_export_vs_fused": onnx_export_vs_fused_case,
    "gn_split_invariance": gn_split_invariance_case,
    "gn_batch_invariance": gn_batch_invariance_case,
    "attn_batch_invariance": attn_batch_invariance_case,
    "export_dynamic_batch": export_dynamic_batch_case,
    "make_fx_grad": make_fx_grad_case,
    "compile_fullgraph_aot_eager": compile_fullgraph_aot_eager_case,
    "compile_fullgraph_inductor_opaque": compile_fullgraph_inductor_opaque_case,
    "double_backward_gn": double_backward_gn_case,
    "double_backward_attn": double_backward_attn_case,
}


def main(names):
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("interp_checks.py: run with TRITON_INTERPRET=1")
    import torch
    torch.set_num_threads(2)
    import admrt.kernels as K
    assert K.INTERPRET, "kernels were not defined under the interpreter"
    for name in names:
        try:
            if name in GN_CASES:
                ok, detail = gn_case(name)
            elif name in ATTN_CASES:
                ok, detail = attn_case(name)
            elif name in OTHER_CASES:
                ok, detail = OTHER_CASES[name]()
            else:
                raise KeyError(name)
        except Exception as e:  # reported per case, not a crash of the whole run
            ok, detail = False, f"{type(e).__name__}: {e}"
        print(json.dumps({"name": name, "ok": ok, "detail": detail}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or [*GN_CASES, *ATTN_CASES, *OTHER_CASES])
