"""`admrt bench`: end-to-end sampling throughput and latency, admrt against guided-diffusion in
the same run.

Both sides get the same random weights (the released architectures, e.g. imagenet256-cond with
imagenet256-classifier), the same labels and guidance scale; the reference runs its own
ddim_sample_loop / p_sample_loop with classifier_sample.py's cond_fn. admrt runs the path users
run by default (seeded noise) in each variant:

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
untimed run with reference noise (guided-diffusion's draw order, uncaptured).

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
from admrt.cli import CommandError
from admrt.export import MissingPackageError
from admrt.diffusion import space_timesteps
from admrt.reference import reference_model, reference_sample, set_reference_dtype, to_uint8_nhwc

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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


def measure(args) -> dict:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    preset = admrt.get_preset(args.preset)
    cpreset = admrt.get_preset(args.classifier) if args.classifier else None
    model = admrt.create_model(preset)
    clf = admrt.create_model(cpreset) if cpreset else None
    _random_weights(model, clf)
    model.to(device)
    clf = clf.to(device) if clf is not None else None

    n, size, ch = args.batch, preset.model.image_size, preset.model.in_channels
    num_classes = cpreset.model.out_channels if cpreset is not None else preset.model.num_classes
    if preset.model.num_classes:
        num_classes = min(num_classes, preset.model.num_classes)
    classes = [i % num_classes for i in range(n)] if num_classes else None
    y = torch.tensor(classes, device=device) if classes is not None else None
    guidance = args.guidance if clf is not None else None
    steps = len(space_timesteps(preset.diffusion.steps, args.steps))  # sampling steps per batch
    results = {"config": {k: str(v) for k, v in vars(args).items()}, "rows": []}

    variants = {}  # name -> callable returning uint8 images (or the reference's tensor)
    if not args.skip_reference:
        ref_model = reference_model(preset.model).to(device)
        ref_model.load_state_dict(model.state_dict())
        ref_clf = None
        if cpreset is not None:
            ref_clf = reference_model(cpreset.model).to(device)
            ref_clf.load_state_dict(clf.state_dict())
        for m in (ref_model, ref_clf):
            if m is not None:
                m.eval()
                set_reference_dtype(m, dtype)
        variants["guided-diffusion (reference)"] = lambda: to_uint8_nhwc(reference_sample(  # noqa: E731
            ref_model, ref_clf, preset, args.steps, args.guidance, y, (n, ch, size, size), device, seed=1))
    engines = [("admrt eager", "eager", False)]
    if device.type == "cuda":
        engines.append(("admrt + graphs", "eager", True))
    if args.compile:
        engines.append(("admrt compile" + (" + graphs" if device.type == "cuda" else ""), "compile", True))
    if args.onnxruntime:
        engines.append(("admrt onnxruntime", "onnxruntime", False))
    built = {}
    for name, backend, graphs in engines:
        t0 = time.perf_counter()
        try:
            built[name] = admrt.Engine(model, classifier=clf, backend=backend, dtype=args.dtype, cuda_graphs=graphs)
        except MissingPackageError as exc:  # onnxruntime without a CUDA provider: a FAILED row, the others go on
            results["rows"].append({"impl": name, "error": str(exc)})
            print(f"{name}: FAILED: {exc}", flush=True)
            continue
        if backend == "onnxruntime":
            results["onnxruntime_export_s"] = time.perf_counter() - t0  # ONNX export + check + sessions, apart
            print(f"onnxruntime: exported and loaded in {results['onnxruntime_export_s']:.1f} s", flush=True)
        variants[name] = (lambda eng: lambda: eng.sample(  # noqa: E731
            classes=classes, num=n, steps=args.steps, guidance=guidance, seeds=1, batch_size=n).images)(built[name])

    if args.package:
        from admrt.engine import sample_program
        from admrt.export.aoti import export_aoti
        folder = Path(tempfile.mkdtemp(prefix="admrt-bench-")) / "pkg"
        t0 = time.perf_counter()
        export_aoti(model, clf, out=folder, steps=args.steps, dtype=args.dtype, device=device,
                    max_batch=max(2, n), log=lambda _m: None)
        results["package_export_s"] = time.perf_counter() - t0  # export + AOT compile + check, apart
        print(f"package: exported and compiled in {results['package_export_s']:.1f} s", flush=True)
        pkg = admrt.Engine.from_package(folder, cuda_graphs=True)
        suffix = " + graphs" if device.type == "cuda" else ""
        variants["admrt aoti package" + suffix] = lambda: pkg.sample(  # noqa: E731
            classes=classes, num=n, steps=args.steps, guidance=guidance, seeds=1, batch_size=n).images
        runs = iter(range(10 ** 6))  # a fresh run folder each time (a rerun would only resume)
        cmd = [sample_program, "--package", str(folder), "--num", str(n), "--batch-size", str(n), "--seed", "1",
               "--steps", args.steps, "--no-progress"] + (["--guidance", str(guidance)] if guidance is not None else [])
        variants["admrt-sample (process)"] = lambda: subprocess.run(  # noqa: E731
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
    live = [k for k in variants if k not in failed]
    times = {k: [] for k in live}
    for _ in range(args.reps):  # alternate: A B C A B C ...
        for name in live:
            times[name].append(_timed(variants[name], device)[0])

    for name in variants:
        if name in failed:
            results["rows"].append({"impl": name, "error": failed[name]})
            continue
        med = statistics.median(times[name])
        row = {"impl": name, "median_s": med, "min_s": min(times[name]), "max_s": max(times[name]),
               "times_s": times[name], "cold_s": cold[name], "cold_minus_warm_s": cold[name] - med,
               "images_per_s": n / med, "ms_per_step": 1e3 * med / steps, "peak_mem_gib": peak[name]}
        results["rows"].append(row)
        print(f"{name:30s} {n / med:9.2f} img/s  {1e3 * med:9.1f} ms/batch [{1e3 * row['min_s']:.1f}, "
              f"{1e3 * row['max_s']:.1f}]  {1e3 * med / steps:7.2f} ms/step  cold +{row['cold_minus_warm_s']:.1f} s"
              f"  peak {peak[name]:6.2f} GiB", flush=True)
    ref_row = next((r for r in results["rows"] if r["impl"].startswith("guided") and "median_s" in r), None)
    if ref_row:
        for row in results["rows"]:
            if "median_s" in row:
                row["speedup_vs_reference"] = ref_row["median_s"] / row["median_s"]
        # image parity, untimed: the reference's noise order, uncaptured
        ref_img = variants["guided-diffusion (reference)"]().cpu().int()
        eng = next(iter(built.values()))
        ours = eng.sample(classes=classes, num=n, steps=args.steps, guidance=guidance, seeds=1, batch_size=n,
                          noise="reference").images
        diff = (torch.as_tensor(ours).int() - ref_img).abs()
        results["image_diff_vs_reference"] = {"max_abs_uint8": int(diff.max()),
                                              "mean_abs_uint8": float(diff.float().mean())}
    results["env"] = _env(device)
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
    p.add_argument("--guidance", type=float, default=1.0, help="classifier scale")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16",
                   help="precision of the networks' bodies, on both sides")
    p.add_argument("--reps", type=int, default=5, help="timed rounds, variants alternating")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--compile", action="store_true", help="also time backend='compile' (fullgraph)")
    p.add_argument("--onnxruntime", action="store_true",
                   help="also time backend='onnxruntime' (both units exported to ONNX, onnxruntime sessions; CUDA "
                        "needs onnxruntime-gpu)")
    p.add_argument("--package", action="store_true",
                   help="also time an AOTInductor package (Engine.from_package) and the admrt-sample program on it; "
                        "the export and compile time is reported apart")
    p.add_argument("--skip-reference", action="store_true",
                   help="do not time guided-diffusion, nor compare images with it (admrt's variants only)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for a JSON of the results (default: print only)")


def main(argv=None) -> int:
    from admrt.cli import main as admrt_main
    return admrt_main(["bench", *(sys.argv[1:] if argv is None else argv)])


def _check(args) -> None:
    """Bad arguments: one line naming the argument, the value and what was expected."""
    for flag, name in (("--preset", args.preset), ("--classifier", args.classifier)):
        if name and name not in admrt.PRESETS:
            raise CommandError(f"{flag}={name!r}: unknown preset; expected one of {sorted(admrt.PRESETS)}")
    for flag, value in (("--batch", args.batch), ("--reps", args.reps)):
        if value <= 0:
            raise CommandError(f"{flag}={value}: expected a positive int")
    try:
        torch.device(args.device)
    except RuntimeError:
        raise CommandError(f"--device={args.device!r}: expected cpu, cuda or cuda:N") from None
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device={args.device!r}: no CUDA device on this machine")


def run(args) -> int:
    _check(args)
    results = measure(args)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        name = f"sampling_{args.preset}_{args.dtype}_b{args.batch}_{args.steps}.json"
        (args.out / name).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
