"""After a GPU check: the returned files into bench/results/gpu_<date>/ and README's figures, in one
command.

    python bench/gpu_report.py /work/.device/<files_at> [<files_at of a second call> ...]

Each argument is a folder holding what bench/gpu_check.sh left under $OUT (gpu_check.json,
gpu_check.md, logs.tgz). Several calls of one lease combine: for each stage the latest call that
ran it wins. Written:
  bench/results/gpu_<date>/README.md       the stages, the verdicts on the targets, the throughput
                                           table, the kernel targets, failing tests, the step profile
  bench/results/gpu_<date>/call<k>_*       each call's files as returned
  README.md, between the `gpu-check` markers in "Where it stands": the figures of this check
A dry run's results (--dry-run, on CPU) are refused: they were not measured on a GPU
(--allow-dry-run writes them anyway, for testing this script).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_check  # noqa: E402  (the stage names and the markdown of one call)
import report  # noqa: E402  (the throughput targets)

BEGIN = "<!-- gpu-check: begin (bench/gpu_report.py writes this block) -->"
END = "<!-- gpu-check: end -->"


def combine(calls: list[dict]) -> dict:
    """One result from several calls: per stage, the last call that did not skip it."""
    out = {"dry_run": any(c["dry_run"] for c in calls), "started": calls[0]["started"], "env": {}, "stages": {},
           "total_s": sum(c["total_s"] for c in calls), "calls": len(calls)}
    for call in calls:
        out["env"].update({k: v for k, v in call.get("env", {}).items() if v is not None})
        for name, stage in call["stages"].items():
            if stage["status"] != "skipped" or name not in out["stages"]:
                out["stages"][name] = stage
    return out


def verdicts(result: dict) -> list[tuple[str, str, str]]:
    """(target, measured, met) rows: does the default path work, every user path, then the
    throughput and kernel targets (bench/report.py's and bench/bench_kernels.py's own rules)."""
    st = result["stages"]
    rows = []
    build, corr, smoke = st.get("build", {}), st.get("correctness", {}), st.get("smoke", {})
    tests_ok = corr.get("status") == "ok"
    rows.append(("builds with CUDA", build.get("summary", "not run"), _yes(build.get("status") == "ok", build)))
    rows.append(("GPU tests pass (capture, no host sync, noise, kernels vs fp64, double backward, AOTI)",
                 corr.get("summary", "not run"), _yes(tests_ok, corr)))
    for name, path in (smoke.get("paths") or {}).items():
        rows.append((f"user path: {name}", path["line"], _yes(path["status"] == "ok", path)))
    runs = [r["result"] for r in (st.get("throughput", {}).get("rows") or {}).values() if "result" in r]
    if runs:
        for line in report.targets(runs).splitlines()[2:]:
            target, measured, met = [cell.strip() for cell in line.strip("|").split("|")]
            rows.append((target, measured, met))
    for t in st.get("kernels", {}).get("targets") or []:
        value = t.get("value")
        measured = (f"{t['metric']} = {value:.3g} ({t.get('decided_by')})" if isinstance(value, (int, float))
                    else "not measured" if "value" in t else "")
        rows.append((f"kernels: {t['text']}", measured, {True: "yes", False: "**no**", None: "—"}[t.get("met")]))
    return rows


def _yes(ok: bool, stage: dict) -> str:
    if stage.get("status") in (None, "skipped"):
        return "—"
    if stage.get("status") in ("timeout", "partial", "interrupted"):   # cut short with nothing failed: undecided
        return "partial"
    return "yes" if ok else "**no**"


def report_markdown(result: dict, folder_name: str) -> str:
    lines = gpu_check.markdown(result).splitlines()
    lines[0] = f"# GPU check {result['started'][:10]}" + (" (DRY RUN ON CPU: not GPU figures)" if result["dry_run"] else "")
    body = "\n".join(lines[1:])
    table = ["| target | measured | met |", "|---|---|---|"]
    table += [f"| {gpu_check._cell(t)} | {gpu_check._cell(m)} | {v} |" for t, m, v in verdicts(result)]
    how = (f"`bash bench/gpu_check.sh` in {result['calls']} device call(s) ({result['total_s']:.0f} s of check "
           f"time), then `python bench/gpu_report.py`. Raw files: `call<k>_gpu_check.json` (every stage's "
           "result), `call<k>_logs.tgz` (logs and the `admrt bench`, kernel and profile JSONs).")
    return f"{lines[0]}\n\n{how}\n\n## Verdicts\n\n" + "\n".join(table) + "\n" + body + "\n"


def readme_block(result: dict, folder_name: str) -> str:
    """The figures for README's "Where it stands": one bullet, a line per stage."""
    env, st = result["env"], result["stages"]
    lines = [f"- **GPU check** ([bench/results/{folder_name}](bench/results/{folder_name}/README.md), "
             f"`bash bench/gpu_check.sh`): {env.get('device', '?')}, torch {env.get('torch')}, CUDA "
             f"{env.get('cuda')}, triton {env.get('triton')}, {result['started'][:10]}."]
    for name, title in (("build", "build"), ("correctness", "GPU tests")):
        if name in st:
            lines.append(f"  - {title}: {st[name]['status']}: {st[name]['summary']}")
    paths = st.get("smoke", {}).get("paths") or {}
    if paths:
        lines.append("  - user paths: " + "; ".join(f"`{k}` {v['status']}" + (f" ({v['line']})" if v["status"] != "skipped"
                                                                              else "") for k, v in paths.items()))
    for name, row in (st.get("throughput", {}).get("rows") or {}).items():
        cfg = row.get("result", {}).get("config", {})
        lines.append(f"  - {name}, guided {cfg.get('steps', '')} {cfg.get('dtype', '')}: {row['status']}: {row['line']}")
    kn = st.get("kernels", {})
    if kn.get("targets"):
        met = [t["target"] for t in kn["targets"] if t.get("met") is True]
        missed = [t["target"] for t in kn["targets"] if t.get("met") is False]
        lines.append(f"  - kernel targets: {len(met)} of {len(kn['targets'])} met"
                     + (f"; not met: {', '.join(missed)}" if missed else ""))
    pr = st.get("profile", {})
    if pr.get("status") == "ok":
        c = pr["result"]["config"]
        lines.append(f"  - step profile ({c['preset']} b{c['batch']} {c['dtype']}): {pr['summary']}")
    return f"{BEGIN}\n" + "\n".join(lines) + f"\n{END}"


