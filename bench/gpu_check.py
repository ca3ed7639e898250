"""The GPU check: every CUDA path of admrt proven or disproven in one device call, in stages by
priority, each in its own time box, the whole inside --total seconds (480 by default, so that a
15-minute lease holds the machine's start, this call and a second, shorter one).

    bash bench/gpu_check.sh --prepare     # here, once: guided-diffusion's wheel into .whl/ (ignored)
    bash bench/gpu_check.sh               # on the GPU machine: every stage, results under $OUT
    bash bench/gpu_check.sh --dry-run     # on CPU (CI): each stage's code path that runs without CUDA
    bash bench/gpu_check.sh --stages throughput,profile   # chosen stages (build comes first when needed)

The device call: run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=570); then
`python bench/gpu_report.py <files_at>` writes bench/results/gpu_<date>/ and README's figures.

Stages (STAGES: box in seconds, expected on an H200 and how that was estimated: bench/README.md):
  build        pip install -e . against the machine's CUDA torch, nvcc for this GPU's architecture
               only; a failed build stops the check with its log
  correctness  the GPU-marked tests (GPU_TESTS): capture equals uncaptured, no host sync inside a
               step, CPU and CUDA noise equal, fused kernels against fp64 at every ADM shape, double
               backward, CUDA AOTI packages against eager
  smoke        each user-facing GPU path on the bundled models, one line ok/failed each: `admrt
               sample` (default), `admrt sample --backend compile`, `admrt export aoti --device
               cuda` then `admrt-sample` on it; images compared with the default's
  throughput   `admrt bench`, guided DDIM-25, fp16, guided-diffusion fp16 in the same run,
               alternating (THROUGHPUT_ROWS, by priority): images/s, ms/step, % of the matmul rate
               measured in the run, peak memory
  kernels      bench/bench_kernels.py, the rows that decide the kernel targets first
  profile      bench/profile_step.py: the captured step at ADM-256 b64, by kernel category
correctness and smoke run side by side (neither is timed; both are mostly compile work for the
machine's 16 cores); the timed stages run alone.

Results (three files: the device tool returns at most 8, no deeper than $OUT/a/b): $OUT/gpu_check.json
(the environment and every stage's result), $OUT/gpu_check.md (the summary), $OUT/logs.tgz (each
stage's log and raw result files), each rewritten atomically as a stage ends, so a call cut by its
time limit returns what was measured before the cut. Scratch (packages, caches, images) goes to
--work, outside $OUT. This file needs only the standard library until the build is done.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import report   # bench/report.py: the throughput table and the best admrt row (standard library only)

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

# The GPU-marked tests that decide whether the default path works at all, by file (only these files
# are collected: others import packages the GPU machine lacks).
GPU_TESTS = [
    "tests/engine/test_noise.py",        # CPU and CUDA noise equal
    "tests/engine/test_engine_gpu.py",   # guided loops vs guided-diffusion, capture == uncaptured, no host sync,
                                         # compile backend, AOTI packages, step batching captured
    "tests/kernels/test_kernels_gpu.py",  # fused kernels vs fp64 at every ADM shape, double backward, Inductor/AOTI
    "tests/models/test_models_fused.py",  # ADM-64 fused vs unfused
    "tests/export/test_aoti_gpu.py",     # a CUDA AOTI package with graphs vs eager, admrt-sample
]


@dataclass
class Row:
    """One `admrt bench` configuration of the throughput stage."""
    name: str
    args: list[str]


def throughput_rows(dry: bool) -> list[Row]:
    """By priority: ADM-256 b64 decides the 3x target (one warm round each: a guided-diffusion loop is
    ~40 s there, and the image check, another loop a side, is left to the smaller rows), b1 the latency
    target, ADM-64 b64 the smaller model. --dry-run: the same code path on tiny random models, CPU."""
    if dry:
        tiny = ["--preset", "tiny-cond", "--classifier", "tiny-classifier", "--steps", "ddim2", "--dtype", "fp32",
                "--device", "cpu", "--impls", "gd,eager"]
        return [Row("tiny b2", tiny + ["--batch", "2", "--reps", "1", "--skip-image-check"]),
                Row("tiny b1", tiny + ["--batch", "1", "--reps", "2"])]
    adm256 = ["--preset", "imagenet256-cond", "--classifier", "imagenet256-classifier"]
    adm64 = ["--preset", "imagenet64-cond", "--classifier", "imagenet64-classifier"]
    common = ["--steps", "ddim25", "--dtype", "fp16", "--device", "cuda"]
    return [Row("ADM-256 b64", adm256 + common + ["--batch", "64", "--reps", "1", "--impls", "gd,graphs",
                                                  "--skip-image-check"]),
            Row("ADM-256 b1", adm256 + common + ["--batch", "1", "--reps", "3", "--impls", "gd,graphs,eager"]),
            Row("ADM-64 b64", adm64 + common + ["--batch", "64", "--reps", "2", "--impls", "gd,graphs"])]


# -- running commands --------------------------------------------------------------------------

@dataclass
class Ran:
    argv: list[str]
    rc: int | None          # None: killed at its time limit
    seconds: float
    log: Path

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def error_line(self) -> str:
        """The line that says what went wrong: the last error-looking line of the log, else its last line."""
        lines = [ln.strip() for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
        if self.rc is None:
            last = [ln for ln in lines if not ln.startswith(("$ ", "[gpu_check:"))]
            why = "interrupted" if lines and lines[-1].startswith("[gpu_check: interrupted") else "stopped at its time limit"
            return f"{why} after {self.seconds:.0f} s" + (f" (last: {last[-1][:200]})" if last else "")
        pattern = re.compile(r"(Error|error:|Exception|FAILED|Traceback|^admrt[\w -]*: |CUDA|Killed)")
        hits = [ln for ln in lines if pattern.search(ln) and not ln.startswith("$ ")]
        line = (hits or lines or [f"exit code {self.rc}, no output"])[-1]
        return f"exit code {self.rc}: {line[:300]}"


_LIVE: set[subprocess.Popen] = set()   # the commands running now (stages side by side run two at once)
_LIVE_LOCK = threading.Lock()
_STOPPING = threading.Event()           # set on Ctrl-C / SIGTERM: every command is being stopped


def run(argv: list[str], log: Path, timeout: float, env: dict | None = None) -> Ran:
    """Run argv with stdout and stderr appended to log, killed with its whole process group at timeout
    (or when the check is interrupted: rc None then too)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log, "ab") as f:
        f.write(f"$ {shlex.join(argv)}\n".encode())
        f.flush()
        if _STOPPING.is_set():   # interrupted: a stage's next command does not start
            f.write(b"[gpu_check: interrupted, not started]\n")
            return Ran(argv, None, 0.0, log)
        try:
            proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                    env=None if env is None else {**os.environ, **env})
        except OSError as exc:   # e.g. a program that was not built: that command fails, not the check
            f.write(f"gpu_check: cannot start {argv[0]}: {exc}\n".encode())
            return Ran(argv, 127, time.monotonic() - start, log)
        with _LIVE_LOCK:
            _LIVE.add(proc)
        try:
            rc = proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc = None
            f.write(f"\n[gpu_check: killed at its time limit, {timeout:.0f} s]\n".encode())
        except BaseException:   # Ctrl-C in this thread: the command goes with the check
            _kill_group(proc)
            raise
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(proc)
        if _STOPPING.is_set():
            rc = None
            f.write(b"\n[gpu_check: interrupted]\n")
    return Ran(argv, rc, time.monotonic() - start, log)


