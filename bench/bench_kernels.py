"""Benchmark the fused kernels (admrt.kernels) against torch at ADM-256 and ADM-64 shapes.

Group norm: GB/s counting the fewest bytes each pass must move (forward: read x, write y;
backward: read x and dy, write dx), for the fused op, the torch eager chain it replaces
(`group_norm_act_reference`: fp32 GN, AdaGN, SiLU, cast) and torch's native GroupNorm alone.
Attention: TFLOP/s (forward 4*B*H*T^2*D, backward 2.5x that, the flash-attention convention)
for the fused op, scaled_dot_product_attention (flash backend where it takes the inputs) with
the layout transforms it needs to read qkv and write (B, H*C, T), and the reference einsum.
Device copy bandwidth is measured in the same run. Warm runs only, median of many
(triton.testing.do_bench). Prints a table; --out writes JSON with device, versions and date.

    python bench/bench_kernels.py --out bench/results/kernels_h100.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import warnings

import torch
import torch.nn.functional as F


def _import_kernels():
    try:
        import admrt.kernels as K
        return K
    except ImportError:
        raise SystemExit("bench_kernels.py: admrt.kernels not importable (pip install -e . first)")


def bench(fn, rep=200):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")  # ms


def bench_graph(fn, rep=200):
    """Median of CUDA-graph replays: the launch overhead removed, as the compiled engine runs."""
    import triton.testing
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")
    except Exception as e:  # noqa: BLE001 - report, don't stop the run
        print(f"graph timing failed: {type(e).__name__}: {e}")
        return float("nan")


def copy_bandwidth(dev):
    n = 1 << 28  # 512 MiB fp16
    a = torch.randn(n, device=dev, dtype=torch.float16)
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a))
    return 2 * a.numel() * a.element_size() / ms / 1e6  # GB/s


GN_SHAPES = {  # (model, resolution): (B, C, H, W) of the norms that move the most bytes
    "adm256 res256": (4, 256, 256, 256),
    "adm256 res32": (4, 512, 32, 32),
    "adm256 res8": (4, 1024, 8, 8),
    "adm64 res64": (16, 192, 64, 64),
    "adm64 res32": (16, 384, 32, 32),
    "adm64 res16": (16, 576, 16, 16),
}
GN_VARIANTS = {  # name: (dtype, channels_last, adagn, act)
    "fp16 nchw silu": (torch.float16, False, False, "silu"),
    "fp16 nchw adagn+silu": (torch.float16, False, True, "silu"),
    "fp16 cl adagn+silu": (torch.float16, True, True, "silu"),
    "bf16 nchw none": (torch.bfloat16, False, False, "none"),
}
ATTN_SHAPES = {  # (B, heads, head dim, T), legacy order as the released models
    "adm256 T1024": (8, 8, 64, 1024),
    "adm256 T256": (8, 16, 64, 256),
    "adm256 T64": (8, 16, 64, 64),
    "adm64 T1024": (32, 6, 64, 1024),
    "adm64 T256": (32, 9, 64, 256),
    "adm64 T64": (32, 12, 64, 64),
}


def bench_group_norm(K, dev, copy_gbs, rows):
    for sname, shape in GN_SHAPES.items():
        B, C = shape[:2]
        for vname, (dt, cl, ada, act) in GN_VARIANTS.items():
            mf = torch.channels_last if cl else torch.contiguous_format
            x = torch.randn(shape, device=dev, dtype=dt).to(memory_format=mf)
            w = torch.randn(C, device=dev)
            b = torch.randn(C, device=dev)
            sc = torch.randn(B, C, device=dev) if ada else None
            sh = torch.randn(B, C, device=dev) if ada else None
            nbytes = x.numel() * x.element_size()
            kw = dict(scale=sc, shift=sh, act=act)
            fused = lambda: K.group_norm_act(x, w, b, fused="require", **kw)  # noqa: E731
            eager = lambda: K.group_norm_act_reference(x, w, b, **kw)  # noqa: E731
            native = lambda: F.group_norm(x, 32, w.to(dt), b.to(dt))  # noqa: E731
            # correctness at this shape before timing
            err = (fused().float() - eager().float()).abs().max().item()
            t_f, t_e, t_n = bench(fused), bench(eager), bench(native)
            g_f, g_e, g_n = bench_graph(fused), bench_graph(eager), bench_graph(native)
            # backward: grads of x, w, b (and scale, shift)
            ins = [t.requires_grad_() for t in (x, w, b, sc, sh) if t is not None]
            yf, ye = fused(), eager()
            dy = torch.randn_like(yf)
            tb_f = bench(lambda: torch.autograd.grad(yf, ins, dy, retain_graph=True))
            tb_e = bench(lambda: torch.autograd.grad(ye, ins, dy, retain_graph=True))
            for t in ins:
                t.requires_grad_(False)
            r = dict(op="group_norm", shape=sname, dims=list(shape), variant=vname, max_abs_err=err,
                     fused_ms=t_f, eager_ms=t_e, native_gn_ms=t_n, fused_bwd_ms=tb_f, eager_bwd_ms=tb_e,
                     fused_gbs=2 * nbytes / t_f / 1e6, eager_gbs=2 * nbytes / t_e / 1e6,
                     fused_bwd_gbs=3 * nbytes / tb_f / 1e6,
                     frac_copy=2 * nbytes / t_f / 1e6 / copy_gbs,
                     speedup_eager=t_e / t_f, speedup_native=t_n / t_f, bwd_over_fwd=tb_f / t_f,
                     bwd_speedup_eager=tb_e / tb_f, fused_graph_ms=g_f, eager_graph_ms=g_e,
                     native_graph_ms=g_n, fused_graph_gbs=2 * nbytes / g_f / 1e6,
                     graph_frac_copy=2 * nbytes / g_f / 1e6 / copy_gbs, graph_speedup_eager=g_e / g_f,
                     graph_speedup_native=g_n / g_f)
            rows.append(r)
            print(f"GN  {sname:14s} {vname:22s} fused {r['fused_gbs']:7.0f} GB/s ({100 * r['frac_copy']:5.1f}% copy) "
                  f"x{r['speedup_eager']:5.2f} eager x{r['speedup_native']:5.2f} native | bwd {r['fused_bwd_gbs']:6.0f} GB/s "
                  f"{r['bwd_over_fwd']:4.2f}x fwd, x{r['bwd_speedup_eager']:5.2f} eager | graph {r['fused_graph_gbs']:6.0f} GB/s "
                  f"({100 * r['graph_frac_copy']:5.1f}%) x{r['graph_speedup_eager']:5.2f} eager x{r['graph_speedup_native']:5.2f} native",
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


def bench_attention(K, dev, rows):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for sname, (B, H, D, T) in ATTN_SHAPES.items():
        for dt in (torch.float16, torch.bfloat16):
            qkv = torch.randn(B, 3 * H * D, T, device=dev, dtype=dt)
            flops = 4 * B * H * T * T * D
            fused = lambda: K.qkv_attention(qkv, H, legacy_order=True, fused="require")  # noqa: E731
            ref = lambda: K.qkv_attention_reference(qkv, H, legacy_order=True)  # noqa: E731

            def sdpa():
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    return _sdpa_attention(qkv, H, True)
            try:
                sdpa()
            except RuntimeError as e:  # no flash kernel for these inputs: torch's own choice
                print(f"sdpa flash unavailable ({e}); using the default backend")

                def sdpa():
                    return _sdpa_attention(qkv, H, True)
            err = (fused().float() - ref().float()).abs().max().item()
            err_sdpa = (sdpa().float() - ref().float()).abs().max().item()
            t = {n: bench(f) for n, f in (("fused", fused), ("sdpa", sdpa), ("ref", ref))}
            tg = {n: bench_graph(f) for n, f in (("fused", fused), ("sdpa", sdpa), ("ref", ref))}
            qkv.requires_grad_()
            tb = {}
            for n, f in (("fused", fused), ("sdpa", sdpa), ("ref", ref)):
                y = f()
                dy = torch.randn_like(y)
                tb[n] = bench(lambda: torch.autograd.grad(y, qkv, dy, retain_graph=True))
            qkv.requires_grad_(False)
            r = dict(op="attention", shape=sname, dims=[B, H, D, T], dtype=str(dt).split(".")[-1],
                     max_abs_err=err, sdpa_max_abs_err=err_sdpa,
                     **{f"{n}_ms": v for n, v in t.items()}, **{f"{n}_bwd_ms": v for n, v in tb.items()},
                     fused_tflops=flops / t["fused"] / 1e9, sdpa_tflops=flops / t["sdpa"] / 1e9,
                     ref_tflops=flops / t["ref"] / 1e9, fused_bwd_tflops=2.5 * flops / tb["fused"] / 1e9,
                     vs_sdpa=t["sdpa"] / t["fused"], vs_ref=t["ref"] / t["fused"],
                     bwd_vs_sdpa=tb["sdpa"] / tb["fused"], bwd_vs_ref=tb["ref"] / tb["fused"],
                     bwd_over_fwd=tb["fused"] / t["fused"], **{f"{n}_graph_ms": v for n, v in tg.items()},
                     graph_vs_sdpa=tg["sdpa"] / tg["fused"], graph_vs_ref=tg["ref"] / tg["fused"])
            rows.append(r)
            print(f"ATT {sname:14s} {r['dtype']:9s} fused {r['fused_tflops']:6.1f} TFLOP/s x{r['vs_sdpa']:5.2f} sdpa "
                  f"x{r['vs_ref']:5.2f} ref | bwd {r['fused_bwd_tflops']:6.1f} TFLOP/s x{r['bwd_vs_sdpa']:5.2f} sdpa "
                  f"x{r['bwd_vs_ref']:5.2f} ref, {r['bwd_over_fwd']:4.2f}x fwd | graph x{r['graph_vs_sdpa']:5.2f} sdpa "
                  f"x{r['graph_vs_ref']:5.2f} ref", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write JSON results here")
    ap.add_argument("--only", choices=["gn", "attn"], help="run one op only")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning, module="bench_kernels")
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py: needs a CUDA device")
    import triton
    K = _import_kernels()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    copy_gbs = copy_bandwidth(dev)
    print(f"device {torch.cuda.get_device_name(dev)}; copy bandwidth {copy_gbs:.0f} GB/s (read + write)")
    rows: list[dict] = []
    if args.only in (None, "gn"):
        bench_group_norm(K, dev, copy_gbs, rows)
    if args.only in (None, "attn"):
        bench_attention(K, dev, rows)
    meta = dict(device=torch.cuda.get_device_name(dev), torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                copy_gbs=copy_gbs, timing="triton.testing.do_bench median, warm", results=rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(meta, f, indent=1)
    return meta


if __name__ == "__main__":
    sys.exit(main() and 0)