def update_readme(readme: Path, block: str) -> None:
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"gpu_report.py: {readme}: no `gpu-check` markers (expected {BEGIN!r} ... {END!r} "
                         "in \"Where it stands\")")
    head, rest = text.split(BEGIN, 1)
    readme.write_text(head + block + rest.split(END, 1)[1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("calls", nargs="+", type=Path, help="folders of the returned files, one per device call, in order")
    p.add_argument("--results-root", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    p.add_argument("--allow-dry-run", action="store_true", help="write a dry run's results too (for testing)")
    args = p.parse_args(argv)
    calls = []
    for folder in args.calls:
        path = folder / "gpu_check.json"
        if not path.is_file():
            p.error(f"{folder}: no gpu_check.json there (expected the files bench/gpu_check.sh left under $OUT)")
        try:
            call = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            p.error(f"{path}: not JSON ({exc})")
        if not (isinstance(call, dict) and isinstance(call.get("stages"), dict)
                and isinstance(call.get("started"), str) and "dry_run" in call):
            p.error(f"{path}: not a GPU check's result (expected an object with dry_run, started and stages)")
        calls.append(call)
    if any(c["dry_run"] for c in calls) and not args.allow_dry_run:
        p.error(f"{', '.join(str(f) for f, c in zip(args.calls, calls) if c['dry_run'])}: a dry run (CPU): "
                "not GPU figures; refused")
    result = combine(calls)
    name = f"gpu_{result['started'][:10]}"
    folder = args.results_root / name
    folder.mkdir(parents=True, exist_ok=True)
    for k, src in enumerate(args.calls, 1):
        for f in ("gpu_check.json", "gpu_check.md", "logs.tgz"):
            if (src / f).is_file():
                shutil.copyfile(src / f, folder / f"call{k}_{f}")
    text = report_markdown(result, name)
    (folder / "README.md").write_text(text)
    update_readme(args.readme, readme_block(result, name))
    print(text)
    print(f"gpu_report.py: wrote {folder} and the figures in {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
