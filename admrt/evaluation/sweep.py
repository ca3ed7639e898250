"""The guidance trade-off (Dhariwal & Nichol 2021, Table 1 / Figure 4): sample a model with its
noisy classifier over guidance scales and samplers, compute every metric of each run against a
reference set, and write a report: a markdown table, a PNG plot (FID, precision, recall against
the scale) and one sample grid per run.

Each run draws the same labels (0..9 cycling) and the same per-sample seeds, so the runs differ
only in the scale and the sampler.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from admrt.io import atomic_write

from .evaluator import EvalResult, Evaluator, ReferenceStatistics


@dataclass(frozen=True)
class SweepConfig:
    scales: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
    samplers: tuple[str, ...] = ("ddim25", "250")
    num_samples: tuple[int, ...] = (1000,)   # per sampler, or one for all
    batch_size: int = 100
    seed: int = 0
    grid_per_class: int = 8          # columns of each sample grid (rows: the classes)

    def __post_init__(self):
        if not self.scales or any(s < 0 for s in self.scales):
            raise ValueError(f"scales={self.scales}: expected non-negative guidance scales")
        if not self.samplers:
            raise ValueError("samplers=(): expected at least one, e.g. ('ddim25', '250')")
        if len(self.num_samples) not in (1, len(self.samplers)):
            raise ValueError(f"num_samples={self.num_samples}: expected one count, or one per sampler "
                             f"({len(self.samplers)})")
        if min(self.num_samples) < 20:
            raise ValueError(f"num_samples={self.num_samples}: expected >= 20 each (IS uses 10 splits)")

    def samples_for(self, i: int) -> int:
        """Samples per run of the i-th sampler."""
        return self.num_samples[i if len(self.num_samples) > 1 else 0]


@dataclass(frozen=True)
class SweepRow:
    sampler: str
    scale: float
    result: EvalResult
    seconds: float
    grid: str = ""                   # file name of the sample grid

    def to_dict(self) -> dict:
        return {"sampler": self.sampler, "scale": self.scale, "seconds": self.seconds,
                "grid": self.grid, **self.result.to_dict()}


def sampler_label(steps: str) -> str:
    """"ddim25" -> "DDIM-25", "250" -> "DDPM-250", "ddim:250" -> "DDIM-250" (the core's StepPlan)."""
    from admrt.core import StepPlan

    plan = StepPlan.parse(str(steps))
    count = plan.ddim_steps or plan.grid_steps or ",".join(str(c) for c in plan.sections)
    return f"{plan.method.upper()}-{count}" + (" (log-SNR)" if plan.spacing == "logsnr" else "")


def run_sweep(engine, evaluator: Evaluator, reference: ReferenceStatistics, config: SweepConfig,
              out_dir: str | os.PathLike | None = None,
              log: Callable[[str], None] = print) -> list[SweepRow]:
    """Sample with `engine` (an admrt.Engine with a classifier) for every (sampler, scale), and
    evaluate against `reference`. Writes each run's samples (.npz) and grid into out_dir."""
    out = Path(out_dir) if out_dir is not None else None
    num_classes = engine.num_classes or 1
    rows = []
    for i, steps in enumerate(config.samplers):
        n = config.samples_for(i)
        labels = np.arange(n, dtype=np.int64) % num_classes
        seeds = config.seed + np.arange(n, dtype=np.int64)
        for scale in config.scales:
            t0 = time.time()
            res = engine.sample(classes=labels, steps=steps, guidance=float(scale), seeds=seeds,
                                batch_size=config.batch_size)
            seconds = time.time() - t0
            result = evaluator.evaluate(reference, res.images)
            grid_name = ""
            if out is not None:
                tag = f"{steps}_g{scale:g}"
                from .npz import save_batch
                save_batch(out / "samples" / f"{tag}.npz", res.images, res.labels)
                grid_name = f"grid_{tag}.png"
                save_grid(out / grid_name, res.images, res.labels, num_classes, config.grid_per_class)
            rows.append(SweepRow(str(steps), float(scale), result, round(seconds, 1), grid_name))
            log(f"{sampler_label(steps):>9} scale {scale:>4g}: FID {result.fid:.3f} sFID {result.sfid:.3f} "
                f"IS {result.inception_score:.3f} P {result.precision:.3f} R {result.recall:.3f} "
                f"(sampled {n} in {seconds:.0f}s)")
    return rows


def load_rows(results_json: str | os.PathLike) -> tuple[list[SweepRow], dict]:
    """The rows and meta of a results.json written by `write_report`."""
    fields = EvalResult.__dataclass_fields__
    try:
        data = json.loads(Path(results_json).read_text())
        rows = [SweepRow(r["sampler"], float(r["scale"]), EvalResult(**{k: r[k] for k in fields}),
                         float(r["seconds"]), r.get("grid", "")) for r in data["rows"]]
        return rows, data.get("meta", {})
    except (ValueError, RecursionError, KeyError, TypeError, AttributeError) as e:  # malformed, too deep or foreign
        reason = str(e).splitlines()[0][:120] if str(e) else "malformed"
        raise ValueError(f"{type(e).__name__}: {reason}") from None


# ----------------------------------------------------------------------------------------------
# Report


def markdown_table(rows: Sequence[SweepRow]) -> str:
    head = ("| sampler | guidance scale | FID | sFID | IS | precision | recall | samples | sampling s |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    body = "".join(
        f"| {sampler_label(r.sampler)} | {r.scale:g} | {r.result.fid:.3f} | {r.result.sfid:.3f} | "
        f"{r.result.inception_score:.3f} | {r.result.precision:.3f} | {r.result.recall:.3f} | "
        f"{r.result.num_samples} | {r.seconds:.0f} |\n" for r in rows)
    return head + body


def write_report(rows: Sequence[SweepRow], out_dir: str | os.PathLike, meta: dict,
                 title: str = "Guidance sweep") -> Path:
    """report.md (table, plot, grids, how it was made), results.json, tradeoff.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_tradeoff(rows, out / "tradeoff.png")
    results = json.dumps({"meta": meta, "rows": [r.to_dict() for r in rows]}, indent=1)
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(results))
    lines = [f"# {title}", ""]
    if meta.get("description"):
        lines += [meta["description"], ""]
    lines += [markdown_table(rows), "", "![FID, precision and recall against the guidance scale](tradeoff.png)", ""]
    lines += ["## Samples", "", "Rows: classes 0-9; columns: the first samples of each class (same seeds in every run).", ""]
    for r in rows:
        if r.grid:
            lines.append(f"**{sampler_label(r.sampler)}, scale {r.scale:g}**  \n![{r.grid}]({r.grid})\n")
    lines += ["## How this was made", "", "```", meta.get("command", ""), "```", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items() if k not in ("command", "description")]
    return atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))


def save_grid(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray | None, num_classes: int,
              per_class: int, scale: int | None = None, pad: int = 1) -> Path:
    """A grid of uint8 NHWC images: one row per class, `per_class` columns, nearest upscale
    (default: to tiles of at least 64 pixels)."""
    from PIL import Image
    n, h, w, c = images.shape
    scale = scale or max(1, 64 // max(h, w))
    if labels is None:
        labels = np.zeros(n, dtype=np.int64)
        num_classes = 1
    rows = []
    for k in range(num_classes):
        idx = np.flatnonzero(labels == k)[:per_class]
        rows.append(idx)
    cols = max(1, max(len(r) for r in rows))
    hh, ww = h * scale + pad, w * scale + pad
    canvas = np.full((len(rows) * hh + pad, cols * ww + pad, c), 255, dtype=np.uint8)
    for i, idx in enumerate(rows):
        for j, s in enumerate(idx):
            tile = images[s].repeat(scale, 0).repeat(scale, 1)
            canvas[pad + i * hh: pad + i * hh + h * scale, pad + j * ww: pad + j * ww + w * scale] = tile
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


_COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def plot_tradeoff(rows: Sequence[SweepRow], path: str | os.PathLike) -> Path:
    """Three panels (FID, precision, recall) against the guidance scale, one line per sampler.
    matplotlib when installed, else drawn with PIL."""
    samplers = list(dict.fromkeys(r.sampler for r in rows))
    scales = sorted({r.scale for r in rows})
    metrics = [("FID", lambda r: r.result.fid), ("precision", lambda r: r.result.precision),
               ("recall", lambda r: r.result.recall)]
    series = {m: {s: [(r.scale, f(r)) for r in rows if r.sampler == s] for s in samplers} for m, f in metrics}
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_pil(series, scales, samplers, Path(path))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, (m, _) in zip(axes, metrics):
        for i, s in enumerate(samplers):
            xs, ys = zip(*series[m][s])
            ax.plot([scales.index(x) for x in xs], ys, "o-", label=sampler_label(s),
                    color=np.array(_COLORS[i % len(_COLORS)]) / 255)
        ax.set_xticks(range(len(scales)), [f"{x:g}" for x in scales])
        ax.set_xlabel("guidance scale")
        ax.set_title(m)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return Path(path)


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0) * 0.1
    raw = (hi - lo) / max(1, n - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t <= hi + step * 0.5:
        ticks.append(round(t, 10))
        t += step
    return ticks


def _plot_pil(series, scales, samplers, path: Path) -> Path:
    from PIL import Image, ImageDraw, ImageFont
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    pw, ph, ml, mr, mt, mb = 380, 300, 62, 14, 30, 48
    img = Image.new("RGB", (pw * len(series), ph + 26), "white")
    d = ImageDraw.Draw(img)
    for p, (name, by_sampler) in enumerate(series.items()):
        x0, y0 = p * pw + ml, mt
        x1, y1 = (p + 1) * pw - mr, ph - mb
        ys = [v for pts in by_sampler.values() for _, v in pts]
        ticks = _nice_ticks(min(ys), max(ys))
        lo, hi = ticks[0], ticks[-1]
        if hi == lo:
            hi = lo + 1

        inset = 12  # keep points off the frame

        def px(x, x0=x0, x1=x1):
            i = scales.index(x)
            return x0 + inset + (x1 - x0 - 2 * inset) * (i / max(1, len(scales) - 1))

        def py(v, lo=lo, hi=hi, y0=y0, y1=y1):
            return y1 - inset - (y1 - y0 - 2 * inset) * (v - lo) / (hi - lo)

        d.text(((x0 + x1) / 2, 8), name, fill="black", font=font, anchor="mt")
        for t in ticks:
            yy = py(t)
            d.line([x0, yy, x1, yy], fill=(225, 225, 225))
            d.text((x0 - 6, yy), f"{t:g}", fill="black", font=font, anchor="rm")
        for x in scales:
            xx = px(x)
            d.line([xx, y1, xx, y1 + 4], fill=(80, 80, 80))
            d.text((xx, y1 + 7), f"{x:g}", fill="black", font=font, anchor="mt")
        d.text(((x0 + x1) / 2, y1 + 26), "guidance scale", fill="black", font=font, anchor="mt")
        d.rectangle([x0, y0, x1, y1], outline=(80, 80, 80))
        for i, s in enumerate(samplers):
            color = _COLORS[i % len(_COLORS)]
            pts = [(px(x), py(v)) for x, v in by_sampler[s]]
            if len(pts) > 1:
                d.line(pts, fill=color, width=2)
            for (xx, yy) in pts:
                d.ellipse([xx - 3, yy - 3, xx + 3, yy + 3], fill=color)
    lx = 10
    for i, s in enumerate(samplers):
        color = _COLORS[i % len(_COLORS)]
        d.line([lx, ph + 12, lx + 20, ph + 12], fill=color, width=3)
        d.text((lx + 26, ph + 12), sampler_label(s), fill="black", font=font, anchor="lm")
        lx += 130
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
