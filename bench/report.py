"""The throughput table and plot from a folder of `admrt bench` JSONs (one per configuration, as
bench/test_throughput.py and `admrt bench --out` write them):

    python bench/report.py bench/results/throughput_gpu    # -> table.md, images_per_s.svg there

table.md: a row per (configuration, implementation) with images/s, latency per batch (median and
min-max of the alternating rounds), ms/step, achieved TFLOP/s and % of the device's matmul rate,
peak memory, compile/capture time apart, speed-up over guided-diffusion and the image difference
against it; then the throughput issue's targets, each decided from the rows that exist.
images_per_s.svg: images/s against batch, one panel per model, one line per implementation.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

REFERENCE = "guided-diffusion (reference)"


def load(folder: Path) -> list[dict]:
    runs = []
    for path in sorted(Path(folder).glob("sampling_*.json")):
        run = json.loads(path.read_text())
        run["file"] = path.name
        _backfill_work(run)
        runs.append(run)
    return sorted(runs, key=lambda r: (r["config"]["preset"], r["config"].get("upsampler") or "", r["config"]["steps"],
                                       int(r["config"]["batch"])))


def _backfill_work(run: dict) -> None:
    """Files written before admrt bench counted FLOPs get the same count here (step_flops)."""
    from admrt.diffusion import build_tables
    from admrt.presets import get_preset

    import measure as bm

    c = run["config"]
    if "flops_per_image_step" not in run:
        run["flops_per_image_step"] = bm.step_flops(c["preset"], c.get("classifier") or None)
    steps = build_tables(get_preset(c["preset"]).diffusion, c["steps"]).num_timesteps
    peak = run.get("matmul_tflops") or bm.matmul_peak_tflops(run["env"].get("device", ""))
    for row in run["rows"]:
        if "median_s" in row and row.get("achieved_tflops") is None:
            row["achieved_tflops"] = run["flops_per_image_step"]["total"] * int(c["batch"]) * steps / row["median_s"] / 1e12
            row["pct_of_matmul_peak"] = 100 * row["achieved_tflops"] / peak if peak else None


def _fmt(value, spec="{:.2f}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return spec.format(value)


ENV_FIELDS = (("device", ""), ("torch", "torch "), ("triton", "triton "), ("cuda", "CUDA "))


def table(runs: list[dict]) -> str:
    envs = sorted({", ".join(f"{label}{r['env'][key]}" for key, label in ENV_FIELDS if r["env"].get(key))
                   for r in runs})
    dates = sorted(r["env"]["date"][:10] for r in runs)
    lines = [f"Device and versions: {'; '.join(envs)}.", f"Dates: {dates[0]} to {dates[-1]}.", "",
             "| model + classifier | batch | steps | dtype | impl | images/s | batch ms (min-max) | ms/step | TFLOP/s "
             "| % matmul | peak GiB | cold extra s | x reference | images vs reference (uint8 mean / max) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        c = run["config"]
        for row in run["rows"]:
            diff = _diff(run, row["impl"])
            diff_text = f"{diff['mean_abs_uint8']:.3f} / {diff['max_abs_uint8']}" if diff else "—"
            head = f"| {_stack(c)} | {c['batch']} | {c['steps']} | {c['dtype']} | {row['impl']} "
            if "error" in row:
                lines.append(head + f"| FAILED: {row['error'][:120]} |" + " |" * 9)
                continue
            lines.append(
                head + f"| {row['images_per_s']:.2f} | {1e3 * row['median_s']:.0f} ({1e3 * min(row['times_s']):.0f}-"
                f"{1e3 * max(row['times_s']):.0f}) | {row['ms_per_step']:.1f} | {_fmt(row.get('achieved_tflops'), '{:.3g}')} "
                f"| {_fmt(row.get('pct_of_matmul_peak'), '{:.1f}')} | {_fmt(row.get('peak_mem_gib'))} "
                f"| {_fmt(_cold(row), '{:.0f}')} | **{_fmt(row.get('speedup_vs_reference'))}x** "
                f"| {diff_text} |")
    return "\n".join(lines)


def _cold(row: dict):
    """The cold run's extra time (compile, capture); within the timing noise of 0 for eager runs."""
    extra = row.get("cold_minus_warm_s")
    return None if extra is None else max(extra, 0.0)


