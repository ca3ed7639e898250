"""`admrt bench`: end-to-end sampling throughput and latency, admrt against guided-diffusion in
the same run.

Both sides get the same random weights (the released architectures, e.g. imagenet256-cond with
imagenet256-classifier), the same labels and guidance scale; the reference runs its own
ddim_sample_loop / p_sample_loop with classifier_sample.py's cond_fn. Warm runs only: one
warm-up, then the median of --reps timed runs (device synchronised around the whole loop).

    admrt bench --preset imagenet64-cond --classifier imagenet64-classifier \
        --batch 32 --steps ddim25 --dtype fp16 --out bench/results

Reports images/s, latency per batch and per step, peak memory, and admrt/reference ratios; also
checks, at --dtype fp32 with reference noise, that the images agree (max |diff| in uint8 levels).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import admrt
from admrt.diffusion import space_timesteps
from admrt.reference import reference_model, reference_sample, set_reference_dtype, to_uint8_nhwc

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _time(fn, reps, device):
    fn()  # warm-up (cuDNN autotune, Triton compile, allocator)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, out


def measure(args) -> dict:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    preset = admrt.get_preset(args.preset)
    cpreset = admrt.get_preset(args.classifier) if args.classifier else None
    model = admrt.create_model(preset)
    clf = admrt.create_model(cpreset) if cpreset else None
    with torch.no_grad():  # random weights everywhere (the zero-initialised output convs too)
        for m in (model, clf):
            if m is None:
                continue
            for p in m.parameters():
                if p.dim() > 1:  # matrices and kernels: N(0, 0.25 / fan_in); norms and biases as built
                    p.copy_(torch.randn_like(p) * (0.5 / p[0].numel() ** 0.5))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    clf_state = {k: v.clone() for k, v in clf.state_dict().items()} if clf is not None else None

    n, size, ch = args.batch, preset.model.image_size, preset.model.in_channels
    num_classes = cpreset.model.out_channels if cpreset is not None else preset.model.num_classes
    classes = [i % num_classes for i in range(n)] if num_classes else None
    y = torch.tensor(classes, device=device) if classes is not None else None
    results = {"config": vars(args), "rows": []}
    steps = len(space_timesteps(preset.diffusion.steps, args.steps))  # sampling steps per batch

    def record(name, median, times, mem):
        row = {"impl": name, "median_s": median, "times_s": times, "images_per_s": n / median,
               "ms_per_step": 1e3 * median / steps, "peak_mem_gib": mem}
        results["rows"].append(row)
        print(f"{name:28s} {n / median:9.2f} img/s  {1e3 * median:9.1f} ms/batch  "
              f"{1e3 * median / steps:7.2f} ms/step  peak {mem:6.2f} GiB", flush=True)


    outputs = {}
    if not args.skip_reference:
        ref_model = reference_model(preset.model).to(device)
        ref_model.load_state_dict(state)
        ref_clf = None
        if cpreset is not None:
            ref_clf = reference_model(cpreset.model).to(device)
            ref_clf.load_state_dict(clf_state)
        for m in (ref_model, ref_clf):
            if m is not None:
                m.eval()
                set_reference_dtype(m, dtype)
        fn = lambda: to_uint8_nhwc(reference_sample(  # noqa: E731
            ref_model, ref_clf, preset, args.steps, args.guidance, y, (n, ch, size, size), device, seed=1))
        _reset_peak(device)
        med, times, outputs["reference"] = _time(fn, args.reps, device)
        record("guided-diffusion (reference)", med, times, _peak(device))
        del ref_model, ref_clf
        torch.cuda.empty_cache() if device.type == "cuda" else None

    variants = [("admrt eager", "eager", False), ("admrt eager + fused", "eager", True)]
    if args.compile:
        variants.append(("admrt compile + fused", "compile", True))
    for name, backend, fused in variants:
        m = admrt.create_model(preset).to(device)
        m.load_state_dict(state)
        c = None
        if cpreset is not None:
            c = admrt.create_model(cpreset).to(device)
            c.load_state_dict(clf_state)
        for module in (m, c):
            if module is not None:
                module.set_fused_kernels(fused)
        eng = admrt.Engine(m, classifier=c, backend=backend, dtype=args.dtype)
        fn = lambda: eng.sample(classes=classes, num=n, steps=args.steps,  # noqa: E731
                                guidance=args.guidance if c is not None else None,
                                seeds=1, batch_size=n, noise="reference", check_finite=False)
        try:
            _reset_peak(device)
            med, times, out = _time(fn, args.reps, device)
        except Exception as exc:  # report and go on: one failing variant must not hide the others
            print(f"{name}: FAILED: {type(exc).__name__}: {exc}", flush=True)
            results["rows"].append({"impl": name, "error": f"{type(exc).__name__}: {exc}"})
            continue
        outputs[name] = torch.as_tensor(out.images)
        record(name, med, times, _peak(device))
        del eng, m, c

    ref_row = next((r for r in results["rows"] if r["impl"].startswith("guided")), None)
    if ref_row:
        for row in results["rows"]:
            if "median_s" in row:
                row["speedup_vs_reference"] = ref_row["median_s"] / row["median_s"]
        if "reference" in outputs:
            ref_img = outputs["reference"].cpu().int()
            for name, img in outputs.items():
                if name != "reference":
                    diff = (img.cpu().int() - ref_img).abs()
                    results.setdefault("image_diff_vs_reference", {})[name] = {
                        "max_abs_uint8": int(diff.max()), "mean_abs_uint8": float(diff.float().mean())}
    results["env"] = _env(device)
    print(json.dumps({k: v for k, v in results.items() if k != "rows"}, indent=1, default=str))
    return results


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
        env["device"] = platform.processor() or "cpu"
    return env


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="imagenet64-cond")
    p.add_argument("--classifier", default="imagenet64-classifier", help="'' for unguided")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", default="ddim25")
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="also time backend='compile'")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="folder for a JSON of the results")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="admrt bench", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


def run(args) -> int:
    results = measure(args)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        name = f"sampling_{args.preset}_{args.dtype}_b{args.batch}_{args.steps}.json"
        (args.out / name).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
