"""`admrt bench`: end-to-end sampling throughput and latency, admrt against guided-diffusion in
the same run. Not installed: `admrt bench` runs this file from the source checkout (admrt/cli.py
finds bench/ beside the package in an editable install); bench/bench_sampling.py runs it too, and
the throughput suite (bench/test_throughput.py) and bench/profile_step.py import it as `measure`.
guided-diffusion's side is bench/gd_oracle.py.

Both sides get the same random weights (the released architectures, e.g. imagenet256-cond with
imagenet256-classifier), the same labels and guidance scale; the reference runs its own
ddim_sample_loop / p_sample_loop with classifier_sample.py's cond_fn. admrt runs the path users
run by default (seeded noise) in each variant:

    guided-diffusion (reference)  its own loop in its own mixed precision (convert_to_fp16's policy)
    guided-diffusion + torch.compile  the same loop with its UNet and classifier wrapped in
                           torch.compile (default mode): what a user would try first
    admrt eager            the Sampler context, every step run uncaptured (cuda_graphs=False)
    admrt + graphs         the same, one whole step captured as a CUDA graph and replayed (CUDA only)
    admrt compile [+ graphs]  backend="compile" (torch.compile fullgraph of both units)
    admrt aoti package [+ graphs]  an AOTInductor package of both units (admrt export aoti, with
                           --package), run by the C++ Context through Engine.from_package
    admrt onnxruntime      backend="onnxruntime": both units exported to ONNX and run in onnxruntime
                           sessions (I/O bound to the core's buffers), every step uncaptured
    admrt-sample (process)  the Python-free program on the same package, as a user runs it: the
                           whole process (start, package load, sampling, .npz written)

Each variant is first run once cold (its compile / capture / autotune time is reported apart),
then the variants are timed alternately, A B C A B C ..., for --reps rounds: median, min and max
(device synchronised around each whole loop). Peak memory is what a variant allocated on top of
what was live before it was built. Images are compared with the reference in a separate,
untimed run with reference noise (guided-diffusion's draw order, uncaptured). Work is counted
by `step_flops` (torch's FLOP counter on meta tensors: the denoiser's forward, the classifier's
forward and its input-gradient backward), so each row also gives achieved TFLOP/s and its
percentage of the device's dense matrix-multiply rate, measured in the same run (`matmul_tflops`).

    admrt bench --preset imagenet64-cond --classifier imagenet64-classifier \
        --batch 32 --steps ddim25 --dtype fp16 --compile --out bench/results
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import admrt
from admrt.cli import CommandError, device_value, finite_float
from admrt.export import MissingPackageError
from admrt.diffusion import build_tables
from admrt.models.unet import resolve_dtype

from gd_oracle import reference_cascade, reference_model, reference_sample, set_reference_dtype, to_uint8_nhwc

DTYPE_NAMES = ("fp16", "bf16", "fp32")

# Dense matrix-multiply rates measured on the devices this project has run on (TFLOP/s, bf16/fp16
# inputs, fp32 accumulation): the yardstick of "% of the matmul rate" for result files written
# before each run measured its own (`matmul_tflops`, below). The H100's 798 is the rate the
# throughput issue states as measured; the H200's is the device tool's "about 790".
MATMUL_PEAK_TFLOPS = {"H100": 798.0, "H200": 790.0}

# The implementations a run can time, by id (what --impls and the pytest suite take) -> row name.
IMPLS = {
    "gd": "guided-diffusion (reference)",
    "gd-compile": "guided-diffusion + torch.compile",
    "eager": "admrt eager",
    "graphs": "admrt + graphs",
    "compile": "admrt compile + graphs",
    "onnxruntime": "admrt onnxruntime",
    "aoti": "admrt aoti package + graphs",
    "admrt-sample": "admrt-sample (process)",
}
REFERENCE_IMPLS = ("gd", "gd-compile")


def _timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def _random_weights(*modules) -> None:
    with torch.no_grad():  # random weights everywhere (the zero-initialised output convs too)
        for m in modules:
            if m is None:
                continue
            for p in m.parameters():
                if p.dim() > 1:  # matrices and kernels: N(0, 0.25 / fan_in); norms and biases as built
                    p.copy_(torch.randn_like(p) * (0.5 / p[0].numel() ** 0.5))


def random_stack(device, model: str, classifier: str = "", upsampler: str = "") -> dict:
    """The benchmarked networks by role ("model", "classifier", "upsampler") -> (preset, module
    or None): the presets' architectures with seeded random weights (_random_weights), on device."""
    torch.manual_seed(0)
    presets = {role: admrt.get_preset(name) if name else None
               for role, name in (("model", model), ("classifier", classifier), ("upsampler", upsampler))}
    modules = {role: admrt.create_model(preset) if preset else None for role, preset in presets.items()}
    _random_weights(*modules.values())
    return {role: (presets[role], m.to(device) if m is not None else None) for role, m in modules.items()}


