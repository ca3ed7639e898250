"""Latency under load of `admrt serve`: step batching against static (request-level) batching.

Open-loop Poisson arrivals (as vLLM's benchmark_serving: a closed-loop client waits for its
previous answer and so hides the tail), the same request stream for both modes:

 1. latency alone: single requests one after another (static and step are the same then);
 2. static batching's maximum throughput: a burst of requests at t = 0, images / makespan;
 3. for each load in --loads (fractions of that maximum): Poisson arrivals at that rate, each
    request n images of a random class, against a server in each mode (A B A B: the modes
    alternate per load); p50 / p95 / p99 latency, throughput, SLO attainment (SLO: 3x the
    latency alone);
 4. step batching's maximum throughput (the same burst);
 5. a burst of 10x capacity (--max-queue x 10 images): every request must be answered 200 or 503,
    none lost or hanging, and the server still healthy.

Each server is `admrt serve` in its own process (the models as `admrt sample` takes them, here its
defaults: the bundled stack). Writes OUT/results.json, OUT/README.md (table) and OUT/p99_vs_load.png.

    python bench/serve_load.py --out bench/results/serve_cpu
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, mode: str, args):
        self.port = free_port()
        cmd = [sys.executable, "-m", "admrt.cli", "serve", "--batching", mode, "--port", str(self.port),
               "--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue), "--log-level", "warning"]
        cmd += args.serve_args.split() if args.serve_args else []
        self.log = open(Path(args.out) / f"server_{mode}.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server ({mode}) exited with {self.proc.returncode}; see {self.log.name}")
            try:
                status, _, _ = request(self.port, "GET", "/ready", timeout=2)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"server ({mode}) not ready within 600 s")

    def metrics(self) -> str:
        return request(self.port, "GET", "/metrics")[2].decode()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9


def request(port: int, method: str, path: str, body=None, timeout: float = 600):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def run_stream(port: int, arrivals: list[float], bodies: list[dict]) -> list[dict]:
    """Sends bodies[i] at arrivals[i] seconds from now (open loop, one thread per request)."""
    results = [None] * len(bodies)
    start = time.perf_counter()

    def send(i):
        delay = start + arrivals[i] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        t0 = time.perf_counter()
        try:
            status, headers, _ = request(port, "POST", "/v1/images/generations", bodies[i])
        except OSError as exc:
            status, headers = f"error: {exc}", {}
        results[i] = {"status": status, "sent": t0 - start, "latency": time.perf_counter() - t0,
                      "images": bodies[i]["n"]}

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def summarize(results: list[dict], slo: float) -> dict:
    ok = [r for r in results if r["status"] == 200]
    lat = np.array([r["latency"] for r in ok]) if ok else np.array([np.nan])
    span = max(r["sent"] + r["latency"] for r in results) - min(r["sent"] for r in results)
    return {"requests": len(results), "ok": len(ok), "rejected_503": sum(r["status"] == 503 for r in results),
            "other": sum(r["status"] not in (200, 503) for r in results),
            "p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
            "p99": float(np.percentile(lat, 99)), "mean": float(lat.mean()),
            "throughput_images_s": sum(r["images"] for r in ok) / span,
            "slo_attainment": float(np.mean([r["status"] == 200 and r["latency"] <= slo for r in results]))}


def bodies_for(n_requests: int, images: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"class_label": rng.randrange(10), "n": images, "seed": rng.randrange(2 ** 31),
             "response_format": "b64_json"} for _ in range(n_requests)]


def burst(port: int, n_requests: int, images: int, seed: int) -> dict:
    results = run_stream(port, [0.0] * n_requests, bodies_for(n_requests, images, seed))
    return summarize(results, float("inf"))


def step_scaling(serve_args: str, slots=(1, 2, 4, 8, 16), repeats: int = 10) -> dict:
    """Milliseconds of one step of each stage with m occupied slots (in this process, the models
    `admrt serve` would load): whether a batch costs about the same as one image (step batching
    then pays off) or about m times as much (a compute-bound CPU)."""
    from admrt.engine.serve import add_arguments, build_batcher

    ap = argparse.ArgumentParser()
    add_arguments(ap)
    found = {}
    for m in slots:
        args = ap.parse_args(serve_args.split() + ["--max-batch", str(m), "--batching", "static"])
        batcher, num_classes = build_batcher(args)
        labels = [i % (num_classes or 1) for i in range(m)] if num_classes else []
        batcher.submit(labels, [], [1], None if labels else m, "")
        times, stage = {"base": [], "upsampler": []}, "base"
        while batcher.busy:
            start = time.perf_counter()
            batcher.iterate()
            elapsed = time.perf_counter() - start
            st = batcher.stats()
            stage = "upsampler" if st["upsampler_slots"] and not st["base_slots"] else "base"
            times[stage].append(elapsed)
        found[str(m)] = {k: 1000 * float(np.median(v[2:2 + repeats])) for k, v in times.items() if len(v) > 2}
    return found


def environment() -> dict:
    import torch

    import admrt
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": f"cpu: {cpu}, {os.cpu_count()} cores",
            "admrt": admrt.__version__, "torch": torch.__version__, "python": platform.python_version()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/serve_cpu")
    ap.add_argument("--loads", default="0.3,0.5,0.7,0.9")
    ap.add_argument("--requests", type=int, default=40, help="requests per load and mode")
    ap.add_argument("--images", type=int, default=1, help="images per request (n)")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-queue", type=int, default=64)
    ap.add_argument("--burst-requests", type=int, default=48, help="requests of the maximum-throughput burst")
    ap.add_argument("--serve-args", default="", help="more `admrt serve` options (models, --steps, --device)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report-only", action="store_true", help="rewrite OUT/README.md and the plot from OUT/results.json")
    ap.add_argument("--scaling-only", action="store_true", help="measure only the step time by occupied slots "
                                                                  "(added to OUT/results.json)")
    args = ap.parse_args()
    out = Path(args.out)
    if args.scaling_only:
        report = json.loads((out / "results.json").read_text())
        report["step_ms_by_slots"] = step_scaling(args.serve_args)
        (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
        write_report(report, out)
        return 0
    if args.report_only:
        write_report(json.loads((out / "results.json").read_text()), out)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    loads = [float(x) for x in args.loads.split(",")]
    report = {"environment": environment(), "settings": vars(args), "loads": {}}

    def save():
        (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")

    report["step_ms_by_slots"] = step_scaling(args.serve_args)
    save()
    static = Server("static", args)
    try:
        alone = [run_stream(static.port, [0.0], bodies_for(1, args.images, 1000 + i))[0]["latency"] for i in range(5)]
        report["latency_alone_s"] = float(np.median(alone))
        report["latency_alone_spread_s"] = [float(min(alone)), float(max(alone))]
        slo = 3 * report["latency_alone_s"]
        report["slo_s"] = slo
        report["static_max"] = burst(static.port, args.burst_requests, args.images, 1)
        save()
        print(f"alone {report['latency_alone_s']:.2f} s; static max {report['static_max']['throughput_images_s']:.2f} "
              "images/s", flush=True)
    finally:
        static.stop()
    capacity = report["static_max"]["throughput_images_s"]

    servers = {}
    try:
        for mode in ("static", "step"):
            servers[mode] = Server(mode, args)
            # Each server process's own speed (on this VM two processes can differ by up to ~1.5x):
            times = [run_stream(servers[mode].port, [0.0], bodies_for(1, args.images, 2000 + i))[0]["latency"]
                     for i in range(3)]
            report.setdefault("latency_alone_by_server_s", {})[mode] = float(np.median(times))
        for i, load in enumerate(loads):
            rate = load * capacity / args.images  # requests per second
            rng = np.random.default_rng(args.seed + i)
            arrivals = list(np.cumsum(rng.exponential(1 / rate, args.requests)) - 0.0)
            bodies = bodies_for(args.requests, args.images, args.seed + i)
            row = {"rate_requests_s": rate}
            order = ("static", "step") if i % 2 == 0 else ("step", "static")  # A B, then B A
            for mode in order:
                row[mode] = summarize(run_stream(servers[mode].port, arrivals, bodies), slo)
                print(f"load {load}: {mode} p99 {row[mode]['p99']:.2f} s, {row[mode]['throughput_images_s']:.2f} "
                      "images/s", flush=True)
            report["loads"][str(load)] = row
            save()
        report["step_max"] = burst(servers["step"].port, args.burst_requests, args.images, 1)
        save()
        # 10x capacity at once: every request answered (200 or 503), none lost or hanging.
        n_burst = 10 * args.max_queue // args.images
        results = run_stream(servers["step"].port, [0.0] * n_burst, bodies_for(n_burst, args.images, 7))
        healthy = request(servers["step"].port, "GET", "/health")[0] == 200
        report["overload_burst"] = {"requests": n_burst, "ok": sum(r["status"] == 200 for r in results),
                                    "rejected_503": sum(r["status"] == 503 for r in results),
                                    "other": [r["status"] for r in results if r["status"] not in (200, 503)],
                                    "healthy_after": healthy}
        save()
    finally:
        report["exit_codes_after_sigterm"] = {mode: s.stop() for mode, s in servers.items()}
        save()
    write_report(report, out)
    return 0


def targets(report: dict) -> list[tuple[bool, str]]:
    """The issue's targets, decided from the measurements: (met, what was measured)."""
    found = []
    row = report["loads"].get("0.7")
    if row:
        st, sp = row["static"]["p99"], row["step"]["p99"]
        found.append((sp <= 0.5 * st, f"at 0.7 load, step p99 {sp:.2f} s <= 0.5x static p99 {st:.2f} s "
                                      f"(ratio {sp / st:.2f})"))
        found.append((sp <= 2 * report["latency_alone_s"], f"at 0.7 load, step p99 {sp:.2f} s <= 2x the latency "
                                                           f"alone {report['latency_alone_s']:.2f} s "
                                                           f"(ratio {sp / report['latency_alone_s']:.2f})"))
    a, b = report["step_max"]["throughput_images_s"], report["static_max"]["throughput_images_s"]
    found.append((a >= 0.95 * b, f"step max throughput {a:.2f} images/s within 5% of static's {b:.2f} (or above)"))
    burst = report["overload_burst"]
    found.append((not burst["other"] and burst["ok"] + burst["rejected_503"] == burst["requests"]
                  and burst["healthy_after"],
                  f"burst of {burst['requests']} requests: {burst['ok']} served + {burst['rejected_503']} refused "
                  f"(503), none lost or hanging, server up"))
    return found


