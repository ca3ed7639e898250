"""Where a guided sampling step's time goes: a profile of the step as users run it (on CUDA the
core's captured whole-step graph, replayed), by category, and the step split into its units.

    python bench/profile_step.py --preset imagenet256-cond --classifier imagenet256-classifier \
        --batch 64 --dtype fp16 --backend compile --out bench/results/profile_gpu

By category (torch.profiler over one whole sampling loop, divided by its steps): every device
kernel (on CPU: every operator's self time) is put in one category by its name (CATEGORIES:
convolution, matmul, group norm, attention, copies and layout transforms, noise, memcpy/memset, elementwise and
other); "gaps" is the step's wall time no kernel covers (launch and host overhead the graph did
not remove). Convolutions also get their achieved TFLOP/s (the FLOPs torch's counter gives the
step's convolutions, measure.step_flops, over their kernel time).

By unit: the denoiser, the classifier's forward and its whole gradient, each run alone on the
step's inputs (on CUDA captured in a graph of its own and replayed; with --backend compile the
classifier's forward is compiled alone too), timed as the median of --reps; the classifier's
backward is the gradient minus the forward, and "sampler update, noise and overhead" is the step
minus the two units.

On CPU the categories cover torch operators only: with --backend compile, Inductor's generated
C++ kernels are not operators, so there the category table is partial (the units are not).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

import admrt
from admrt.diffusion import build_tables

import measure as bm

# (category, name pattern): the first match wins; names are CUDA kernels (cuDNN, cuBLAS, Triton's
# admrt kernels, Inductor's triton_* kernels, the core's noise kernel) or, on CPU, operator names.
CATEGORIES = [
    ("noise", r"seeded_normal|philox|randn|normal_"),
    ("group norm", r"_gn_|group_norm|groupnorm|native_group_norm"),
    ("attention", r"_attn_|attention|flash|fmha|softmax|bmm|baddbmm|einsum"),
    ("convolution", r"conv|xmma_fprop|xmma_dgrad|implicit_gemm|fprop|dgrad|wgrad|cudnn|winograd|mkldnn_conv"),
    ("matmul", r"gemm|addmm|aten::mm|aten::linear|aten::matmul|cutlass|cublas"),
    ("memcpy/memset", r"memcpy|memset"),
    ("copies and layout transforms", r"nchwtonhwc|nhwctonchw|transpose|permute|copy|aten::contiguous|aten::clone"),
]
_COMPILED = [(name, re.compile(pattern, re.IGNORECASE)) for name, pattern in CATEGORIES]
# Inductor's generated kernels name the ops they fused: "triton_poi_fused_convolution_silu_3" is
# the pointwise epilogue after an (extern, cuDNN) convolution, not a convolution
_INDUCTOR = re.compile(r"^triton_(poi|red|per)_")
_INDUCTOR_CATEGORIES = ("group norm", "attention")
# CPU operators that only contain others (their self time is small, their children are counted)
_CPU_WRAPPERS = re.compile(r"^(aten::(to|_to_copy|empty|empty_like|view|reshape|as_strided|detach|t|expand|"
                           r"select|slice|unsqueeze|squeeze|resolve_conj|resolve_neg|alias)$|autograd::|"
                           r"Torch-Compiled|CompiledFunction|## |torch_compile)")


def category(name: str) -> str:
    inductor = _INDUCTOR.match(name) is not None
    for cat, pattern in _COMPILED:
        if pattern.search(name) and (not inductor or cat in _INDUCTOR_CATEGORIES):
            return cat
    return "elementwise and other"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _unit_ms(fn, args, device, reps: int) -> float:
    """Median ms of fn(*args): on CUDA captured in a graph of its own and replayed (as the core
    replays its step), on CPU called directly."""
    if device.type == "cuda":
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            fn(*args)   # warm up outside capture (allocator, lazy init)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn(*args)
        run = graph.replay
    else:
        fn(*args)
        run = lambda: fn(*args)  # noqa: E731
    times = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        run()
        _sync(device)
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def _events(prof, device) -> list[tuple[str, float]]:
    """(name, µs) of every device kernel (CUDA) or every operator's self time (CPU)."""
    out = []
    for e in prof.events():
        if device.type == "cuda":
            if e.device_type == torch.autograd.DeviceType.CUDA:
                out.append((e.name, e.device_time_total))   # a kernel's own duration
        elif e.device_type == torch.autograd.DeviceType.CPU and not _CPU_WRAPPERS.search(e.name):
            out.append((e.name, e.self_cpu_time_total))
    return out