def impl_name(impl: str, device: torch.device) -> str:
    """The row name of an implementation id; without CUDA there are no graphs to name."""
    name = IMPLS[impl]
    return name.replace(" + graphs", "") if device.type != "cuda" else name


def default_impls(args) -> list[str]:
    """The ids `admrt bench` times when --impls is not given: from its flags."""
    impls = [] if args.skip_reference else ["gd"]
    impls += ["gd-compile"] if args.reference_compile else []
    impls += ["eager"] + (["graphs"] if torch.device(args.device).type == "cuda" else [])
    impls += ["compile"] if args.compile else []
    impls += ["onnxruntime"] if args.onnxruntime else []
    impls += ["aoti", "admrt-sample"] if args.package else []
    return impls


def step_flops(preset, classifier_preset=None) -> dict:
    """FLOPs of one sampling step per image, counted by torch's FLOP counter on meta tensors
    (convolutions, matrix products and attention's batched products; elementwise work is not
    counted): the denoiser's forward, and for guidance the classifier's forward and its backward
    to the input only (classifier_sample.py's cond_fn: no weight gradients); their total, and the
    convolutions' part of it. ADM-256's forward is 2.24 TFLOP (DiT, Table 6: 1120 GMAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    from admrt.models.units import ClassifierGradient, Denoiser

    preset = admrt.get_preset(preset)
    size = preset.model.image_size
    meta = torch.device("meta")
    x = torch.zeros(1, preset.model.in_channels, size, size, device=meta)
    t = torch.zeros(1, dtype=torch.long, device=meta)
    counts, convolution = {}, 0

    def conv(counter):  # the convolutions' share (their kernels are timed apart by bench/profile_step.py)
        return sum(v for op, v in counter.get_flop_counts()["Global"].items() if "convolution" in str(op))

    with meta:
        denoiser = Denoiser(admrt.create_model(preset), device=meta)
    low_res = None
    if preset.model.kind == "superres":
        low = preset.model.low_res_size
        low_res = torch.zeros(1, preset.model.in_channels, low, low, device=meta)
    with FlopCounterMode(display=False) as counter:
        denoiser(x, t, t, low_res)
    counts["denoiser"] = counter.get_total_flops()
    convolution += conv(counter)
    if classifier_preset:
        with meta:
            unit = ClassifierGradient(admrt.create_model(admrt.get_preset(classifier_preset)), device=meta)
        x_in = x.clone().requires_grad_(True)
        with FlopCounterMode(display=False) as counter:   # autograd.grad under the counter is refused:
            logits = unit.net(x_in, t)                     # forward and backward counted apart
        counts["classifier_forward"] = counter.get_total_flops()
        convolution += conv(counter)
        with FlopCounterMode(display=False) as counter:
            torch.log_softmax(logits.float(), -1)[:, 0].sum().backward()
        counts["classifier_backward"] = counter.get_total_flops()
        convolution += conv(counter)
    counts["total"] = sum(counts.values())
    counts["convolution"] = convolution
    return counts


def matmul_peak_tflops(device_name: str):
    """The recorded matrix rate of a device (MATMUL_PEAK_TFLOPS), or None: for result files that
    carry no rate measured in their own run."""
    return next((v for k, v in MATMUL_PEAK_TFLOPS.items() if k in device_name), None)


def matmul_tflops(device, dtype: str = "fp16", reps: int = 10) -> float:
    """The dense matrix-multiply rate this device gives now, in TFLOP/s: the median of `reps`
    square products on random data (METHOD.md: never zeros), n = 8192 in `dtype` on CUDA (fp32
    accumulation), n = 2048 in fp32 on CPU (what the networks run there). The yardstick of every
    row's "% of the matmul rate", measured in the same run."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    n, dt = (8192, resolve_dtype(dtype)) if cuda else (2048, torch.float32)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dt, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dt, generator=gen)
    times = []
    for _ in range(reps + 2):  # two warm-ups (cuBLAS handle, workspace, clocks)
        times.append(_timed(lambda: a @ b, device)[0])
    return 2 * n ** 3 / statistics.median(times[2:]) / 1e12


