"""Benchmark the fused kernels (admrt.kernels) against torch at ADM-64/128/256 shapes.

Group norm: GB/s counting the fewest bytes each pass must move (forward: read x, write y;
backward: read x and dy, write dx), for the fused op, the torch eager chain it replaces
(`group_norm_act_reference`: fp32 GN, AdaGN, SiLU, cast) and torch's native GroupNorm alone
(forward). Each row names the launch plans, forward and backward (`path`, `bwd_path`:
"onepass"|"twopass"; `plan`, `bwd_plan`: the `plan_group_norm` dataclass) and `elems_per_sample`
(C*H*W). Where a direction's plan is one-pass it is also timed graph-replayed with the two-pass
path forced (the one-pass budget, ONEPASS_BUDGET, set to 0 and restored after): `onepass_vs_twopass`, `bwd_onepass_vs_twopass` = two-pass / one-pass time (null where
the plan is two-pass).
Attention: TFLOP/s (forward 4*B*H*T^2*D, backward 2.5x that, the flash-attention convention)
for the fused op, scaled_dot_product_attention (flash backend where it takes the inputs) with
the layout transforms it needs to read qkv (in the same channel order: `legacy_order` per
shape; the classifier's AttentionPool2d uses the new order, T = 65) and write (B, H*C, T), and
the reference einsum. Rows carry the launch blocks (`blocks_fwd`, `blocks_bwd`: `_attn_blocks`).

Times: warm medians, eager (each call from Python; triton.testing.do_bench) and replayed from a
CUDA graph (`*_graph_ms`; do_bench_cudagraph: launch overhead removed, as the compiled engine
runs). Graph-replayed backwards (`*_bwd_graph_ms`) run the forward eagerly on a side stream and
capture torch.autograd.grad(retain_graph=True) on that stream (autograd runs each backward op on
its forward op's stream); a capture that fails is reported and recorded as nan.
Backward rows add graph-replayed GB/s and fractions of copy (`fused_bwd_graph_gbs`,
`graph_bwd_frac_copy` = 3 * bytes / time / copy), `eager_bwd_graph_ms` (GN: the eager chain's
backward) or `sdpa_bwd_graph_ms`, `ref_bwd_graph_ms` (attention), and `graph_bwd_over_fwd`.
`first_call_ms` / `first_call_bwd_ms`: wall time of the first fused forward / backward at that
shape and variant, synchronised, before any warm timing: the Triton JIT compile plus one run.
It is the first call *in this process*: the in-memory JIT cache may already hold a kernel
compiled for an earlier shape with the same constexprs and specialisations (then it is close
to a warm call), and Triton's on-disk cache (~/.triton/cache) may hold one from an earlier
process (then it is a load, not a compile): `triton_cache_empty_at_start` says which
(give it an empty TRITON_CACHE_DIR for a cold compile). The launch configs come from
stated rules (no autotuning), so there is no tuning cost.
Device copy bandwidth (`copy_gbs`) is measured in the same run (frac_copy = GB/s over it), and
the graph-replayed time of an empty Triton kernel, grid (1,) (`bare_launch_us`, top level and
per GN row): `graph_over_bare_launch` = fused graph time / bare launch.

`targets` (JSON) and the printed summary: issue 10's targets, each met / not met (None: no rows
or no timings) with the numbers that decide it: GN >= 80% of copy bandwidth graph-replayed at
ADM-256 res 256/128, both layouts; GN at C*HW <= 64K within 2x of a bare launch; attention
backward <= 2.5x its forward at T >= 256 and no slower than SDPA-flash's backward at every
shape (each decided on eager times and, separately, on graph-replayed times); first-call cost
reported; fp16 and bf16 both.

--smoke: runs every code path at tiny shapes on CPU under the Triton interpreter (set
TRITON_INTERPRET=1 before Python starts), timing with perf_counter (median of 2 runs), graph
timings nan, SDPA on any backend; the one-pass budgets are lowered for the run (SMOKE_ONEPASS_BUDGET)
so tiny shapes take each path (one pass both ways, one pass forward and two backward, two both
ways). Its numbers mean nothing; it checks the benchmark itself.

    python bench/bench_kernels.py --out bench/results/kernels_h100.json   # [--only gn|attn]
    python bench/bench_kernels.py --rep 20 --graph-rep 10 --time-limit 35 --out ...   # bench/gpu_check.py's kernels stage
    TRITON_INTERPRET=1 python bench/bench_kernels.py --smoke --out /tmp/kernels_smoke.json
Order: the group norm shapes that decide targets (ADM-256 res 256, 128, 8; ADM-64 res 8), then
attention, then the other group norm shapes. --time-limit S starts no row after S seconds (the
rest listed in `skipped`; targets from what ran). --out is rewritten after every row
(`complete`: false until the run ends), so a run killed from outside keeps what it measured.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

try:
    import triton

    @triton.jit
    def _bench_empty_kernel():
        pass
except ImportError:  # the benchmark then stops in _import_kernels / main with a message
    triton = None

NAN = float("nan")
SMOKE = False       # set by main: CPU, Triton interpreter, perf_counter timer, no graphs
SMOKE_RUNS = 2      # timed runs per smoke measurement (the interpreter is slow)
SMOKE_ONEPASS_BUDGET = (1024, 512)  # --smoke: (forward, backward) one-pass tile budgets
REP_MS = 200        # do_bench rep: ms of warm eager calls per measurement
GRAPH_REP_MS = 200  # graph timings: ms of calls per replay (10 replays; do_bench_cudagraph's rep)


def _import_kernels():
    try:
        import admrt.kernels as K
        return K
    except ImportError:
        raise SystemExit("bench_kernels.py: admrt.kernels not importable (pip install -e . first)")


def _sync():
    if not SMOKE:
        torch.cuda.synchronize()


def _ratio(a, b):
    """a / b, nan where either is nan or b is 0."""
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return NAN
    return a / b


def gn_plan(G, C, L, channels_last, direction="forward"):
    """plan_group_norm of a 32-group norm in one direction ("forward" | "backward")."""
    return G.plan_group_norm(C, L, 32, channels_last, direction)


def onepass_budget_of(G):
    """The one-pass tile budgets, {direction: [elements, values per thread]}, for the JSON."""
    return {d: list(v) for d, v in G.ONEPASS_BUDGET.items()}


@contextlib.contextmanager
def onepass_budget(G, forward, backward=None):
    """Temporarily set the one-pass tile budget (elements) of the group norm plans, per direction
    (backward: same as forward if None); 0 forces the two-pass path. Restored on exit."""
    backward = forward if backward is None else backward
    old = dict(G.ONEPASS_BUDGET)
    for d, v in old.items():   # in place: the launchers read the module's dict
        G.ONEPASS_BUDGET[d] = (forward if d == "forward" else backward, *v[1:])
    try:
        yield
    finally:
        G.ONEPASS_BUDGET.update(old)


def first_call_ms(fn):
    """Wall time of one synchronised call (the first at a shape: JIT compile + run), and its result."""
    _sync()
    t0 = time.perf_counter()
    out = fn()
    _sync()
    return (time.perf_counter() - t0) * 1e3, out


def bench(fn, rep=None):
    """Median ms of warm eager calls (do_bench; in --smoke a perf_counter median of SMOKE_RUNS)."""
    if SMOKE:
        ts = []
        for _ in range(SMOKE_RUNS):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=rep or REP_MS, return_mode="median")  # ms


def bench_graph(fn, rep=None):
    """Median of CUDA-graph replays: the launch overhead removed, as the compiled engine runs.
    In --smoke: one call (the code path runs) and nan."""
    if SMOKE:
        fn()
        return NAN
    import triton.testing
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=rep or GRAPH_REP_MS, return_mode="median")
    except Exception as e:  # noqa: BLE001 - report, don't stop the run
        print(f"graph timing failed: {type(e).__name__}: {e}")
        return NAN


def bench_graph_grad(make, rep=None):
    """Median ms per call of a graph-replayed backward. make() runs the forward and returns a
    zero-argument function calling torch.autograd.grad(..., retain_graph=True). The forward,
    the warm-up and the capture all run on one side stream: autograd runs each backward op on
    the stream of its forward op, so a forward on another stream would escape the capture.
    As do_bench_cudagraph: n calls unrolled in one graph (n from an eager estimate), 10 replays.
    In --smoke: make() and one call (the code path runs) and nan."""
    if SMOKE:
        make()()
        return NAN
    rep = rep or GRAPH_REP_MS
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(s):
            fn = make()
            fn()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                fn()
            end.record()
            torch.cuda.synchronize()
            est = start.elapsed_time(end) / 5
            n = max(1, int(rep / est)) if est > 0 else 1000
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, stream=s):
                for _ in range(n):
                    fn()
            torch.cuda.synchronize()
            ts = []
            for _ in range(10):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                g.replay()
                end.record()
                torch.cuda.synchronize()
                ts.append(start.elapsed_time(end) / n)
        del g
        return statistics.median(ts)
    except Exception as e:  # noqa: BLE001 - report, don't stop the run
        print(f"graph backward timing failed: {type(e).__name__}: {e}")
        try:
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001
            pass
        return NAN
    finally:
        torch.cuda.current_stream().wait_stream(s)


def copy_bandwidth(dev):
    n = (1 << 22) if SMOKE else (1 << 28)  # 8 MiB / 512 MiB fp16
    a = torch.randn(n, device=dev, dtype=torch.float16)
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a))
    return 2 * a.numel() * a.element_size() / ms / 1e6  # GB/s


def bare_launch_us():
    """Graph-replayed time (µs) of an empty Triton kernel, grid (1,): the floor of one launch
    (in --smoke the interpreter's wall time per call)."""
    fn = lambda: _bench_empty_kernel[(1,)]()  # noqa: E731
    fn()  # compile
    return (bench(fn) if SMOKE else bench_graph(fn)) * 1e3


GN_SHAPES = {  # (model, resolution): (B, C, H, W) of the norms that move the most bytes
    "adm256 res256": (4, 256, 256, 256),
    "adm256 res32": (4, 512, 32, 32),
    "adm256 res8": (4, 1024, 8, 8),
    "adm64 res64": (16, 192, 64, 64),
    "adm64 res32": (16, 384, 32, 32),
    "adm64 res16": (16, 576, 16, 16),
    "adm256 res128": (4, 256, 128, 128),
    "adm256 res64": (4, 512, 64, 64),
    "adm128 res64": (8, 256, 64, 64),
    "adm128 res32": (8, 512, 32, 32),
    "adm256 res16": (4, 1024, 16, 16),
    "adm64 res8": (16, 768, 8, 8),
}
GN_VARIANTS = {  # name: (dtype, channels_last, adagn, act)
    "fp16 nchw silu": (torch.float16, False, False, "silu"),
    "fp16 nchw adagn+silu": (torch.float16, False, True, "silu"),
    "fp16 cl adagn+silu": (torch.float16, True, True, "silu"),
    "bf16 nchw none": (torch.bfloat16, False, False, "none"),
    "bf16 cl adagn+silu": (torch.bfloat16, True, True, "silu"),
}
ATTN_SHAPES = {  # (B, heads, head dim, T, legacy_order); legacy order as the released models
    "adm256 T1024": (8, 8, 64, 1024, True),
    "adm256 T256": (8, 16, 64, 256, True),
    "adm256 T64": (8, 16, 64, 64, True),
    "adm64 T1024": (32, 6, 64, 1024, True),
    "adm64 T256": (32, 9, 64, 256, True),
    "adm64 T64": (32, 12, 64, 64, True),
    "adm256 T256 d32": (8, 32, 32, 256, True),
    "adm256 T1024 d128": (8, 4, 128, 1024, True),
    "adm256 T64 d128": (8, 8, 128, 64, True),
    "adm64 T1024 new": (32, 6, 64, 1024, False),
    "clf256 T65": (16, 8, 64, 65, False),  # classifier AttentionPool2d: new order, T = 8*8 + 1
}
ATTN_DTYPES = (torch.float16, torch.bfloat16)
# --smoke: tiny shapes, every variant and both orders; with SMOKE_ONEPASS_BUDGET res8 takes one
# pass both ways, res32 one pass forward and two backward, res32x64 two passes both ways
SMOKE_GN_SHAPES = {"smoke res8": (2, 64, 8, 8), "smoke res32": (1, 32, 32, 32), "smoke res32x64": (1, 32, 32, 64)}
SMOKE_ATTN_SHAPES = {"smoke T40": (1, 2, 32, 40, True), "smoke T40 new": (1, 2, 32, 40, False)}
# shapes that decide the targets; measured first (then attention, then the other GN shapes), so a
# run under --time-limit keeps what decides the targets
TARGET_GN_COPY_SHAPES = ("adm256 res256", "adm256 res128")
GN_FIRST = (*TARGET_GN_COPY_SHAPES, "adm256 res8", "adm64 res8")
SMOKE_TARGET_GN_COPY_SHAPES = ("smoke res32x64",)
TARGET_GN_SMALL_ELEMS = 65536
TARGET_ATTN_LONG_T = 256


class Results:
    """The JSON document; written to --out after every row (complete: false until the end).
    Rows past the deadline (--time-limit) are listed in `skipped` instead of measured."""

    def __init__(self, path, meta, deadline=math.inf):
        self.path, self.meta, self.rows, self.deadline = path, meta, [], deadline
        self.meta.update(complete=False, results=self.rows, skipped=[])

    def skip(self, *names):
        """True (and the row listed as skipped) once the time limit has passed."""
        if time.perf_counter() < self.deadline:
            return False
        self.meta["skipped"].append(" ".join(names))
        return True

    def add(self, row):
        self.rows.append(row)
        self.meta["targets"] = run_targets(self.rows)   # so a run killed from outside keeps its verdicts too
        self.write()

    def write(self):
        if self.path:   # atomically: a run killed mid-write keeps the previous version
            tmp = f"{self.path}.tmp"
            with open(tmp, "w") as f:
                json.dump(self.meta, f, indent=1)
            os.replace(tmp, self.path)


def bench_group_norm(K, dev, copy_gbs, bare_us, res, shapes):
    G = importlib.import_module("admrt.kernels.group_norm")
    for sname, shape in shapes.items():
        B, C, H, W = shape
        L = H * W
        for vname, (dt, cl, ada, act) in GN_VARIANTS.items():
            if res.skip("group_norm", sname, vname):
                continue
            mf = torch.channels_last if cl else torch.contiguous_format
            x = torch.randn(shape, device=dev, dtype=dt).to(memory_format=mf)
            w = torch.randn(C, device=dev)
            b = torch.randn(C, device=dev)
            sc = torch.randn(B, C, device=dev) if ada else None
            sh = torch.randn(B, C, device=dev) if ada else None
            nbytes = x.numel() * x.element_size()
            plan, bplan = gn_plan(G, C, L, cl, "forward"), gn_plan(G, C, L, cl, "backward")
            kw = dict(scale=sc, shift=sh, act=act)
            fused = lambda: K.group_norm_act(x, w, b, fused="require", **kw)  # noqa: E731
            eager = lambda: K.group_norm_act_reference(x, w, b, **kw)  # noqa: E731
            native = lambda: F.group_norm(x, 32, w.to(dt), b.to(dt))  # noqa: E731
            t_first, y0 = first_call_ms(fused)
            # correctness at this shape before timing
            err = (y0.float() - eager().float()).abs().max().item()
            del y0
            t_f, t_e, t_n = bench(fused), bench(eager), bench(native)
            g_f, g_e, g_n = bench_graph(fused), bench_graph(eager), bench_graph(native)
            g_2p = gb_2p = None
            if plan.onepass:  # the same shape through the two-pass kernels (forced), graph-replayed
                with onepass_budget(G, 0):
                    assert gn_plan(G, C, L, cl).path == "twopass"
                    g_2p = bench_graph(fused)
            # backward: grads of x, w, b (and scale, shift)
            ins = [t.requires_grad_() for t in (x, w, b, sc, sh) if t is not None]
            yf, ye = fused(), eager()
            dy = torch.randn_like(yf)
            t_first_bwd, _ = first_call_ms(lambda: torch.autograd.grad(yf, ins, dy, retain_graph=True))
            tb_f = bench(lambda: torch.autograd.grad(yf, ins, dy, retain_graph=True))
            tb_e = bench(lambda: torch.autograd.grad(ye, ins, dy, retain_graph=True))

            def grad_of(f):
                def make():
                    y = f()
                    d = torch.randn_like(y)
                    return lambda: torch.autograd.grad(y, ins, d, retain_graph=True)
                return make
            gb_f, gb_e = bench_graph_grad(grad_of(fused)), bench_graph_grad(grad_of(eager))
            if bplan.onepass:  # the backward through the two-pass kernels (forced)
                with onepass_budget(G, 0):
                    assert gn_plan(G, C, L, cl, "backward").path == "twopass"
                    gb_2p = bench_graph_grad(grad_of(fused))
            yf = ye = None  # free before the next row
            for t in ins:
                t.requires_grad_(False)
            r = dict(op="group_norm", shape=sname, dims=list(shape), variant=vname, max_abs_err=err,
                     fused_ms=t_f, eager_ms=t_e, native_gn_ms=t_n, fused_bwd_ms=tb_f, eager_bwd_ms=tb_e,
                     fused_gbs=2 * nbytes / t_f / 1e6, eager_gbs=2 * nbytes / t_e / 1e6,
                     fused_bwd_gbs=3 * nbytes / tb_f / 1e6,
                     frac_copy=2 * nbytes / t_f / 1e6 / copy_gbs,
                     speedup_eager=t_e / t_f, speedup_native=t_n / t_f, bwd_over_fwd=tb_f / t_f,
                     bwd_speedup_eager=tb_e / tb_f, fused_graph_ms=g_f, eager_graph_ms=g_e,
                     native_graph_ms=g_n, fused_graph_gbs=_ratio(2 * nbytes / 1e6, g_f),
                     graph_frac_copy=_ratio(2 * nbytes / 1e6, g_f * copy_gbs),
                     graph_speedup_eager=_ratio(g_e, g_f), graph_speedup_native=_ratio(g_n, g_f),
                     # added with the one-pass kernels (issue 10)
                     dtype=str(dt).split(".")[-1], layout="channels_last" if cl else "nchw",
                     adagn=ada, act=act, elems_per_sample=C * L, path=plan.path,
                     plan=dataclasses.asdict(plan), bwd_path=bplan.path, bwd_plan=dataclasses.asdict(bplan),
                     first_call_ms=t_first, first_call_bwd_ms=t_first_bwd,
                     fused_bwd_graph_ms=gb_f, eager_bwd_graph_ms=gb_e,
                     fused_bwd_graph_gbs=_ratio(3 * nbytes / 1e6, gb_f),
                     graph_bwd_frac_copy=_ratio(3 * nbytes / 1e6, gb_f * copy_gbs),
                     graph_bwd_speedup_eager=_ratio(gb_e, gb_f), graph_bwd_over_fwd=_ratio(gb_f, g_f),
                     bare_launch_us=bare_us, graph_over_bare_launch=_ratio(g_f * 1e3, bare_us),
                     twopass_graph_ms=g_2p, onepass_vs_twopass=None if g_2p is None else _ratio(g_2p, g_f),
                     twopass_bwd_graph_ms=gb_2p,
                     bwd_onepass_vs_twopass=None if gb_2p is None else _ratio(gb_2p, gb_f))
            res.add(r)
            o2p = "" if g_2p is None else f" 2p/1p x{r['onepass_vs_twopass']:4.2f}"
            b2p = "" if gb_2p is None else f" 2p/1p x{r['bwd_onepass_vs_twopass']:4.2f}"
            print(f"GN  {sname:14s} {vname:22s} {plan.path:7s} fused {r['fused_gbs']:7.0f} GB/s ({100 * r['frac_copy']:5.1f}% copy) "
                  f"x{r['speedup_eager']:5.2f} eager x{r['speedup_native']:5.2f} native | bwd {r['fused_bwd_gbs']:6.0f} GB/s "
                  f"{r['bwd_over_fwd']:4.2f}x fwd, x{r['bwd_speedup_eager']:5.2f} eager | graph {r['fused_graph_gbs']:6.0f} GB/s "
                  f"({100 * r['graph_frac_copy']:5.1f}%) x{r['graph_speedup_eager']:5.2f} eager x{r['graph_speedup_native']:5.2f} native, "
                  f"{r['graph_over_bare_launch']:5.2f}x bare{o2p} | graph bwd {bplan.path} ({100 * r['graph_bwd_frac_copy']:5.1f}%) "
                  f"{r['graph_bwd_over_fwd']:4.2f}x fwd{b2p} | first {t_first:7.1f} + {t_first_bwd:7.1f} ms",
                  flush=True)


def _sdpa_attention(qkv, H, legacy):
    """scaled_dot_product_attention with the layout transforms ADM's qkv needs."""
    B, W, T = qkv.shape
    D = W // (3 * H)
    if legacy:
        q, k, v = qkv.reshape(B, H, 3 * D, T).split(D, dim=2)      # (B, H, D, T)
    else:
        q, k, v = qkv.reshape(B, 3, H, D, T).unbind(1)
    q, k, v = (t.transpose(-1, -2).contiguous() for t in (q, k, v))  # (B, H, T, D), stride 1 in D
    o = F.scaled_dot_product_attention(q, k, v)                     # scale 1/sqrt(D) as ADM
    return o.transpose(-1, -2).reshape(B, H * D, T)


def bench_attention(K, dev, res, shapes):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    A = importlib.import_module("admrt.kernels.attention")
    for sname, (B, H, D, T, legacy) in shapes.items():
        for dt in ATTN_DTYPES:
            if res.skip("attention", sname, str(dt).split(".")[-1]):
                continue
            qkv = torch.randn(B, 3 * H * D, T, device=dev, dtype=dt)
            flops = 4 * B * H * T * T * D
            fused = lambda: K.qkv_attention(qkv, H, legacy_order=legacy, fused="require")  # noqa: E731
            ref = lambda: K.qkv_attention_reference(qkv, H, legacy_order=legacy)  # noqa: E731

            def sdpa():
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    return _sdpa_attention(qkv, H, legacy)
            try:
                if SMOKE:  # CPU: torch's own backend choice
                    raise RuntimeError("--smoke (CPU)")
                sdpa()
            except RuntimeError as e:  # no flash kernel for these inputs: torch's own choice
                if not SMOKE:
                    print(f"sdpa flash unavailable ({e}); using the default backend")

                def sdpa():
                    return _sdpa_attention(qkv, H, legacy)
            t_first, y0 = first_call_ms(fused)
            y_ref = ref()
            err = (y0.float() - y_ref.float()).abs().max().item()
            err_sdpa = (sdpa().float() - y_ref.float()).abs().max().item()
            del y0, y_ref
            fns = (("fused", fused), ("sdpa", sdpa), ("ref", ref))
            t = {n: bench(f) for n, f in fns}
            tg = {n: bench_graph(f) for n, f in fns}
            qkv.requires_grad_()
            tb, tbg = {}, {}
            t_first_bwd = NAN
            for n, f in fns:
                y = f()
                dy = torch.randn_like(y)
                if n == "fused":
                    t_first_bwd, _ = first_call_ms(lambda: torch.autograd.grad(y, qkv, dy, retain_graph=True))
                tb[n] = bench(lambda: torch.autograd.grad(y, qkv, dy, retain_graph=True))
                y = None

                def make(f=f):
                    y = f()
                    d = torch.randn_like(y)
                    return lambda: torch.autograd.grad(y, qkv, d, retain_graph=True)
                tbg[n] = bench_graph_grad(make)
            qkv.requires_grad_(False)
            r = dict(op="attention", shape=sname, dims=[B, H, D, T], dtype=str(dt).split(".")[-1],
                     max_abs_err=err, sdpa_max_abs_err=err_sdpa,
                     **{f"{n}_ms": v for n, v in t.items()}, **{f"{n}_bwd_ms": v for n, v in tb.items()},
                     fused_tflops=flops / t["fused"] / 1e9, sdpa_tflops=flops / t["sdpa"] / 1e9,
                     ref_tflops=flops / t["ref"] / 1e9, fused_bwd_tflops=2.5 * flops / tb["fused"] / 1e9,
                     vs_sdpa=t["sdpa"] / t["fused"], vs_ref=t["ref"] / t["fused"],
                     bwd_vs_sdpa=tb["sdpa"] / tb["fused"], bwd_vs_ref=tb["ref"] / tb["fused"],
                     bwd_over_fwd=tb["fused"] / t["fused"], **{f"{n}_graph_ms": v for n, v in tg.items()},
                     graph_vs_sdpa=_ratio(tg["sdpa"], tg["fused"]), graph_vs_ref=_ratio(tg["ref"], tg["fused"]),
                     # added with the one-launch backward (issue 10)
                     legacy_order=legacy, first_call_ms=t_first, first_call_bwd_ms=t_first_bwd,
                     **{f"{n}_bwd_graph_ms": v for n, v in tbg.items()},
                     fused_graph_tflops=_ratio(flops / 1e9, tg["fused"]),
                     fused_bwd_graph_tflops=_ratio(2.5 * flops / 1e9, tbg["fused"]),
                     graph_bwd_vs_sdpa=_ratio(tbg["sdpa"], tbg["fused"]),
                     graph_bwd_vs_ref=_ratio(tbg["ref"], tbg["fused"]),
                     graph_bwd_over_fwd=_ratio(tbg["fused"], tg["fused"]),
                     blocks_fwd=list(A._attn_blocks(D, T, dt, "fwd")),
                     blocks_bwd=list(A._attn_blocks(D, T, dt, "bwd")))
            res.add(r)
            print(f"ATT {sname:17s} {r['dtype']:8s} {'legacy' if legacy else 'new':6s} fused {r['fused_tflops']:6.1f} TFLOP/s "
                  f"x{r['vs_sdpa']:5.2f} sdpa x{r['vs_ref']:5.2f} ref | bwd {r['fused_bwd_tflops']:6.1f} TFLOP/s "
                  f"x{r['bwd_vs_sdpa']:5.2f} sdpa x{r['bwd_vs_ref']:5.2f} ref, {r['bwd_over_fwd']:4.2f}x fwd | graph "
                  f"x{r['graph_vs_sdpa']:5.2f} sdpa x{r['graph_vs_ref']:5.2f} ref | graph bwd "
                  f"x{r['graph_bwd_vs_sdpa']:5.2f} sdpa {r['graph_bwd_over_fwd']:4.2f}x fwd | first "
                  f"{t_first:7.1f} + {t_first_bwd:7.1f} ms", flush=True)


def _extreme(rows, key, pick):
    """(value, row) of the min or max finite rows[key], or (None, None) if there is none."""
    vals = [(r[key], r) for r in rows if r.get(key) is not None and math.isfinite(r[key])]
    if not vals:
        return None, None
    return pick(vals, key=lambda vr: vr[0])


def _where(r):
    if r is None:
        return None
    return f"{r['shape']} {r.get('variant') or r['dtype']}"


def _target(name, text, rows, key, pick, threshold, better, note=None):
    """One target decided by the min (pick=min) or max of key over rows against threshold."""
    v, r = _extreme(rows, key, pick)
    met = None if v is None else (v >= threshold if better == ">=" else v <= threshold)
    measured = sum(1 for x in rows if x.get(key) is not None and math.isfinite(x[key]))
    if met and measured < len(rows):   # a row without a number could still fail it
        met = None
    out = dict(target=name, text=text, metric=f"{pick.__name__} {key}", value=v, threshold=threshold,
               compare=better, met=met, decided_by=_where(r), rows=len(rows), measured=measured)
    if note:
        out["note"] = note
    return out


def targets(rows, gn_copy_shapes=TARGET_GN_COPY_SHAPES, attn_long_t=TARGET_ATTN_LONG_T):
    """Issue 10's targets from the rows: met True/False, None where no row has a finite value."""
    gn = [r for r in rows if r["op"] == "group_norm"]
    at = [r for r in rows if r["op"] == "attention"]
    out = []
    for layout in ("nchw", "channels_last"):
        sel = [r for r in gn if r["shape"] in gn_copy_shapes and r["layout"] == layout]
        out.append(_target(f"gn_copy_bw_{layout}",
                           f"GN forward >= 80% of copy bandwidth, graph-replayed, {layout}, at {', '.join(gn_copy_shapes)}",
                           sel, "graph_frac_copy", min, 0.8, ">="))
        bwd = _extreme(sel, "graph_bwd_frac_copy", min)[0]
        out[-1]["min_graph_bwd_frac_copy"] = bwd   # the backward against the same bar (reported)
    small = [r for r in gn if r["elems_per_sample"] <= TARGET_GN_SMALL_ELEMS]
    out.append(_target("gn_small_launch", f"GN with C*HW <= {TARGET_GN_SMALL_ELEMS} within 2x of a bare launch "
                       "(graph-replayed)", small, "graph_over_bare_launch", max, 2.0, "<="))
    long_t = [r for r in at if r["dims"][3] >= attn_long_t]
    for key, text in (("bwd_over_fwd", "eager"), ("graph_bwd_over_fwd", "graph-replayed")):
        out.append(_target(f"attn_{key}", f"attention backward <= 2.5x its forward at T >= {attn_long_t} ({text})",
                           long_t, key, max, 2.5, "<="))
    for key, text in (("bwd_vs_sdpa", "eager"), ("graph_bwd_vs_sdpa", "graph-replayed")):
        out.append(_target(f"attn_{key}", f"attention backward no slower than SDPA-flash's (with its layout "
                           f"transforms) at every shape ({text}; value = SDPA time / fused time)",
                           at, key, min, 1.0, ">="))
    first = [r.get("first_call_ms") for r in rows] + [r.get("first_call_bwd_ms") for r in rows]
    ok = bool(rows) and all(v is not None and math.isfinite(v) for v in first)
    v, r = _extreme(rows, "first_call_ms", max)
    vb, rb = _extreme(rows, "first_call_bwd_ms", max)
    out.append(dict(target="first_call_reported", text="first-call (JIT compile) cost reported apart from warm time",
                    metric="every row has first_call_ms and first_call_bwd_ms", met=ok if rows else None,
                    max_first_call_ms=v, decided_by=_where(r), max_first_call_bwd_ms=vb, bwd_decided_by=_where(rb)))
    have = {(r["op"], r["dtype"]) for r in rows}
    ops = sorted({r["op"] for r in rows})
    out.append(dict(target="fp16_and_bf16", text="fp16 and bf16 both measured (per op)",
                    metric="rows per (op, dtype)", met=(all((o, d) in have for o in ops for d in ("float16", "bfloat16"))
                                                        if ops else None),
                    present=sorted(f"{o} {d}" for o, d in have)))
    return out


def run_targets(rows):
    """targets() at this run's shapes (the smoke run's own under --smoke)."""
    return targets(rows, SMOKE_TARGET_GN_COPY_SHAPES if SMOKE else TARGET_GN_COPY_SHAPES,
                   32 if SMOKE else TARGET_ATTN_LONG_T)


def print_targets(tgts):
    print("targets:")
    for t in tgts:
        state = {True: "MET", False: "NOT MET", None: "n/a"}[t["met"]]
        if "value" in t:
            v = "none" if t["value"] is None else f"{t['value']:.3g}"
            num = (f"{t['metric']} = {v} ({t['compare']} {t['threshold']}; {t['decided_by']}; "
                   f"{t['measured']} of {t['rows']} rows measured)")
            if t.get("min_graph_bwd_frac_copy") is not None:
                num += f"; backward min graph_bwd_frac_copy {t['min_graph_bwd_frac_copy']:.3g}"
        elif t["target"] == "first_call_reported":
            fmt = lambda x: "none" if x is None else f"{x:.0f} ms"  # noqa: E731
            num = (f"max first call {fmt(t['max_first_call_ms'])} ({t['decided_by']}), backward "
                   f"{fmt(t['max_first_call_bwd_ms'])} ({t['bwd_decided_by']})")
        else:
            num = ", ".join(t["present"])
        print(f"  {state:7s} {t['text']}: {num}")


def main(argv=None):
    global SMOKE, REP_MS, GRAPH_REP_MS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write JSON results here (rewritten after every row)")
    ap.add_argument("--only", choices=["gn", "attn"], help="run one op only")
    ap.add_argument("--rep", type=int, default=REP_MS,
                    help="ms of warm eager calls per measurement (do_bench rep; default %(default)s)")
    ap.add_argument("--graph-rep", type=int, default=GRAPH_REP_MS,
                    help="graph timings: ms of calls per replay, 10 replays (do_bench_cudagraph rep; default %(default)s)")
    ap.add_argument("--time-limit", type=float, default=math.inf, metavar="S",
                    help="start no new row after S seconds (the rest listed in `skipped`); targets from what ran")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes on CPU under the Triton interpreter (TRITON_INTERPRET=1): checks the benchmark")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning, module="bench_kernels")
    t_start = time.perf_counter()
    SMOKE, REP_MS, GRAPH_REP_MS = args.smoke, args.rep, args.graph_rep
    cache_dir = os.environ.get("TRITON_CACHE_DIR") or os.path.join(
        os.environ.get("TRITON_HOME") or os.path.expanduser("~"), ".triton", "cache")
    cache_empty = not (os.path.isdir(cache_dir) and os.listdir(cache_dir))   # before any compile
    if args.smoke:
        K = _import_kernels()
        if triton is None or not K.INTERPRET:
            raise SystemExit("bench_kernels.py --smoke: needs triton and TRITON_INTERPRET=1 set before Python starts")
        dev = torch.device("cpu")
        device_name = f"cpu ({platform.machine()}, Triton interpreter)"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_kernels.py: needs a CUDA device")
        if triton is None:
            raise SystemExit("bench_kernels.py: needs triton")
        K = _import_kernels()
        if K.INTERPRET:
            raise SystemExit("bench_kernels.py: TRITON_INTERPRET is set; unset it (or pass --smoke)")
        dev = torch.device("cuda")
        device_name = torch.cuda.get_device_name(dev)
    G = importlib.import_module("admrt.kernels.group_norm")
    torch.manual_seed(0)
    with onepass_budget(G, *SMOKE_ONEPASS_BUDGET) if args.smoke else contextlib.nullcontext():
        copy_gbs = copy_bandwidth(dev)
        bare_us = bare_launch_us()
        print(f"device {device_name}; copy bandwidth {copy_gbs:.0f} GB/s (read + write); "
              f"bare Triton launch {bare_us:.2f} us{' (graph-replayed)' if not args.smoke else ''}")
        timing = (f"--smoke: time.perf_counter median of {SMOKE_RUNS} runs on CPU (Triton interpreter), graph "
                  "timings nan" if args.smoke else
                  f"triton.testing.do_bench median, warm (rep {REP_MS} ms); graph: do_bench_cudagraph median "
                  f"(rep {GRAPH_REP_MS} ms); graph backward: forward and capture on one side stream, median of "
                  "10 replays as do_bench_cudagraph")
        meta = dict(device=device_name, torch=torch.__version__, triton=triton.__version__,
                    cuda=torch.version.cuda, python=platform.python_version(),
                    date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    copy_gbs=copy_gbs, timing=timing, smoke=args.smoke, rep_ms=REP_MS, graph_rep_ms=GRAPH_REP_MS,
                    bare_launch_us=bare_us,
                    onepass_budget=onepass_budget_of(G), twopass_tiles=G.TWOPASS_TILES,
                    triton_cache_dir=cache_dir, triton_cache_empty_at_start=cache_empty,
                    time_limit_s=args.time_limit if math.isfinite(args.time_limit) else None)
        res = Results(args.out, meta, t_start + args.time_limit)
        gn_shapes = SMOKE_GN_SHAPES if args.smoke else GN_SHAPES
        first = {k: v for k, v in gn_shapes.items() if k in GN_FIRST}
        rest = {k: v for k, v in gn_shapes.items() if k not in GN_FIRST}
        if args.only in (None, "gn"):
            bench_group_norm(K, dev, copy_gbs, bare_us, res, first)
        if args.only in (None, "attn"):
            bench_attention(K, dev, res, SMOKE_ATTN_SHAPES if args.smoke else ATTN_SHAPES)
        if args.only in (None, "gn"):
            bench_group_norm(K, dev, copy_gbs, bare_us, res, rest)
    tgts = run_targets(res.rows)
    print_targets(tgts)
    if res.meta["skipped"]:
        print(f"skipped after the time limit ({args.time_limit:.0f} s): {len(res.meta['skipped'])} rows")
    elapsed = time.perf_counter() - t_start
    meta.update(targets=tgts, elapsed_s=elapsed, complete=True)
    res.write()
    print(f"done in {elapsed:.0f} s" + (f"; wrote {args.out}" if args.out else ""))
    return meta


if __name__ == "__main__":
    sys.exit(main() and 0)
