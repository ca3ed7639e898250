"""Registers, spills, shared memory and occupancy of the fused kernels on Hopper, without a GPU.

Every launch plan the kernels take at the ADM shapes of bench_kernels.py (group norm forward and
backward, both layouts; attention forward and backward, fp16 and bf16) is compiled with
`triton.compile` for sm_90a and assembled by Triton's bundled `ptxas -v`, which reports the
registers per thread, spill stores and the static shared memory. Programs per SM follow from
them: min(64 warps / num_warps, 65536 registers / (registers * threads), 228 KB / shared).
This is a static bound, read before any GPU run: a plan that spills, or that fits one program
per SM, shows it here. The launches are the real launchers' (the custom ops' bodies run on meta
tensors with `wrap_triton` recording instead of launching), compiled by each kernel's own
`warmup` against a stand-in sm_90 target, so with the specialisations a launch makes.

    python bench/kernel_resources.py --out bench/results/kernel_resources_sm90.json
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import re
import subprocess
import sys
import tempfile

import torch

REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
SHARED_PER_SM = 228 * 1024


def _modules():
    import admrt.kernels as K
    if K.INTERPRET:
        raise SystemExit("kernel_resources.py: TRITON_INTERPRET=1 is set; the kernels must be compiled, unset it")
    return K._group_norm, K._attention


@contextlib.contextmanager
def hopper_target():
    """Triton's active driver answers for an H100 (sm_90): `warmup` compiles, nothing launches."""
    import triton.runtime.driver as driver
    from triton.backends.compiler import GPUTarget

    class Hopper:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    saved = driver._active
    driver._active = Hopper()
    try:
        yield
    finally:
        driver._active = saved


@contextlib.contextmanager
def recorded_launches(*modules):
    """Within the block, the kernel modules' `wrap_triton(kernel)[grid](*args, **kwargs)` records
    (kernel, grid, args, kwargs) instead of launching; the launchers run on meta tensors."""
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, grid, args, kwargs))

    saved = [m.wrap_triton for m in modules]
    for m in modules:
        m.wrap_triton = Recorder
    try:
        yield launches
    finally:
        for m, w in zip(modules, saved):
            m.wrap_triton = w