def _reference_variants(impls, stack, args, y, device) -> dict:
    """guided-diffusion's own loops on the same weights (the cascade's two when an upsampler is
    benchmarked): as they are, and/or with torch.compile."""
    if not impls:
        return {}
    dtype = resolve_dtype(args.dtype)
    nets = {}
    for role, (preset, module) in stack.items():
        if module is not None:
            ref = reference_model(preset.model).to(device)
            ref.load_state_dict(module.state_dict())
            ref.eval()
            set_reference_dtype(ref, dtype)
            nets[role] = ref
    model, up = stack["model"][0], stack["upsampler"][0]
    n, size, ch = args.batch, model.model.image_size, model.model.in_channels
    variants = {}
    for impl in impls:
        net = dict(nets)
        if impl == "gd-compile":  # separate wrappers over the same modules
            net = {role: torch.compile(m) for role, m in nets.items()}
        if up is None:
            run = (lambda net: lambda: reference_sample(  # noqa: E731
                net["model"], net.get("classifier"), model, args.steps, args.guidance, y, (n, ch, size, size),
                device, seed=1))(net)
        else:
            up_size = up.model.image_size
            run = (lambda net: lambda: reference_cascade(  # noqa: E731
                net["model"], net.get("classifier"), net["upsampler"], model, up, args.steps,
                args.upsampler_steps or args.steps, args.guidance, y, (n, ch, size, size), (n, ch, up_size, up_size),
                device, seed=1))(net)
        variants[impl_name(impl, device)] = (lambda run: lambda: to_uint8_nhwc(run()))(run)  # noqa: E731
    return variants