def _stop_all() -> None:
    """Stop every running command: their own sessions do not get the terminal's Ctrl-C."""
    _STOPPING.set()
    with _LIVE_LOCK:
        live = list(_LIVE)
    for proc in live:
        _kill_group(proc)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the command's process group, then SIGKILL to whatever of it is left (a child that
    ignores SIGTERM must not run on into a timed stage)."""
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass


# -- the check ---------------------------------------------------------------------------------

class Check:
    """The run's state: where things go, the deadline, and the results written as stages end."""

    def __init__(self, out: Path, work: Path, dry: bool, total: float):
        self.out, self.work, self.dry = out, work, dry
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.device = "cpu" if dry else "cuda"
        self.deadline = time.monotonic() + total
        self.lock = threading.Lock()
        self.result = {"dry_run": dry, "started": _now(), "total_s": total, "env": {}, "stages": {}}
        self.write()   # at once: files an earlier run left in --out never stand for this one

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def python(self, code: str, log_name: str, timeout: float = 60) -> str | None:
        """Run a snippet in a fresh interpreter; its stdout's last line, or None where it failed."""
        log = self.logs / log_name
        try:
            proc = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            log.write_text(f"gpu_check: stopped after {timeout} s\n")
            return None
        log.write_text(proc.stdout + proc.stderr)
        lines = proc.stdout.strip().splitlines()
        return lines[-1] if proc.returncode == 0 and lines else None

    def record(self, name: str, result: dict) -> None:
        with self.lock:
            self.result["stages"][name] = result
            self.write()

    def write(self) -> None:
        """gpu_check.json, gpu_check.md and logs.tgz under $OUT, each replaced atomically."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.result["updated"] = _now()
        _replace(self.out / "gpu_check.json", lambda p: p.write_text(json.dumps(self.result, indent=1, default=str)))
        _replace(self.out / "gpu_check.md", lambda p: p.write_text(markdown(self.result)))

        def tar(path):
            with tarfile.open(path, "w:gz") as t:
                # os.walk skips what vanishes under it: a stage running beside this one writes meanwhile
                for folder, dirs, files in os.walk(self.work):
                    dirs[:] = sorted(d for d in dirs if d not in ("cache", "package"))
                    for name in sorted(files):
                        f = Path(folder, name)
                        try:   # read first, then add: a file replaced meanwhile cannot misalign the archive
                            if f.suffix in (".log", ".json", ".md", ".txt") and f.stat().st_size < 8 << 20:
                                data = f.read_bytes()
                            else:
                                continue
                        except OSError:
                            continue
                        info = tarfile.TarInfo(str(f.relative_to(self.work)))
                        info.size, info.mtime = len(data), int(time.time())
                        t.addfile(info, io.BytesIO(data))
        _replace(self.out / "logs.tgz", tar)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _replace(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    tmp.replace(path)


# -- stages --------------------------------------------------------------------------------------

ENV_SNIPPET = """
import json, platform, torch
env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
try:
    import triton; env["triton"] = triton.__version__