def compile_report(kernel, grid, args, kwargs) -> dict:
    """ptxas -v figures of one recorded launch, compiled by the kernel's own `warmup` (so with
    the specialisations a launch makes: unit strides, sizes and pointers divisible by 16)."""
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.runtime.jit import MockTensor
    args = [MockTensor(a.dtype) if isinstance(a, torch.Tensor) else a for a in args]
    with hopper_target():
        compiled = kernel.warmup(*args, grid=grid, **kwargs)
    with tempfile.TemporaryDirectory() as d:
        with open(f"{d}/k.ptx", "w") as f:
            f.write(compiled.asm["ptx"])
        proc = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", f"{d}/k.ptx", "-o", f"{d}/k.cubin"],
                              capture_output=True, text=True)
    info = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed for {kernel.__name__}: {info[-2000:]}")
    regs = int(re.search(r"Used (\d+) registers", info).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", info))
    warps, shared = kwargs["num_warps"], int(compiled.metadata.shared)
    per_sm = min(MAX_WARPS_PER_SM // warps, REGISTERS_PER_SM // (regs * 32 * warps),
                 SHARED_PER_SM // shared if shared else MAX_WARPS_PER_SM)
    return dict(kernel=kernel.__name__, num_warps=warps, num_stages=kwargs.get("num_stages", 3), registers=regs,
                spill_store_bytes=spills, shared_bytes=shared, programs_per_sm=per_sm, warps_per_sm=per_sm * warps)


def _reports(G, A, op, run, **row) -> list[dict]:
    """Runs one op's launcher on meta tensors and reports each kernel it launches."""
    with recorded_launches(G, A) as launches:
        run()
    return [dict(op=op, **row, **compile_report(*launch)) for launch in launches]


GN_SHAPES = {  # (C, H, W) per sample, as bench_kernels.py (and the ADM-128 ones)
    "adm256 res256": (256, 256, 256), "adm256 res128": (256, 128, 128), "adm256 res64": (512, 64, 64),
    "adm256 res32": (512, 32, 32), "adm256 res16": (1024, 16, 16), "adm256 res8": (1024, 8, 8),
    "adm128 res64": (256, 64, 64), "adm128 res32": (512, 32, 32),
    "adm64 res64": (192, 64, 64), "adm64 res32": (384, 32, 32), "adm64 res16": (576, 16, 16), "adm64 res8": (768, 8, 8),
}
ATTN_SHAPES = {  # (heads, head dim, T, legacy order)
    "adm256 T1024": (8, 64, 1024, True), "adm256 T256": (16, 64, 256, True), "adm256 T64": (16, 64, 64, True),
    "d32 T256": (32, 32, 256, True), "d128 T1024": (4, 128, 1024, True), "clf256 T65": (8, 64, 65, False),
}


def group_norm_reports(G, A, dtype=torch.float16) -> list[dict]:
    """Forward and backward (AdaGN + SiLU) of every shape, both layouts."""
    rows = []
    meta = torch.device("meta")
    for shape, (C, H, W) in GN_SHAPES.items():
        for cl in (False, True):
            x = torch.empty(2, C, H, W, device=meta, dtype=dtype)
            if cl:
                x = x.to(memory_format=torch.channels_last)
            w = torch.empty(C, device=meta)
            sc = torch.empty(2, C, device=meta)
            stats = torch.empty(2, 32, device=meta)
            fwd = G._group_norm_act_fwd._init_fn
            bwd = G._group_norm_act_bwd._init_fn
            for direction, run in (("forward", lambda: fwd(x, w, w, sc, sc, 32, 1e-5, True)),
                                   ("backward", lambda: bwd(torch.empty_like(x), x, w, w, sc, sc, stats, stats, True))):
                plan = G.plan_group_norm(C, H * W, 32, cl, direction)
                rows += _reports(G, A, "group_norm", run, shape=shape, layout="cl" if cl else "nchw",
                                 dtype=str(dtype).split(".")[-1], direction=direction, path=plan.path,
                                 tile=plan.block_c * plan.block_l)
    return rows


def attention_reports(G, A) -> list[dict]:
    rows = []
    meta = torch.device("meta")
    for dtype in (torch.float16, torch.bfloat16):
        for shape, (H, D, T, legacy) in ATTN_SHAPES.items():
            qkv = torch.empty(2, 3 * H * D, T, device=meta, dtype=dtype)
            out = torch.empty(2, H * D, T, device=meta, dtype=dtype)
            lse = torch.empty(2 * H, T, device=meta)
            fwd = A._qkv_attention_fwd._init_fn
            bwd = A._qkv_attention_bwd._init_fn
            for direction, run in (("forward", lambda: fwd(qkv, H, legacy)),
                                   ("backward", lambda: bwd(out, qkv, out, lse, H, legacy))):
                rows += _reports(G, A, "attention", run, shape=shape, layout="legacy" if legacy else "new",
                                 dtype=str(dtype).split(".")[-1], direction=direction)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write JSON here (and a markdown table beside it, .md)")
    ap.add_argument("--only", choices=["gn", "attn"])
    args = ap.parse_args(argv)
    G, A = _modules()
    import triton
    rows = []
    if args.only in (None, "gn"):
        rows += group_norm_reports(G, A)
    if args.only in (None, "attn"):
        rows += attention_reports(G, A)
    lines = ["| op | shape | layout | dtype | direction | path | kernel | warps | registers | spill bytes | shared B "
             "| programs/SM |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['shape']} | {r['layout']} | {r['dtype']} | {r['direction']} | "
                     f"{r.get('path', '')} | {r['kernel']} | {r['num_warps']} | {r['registers']} | "
                     f"{r['spill_store_bytes']} | {r['shared_bytes']} | {r['programs_per_sm']} |")
    print("\n".join(lines))
    meta = dict(target="sm_90a (compiled offline; triton.compile + ptxas -v, no GPU)", torch=torch.__version__,
                triton=triton.__version__, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                results=rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(meta, f, indent=1)
        with open(args.out.rsplit(".", 1)[0] + ".md", "w") as f:
            f.write(f"Static resources on {meta['target']}, triton {meta['triton']}, {meta['date']}\n\n")
            f.write("\n".join(lines) + "\n")
    return meta


if __name__ == "__main__":
    sys.exit(main() and 0)