def measure(args) -> dict:
    device = torch.device(args.device)
    impls = args.impls or default_impls(args)
    stack = random_stack(device, args.preset, args.classifier, args.upsampler)
    (preset, model), (cpreset, clf), (upreset, up) = stack.values()

    n = args.batch
    num_classes = cpreset.model.out_channels if cpreset is not None else preset.model.num_classes
    if preset.model.num_classes:
        num_classes = min(num_classes, preset.model.num_classes)
    classes = [i % num_classes for i in range(n)] if num_classes else None
    y = torch.tensor(classes, device=device) if classes is not None else None
    guidance = args.guidance if clf is not None else None
    steps = build_tables(preset.diffusion, args.steps).num_timesteps  # sampling steps per batch
    # admrt's rows may run another plan (--admrt-steps): speed at equal quality, same run
    admrt_steps = args.admrt_steps or args.steps
    our_steps = build_tables(preset.diffusion, admrt_steps).num_timesteps
    up_steps = build_tables(upreset.diffusion, args.upsampler_steps or args.steps).num_timesteps if upreset else 0
    results = {"config": {k: (v if k == "impls" else str(v)) for k, v in vars(args).items()}, "rows": []}
    results["config"]["impls"] = impls
    flops = step_flops(preset, cpreset)
    results["flops_per_image_step"] = flops
    # FLOPs per image of one whole loop (both stages of a cascade), per plan
    work = {plan: flops["total"] * k for plan, k in ((args.steps, steps), (admrt_steps, our_steps))}
    if upreset is not None:
        results["upsampler_flops_per_image_step"] = step_flops(upreset)
        work = {plan: w + results["upsampler_flops_per_image_step"]["total"] * up_steps for plan, w in work.items()}
    sample_kw = dict(classes=classes, num=n, steps=admrt_steps, guidance=guidance, seeds=1, batch_size=n,
                     upsampler_steps=args.upsampler_steps or None)

    # name -> callable returning uint8 images (or the reference's tensor)
    variants = _reference_variants([i for i in impls if i in REFERENCE_IMPLS], stack, args, y, device)
    engines = {"eager": ("eager", False), "graphs": ("eager", True), "compile": ("compile", True),
               "onnxruntime": ("onnxruntime", False)}
    built = {}
    for impl in (i for i in impls if i in engines):
        name, (backend, graphs) = impl_name(impl, device), engines[impl]
        t0 = time.perf_counter()
        try:
            built[name] = admrt.Engine(model, classifier=clf, upsampler=up, backend=backend, dtype=args.dtype,
                                       cuda_graphs=graphs, channels_last=args.channels_last or None)
        except MissingPackageError as exc:  # onnxruntime without a CUDA provider: a FAILED row, the others go on
            results["rows"].append({"impl": name, "error": str(exc)})
            print(f"{name}: FAILED: {exc}", flush=True)
            continue
        if backend == "onnxruntime":
            results["onnxruntime_export_s"] = time.perf_counter() - t0  # ONNX export + check + sessions, apart
            print(f"onnxruntime: exported and loaded in {results['onnxruntime_export_s']:.1f} s", flush=True)
        variants[name] = (lambda eng: lambda: eng.sample(**sample_kw).images)(built[name])  # noqa: E731

    if "aoti" in impls or "admrt-sample" in impls:
        from admrt.engine import sample_program
        from admrt.export.aoti import export_aoti
        folder = Path(tempfile.mkdtemp(prefix="admrt-bench-")) / "pkg"
        t0 = time.perf_counter()
        export_aoti(model, clf, out=folder, steps=admrt_steps, dtype=args.dtype, device=device,
                    max_batch=max(2, n), log=lambda _m: None)
        results["package_export_s"] = time.perf_counter() - t0  # export + AOT compile + check, apart
        print(f"package: exported and compiled in {results['package_export_s']:.1f} s", flush=True)
        if "aoti" in impls:
            pkg = admrt.Engine.from_package(folder, cuda_graphs=True)
            variants[impl_name("aoti", device)] = lambda: pkg.sample(  # noqa: E731
                classes=classes, num=n, steps=admrt_steps, guidance=guidance, seeds=1, batch_size=n).images
        if "admrt-sample" in impls:
            runs = iter(range(10 ** 6))  # a fresh run folder each time (a rerun would only resume)
            cmd = [sample_program, "--package", str(folder), "--num", str(n), "--batch-size", str(n), "--seed", "1",
                   "--steps", admrt_steps, "--no-progress"] + (["--guidance", str(guidance)] if guidance is not None
                                                              else [])
            variants[impl_name("admrt-sample", device)] = lambda: subprocess.run(  # noqa: E731
                cmd + ["--out", str(folder.parent / f"run{next(runs)}")], check=True, capture_output=True)

    # cold run of each variant: compilation, capture, autotuning, allocator; peak memory
    cold, peak, failed = {}, {}, {}
    for name, fn in variants.items():
        base = _allocated(device)
        _reset_peak(device)
        try:
            cold[name], _ = _timed(fn, device)
        except Exception as exc:  # report and go on: one failing variant must not hide the others
            failed[name] = f"{type(exc).__name__}: {exc}"
            print(f"{name}: FAILED: {failed[name]}", flush=True)
            continue
        # torch's allocator only: onnxruntime's own CUDA arena is not seen (NaN for its row)
        peak[name] = (_peak(device) - base / 2 ** 30 if device.type == "cuda" and "onnxruntime" not in name
                      else float("nan"))
        print(f"{name}: cold run {cold[name]:.1f} s", flush=True)   # a run cut short still says this much
    live = [k for k in variants if k not in failed]
    times = {k: [] for k in live}
    for _ in range(args.reps):  # alternate: A B C A B C ...
        for name in live:
            times[name].append(_timed(variants[name], device)[0])

    env = _env(device)
    peak_rate = results["matmul_tflops"] = matmul_tflops(device, args.dtype)  # same run, after the rounds
    for name in variants:
        if name in failed:
            results["rows"].append({"impl": name, "error": failed[name]})
            continue
        med = statistics.median(times[name])
        reference = name in (IMPLS["gd"], IMPLS["gd-compile"])
        plan, loop_steps = (args.steps, steps) if reference else (admrt_steps, our_steps)
        tflops = work[plan] * n / med / 1e12
        row = {"impl": name, "steps": plan, "median_s": med, "min_s": min(times[name]), "max_s": max(times[name]),
               "times_s": times[name], "cold_s": cold[name], "cold_minus_warm_s": cold[name] - med,
               "images_per_s": n / med, "ms_per_step": 1e3 * med / (loop_steps + up_steps), "peak_mem_gib": peak[name],
               "achieved_tflops": tflops,
               "pct_of_matmul_peak": 100 * tflops / peak_rate if peak_rate else None}
        results["rows"].append(row)
        print(f"{name:34s} {n / med:9.2f} img/s  {1e3 * med:9.1f} ms/batch [{1e3 * row['min_s']:.1f}, "
              f"{1e3 * row['max_s']:.1f}]  {row['ms_per_step']:7.2f} ms/step  {tflops:7.3g} TFLOP/s"
              f"  cold +{row['cold_minus_warm_s']:.1f} s  peak {peak[name]:6.2f} GiB", flush=True)
    ref_row = next((r for r in results["rows"] if r["impl"] == IMPLS["gd"] and "median_s" in r), None)
    if ref_row:
        for row in results["rows"]:
            if "median_s" in row:
                row["speedup_vs_reference"] = ref_row["median_s"] / row["median_s"]
    if (IMPLS["gd"] in variants and IMPLS["gd"] not in failed and built and admrt_steps == args.steps
            and not args.skip_image_check):
        # image parity, untimed: the reference's noise order, uncaptured
        ref_img = variants[IMPLS["gd"]]().cpu().int()
        eng = next(iter(built.values()))
        ours = eng.sample(**sample_kw, noise="reference").images
        diff = (torch.as_tensor(ours).int() - ref_img).abs()
        results["image_diff_vs_reference"] = {"max_abs_uint8": int(diff.max()),
                                              "mean_abs_uint8": float(diff.float().mean())}
    results["env"] = env
    print(json.dumps({k: v for k, v in results.items() if k not in ("rows", "config")}, indent=1, default=str))
    return results


