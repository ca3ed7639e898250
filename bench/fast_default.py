"""Fast by default: the measurements behind `--backend auto` (engine/backends.py, choose_backend)
and the compile cache (admrt.engine.cache). Not a test: it writes bench/results/<dir>/.

    python bench/fast_default.py steps --models bundled --batches 1 16 --out DIR
    python bench/fast_default.py steps --models adm64 --batches 1 4 --out DIR
    python bench/fast_default.py main-job --rounds 3 --out DIR
    python bench/fast_default.py startup --rounds 5 --out DIR
    python bench/fast_default.py report DIR

steps: one guided DDIM step (the denoiser and the classifier gradient, through the C++ core, as
`admrt sample` runs it: Engine.sample of `--num-steps` steps at batch B, divided by the steps) for
each backend: eager, compile (torch.compile), aoti, onnxruntime, and openvino (OpenVINO in fp32 on
the same ONNX files as onnxruntime). Each implementation is
built once (the build time, compile included, reported apart; built from the compile cache
`--cache-dir` when it holds them), then timed alternately (A B C A B C ...), median and min-max
per step; achieved GFLOP/s (FLOPs from bench/measure.py's step_flops) against an fp32 2048^3
matmul measured in the same run, before and after. The images of each implementation are compared
with eager's (max uint8 difference).

main-job: README's main job as a user runs it, each a fresh process timed from spawn to exit:
`admrt sample` with its defaults on a cache folder of its own, first with the cache empty (the
first run, once), then rounds of [second run, `admrt sample --backend eager`, guided-diffusion's
loops on the same models (classifier_sample.py's DDIM-25 guided loop and super_res_sample.py's
DDPM-100 on its uint8 output, bench/gd_oracle.py) in a process of its own], alternating. For the
admrt processes, start-up is the time from spawn to the first step's progress output.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

MODEL_SETS = {  # name -> (model, classifier, where the weights come from)
    "bundled": ("fashion16-cond", "fashion16-classifier", "bundled"),
    "adm64": ("imagenet64-cond", "imagenet64-classifier", "random"),
}
IMPLS = ("eager", "compile", "aoti", "onnxruntime", "openvino")


def _env() -> dict:
    """bench/measure.py's environment record, with OpenVINO's version and the CPU's vector ISA."""
    import torch
    from measure import _env as measure_env

    env = measure_env(torch.device("cpu"))
    env["device"] += f", {torch.backends.cpu.get_cpu_capability()}"
    env["openvino"] = __import__("openvino").__version__ if _has("openvino") else None
    return env


def matmul_gflops() -> float:
    """The fp32 matmul rate on CPU in GFLOP/s (bench/measure.py's matmul_tflops: 2048^3, median)."""
    from measure import matmul_tflops
    return 1e3 * matmul_tflops("cpu", reps=5)


# -- steps ----------------------------------------------------------------------------------