except ImportError:
    env["triton"] = None
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    env.update(device=p.name, capability="%d.%d" % (p.major, p.minor), multiprocessors=p.multi_processor_count,
               memory_gib=round(p.total_memory / 2**30, 1))
else:
    import os
    env["device"] = "cpu (%d cores)" % os.cpu_count()
print(json.dumps(env))
"""


def environment(check: Check) -> dict:
    """Device, driver and versions (nvidia-smi and torch), for every call whether it builds or not."""
    try:
        env = json.loads(check.python(ENV_SNIPPET, "env.log") or "{}")
    except json.JSONDecodeError:
        env = {}
    if _gpu_present():
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True)
        if smi.returncode == 0:
            env["nvidia_smi"] = smi.stdout.strip()
    return env


def build(check: Check, box: float) -> dict:
    """pip install -e . (CMake builds the C++ core with nvcc for this GPU's architecture only)."""
    env = check.result["env"]
    probe = "import admrt.core as c, admrt.engine as e; print(c.built_with_cuda(), e.sample_program)"
    if check.dry:
        have = check.python(probe, "build_probe.log")
        if have is None:
            return {"status": "failed", "summary": "admrt.core does not import here: run scripts/install.sh first"}
        return {"status": "skipped", "summary": "dry run: this machine's installed build is used (built with CUDA: "
                                                f"{have.split()[0]})"}
    arch = env.get("capability", "9.0")
    ran = run([PY, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", "--no-index", "--no-cache-dir",
               "--disable-pip-version-check", "-e", "."],
              check.logs / "build.log", box, env={"ADMRT_CUDA_ARCH_LIST": arch})
    if not ran.ok:
        return {"status": "failed", "seconds": ran.seconds, "summary": f"build failed: {_first_build_error(ran)}",
                "log_tail": _tail(ran.log, 40)}
    have = check.python(probe, "build_probe.log")
    if have is None or not have.startswith("True"):
        return {"status": "failed", "seconds": ran.seconds,
                "summary": f"built, but admrt.core {'does not import' if have is None else 'has no CUDA'} "
                           f"(build_probe.log)"}
    return {"status": "ok", "seconds": ran.seconds, "summary": f"built for sm_{arch.replace('.', '')} in "
                                                               f"{ran.seconds:.0f} s"}


def _first_build_error(ran: Ran) -> str:
    """The compiler's or CMake's first error (pip's own closing lines only say that a subprocess failed)."""
    pattern = re.compile(r"(CMake Error|fatal error|error:|Error \d|undefined reference)", re.IGNORECASE)
    for line in ran.log.read_text(errors="replace").splitlines():
        if pattern.search(line) and "subprocess-exited-with-error" not in line:
            return line.strip()[:300]
    return ran.error_line()


def _tail(path: Path, n: int) -> list[str]:
    return path.read_text(errors="replace").splitlines()[-n:]


PYTEST_LINE = re.compile(r"(?:^|\s)(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)(?:\s|$)")
NODE_ID = re.compile(r"(tests/\S+::\S+)")


def pytest_outcomes(text: str) -> dict:
    """Per-test outcomes from `pytest -v` output (plain or xdist lines), as they were printed, and the
    short summary's reasons for the failures."""
    outcomes, reasons = {}, {}
    for line in text.splitlines():
        node, word = NODE_ID.search(line), PYTEST_LINE.search(line)
        if not node or not word:
            continue
        if line.startswith(("FAILED ", "ERROR ")):       # the short summary: "FAILED id - reason"
            reasons[node.group(1)] = line.split(" - ", 1)[1][:300] if " - " in line else ""
        elif node.group(1) not in outcomes or word.group(1) == "ERROR":
            outcomes[node.group(1)] = word.group(1)
    counts = {}
    for word in outcomes.values():
        counts[word.lower()] = counts.get(word.lower(), 0) + 1
    failures = [{"test": t, "outcome": w, "reason": reasons.get(t, "")} for t, w in outcomes.items()
                if w in ("FAILED", "ERROR")]
    return {"counts": counts, "failures": failures}


def correctness(check: Check, box: float) -> dict:
    """The GPU-marked tests of GPU_TESTS; on CPU (--dry-run) only collected."""
    base = [PY, "-m", "pytest", "-p", "no:cacheprovider", "--continue-on-collection-errors", "-m", "gpu", *GPU_TESTS]
    if check.dry:
        ran = run(base + ["--collect-only", "-q"], check.logs / "correctness.log", box)
        found = re.search(r"(\d+)(?:/\d+)? tests? collected", ran.log.read_text())
        if not ran.ok or not found:
            return {"status": "failed", "summary": f"the GPU tests do not collect: {ran.error_line()}"}
        return {"status": "skipped", "collected": int(found.group(1)),
                "summary": f"dry run: {found.group(1)} GPU tests collected, not run (no CUDA)"}
    extra = ["-v", "-rfE", "--tb=short"]
    if _importable("xdist"):
        extra += ["-n", "6"]          # the AOTI and Inductor compiles are CPU work: 16 cores
    if _importable("pytest_timeout"):   # under the box, so a hung test is named; a thread also stops a CUDA call
        extra += ["--timeout", "120", "--timeout-method", "thread"]
    ran = run(base + extra, check.logs / "correctness.log", box, env={"COLUMNS": "300"})   # whole failure reasons
    text = ran.log.read_text(errors="replace")
    out = pytest_outcomes(text)
    total = (re.search(r"(\d+) selected", text) or re.search(r"workers \[(\d+) items", text)
             or re.search(r"collected (\d+) items", text))
    out["collected"] = int(total.group(1)) if total else None
    c = out["counts"]
    done = sum(c.values())
    broken = c.get("failed", 0) + c.get("error", 0)
    status = ("failed" if broken else "timeout" if ran.rc is None else
              "ok" if ran.ok and c.get("passed") else "failed")
    words = ", ".join(f"{v} {k}" for k, v in sorted(c.items())) or "no test finished"
    summary = f"{words} of {out['collected'] or '?'}"
    if ran.rc is None:
        summary += f" (stopped at {box:.0f} s)"
    elif not done:
        summary += f": {ran.error_line()}"
    return {"status": status, "seconds": ran.seconds, "summary": summary, **out}


def _importable(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def smoke(check: Check, box: float) -> dict:
    """Each user-facing GPU path, as a user runs it, on the bundled models: ok or failed with its error.
    The compiled paths run without the upsampler (the base model's UNet code again: half the compile
    time); their images are compared with the default path's without the upsampler."""
    w, dev = check.work / "smoke", check.device
    admrt = [PY, "-m", "admrt.cli"]
    env = {"ADMRT_CACHE_DIR": str(w / "cache")}          # a cold cache: the first-run path
    small = ["--num", "4", "--no-progress"]
    if check.dry:  # the default path only, on CPU: eager, two steps a stage
        small = ["--num", "2", "--no-progress", "--backend", "eager", "--steps", "ddim2", "--upsampler-steps", "ddim2"]
    program = check.python("import admrt.engine as e; print(e.sample_program)", "smoke_program.log") or "admrt-sample"
    default, compiled, aoti = ("admrt sample (default)", "admrt sample --backend compile",
                               "admrt export aoti --device cuda + admrt-sample")
    items = {   # name -> (folder, commands run in turn)
        default: ("default", [admrt + ["sample", "--device", dev, "--out", str(w / "default")] + small,
                              admrt + ["sample", "--device", dev, "--upsampler", "none", "--out", str(w / "base")]
                              + small]),
        compiled: ("compile", [admrt + ["sample", "--device", dev, "--backend", "compile", "--upsampler", "none",
                                        "--out", str(w / "compile")] + small]),
        aoti: ("aoti", [admrt + ["export", "aoti", "--device", dev, "--upsampler", "none", "--out", str(w / "package")],
                        [program, "--package", str(w / "package"), "--out", str(w / "aoti"), "--num", "4",
                         "--no-progress"]]),
    }
    todo = [default] if check.dry else list(items)
    results = {k: {"status": "skipped", "line": "needs CUDA"} for k in items}

    def one(name):
        folder, commands = items[name]
        start = time.monotonic()
        try:
            for argv in commands:
                ran = run(argv, check.logs / f"smoke_{folder}.log", box - (time.monotonic() - start), env=env)
                if not ran.ok:
                    return {"status": "failed", "seconds": time.monotonic() - start, "line": ran.error_line()}
        except Exception as exc:   # this path fails, the others still report
            return {"status": "failed", "seconds": time.monotonic() - start,
                    "line": f"gpu_check.py: {type(exc).__name__}: {exc}"}
        return {"status": "ok", "seconds": time.monotonic() - start, "line": "ok"}

    with concurrent.futures.ThreadPoolExecutor(len(todo)) as pool:
        for name, res in zip(todo, pool.map(one, todo)):
            results[name] = res
    diff = check.python(IMAGE_DIFF.format(folder=str(w), names=["default", "compile", "aoti"], reference="base"),
                        "smoke_images.log")
    diffs = json.loads(diff) if diff else {}
    for name, res in results.items():
        d = diffs.get(items[name][0])
        if res["status"] != "ok" or d is None:
            continue
        res["images"] = d
        res["line"] = f"{d['images']} images"
        if "max_abs_vs_default" in d:
            res["line"] += f", at most {d['max_abs_vs_default']} uint8 levels from the default path's"
            if d["max_abs_vs_default"] > MAX_LEVELS_FROM_DEFAULT:
                res["status"] = "failed"
                res["line"] += f" (more than {MAX_LEVELS_FROM_DEFAULT})"
    bad = [k for k, r in results.items() if r["status"] == "failed"]
    skipped = len(items) - len(todo)
    summary = (f"{len(bad)} of {len(todo)} failed: " + "; ".join(f"{k}: {results[k]['line']}" for k in bad) if bad
               else f"{len(todo)} of {len(items)} ran ok" + (f" ({skipped} need CUDA)" if skipped else ""))
    return {"status": "failed" if bad else "ok", "summary": summary, "paths": results}


# A compiled path's images may differ from eager's by rounding (a level or two after many steps);
# more than this is a wrong result, not rounding.
MAX_LEVELS_FROM_DEFAULT = 8

IMAGE_DIFF = """
import json, numpy as np, pathlib
def images(name):
    files = sorted(pathlib.Path({folder!r}, name).glob("samples_*.npz"))
    return np.load(files[0])["arr_0"].astype(np.int16) if files else None
out = {{}}
ref = images({reference!r})
for name in {names!r}:
    x = images(name)
    if x is None:
        continue
    out[name] = {{"images": int(x.shape[0]), "shape": list(x.shape)}}
    if name != "default" and ref is not None and x.shape == ref.shape:
        out[name]["max_abs_vs_default"] = int(np.abs(x - ref).max())
print(json.dumps(out))
"""


def throughput(check: Check, box: float) -> dict:
    """`admrt bench` per row of throughput_rows, each in its own process, by priority, inside the box."""
    folder = check.work / "throughput"
    start = time.monotonic()
    rows = {}
    for row in throughput_rows(check.dry):
        left = box - (time.monotonic() - start)
        if left < 20:
            rows[row.name] = {"status": "skipped", "line": f"no time left in the stage's {box:.0f} s"}
            continue
        slug = row.name.replace(" ", "_")
        ran = run([PY, "-m", "admrt.cli", "bench", *row.args, "--out", str(folder / slug)],
                  check.logs / f"throughput_{slug}.log", left)
        path = next((folder / slug).glob("sampling_*.json"), None)   # the one file `admrt bench --out` writes
        if not ran.ok or path is None:
            rows[row.name] = {"status": "failed" if ran.rc is not None else "timeout", "line": ran.error_line(),
                              "seconds": ran.seconds}
            continue
        res = json.loads(path.read_text())
        rows[row.name] = {"status": "ok", "seconds": ran.seconds, "file": path.name, "result": res,
                          "line": _row_line(res)}
        failed = [r["impl"] for r in res["rows"] if "error" in r]
        if failed:
            rows[row.name].update(status="failed", line=f"{', '.join(failed)} failed; " + rows[row.name]["line"])
    bad = [k for k, r in rows.items() if r["status"] == "failed"]
    done = [k for k, r in rows.items() if r["status"] == "ok"]
    status = "failed" if bad else ("ok" if len(done) == len(rows) else "partial")   # a cut row measured nothing
    summary = "; ".join(f"{k}: {r['line']}" for k, r in rows.items())
    return {"status": status, "summary": summary, "rows": rows}


def _row_line(res: dict) -> str:
    """'admrt + graphs 1.1 images/s, 2.31x guided-diffusion, 31.0% of the 790 TFLOP/s matmul rate'."""
    ours = report._best_admrt(res)
    if ours is None:
        return "no admrt row"
    text = f"{ours['impl']} {ours['images_per_s']:.3g} images/s"
    if ours.get("speedup_vs_reference") is not None:
        text += f", {ours['speedup_vs_reference']:.2f}x guided-diffusion"
    if ours.get("pct_of_matmul_peak") is not None:
        text += f", {ours['pct_of_matmul_peak']:.1f}% of the {res['matmul_tflops']:.3g} TFLOP/s matmul rate"
    return text


def kernels(check: Check, box: float) -> dict:
    """bench/bench_kernels.py inside the box (it starts no row after --time-limit, and rewrites its JSON
    after every row); the targets from the rows it measured."""
    out = check.work / "kernels.json"
    argv = [PY, "bench/bench_kernels.py", "--out", str(out), "--time-limit", f"{max(box - 25, 5):.0f}"]
    env = None
    if check.dry:
        argv += ["--smoke"]
        env = {"TRITON_INTERPRET": "1"}
    else:
        argv += ["--rep", "20", "--graph-rep", "10"]
    ran = run(argv, check.logs / "kernels.log", box, env=env)
    if not out.exists():
        return {"status": "failed" if ran.rc is not None else "timeout", "summary": ran.error_line()}
    res = json.loads(out.read_text())
    targets = res.get("targets") or []
    met = sum(1 for t in targets if t.get("met") is True)
    missed = [t["target"] for t in targets if t.get("met") is False]
    status = "ok" if ran.ok and res.get("complete") else ("failed" if ran.rc is not None else "partial")
    summary = (f"{len(res.get('results', []))} rows, {len(res.get('skipped', []))} skipped by the time limit; "
               f"targets met {met} of {len(targets)}" + (f", missed: {', '.join(missed)}" if missed else ""))
    if not ran.ok:
        summary += f"; {ran.error_line()}"
    return {"status": status, "seconds": ran.seconds, "summary": summary, "targets": targets,
            "copy_gbs": res.get("copy_gbs"), "bare_launch_us": res.get("bare_launch_us"), "rows": res.get("results", []),
            "skipped_rows": res.get("skipped", [])}


def profile(check: Check, box: float) -> dict:
    """bench/profile_step.py: the captured step by kernel category (ADM-256 b64, fp16, the default engine)."""
    folder = check.work / "profile"
    if check.dry:
        args = ["--preset", "tiny-cond", "--classifier", "tiny-classifier", "--batch", "2", "--steps", "ddim2",
                "--dtype", "fp32", "--reps", "1", "--device", "cpu"]
    else:   # ten steps: the per-step profile of DDIM-25 at 40% of the loop's cost
        args = ["--preset", "imagenet256-cond", "--classifier", "imagenet256-classifier", "--batch", "64",
                "--steps", "ddim10", "--dtype", "fp16", "--reps", "2"]
    ran = run([PY, "bench/profile_step.py", *args, "--backend", "eager", "--out", str(folder)],
              check.logs / "profile.log", box)
    files = sorted(folder.glob("profile_*.json"))
    if not ran.ok or not files:
        return {"status": "failed" if ran.rc is not None else "timeout", "summary": ran.error_line()}
    res = json.loads(files[0].read_text())
    top = ", ".join(f"{r['category']} {r['pct_of_step']:.0f}%" for r in res["categories"][:4])
    return {"status": "ok", "seconds": ran.seconds, "result": res, "markdown": files[0].with_suffix(".md").read_text(),
            "summary": f"step {res['step_ms']:.1f} ms: {top}"}


@dataclass
class Stage:
    name: str
    box_s: float
    expected_s: float     # on an H200 (not yet measured: bench/README.md says how each was estimated)
    run: Callable[[Check, float], dict]
    min_s: float = 15     # with less left, the stage is skipped rather than started and cut


# By priority. The boxes add up to more than --total: a stage gets its box or what is left of the
# total, so on an H200 as estimated the profile gets what the others leave (often nothing: then
# `--stages profile` in a second call).
STAGES = [Stage("build", 150, 60, build, min_s=60), Stage("correctness", 140, 140, correctness, min_s=30),
          Stage("smoke", 140, 120, smoke, min_s=30), Stage("throughput", 240, 235, throughput, min_s=60),
          Stage("kernels", 60, 60, kernels, min_s=30), Stage("profile", 60, 50, profile, min_s=40)]
SIDE_BY_SIDE = ("correctness", "smoke")


def run_stage(check: Check, stage: Stage) -> dict:
    box = min(stage.box_s, check.left())
    if box < stage.min_s:
        result = {"status": "skipped", "summary": f"{max(box, 0):.0f} s left of the check's "
                                                  f"{check.result['total_s']:.0f} s; it needs {stage.min_s:.0f}"}
    else:
        print(f"== {stage.name}: up to {box:.0f} s", flush=True)
        start = time.monotonic()
        try:
            result = stage.run(check, box)
        except Exception as exc:   # a bug in a stage is that stage's failure; the next stages still run
            result = {"status": "failed", "summary": f"gpu_check.py: {type(exc).__name__}: {exc}"}
        result.setdefault("seconds", time.monotonic() - start)
        result["wall_s"] = time.monotonic() - start
    result["box_s"] = round(max(box, 0), 1)   # the box that applied: its own, or what was left
    check.record(stage.name, result)
    print(f"== {stage.name}: {result['status']}: {result['summary']}", flush=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/gpu_check.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true",
                   help="on CPU: every stage's code path that runs without CUDA; says which stages it skipped")
    p.add_argument("--stages", default=",".join(s.name for s in STAGES),
                   help="comma-separated stages to run, in priority order regardless (build is added when admrt "
                        "does not import; name it after changing C++ on a warm machine)")
    p.add_argument("--total", type=float, default=480, help="seconds for the whole check (default 480)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default $OUT, else a new temporary one)")
    p.add_argument("--work", type=Path, default=None,
                   help="scratch folder outside --out (default: a new folder under /tmp)")
    args = p.parse_args(argv)
    names = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [n for n in names if n not in {s.name for s in STAGES}]
    if unknown or not names:
        p.error(f"--stages={args.stages!r}: expected some of {[s.name for s in STAGES]}")
    if args.total <= 0:
        p.error(f"--total={args.total}: expected a positive number of seconds")
    if not args.dry_run and not _gpu_present():
        p.error("no GPU here (nvidia-smi lists none): run it on the GPU machine, or pass --dry-run")
    out = (args.out or Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="gpu-check-out-"))).resolve()
    work = (args.work or Path(tempfile.mkdtemp(prefix="gpu-check-work-"))).resolve()
    if work == out or work.is_relative_to(out):
        p.error(f"--work={args.work}: must be outside --out ({out}): only three files go back from there")
    if work.exists() and (not work.is_dir() or any(work.iterdir())):
        p.error(f"--work={args.work}: expected a new or empty folder (an earlier check's run folders and results "
                "there would be taken for this one's)")
    signal.signal(signal.SIGTERM, _interrupt)   # the device tool's limit, a scheduler: as Ctrl-C
    check = Check(out, work, args.dry_run, args.total)
    check.result["env"].update(environment(check))
    if "build" not in names and check.python("import admrt.core; print('ok')", "import_probe.log") is None:
        names.insert(0, "build")
    print(f"gpu_check: {'dry run, ' if args.dry_run else ''}stages {', '.join(names)} within {args.total:.0f} s; "
          f"results in {out}, scratch in {work}", flush=True)
    chosen = [s for s in STAGES if s.name in names]
    skipped = [s.name for s in STAGES if s.name not in names]
    for name in skipped:
        check.result["stages"][name] = {"status": "skipped", "summary": "not chosen (--stages)"}
    groups: list[list[Stage]] = []   # one stage each, but correctness and smoke side by side
    for s in chosen:
        if groups and s.name in SIDE_BY_SIDE and groups[-1][-1].name in SIDE_BY_SIDE:
            groups[-1].append(s)
        else:
            groups.append([s])
    try:
        for k, group in enumerate(groups):
            with concurrent.futures.ThreadPoolExecutor(len(group)) as pool:
                futures = [pool.submit(run_stage, check, s) for s in group]
                try:
                    results = [f.result() for f in futures]
                except BaseException:
                    _stop_all()   # the side-by-side stage's commands too, before the pool waits for it
                    raise
            if group[0].name == "build" and results[0]["status"] == "failed":
                for s in (s for g in groups[k + 1:] for s in g):
                    check.record(s.name, {"status": "skipped", "summary": "the build failed", "box_s": 0})
                break
    except KeyboardInterrupt:
        _stop_all()
        for s in chosen:
            check.result["stages"].setdefault(s.name, {"status": "interrupted", "summary": "interrupted (Ctrl-C or "
                                                       "SIGTERM) before it ended", "box_s": 0})
        check.result["interrupted"] = _now()
        check.write()
        print(f"gpu_check: interrupted; what the stages measured before is in {out}", file=sys.stderr, flush=True)
        return 130
    check.result["finished"] = _now()
    check.write()
    print(markdown(check.result), flush=True)
    return 0 if all(r["status"] in ("ok", "skipped", "partial") for r in check.result["stages"].values()) else 1


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _gpu_present() -> bool:
    return shutil.which("nvidia-smi") is not None and subprocess.run(["nvidia-smi", "-L"],
                                                                      capture_output=True).returncode == 0