def _allocated(device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")


def _env(device) -> dict:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "python": platform.python_version(), "admrt": admrt.__version__}
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        try:
            import triton
            env["triton"] = triton.__version__
        except ImportError:
            pass
    else:
        import os
        env["device"] = f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads, {platform.machine()})"
    try:
        import onnxruntime
        env["onnxruntime"] = f"{onnxruntime.__version__} ({', '.join(onnxruntime.get_available_providers())})"
    except ImportError:
        pass
    return env


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="imagenet64-cond",
                   help="the diffusion model's architecture (random weights, the same on both sides)")
    p.add_argument("--classifier", default="imagenet64-classifier",
                   help="the noisy classifier's architecture for guidance; '' for unguided")
    p.add_argument("--batch", type=int, default=16, help="images per batch (one sampling loop)")
    p.add_argument("--steps", default="ddim25", help="ddimN (DDIM) or N (DDPM respaced) steps per loop")
    p.add_argument("--admrt-steps", default="",
                   help="admrt's rows run this plan instead (e.g. dpmpp2m10 against the reference's ddim25): speed "
                        "at equal quality in one run (docs/solvers has the FID of each plan); no image comparison")
    p.add_argument("--guidance", type=finite_float, default=1.0, help="classifier scale")
    p.add_argument("--upsampler", default="",
                   help="an upsampler's architecture (e.g. upsample64-256): time the cascade, the guided model's "
                        "samples then the upsampler's loop on them (unguided), as the reference scripts run it")
    p.add_argument("--upsampler-steps", default="", help="the upsampler's steps (default: --steps)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="fp16",
                   help="precision of the networks' bodies, on both sides")
    p.add_argument("--channels-last", action="store_true",
                   help="run admrt's networks in NHWC (Engine(channels_last=True)); guided-diffusion stays as it is")
    p.add_argument("--reps", type=int, default=5, help="timed rounds, variants alternating")
    p.add_argument("--device", type=device_value, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--compile", action="store_true", help="also time backend='compile' (fullgraph)")
    p.add_argument("--onnxruntime", action="store_true",
                   help="also time backend='onnxruntime' (both units exported to ONNX, onnxruntime sessions; CUDA "
                        "needs onnxruntime-gpu)")
    p.add_argument("--package", action="store_true",
                   help="also time an AOTInductor package (Engine.from_package) and the admrt-sample program on it; "
                        "the export and compile time is reported apart")
    p.add_argument("--reference-compile", action="store_true",
                   help="also time guided-diffusion's loop with its networks wrapped in torch.compile (default mode)")
    p.add_argument("--impls", type=lambda v: [i.strip() for i in v.split(",") if i.strip()], default=None,
                   help=f"comma-separated implementations to time instead of the flags' choice: {', '.join(IMPLS)}")
    p.add_argument("--skip-reference", action="store_true",
                   help="do not time guided-diffusion, nor compare images with it (admrt's variants only)")
    p.add_argument("--skip-image-check", action="store_true",
                   help="do not compare the images with guided-diffusion's (that check is one more untimed loop on "
                        "each side: minutes at ADM-256 b64)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for a JSON of the results (default: print only)")


def main(argv=None) -> int:
    from admrt.cli import main as admrt_main
    return admrt_main(["bench", *(sys.argv[1:] if argv is None else argv)])


def _check(args) -> None:
    """Bad arguments: one line naming the argument, the value and what was expected."""
    for flag, name in (("--preset", args.preset), ("--classifier", args.classifier), ("--upsampler", args.upsampler)):
        if name and name not in admrt.PRESETS:
            raise CommandError(f"{flag}={name!r}: unknown preset; expected one of {sorted(admrt.PRESETS)}")
    for flag, value in (("--batch", args.batch), ("--reps", args.reps)):
        if value <= 0:
            raise CommandError(f"{flag}={value}: expected a positive int")
    for impl in args.impls or ():
        if impl not in IMPLS:
            raise CommandError(f"--impls={','.join(args.impls)!r}: unknown implementation {impl!r}; expected some of "
                               f"{list(IMPLS)}")
    if args.impls is not None and not args.impls:
        raise CommandError(f"--impls='': expected some of {list(IMPLS)}")
    packaged = {"aoti", "admrt-sample"} & set(args.impls or default_impls(args))
    if args.upsampler and packaged:
        raise CommandError(f"--upsampler={args.upsampler!r}: the package variants ({', '.join(sorted(packaged))}) "
                           "time the guided stage only; leave them out (--impls, --package)")
    if "graphs" in (args.impls or ()) and torch.device(args.device).type != "cuda":
        raise CommandError(f"--impls={','.join(args.impls)!r}: 'graphs' (CUDA-graph replay) needs a CUDA --device, "
                           f"got {args.device!r}")


def parse_args(argv) -> argparse.Namespace:
    """`admrt bench` arguments from a list (the pytest suite builds its configurations with it)."""
    parser = argparse.ArgumentParser(prog="admrt bench")
    add_arguments(parser)
    return parser.parse_args(argv)


def result_path(out: Path, args) -> Path:
    """One JSON per configuration: sampling_<preset>_<dtype>_b<batch>_<steps>[_vs_<admrt steps>].json."""
    stack = args.preset + (f"+{args.upsampler}" if args.upsampler else "")
    plans = args.steps + (f"_vs_{args.admrt_steps}" if getattr(args, "admrt_steps", "") else "")
    return Path(out) / f"sampling_{stack}_{args.dtype}_b{args.batch}_{plans}.json"


def write_results(results: dict, out: Path, args) -> Path:
    """Write a configuration's results atomically (a run stopped mid-write leaves no half file)."""
    from admrt.io import atomic_write

    text = json.dumps(results, indent=1, default=str)
    return atomic_write(result_path(out, args), lambda tmp: Path(tmp).write_text(text))


def run(args) -> int:
    _check(args)
    results = measure(args)
    path = write_results(results, args.out, args) if args.out is not None else None
    failed = [row for row in results["rows"] if "error" in row]
    if failed:   # a failing variant fails the command (exit 1), after the others' rows are kept
        kept = f"the other rows are in {path}" if path is not None else "the other rows are printed above"
        names = ", ".join(row["impl"] for row in failed)
        first = " ".join(failed[0]["error"].split())[:300]
        raise CommandError(f"{len(failed)} of {len(results['rows'])} variants failed ({names}; first: {first}); {kept}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