def steps(args) -> int:
    import numpy as np
    import torch

    import admrt
    from measure import random_stack, step_flops

    model_name, clf_name, weights = MODEL_SETS[args.models]
    if weights == "bundled":
        model, clf = admrt.load_model(model_name), admrt.load_model(clf_name)
    else:
        stack = random_stack(torch.device("cpu"), model_name, clf_name)
        model, clf = stack["model"][1], stack["classifier"][1]
    flops = step_flops(model_name, clf_name)["total"]
    impls = [i for i in args.impls if i != "openvino" or _has("openvino")]
    if "openvino" in args.impls and "openvino" not in impls:
        print("openvino is not installed (pip install openvino): its rows are left out", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"config": {"models": args.models, "model": model_name, "classifier": clf_name, "weights": weights,
                         "batches": args.batches, "num_steps": args.num_steps, "reps": args.reps, "guidance": 1.0,
                         "sampler": f"ddim{args.num_steps}", "dtype": "fp32"},
              "flops_per_image_step": flops, "env": _env(), "build": {}, "rows": []}
    engines = {}
    for impl in impls:
        t0 = time.perf_counter()
        engines[impl] = admrt.Engine(model, classifier=clf, backend=impl, cache_dir=args.cache_dir)
        result["build"][impl] = round(time.perf_counter() - t0, 2)
        print(f"built {impl} in {result['build'][impl]} s", file=sys.stderr, flush=True)
    result["matmul_gflops_before"] = matmul_gflops()
    for batch in args.batches:
        classes = [i % 10 for i in range(batch)]

        def run(impl):
            t0 = time.perf_counter()
            out_ = engines[impl].sample(classes=classes, steps=f"ddim{args.num_steps}", guidance=1.0, seeds=0,
                                        batch_size=batch)
            return time.perf_counter() - t0, out_.images

        images, first, times = {}, {}, {impl: [] for impl in impls}
        for impl in impls:       # warm-up: each implementation's first call at this batch (kept for the check)
            first[impl], images[impl] = run(impl)
        for _ in range(args.reps):
            for impl in impls:   # A B C A B C
                times[impl].append(run(impl)[0] / args.num_steps)
        for impl in impls:
            print(f"b{batch} {impl:<12} first call {first[impl]:.1f} s", file=sys.stderr, flush=True)
            if not times[impl]:
                result["rows"].append({"impl": impl, "batch": batch, "first_call_s": first[impl]})
                continue
            median = statistics.median(times[impl])
            diff = int(np.abs(images[impl].astype(int) - images["eager"].astype(int)).max()) \
                if "eager" in images else None
            result["rows"].append({"impl": impl, "batch": batch, "ms_per_step": 1e3 * median,
                                   "ms_min": 1e3 * min(times[impl]), "ms_max": 1e3 * max(times[impl]),
                                   "times_s": times[impl], "first_call_s": first[impl], "gflops": flops * batch / median / 1e9,
                                   "max_uint8_diff_vs_eager": diff})
            print(f"b{batch} {impl:<12} {1e3 * median:8.1f} ms/step  {flops * batch / median / 1e9:6.1f} GFLOP/s  "
                  f"diff {diff}", file=sys.stderr, flush=True)
    result["matmul_gflops_after"] = matmul_gflops()
    path = out / f"steps_{args.models}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}", file=sys.stderr)
    return 0