# -- the summary ---------------------------------------------------------------------------------

def markdown(result: dict) -> str:
    env = result.get("env", {})
    lines = [f"# GPU check{' (dry run on CPU: nothing here was measured on a GPU)' if result['dry_run'] else ''}",
             "", f"{env.get('device', '?')}" + (f" (sm {env['capability']})" if env.get("capability") else "") +
             f", torch {env.get('torch', '?')}, CUDA {env.get('cuda')}, triton {env.get('triton')}, "
             f"Python {env.get('python', '?')}; started {result['started']}"
             + (f"; nvidia-smi: {env['nvidia_smi']}" if env.get("nvidia_smi") else "") + ".", "",
             *([f"**Interrupted** at {result['interrupted']}: the stages below stopped there.", ""]
               if result.get("interrupted") else []),
             "| stage | status | s (box, expected) | result |", "|---|---|---|---|"]
    for stage in STAGES:
        r = result["stages"].get(stage.name)
        if r is None:
            lines.append(f"| {stage.name} | not reached | | |")
            continue
        secs = f"{r['wall_s']:.0f} ({r['box_s']:.0f}, {stage.expected_s:.0f})" if "wall_s" in r else ""
        lines.append(f"| {stage.name} | {r['status']} | {secs} | {_cell(r['summary'])} |")
    corr = result["stages"].get("correctness", {})
    if corr.get("failures"):
        lines += ["", "## Failing tests", ""]
        lines += [f"- `{f['test']}` {f['outcome']}: {_cell(f['reason'])}" for f in corr["failures"]]
    sm = result["stages"].get("smoke", {})
    if sm.get("paths"):
        lines += ["", "## User paths", ""] + [f"- {k}: {v['status']}: {_cell(v['line'])}" for k, v in sm["paths"].items()]
    tp = result["stages"].get("throughput", {})
    if tp.get("rows"):
        runs = [row["result"] for row in tp["rows"].values() if "result" in row]
        lines += ["", "## Throughput (guided, alternating rounds, median)", ""]
        lines += [report.table(runs)] if runs else []
        lines += [f"- {name}: {row['status']}: {_cell(row['line'])}" for name, row in tp["rows"].items()
                  if "result" not in row]
    kn = result["stages"].get("kernels", {})
    if kn.get("targets"):
        lines += ["", "## Kernel targets", ""]
        lines += [f"- {({True: 'met', False: '**not met**', None: 'n/a'})[t.get('met')]}: {t['text']}"
                  + (f" ({t['metric']} = {report._fmt(t['value'], '{:.3g}')}, {t.get('decided_by')})"
                     if "value" in t else "")
                  for t in kn["targets"]]
    pr = result["stages"].get("profile", {})
    if pr.get("markdown"):
        lines += ["", "## Step profile", "", pr["markdown"]]   # profile_step.py's own
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


if __name__ == "__main__":
    sys.exit(main())
