"""Quality against model calls: FID, precision and recall of the bundled Fashion-MNIST models for
every sampler of the core at a range of model calls, with the bundled feature network against
`fashion-test:16` (the base) or `fashion-test:32` (the upsampler stage).

    python bench/solver_quality.py run --plans ddim10 dpmpp2m10 --scales 1 --num 1000 --seed 0
    python bench/solver_quality.py report --out docs/solvers

`run` appends one JSON line per (stage, plan, scale, num, seed, guidance options) to
OUT/results.jsonl as each finishes and skips the ones already there, so it can be stopped and
rerun; it saves a sample grid of each 10-call run. Every run of a stage draws the same labels
(0..9 cycling) and the same per-image seeds (seed, seed+1, ...): runs differ only in the sampler.
`report` writes OUT/README.md (the table, the best scale of each sampler, the spread between seed
sets) and OUT/fid_vs_calls.png.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE.parent / "docs" / "solvers"


def _engine(stage: str, backend: str):
    import admrt
    model = admrt.load_model("fashion16-cond")
    clf = admrt.load_model("fashion16-classifier")
    up = admrt.load_model("fashion-upsample16-32") if stage == "upsampler" else None
    return admrt.Engine(model, classifier=clf, upsampler=up, backend=backend, dtype="fp32", device="cpu")


def model_calls(plan: str) -> int:
    """Network evaluations of one image under `plan` (the classifier's are not counted)."""
    from admrt.config import DiffusionConfig
    from admrt.core import StepPlan
    from admrt.diffusion import build_tables
    return build_tables(DiffusionConfig(), StepPlan.parse(plan)).num_timesteps


def row_key(r: dict) -> tuple:
    return (r["stage"], r["plan"], r.get("base_plan"), float(r["scale"]), int(r["num"]), int(r["seed"]),
            tuple(r.get("guidance_interval") or ()), int(r.get("guidance_every", 1)))


def load_rows(out: Path) -> list[dict]:
    path = out / "results.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run(args) -> int:
    import torch

    from admrt.evaluation.cli import resolve_reference
    from admrt.evaluation.evaluator import Evaluator
    from admrt.evaluation.features import load_feature_network
    from admrt.evaluation.sweep import save_grid

    out = Path(args.out)
    (out / "grids").mkdir(parents=True, exist_ok=True)
    done = {row_key(r) for r in load_rows(out)}
    engine = _engine(args.stage, args.backend)
    size = 32 if args.stage == "upsampler" else 16
    evaluator = Evaluator(load_feature_network("fashion", None), batch_size=256, device="cpu",
                          pr_reference_size=args.num)
    reference = evaluator.reference(resolve_reference(f"fashion-test:{size}"))
    labels = np.arange(args.num, dtype=np.int64) % 10
    seeds = args.seed + np.arange(args.num, dtype=np.int64)
    for plan in args.plans:
        for scale in args.scales:
            row = {"stage": args.stage, "plan": plan, "base_plan": args.base_plan if args.stage == "upsampler" else None,
                   "scale": float(scale), "num": args.num, "seed": args.seed,
                   "guidance_interval": args.guidance_interval, "guidance_every": args.guidance_every}
            if row_key(row) in done:
                continue
            kw = dict(guidance_interval=args.guidance_interval, guidance_every=args.guidance_every)
            t0 = time.time()
            if args.stage == "upsampler":
                res = engine.sample(classes=labels, steps=args.base_plan, upsampler_steps=plan, guidance=float(scale),
                                    seeds=seeds, batch_size=args.batch_size, **kw)
            else:
                res = engine.sample(classes=labels, steps=plan, guidance=float(scale), seeds=seeds,
                                    batch_size=args.batch_size, **kw)
            seconds = time.time() - t0
            result = evaluator.evaluate(reference, res.images)
            row.update(calls=model_calls(plan), fid=result.fid, sfid=result.sfid, precision=result.precision,
                       recall=result.recall, inception_score=result.inception_score, seconds=round(seconds, 1),
                       torch_threads=torch.get_num_threads())
            if model_calls(plan) == 10 or plan in ("ddim25", "250", "100"):
                tag = f"{args.stage}_{plan}_g{scale:g}".replace(":", "-").replace(",", "-")
                save_grid(out / "grids" / f"{tag}.png", res.images[:80], labels[:80], 10, 8)
                row["grid"] = f"grids/{tag}.png"
            with open(out / "results.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{args.stage} {plan:>16} scale {scale:g} seed {args.seed}: FID {result.fid:.3f} "
                  f"P {result.precision:.3f} R {result.recall:.3f} ({args.num} in {seconds:.0f}s)", flush=True)
    return 0


# ----------------------------------------------------------------------------------------------
# Report

SOLVER_ORDER = ("ddim", "dpmpp2m", "dpmpp3m", "unipc2m", "unipc3m", "dpmpp2m-sde")


def family(plan: str) -> str:
    from admrt.core import StepPlan
    p = StepPlan.parse(plan)
    if p.solver:
        return p.method + ("-logsnr" if p.spacing == "logsnr" else "")
    if p.method == "ddim" and p.spacing == "ddim":
        return "ddim"
    return str(p)


def report(args) -> int:
    out = Path(args.out)
    rows = load_rows(out)
    if not rows:
        raise SystemExit(f"{out}/results.jsonl: no results yet (run first)")
    lines = ["# Quality against model calls: the solvers of the core", ""]
    lines += [
        "FID, precision and recall use admrt's bundled Fashion-MNIST feature CNN "
        "(admrt/bundled/fashion_features.safetensors), not Inception-v3: they rank these runs against each "
        "other and are not comparable with the papers' ImageNet numbers. Made with `bench/solver_quality.py` "
        "(the commands are at the end); every run of a table draws the same labels (0..9 cycling) and the same "
        "seeds, fp32 eager backend on CPU. Model calls count the diffusion network; a guided call also runs the "
        "classifier's forward and backward.", ""]
    for stage in ("base", "upsampler"):
        srows = [r for r in rows if r["stage"] == stage and not r.get("guidance_interval")
                 and r.get("guidance_every", 1) == 1]
        if not srows:
            continue
        lines += [f"## {'Base model (16x16, guided), against fashion-test:16' if stage == 'base' else 'Upsampler stage (16->32), against fashion-test:32'}", ""]
        if stage == "base":
            lines += pivot(srows, args.scale_for_plot, args.seed_for_plot, args.num_for_plot)
        lines += ["All runs (the `s` column is wall time, often beside other work: not a speed figure):", ""]
        lines += ["| sampler | plan | model calls | guidance | seed set | samples | FID | precision | recall | s |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(srows, key=lambda r: (family(r["plan"]), r["calls"], r["scale"], r["seed"])):
            lines.append(f"| {family(r['plan'])} | `{r['plan']}`{' after `' + r['base_plan'] + '`' if r.get('base_plan') else ''} "
                         f"| {r['calls']} | {r['scale']:g} | {r['seed']} | {r['num']} | {r['fid']:.3f} | "
                         f"{r['precision']:.3f} | {r['recall']:.3f} | {r['seconds']:.0f} |")
        lines.append("")
        spread = seed_spread(srows)
        if spread:
            lines += ["Spread between seed sets (same plan and scale, different seeds):", ""]
            lines += [f"- `{plan}` at scale {scale:g}: FID {', '.join(f'{v:.3f}' for v in fids)} "
                      f"(range {max(fids) - min(fids):.3f})" for (plan, scale), fids in spread.items()]
            lines.append("")
    irows = [r for r in rows if r.get("guidance_interval") or r.get("guidance_every", 1) != 1]
    if irows:
        lines += ["## Guidance on part of the trajectory", "",
                  "| plan | guidance | interval (model timesteps) | every | samples | FID | precision | recall | s |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(irows, key=lambda r: (r["plan"], str(r.get("guidance_interval")), r.get("guidance_every", 1))):
            gi = r.get("guidance_interval")
            lines.append(f"| `{r['plan']}` | {r['scale']:g} | {gi[0]}..{gi[1] if gi else ''} | "
                         f"{r.get('guidance_every', 1)} | {r['num']} | {r['fid']:.3f} | {r['precision']:.3f} | "
                         f"{r['recall']:.3f} | {r['seconds']:.0f} |" if gi else
                         f"| `{r['plan']}` | {r['scale']:g} | all | {r.get('guidance_every', 1)} | {r['num']} | "
                         f"{r['fid']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['seconds']:.0f} |")
        lines.append("")
    plot(rows, out / "fid_vs_calls.png", args.scale_for_plot, args.seed_for_plot, args.num_for_plot)
    lines += ["![FID against model calls](fid_vs_calls.png)", ""]
    grids = sorted({r["grid"] for r in rows if r.get("grid")})
    if grids:
        lines += ["## Samples at 10 model calls (and the references)", "",
                  "Rows: classes 0-9; columns: the first samples of each class, the same seeds in every grid.", ""]
        lines += [f"**{Path(g).stem}**  \n![{g}]({g})\n" for g in grids]
    if args.notes and Path(args.notes).exists():
        lines += [Path(args.notes).read_text()]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'README.md'}")
    return 0


def pivot(rows: list[dict], scale: float, seed: int, num: int) -> list[str]:
    """FID by sampler (rows) and model calls (columns) for one scale, seed set and sample count."""
    sel = [r for r in rows if r["scale"] == scale and r["seed"] == seed and r["num"] == num]
    calls = sorted({r["calls"] for r in sel if family(r["plan"]) in SOLVER_ORDER})
    lines = [f"FID at guidance {scale:g}, {num} samples, seeds {seed}.. (lower is better):", "",
             "| sampler | " + " | ".join(str(c) for c in calls) + " |", "|---|" + "---:|" * len(calls)]
    for f in SOLVER_ORDER:
        got = {r["calls"]: r["fid"] for r in sel if family(r["plan"]) == f}
        if got:
            lines.append(f"| {f} | " + " | ".join(f"{got[c]:.3f}" if c in got else "" for c in calls) + " |")
    refs = [r for r in sel if r["plan"] in ("ddim25", "250", "1000")]
    lines += [""] + [f"References: " + ", ".join(
        f"{'DDIM-25' if r['plan'] == 'ddim25' else 'DDPM-' + r['plan']} {r['fid']:.3f}" for r in refs), ""]
    return lines


def seed_spread(rows: list[dict]) -> dict:
    by = {}
    for r in rows:
        by.setdefault((r["plan"], r["scale"], r["num"]), {})[r["seed"]] = r["fid"]
    return {(p, s): list(v.values()) for (p, s, n), v in by.items() if len(v) > 1}  # same sample count only


def plot(rows: list[dict], path: Path, scale: float, seed: int, num: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    base = [r for r in rows if r["stage"] == "base" and not r.get("guidance_interval")
            and r.get("guidance_every", 1) == 1 and r["scale"] == scale and r["seed"] == seed and r["num"] == num]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    fams = [f for f in SOLVER_ORDER if any(family(r["plan"]) == f for r in base)]
    fams += sorted({family(r["plan"]) for r in base} - set(fams) - {"ddim25", "250", "1000"})
    for f in fams:
        pts = sorted((r["calls"], r["fid"]) for r in base if family(r["plan"]) == f)
        if len(pts) > 1:
            ax.plot(*zip(*pts), "o-", label=f)
    for plan, style in (("ddim25", "--"), ("250", ":"), ("1000", "-.")):
        ref = [r for r in base if r["plan"] == plan]
        if ref:
            ax.axhline(ref[0]["fid"], color="gray", linestyle=style, label=f"{'DDIM-25' if plan == 'ddim25' else 'DDPM-' + plan} level")
    ax.set_xlabel("model calls")
    ax.set_ylabel("FID (bundled Fashion-MNIST features)")
    ax.set_yscale("log")
    ax.set_title(f"guidance scale {scale:g}, {num} samples, seeds {seed}..")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--plans", nargs="+", required=True)
    r.add_argument("--scales", type=float, nargs="+", default=[1.0])
    r.add_argument("--num", type=int, default=1000)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--stage", choices=("base", "upsampler"), default="base")
    r.add_argument("--base-plan", default="ddim25", help="the base stage's plan when --stage upsampler")
    r.add_argument("--guidance-interval", type=int, nargs=2, default=None)
    r.add_argument("--guidance-every", type=int, default=1)
    r.add_argument("--batch-size", type=int, default=250)
    r.add_argument("--backend", default="eager")
    r.add_argument("--out", default=str(DEFAULT_OUT))
    g = sub.add_parser("report")
    g.add_argument("--out", default=str(DEFAULT_OUT))
    g.add_argument("--scale-for-plot", type=float, default=1.0)
    g.add_argument("--seed-for-plot", type=int, default=0)
    g.add_argument("--num-for-plot", type=int, default=1000)
    g.add_argument("--notes", default=None, help="a markdown file appended to the report")
    args = p.parse_args(argv)
    return run(args) if args.cmd == "run" else report(args)


if __name__ == "__main__":
    sys.exit(main())