def _has(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


# -- main job -------------------------------------------------------------------------------

def _timed_process(cmd: list[str], env: dict) -> dict:
    """Run cmd; wall seconds from spawn to exit, and to its first step's progress output (tqdm's
    first render on stderr, `admrt sample:`), when it prints one."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first_step, err = [None], []

    def read():
        while chunk := proc.stderr.read1(4096):
            if first_step[0] is None and b"admrt sample:" in chunk and b"step" in chunk:
                first_step[0] = time.perf_counter() - t0
            err.append(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    stdout = proc.stdout.read()
    proc.wait()
    reader.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {b''.join(err).decode()[-2000:]}")
    return {"wall_s": wall, "first_step_s": first_step[0], "stderr_tail": b"".join(err).decode()[-600:],
            "stdout": stdout.decode()[-300:]}


def main_job(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="admrt-mainjob-"))
    env = dict(os.environ)
    env.pop("ADMRT_CACHE_DIR", None)
    env["XDG_CACHE_HOME"] = str(work / "xdg")  # the default cache location, in a folder of this run's own
    admrt = shutil.which("admrt")
    sample = [admrt, "sample", "--no-progress"]
    progress = [admrt, "sample"]
    gd = [sys.executable, str(Path(__file__).resolve()), "gd-main-job", "--out", str(work / "gd")]

    def fresh(name):
        shutil.rmtree(work / name, ignore_errors=True)
        return ["--out", str(work / name)]

    result = {"config": {"rounds": args.rounds, "command": "admrt sample --out DIR",
                         "reference": "guided-diffusion: classifier_sample.py's ddim25 guided loop (scale 1.0), then "
                                      "super_res_sample.py's DDPM-100 on its uint8 output, batch 16, 16 images, one "
                                      "process (bench/fast_default.py gd-main-job)"},
              "env": _env(), "rows": []}
    first = _timed_process(progress + fresh("auto_first"), env)
    result["first_run"] = first
    print(f"first run (empty cache): {first['wall_s']:.1f} s", file=sys.stderr, flush=True)
    for r in range(args.rounds):
        for name, cmd in (("admrt sample (second run)", progress + fresh("auto")),
                          ("admrt sample --backend eager", progress + ["--backend", "eager"] + fresh("eager")),
                          ("guided-diffusion", gd)):
            row = _timed_process(cmd, env)
            row.update(impl=name, round=r)
            result["rows"].append(row)
            print(f"round {r} {name:<30} {row['wall_s']:6.2f} s  first step {row['first_step_s']}", file=sys.stderr,
                  flush=True)
    import numpy as np
    diffs = {}
    with np.load(next((work / "auto").glob("samples_*.npz"))) as a, \
            np.load(next((work / "eager").glob("samples_*.npz"))) as e:
        diffs["auto_vs_eager_max_uint8"] = int(np.abs(a["arr_0"].astype(int) - e["arr_0"].astype(int)).max())
    result["image_check"] = diffs
    entries = subprocess.run([admrt, "cache", "list"], env=env, capture_output=True, text=True).stdout
    result["cache_list"] = entries
    (out / "main_job.json").write_text(json.dumps(result, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out / 'main_job.json'}", file=sys.stderr)
    return 0


def startup(args) -> int:
    """Spawn to first step of `admrt sample` (second run, warm cache) with and without Triton
    importable, alternating: README's runtime install has no Triton (the test extras add it),
    and importing it costs start-up even on a CPU. Without it is simulated by a sitecustomize that
    makes `import triton` fail."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="admrt-startup-"))
    env = dict(os.environ)
    env.pop("ADMRT_CACHE_DIR", None)
    env["XDG_CACHE_HOME"] = str(work / "xdg")
    (work / "block").mkdir()
    (work / "block" / "sitecustomize.py").write_text("import sys\nsys.modules['triton'] = None  # import fails\n")
    blocked = {**env, "PYTHONPATH": os.pathsep.join([str(work / "block")] + env.get("PYTHONPATH", "").split(os.pathsep))}
    admrt = shutil.which("admrt")

    def cmd(name):
        shutil.rmtree(work / name, ignore_errors=True)
        return [admrt, "sample", "--out", str(work / name)]

    _timed_process(cmd("warm"), env)   # fills the cache
    rows = []
    for r in range(args.rounds):
        for name, e in (("with triton", env), ("without triton (runtime install)", blocked)):
            row = _timed_process(cmd("run"), e)
            rows.append({"impl": name, "round": r, "wall_s": row["wall_s"], "first_step_s": row["first_step_s"]})
            print(f"round {r} {name:<34} first step {row['first_step_s']:.2f} s  wall {row['wall_s']:.2f} s",
                  file=sys.stderr, flush=True)
    (out / "startup.json").write_text(json.dumps({"env": _env(), "rows": rows}, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0


def gd_main_job(args) -> int:
    """guided-diffusion's loops on the bundled models (the reference side of main-job)."""
    import numpy as np
    import torch

    import admrt
    from gd_oracle import reference_cascade, reference_model, to_uint8_nhwc

    names = ("fashion16-cond", "fashion16-classifier", "fashion-upsample16-32")
    nets = []
    for name in names:
        ours = admrt.load_model(name)
        ref = reference_model(ours.config)
        ref.load_state_dict(ours.state_dict())
        nets.append(ref.eval())
    presets = [admrt.get_preset(n) for n in (names[0], names[2])]
    y = torch.tensor([i % 10 for i in range(16)])
    with torch.no_grad():
        up = reference_cascade(nets[0], nets[1], nets[2], presets[0], presets[1], "ddim25", "100", 1.0, y,
                               (16, 1, 16, 16), (16, 1, 32, 32), "cpu", 0)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    np.savez(Path(args.out) / "samples_16x32x32x1.npz", to_uint8_nhwc(up).numpy(), y.numpy())
    return 0


# -- report ---------------------------------------------------------------------------------

def report(args) -> int:
    folder = Path(args.folder)
    lines = [f"# Fast by default: measurements ({folder.name})", ""]
    main = folder / "main_job.json"
    if main.exists():
        r = json.loads(main.read_text())
        lines += [f"Environment: {r['env']}", "", "## Main job (`admrt sample --out DIR`, bundled stack, 16 images), "
                  "each a fresh process, spawn to exit", "",
                  f"First run (compile cache empty): **{r['first_run']['wall_s']:.1f} s** (first step at "
                  f"{r['first_run']['first_step_s'] or float('nan'):.1f} s).", "",
                  "| implementation | wall s, median (min-max) | x guided-diffusion | spawn to first step, s |",
                  "|---|---|---|---|"]
        by = {}
        for row in r["rows"]:
            by.setdefault(row["impl"], []).append(row)
        ref = statistics.median(x["wall_s"] for x in by["guided-diffusion"])
        for impl, rows in by.items():
            walls = [x["wall_s"] for x in rows]
            starts = [x["first_step_s"] for x in rows if x["first_step_s"] is not None]
            lines.append(f"| {impl} | {statistics.median(walls):.2f} ({min(walls):.2f}-{max(walls):.2f}) | "
                         f"{ref / statistics.median(walls):.2f} | "
                         f"{f'{statistics.median(starts):.2f}' if starts else '-'} |")
        lines += ["", f"Images: {r['image_check']}", ""]
    start = folder / "startup.json"
    if start.exists():
        rows = json.loads(start.read_text())["rows"]
        lines += ["## Start-up: spawn to the first step, `admrt sample` second run (`startup`)", "",
                  "| import of Triton | first step s, median (min-max) | wall s, median |", "|---|---|---|"]
        for name in dict.fromkeys(row["impl"] for row in rows):
            firsts = [row["first_step_s"] for row in rows if row["impl"] == name]
            walls = [row["wall_s"] for row in rows if row["impl"] == name]
            lines.append(f"| {name} | {statistics.median(firsts):.2f} ({min(firsts):.2f}-{max(firsts):.2f}) | "
                         f"{statistics.median(walls):.2f} |")
        lines.append("")
    for path in sorted(folder.glob("steps_*.json")):
        r = json.loads(path.read_text())
        c = r["config"]
        peak = (r["matmul_gflops_before"] + r["matmul_gflops_after"]) / 2
        lines += [f"## One guided step: {c['model']} + {c['classifier']} ({c['weights']} weights), fp32, "
                  f"{c['sampler']} through Engine.sample", "",
                  f"FLOPs per image-step {r['flops_per_image_step'] / 1e9:.2f} G; fp32 2048^3 matmul "
                  f"{r['matmul_gflops_before']:.0f} / {r['matmul_gflops_after']:.0f} GFLOP/s (before / after).",
                  f"Engine build, s (the compile on an empty cache; openvino loads onnxruntime's cached files; "
                  f"compile compiles at its first call): "
                  + ", ".join(f"{k} {v}" for k, v in r["build"].items()), "",
                  "| batch | implementation | ms/step median (min-max) | x eager | GFLOP/s | % of matmul | "
                  "first call, s | max uint8 diff vs eager |", "|---|---|---|---|---|---|---|---|"]
        eager = {row["batch"]: row["ms_per_step"] for row in r["rows"] if row["impl"] == "eager" and "ms_per_step" in row}
        for row in (row for row in r["rows"] if "ms_per_step" in row):
            lines.append(f"| {row['batch']} | {row['impl']} | {row['ms_per_step']:.1f} ({row['ms_min']:.1f}-"
                         f"{row['ms_max']:.1f}) | {eager.get(row['batch'], float('nan')) / row['ms_per_step']:.2f} | "
                         f"{row['gflops']:.1f} | {100 * row['gflops'] / peak:.0f}% | {row['first_call_s']:.1f} | "
                         f"{row['max_uint8_diff_vs_eager']} |")
        lines.append("")
    (folder / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("steps")
    s.add_argument("--models", choices=MODEL_SETS, default="bundled")
    s.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    s.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    s.add_argument("--num-steps", type=int, default=5)
    s.add_argument("--reps", type=int, default=5)
    s.add_argument("--cache-dir", default=None, help="the compile cache to build from (default admrt's)")
    s.add_argument("--out", required=True)
    m = sub.add_parser("main-job")
    m.add_argument("--rounds", type=int, default=3)
    m.add_argument("--out", required=True)
    u = sub.add_parser("startup")
    u.add_argument("--rounds", type=int, default=5)
    u.add_argument("--out", required=True)
    g = sub.add_parser("gd-main-job")
    g.add_argument("--out", required=True)
    r = sub.add_parser("report")
    r.add_argument("folder")
    args = p.parse_args(argv)
    return {"steps": steps, "main-job": main_job, "startup": startup, "gd-main-job": gd_main_job,
            "report": report}[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