def write_report(report: dict, out: Path) -> None:
    env = report["environment"]
    alone, slo = report["latency_alone_s"], report["slo_s"]
    lines = [f"# admrt serve under load ({env['device']})", "",
             f"{env['date']}; admrt {env['admrt']}, torch {env['torch']}, python {env['python']}. "
             f"`admrt serve --max-batch {report['settings']['max_batch']} {report['settings']['serve_args']}` "
             f"(models: the bundled stack unless said); requests of n={report['settings']['images']}, "
             f"{report['settings']['requests']} per load and mode, Poisson arrivals, the same stream for both modes.", "",
             f"- Latency of a request alone: {alone:.2f} s (5 requests: {report['latency_alone_spread_s'][0]:.2f}-"
             f"{report['latency_alone_spread_s'][1]:.2f}); SLO = 3x = {slo:.2f} s.",
             "- Latency alone in each load-test server process (median of 3): " + ", ".join(
                 f"{m} {v:.2f} s" for m, v in report.get("latency_alone_by_server_s", {}).items()) + ".",
             f"- Maximum throughput (burst of {report['settings']['burst_requests']} requests): static "
             f"{report['static_max']['throughput_images_s']:.2f} images/s, step "
             f"{report['step_max']['throughput_images_s']:.2f} images/s "
             f"({report['step_max']['throughput_images_s'] / report['static_max']['throughput_images_s']:.2f}x).", "",
             "| load | rate (req/s) | mode | p50 (s) | p95 (s) | p99 (s) | images/s | SLO attained | 503 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for load, row in report["loads"].items():
        for mode in ("static", "step"):
            r = row[mode]
            lines.append(f"| {load} | {row['rate_requests_s']:.2f} | {mode} | {r['p50']:.2f} | {r['p95']:.2f} | "
                         f"{r['p99']:.2f} | {r['throughput_images_s']:.2f} | {100 * r['slo_attainment']:.0f}% | "
                         f"{r['rejected_503']} |")
    b = report["overload_burst"]
    scaling = report.get("step_ms_by_slots")
    if scaling:
        lines += ["", "One step's time (ms, median) by occupied slots, per stage (static batching's iterations, "
                      "in-process):", "", "| slots | " + " | ".join(scaling) + " |", "|---|" + "---|" * len(scaling)]
        for stage in ("base", "upsampler"):
            if any(stage in v for v in scaling.values()):
                lines.append(f"| {stage} | " + " | ".join(f"{v.get(stage, float('nan')):.1f}" for v in scaling.values())
                             + " |")
    verdicts = targets(report)
    lines += ["", "Targets (issue 26):", ""] + [f"- {'met' if ok else 'NOT met'}: {text}" for ok, text in verdicts]
    lines += ["", f"Overload: {b['requests']} requests at once (10x the queue bound): {b['ok']} served, "
                  f"{b['rejected_503']} refused with 503, other answers: {b['other'] or 'none'}; "
                  f"healthy afterwards: {b['healthy_after']}. Exit codes after SIGTERM: "
                  f"{report['exit_codes_after_sigterm']}.", ""]
    (out / "README.md").write_text("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    loads = [float(x) for x in report["loads"]]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for mode in ("static", "step"):
        ax.plot(loads, [report["loads"][k][mode]["p99"] for k in report["loads"]], "o-", label=f"{mode} batching")
    ax.axhline(alone, color="gray", ls=":", label="alone")
    ax.axhline(slo, color="gray", ls="--", label="SLO (3x alone)")
    ax.set_xlabel("load (fraction of static's max throughput)")
    ax.set_ylabel("p99 latency (s)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "p99_vs_load.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