def _stack(c: dict) -> str:
    up = c.get("upsampler")
    return f"{c['preset']} + {c.get('classifier') or 'none'}" + (f" -> {up}" if up else "")


def _diff(run, impl):
    """A run's image difference against guided-diffusion (files of 2026-11-23 kept one per impl)."""
    diff = run.get("image_diff_vs_reference")
    if not diff or impl == REFERENCE:
        return None
    return diff if "mean_abs_uint8" in diff else diff.get(impl)


def _find(runs, preset, batch, steps="ddim25"):
    return next((r for r in runs if r["config"]["preset"] == preset and int(r["config"]["batch"]) == batch
                 and r["config"]["steps"] == steps and not r["config"].get("upsampler")), None)


def _best_admrt(run):
    rows = [r for r in run["rows"] if r["impl"].startswith("admrt") and "median_s" in r]
    return max(rows, key=lambda r: r["images_per_s"]) if rows else None


def targets(runs: list[dict]) -> str:
    """The throughput issue's targets, each from its row (missing rows say so)."""
    out = ["| target | measured | met |", "|---|---|---|"]

    def add(target, run, check):
        if run is None or _best_admrt(run) is None:
            out.append(f"| {target} | not measured | — |")
            return
        text, ok = check(run, _best_admrt(run))
        out.append(f"| {target} | {text} | {'yes' if ok else '**no**'} |")

    def speed(need, pct=None):
        def check(run, best):
            s = best.get("speedup_vs_reference")
            text = f"{best['impl']}: {_fmt(s)}x guided-diffusion"
            ok = s is not None and s >= need
            if pct is not None:
                p = best.get("pct_of_matmul_peak")
                text += f", {_fmt(p, '{:.1f}')}% of the matmul rate, {1e3 / best['images_per_s']:.0f} ms/image"
                ok = ok and p is not None and p >= pct
            return text, ok
        return check

    add("ADM-256 guided DDIM-25 b64: >= 3x guided-diffusion fp16, >= 55% of the matmul rate",
        _find(runs, "imagenet256-cond", 64), speed(3.0, 55.0))
    add("ADM-256 guided DDIM-25 b1: latency <= 0.35 s", _find(runs, "imagenet256-cond", 1),
        lambda run, best: (f"{best['impl']}: {best['median_s']:.3f} s", best["median_s"] <= 0.35))
    add("ADM-64 guided DDIM-25 b64: >= 3x guided-diffusion", _find(runs, "imagenet64-cond", 64), speed(3.0))
    worse = []
    for run in runs:
        ref = next((r for r in run["rows"] if r["impl"] == REFERENCE and "peak_mem_gib" in r), None)
        for row in run["rows"]:
            if ref and row["impl"].startswith("admrt") and row.get("peak_mem_gib", math.nan) > ref["peak_mem_gib"]:
                worse.append(f"{_stack(run['config'])} b{run['config']['batch']} {row['impl']}")
    measured = any(not math.isnan(r.get("peak_mem_gib", math.nan)) for run in runs for r in run["rows"])
    out.append(f"| peak memory <= guided-diffusion's at every row | "
               f"{'over at: ' + ', '.join(worse) if worse else ('none over' if measured else 'not measured (CPU)')} "
               f"| {('**no**' if worse else 'yes') if measured else '—'} |")
    diffs = [d for run in runs for row in run["rows"] if (d := _diff(run, row["impl"]))]
    if diffs:
        worst = max(d["mean_abs_uint8"] for d in diffs)
        out.append(f"| images vs guided-diffusion: mean difference < 0.1 uint8 levels | worst mean {worst:.3f}, "
                   f"max {max(d['max_abs_uint8'] for d in diffs)} | {'yes' if worst < 0.1 else '**no**'} |")
    return "\n".join(out)


COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