def profile(args) -> dict:
    device = torch.device(args.device)
    stack = bm.random_stack(device, args.preset, args.classifier)
    (preset, model), (cpreset, clf) = stack["model"], stack["classifier"]
    eng = admrt.Engine(model, classifier=clf, backend=args.backend, dtype=args.dtype,
                       cuda_graphs=not args.no_graphs)
    n = args.batch
    classes = [i % eng.num_classes for i in range(n)] if eng.num_classes else None
    guidance = args.guidance if clf is not None else None
    steps = build_tables(preset.diffusion, args.steps).num_timesteps

    def sample():
        return eng.sample(classes=classes, num=n, steps=args.steps, guidance=guidance, seeds=1, batch_size=n)

    t0 = time.perf_counter()
    sample()   # cold: compile, capture
    _sync(device)
    cold_s = time.perf_counter() - t0
    loop_ms = []
    for _ in range(args.reps):
        _sync(device)
        start = time.perf_counter()
        sample()
        _sync(device)
        loop_ms.append(1e3 * (time.perf_counter() - start))
    step_ms = statistics.median(loop_ms) / steps

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        sample()
        _sync(device)
    by_cat: dict[str, float] = {}
    kernels: dict[str, list] = {}
    for name, us in _events(prof, device):
        cat = category(name)
        by_cat[cat] = by_cat.get(cat, 0.0) + us / 1e3 / steps
        k = kernels.setdefault(name, [cat, 0.0, 0])
        k[1] += us / 1e3 / steps
        k[2] += 1
    busy = sum(by_cat.values())
    flops = bm.step_flops(preset, cpreset)
    rows = [{"category": cat, "ms_per_step": ms, "pct_of_step": 100 * ms / step_ms}
            for cat, ms in sorted(by_cat.items(), key=lambda kv: -kv[1])]
    if device.type == "cuda":
        rows.append({"category": "gaps (no kernel running)", "ms_per_step": max(step_ms - busy, 0.0),
                     "pct_of_step": 100 * max(step_ms - busy, 0.0) / step_ms})
    for row in rows:
        if row["category"] == "convolution" and row["ms_per_step"] > 0:
            row["achieved_tflops"] = flops["convolution"] * n / (row["ms_per_step"] / 1e3) / 1e12

    # the units alone, on the step's inputs
    size, ch = preset.model.image_size, preset.model.in_channels
    x = torch.randn(n, ch, size, size, device=device)
    t = torch.full((n,), preset.diffusion.steps // 2, device=device, dtype=torch.long)
    y = torch.tensor(classes or [0] * n, device=device)
    units = {"denoiser": _unit_ms(eng.units["model"], (x, t, y, None), device, args.reps)}
    if clf is not None:
        grad = eng.units["classifier"]
        net = (grad.unit if args.backend == "compile" else grad).net   # the unit's inference copy
        forward = torch.compile(net, fullgraph=True, dynamic=False) if args.backend == "compile" else net
        with torch.no_grad():
            units["classifier forward"] = _unit_ms(forward, (x, t), device, args.reps)
        grad_ms = _unit_ms(grad, (x, t, y), device, args.reps)
        units["classifier backward (gradient - forward)"] = grad_ms - units["classifier forward"]
    units["sampler update, noise and overhead (step - units)"] = step_ms - sum(units.values())
    unit_rows = [{"unit": k, "ms_per_step": v, "pct_of_step": 100 * v / step_ms} for k, v in units.items()]

    top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:args.top]
    return {"config": {k: str(v) for k, v in vars(args).items()},
            "step_ms": step_ms, "loop_ms": loop_ms, "steps": steps, "cold_s": cold_s,
            "images_per_s": n / (statistics.median(loop_ms) / 1e3),
            "busy_ms_per_step": busy, "flops_per_image_step": flops,
            "achieved_tflops": flops["total"] * n / (step_ms / 1e3) / 1e12,
            "categories": rows, "units": unit_rows,
            "top_kernels": [{"name": name[:160], "category": c, "ms_per_step": ms, "calls_per_step": calls / steps}
                            for name, (c, ms, calls) in top],
            "env": bm._env(device)}


def markdown(result: dict) -> str:
    c, env = result["config"], result["env"]
    lines = [f"### {c['preset']} + {c['classifier'] or 'no classifier'}, batch {c['batch']}, {c['dtype']}, "
             f"backend {c['backend']}{'' if c['no_graphs'] == 'False' else ', uncaptured'}, {c['steps']}",
             "", f"{env['device']}, torch {env['torch']}{', triton ' + env['triton'] if 'triton' in env else ''}, "
             f"{env['date'][:10]}. Step {result['step_ms']:.2f} ms ({result['images_per_s']:.2f} images/s, "
             f"{result['achieved_tflops']:.3g} TFLOP/s), {'operators' if env['device'].startswith('cpu') else 'kernels'} "
             f"busy {result['busy_ms_per_step']:.2f} ms of it; "
             f"cold (compile, capture) {result['cold_s']:.1f} s.", "",
             "| category | ms/step | % of step | achieved |", "|---|---|---|---|"]
    for row in result["categories"]:
        ach = f"{row['achieved_tflops']:.3g} TFLOP/s" if "achieved_tflops" in row else ""
        lines.append(f"| {row['category']} | {row['ms_per_step']:.3f} | {row['pct_of_step']:.1f} | {ach} |")
    lines += ["", "| unit | ms/step | % of step |", "|---|---|---|"]
    lines += [f"| {r['unit']} | {r['ms_per_step']:.3f} | {r['pct_of_step']:.1f} |" for r in result["units"]]
    lines += ["", "| top kernels | category | ms/step | calls/step |", "|---|---|---|---|"]
    lines += [f"| `{k['name'][:90]}` | {k['category']} | {k['ms_per_step']:.3f} | {k['calls_per_step']:.1f} |"
              for k in result["top_kernels"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="imagenet256-cond")
    p.add_argument("--classifier", default="imagenet256-classifier", help="'' for unguided")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", default="ddim25")
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--dtype", choices=bm.DTYPE_NAMES, default="fp16")
    p.add_argument("--backend", default="compile", choices=("eager", "compile"),
                   help="the Engine backend profiled (its units are timed alone too, as modules)")
    p.add_argument("--no-graphs", action="store_true", help="profile the uncaptured step")
    p.add_argument("--reps", type=int, default=5, help="timed loops (and unit replays), median")
    p.add_argument("--top", type=int, default=15, help="kernels listed by time")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=None, help="folder for profile_*.json and .md")
    args = p.parse_args(argv)
    for flag, name in (("--preset", args.preset), ("--classifier", args.classifier)):
        if name and name not in admrt.PRESETS:
            p.error(f"{flag}={name!r}: unknown preset; expected one of {sorted(admrt.PRESETS)}")
    for flag, value in (("--batch", args.batch), ("--reps", args.reps), ("--top", args.top)):
        if value <= 0:
            p.error(f"{flag}={value}: expected a positive int")
    result = profile(args)
    text = markdown(result)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = (f"profile_{args.preset}_{args.dtype}_b{args.batch}_{args.steps}_{args.backend}"
                f"{'_uncaptured' if args.no_graphs else ''}")
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
        (args.out / f"{stem}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