def plot(runs: list[dict]) -> str:
    """An SVG of images/s against batch (both axes log), a panel per (model, steps, dtype)."""
    panels = defaultdict(lambda: defaultdict(list))   # panel -> impl -> [(batch, images/s)]
    for run in runs:
        c = run["config"]
        for row in run["rows"]:
            if "images_per_s" in row:
                panel = (_stack(c).replace(f" + {c.get('classifier') or 'none'}", ""), f"{c['steps']} {c['dtype']}")
                panels[panel][row["impl"]].append((int(c["batch"]), row["images_per_s"]))
    impls = sorted({i for p in panels.values() for i in p})
    color = {impl: COLORS[k % len(COLORS)] for k, impl in enumerate(impls)}
    w, h, pad = 300, 220, 40
    width = max(1, len(panels)) * w + 20
    height = h + 30 + 16 * len(impls)
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           'font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>']
    for k, (title, lines) in enumerate(sorted(panels.items())):
        x0 = 10 + k * w
        points = [pt for line in lines.values() for pt in line]
        bx = [math.log2(b) for b, _ in points]
        ly = [math.log10(v) for _, v in points]
        xmin, xmax = min(bx), max(max(bx), min(bx) + 1)
        ymin, ymax = math.floor(min(ly)), math.ceil(max(ly) + 1e-9)
        ymax = max(ymax, ymin + 1)

        def sx(b, x0=x0, xmin=xmin, xmax=xmax):
            return x0 + pad + (math.log2(b) - xmin) / (xmax - xmin) * (w - pad - 20)

        def sy(v, ymin=ymin, ymax=ymax):
            return h - 30 - (math.log10(v) - ymin) / (ymax - ymin) * (h - 70)

        svg.append(f'<text x="{x0 + pad}" y="13" font-weight="bold">{title[0]}</text>')
        svg.append(f'<text x="{x0 + pad}" y="26">{title[1]}</text>')
        svg.append(f'<line x1="{x0 + pad}" y1="{h - 30}" x2="{x0 + w - 20}" y2="{h - 30}" stroke="black"/>')
        svg.append(f'<line x1="{x0 + pad}" y1="40" x2="{x0 + pad}" y2="{h - 30}" stroke="black"/>')
        for e in range(ymin, ymax + 1):
            svg.append(f'<text x="{x0 + pad - 4}" y="{sy(10 ** e) + 4:.1f}" text-anchor="end">{10 ** e:g}</text>')
        for b in sorted({b for b, _ in points}):
            svg.append(f'<text x="{sx(b):.1f}" y="{h - 16}" text-anchor="middle">{b}</text>')
        svg.append(f'<text x="{x0 + w / 2:.0f}" y="{h - 2}" text-anchor="middle">batch</text>')
        svg.append(f'<text x="{x0 + 10}" y="{h / 2:.0f}" transform="rotate(-90 {x0 + 10} {h / 2:.0f})" '
                   'text-anchor="middle">images/s</text>')
        for impl, line in lines.items():
            line = sorted(line)
            path = " ".join(f"{sx(b):.1f},{sy(v):.1f}" for b, v in line)
            svg.append(f'<polyline points="{path}" fill="none" stroke="{color[impl]}" stroke-width="2"/>')
            svg.extend(f'<circle cx="{sx(b):.1f}" cy="{sy(v):.1f}" r="3" fill="{color[impl]}"/>' for b, v in line)
    for k, impl in enumerate(impls):
        y = h + 14 + 16 * k
        svg.append(f'<rect x="{10 + pad}" y="{y - 9}" width="12" height="10" fill="{color[impl]}"/>')
        svg.append(f'<text x="{28 + pad}" y="{y}">{impl}</text>')
    svg.append("</svg>")
    return "\n".join(svg)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, help="a folder of sampling_*.json")
    args = p.parse_args(argv)
    runs = load(args.folder)
    if not runs:
        print(f"report: {args.folder}: no sampling_*.json there (run `pytest bench/ --bench-out {args.folder}`)",
              file=sys.stderr)
        return 1
    text = (f"# Guided sampling throughput\n\n{table(runs)}\n\n## Targets\n\n{targets(runs)}\n\n"
            "![images/s vs batch](images_per_s.svg)\n")
    (args.folder / "table.md").write_text(text)
    (args.folder / "images_per_s.svg").write_text(plot(runs))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
