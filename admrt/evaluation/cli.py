"""`admrt eval`: the ADM evaluator's metrics, and `admrt eval sweep`: the guidance trade-off.

    admrt eval REF.npz SAMPLES.npz [--features fashion|inception --inception-weights PT] [--json OUT]
    admrt eval sweep [--model fashion16-cond --classifier fashion16-classifier]
                     [--scales 0 0.5 1 2 4 8] [--samplers ddim25 250] [--num-samples 1000] [--out DIR]

Batches are .npz files in guided-diffusion's format (arr_0 uint8 NHWC). `REF` may carry
precomputed mu/sigma/mu_s/sigma_s (the paper's reference batches do), or be
`fashion-test[:SIZE]` for Fashion-MNIST's test split through admrt's data pipeline at SIZE pixels
(default 16). Figures made with the default feature network (`--features fashion`, bundled) are
not comparable with Inception-v3 figures.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from admrt.cli import (ArgumentParser, OptionValueError, UsageError, device_value, finite_float, int_in, nonempty,
                       positive_int)

FASHION_REF = "fashion-test"
FASHION_MAX_SIZE = 256   # fashion-test:SIZE pixels per side (the 10,000 test images are resized in memory)


def guidance_scale(text: str) -> float:
    """--scales: a finite guidance scale >= 0."""
    value = finite_float(text)
    if value < 0:
        raise OptionValueError("expected a finite guidance scale >= 0")
    return value


def step_plan(text: str) -> str:
    """--samplers: a step plan the core parses (ddimN, N, a,b,c, dpmpp2mN, ...)."""
    from admrt.core import StepPlan

    try:
        StepPlan.parse(text, "samplers")
    except ValueError as exc:   # the core's message: samplers='ddimx': expected ... (the parser names the value)
        raise OptionValueError(" ".join(str(exc).split()).split(": ", 1)[-1]) from None
    return text


def check_output_file(flag: str, path) -> None:
    """Refuse, before any work, an output file that cannot be written: a folder, or a parent that
    cannot be created or written (the test file made here is removed)."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag}={str(path)!r}: a folder; expected a file name")
    _check_folder_writable(flag, path.parent, str(path))


def check_output_folder(flag: str, path) -> None:
    """Refuse, before any work, a report folder that is a file or cannot be created or written.
    Nothing is left: a parent made for the check is removed again."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag}={str(path)!r}: not a folder")
    _check_folder_writable(flag, path, str(path))


def _check_folder_writable(flag: str, folder, shown: str) -> None:
    import os
    import tempfile

    folder = Path(folder)
    missing = []
    probe = folder
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(0, "not a folder", str(probe))
        for d in reversed(missing):
            d.mkdir()
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".admrt-write-check.", suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename and str(exc.filename) != shown else ""
        raise UsageError(f"{flag}={shown!r}: cannot write there ({exc.strerror or exc}{where})") from None
    finally:
        for d in missing:   # the folders made for the check: the command makes them when it writes
            try:
                d.rmdir()
            except OSError:
                pass


def _add_feature_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("features and metrics")
    g.add_argument("--features", choices=("fashion", "inception"), default="fashion",
                   help="feature network: the bundled Fashion-MNIST CNN (default), or Inception-v3 with FID "
                        "weights (--inception-weights)")
    g.add_argument("--inception-weights", type=nonempty, default=None, metavar="PATH",
                   help="local pytorch-fid pt_inception-2015-12-05-6726825d.pth (never downloaded)")
    g.add_argument("--feature-weights", type=nonempty, default=None, metavar="PATH",
                   help="another Fashion feature network file (default: the bundled one)")
    g.add_argument("--eval-batch-size", type=positive_int, default=64, help="images per feature-network batch")
    g.add_argument("--device", type=device_value, default="cpu",
                   help="torch device for features and sampling (default cpu)")
    g.add_argument("--cache-dir", default=None,
                   help="reference statistics cache (default: eval/ under $ADMRT_CACHE_DIR, else "
                        "$XDG_CACHE_HOME/admrt, else ~/.cache/admrt)")
    g.add_argument("--no-cache", action="store_true", help="neither read nor write cached reference statistics")
    g.add_argument("--k", type=positive_int, default=3, help="nearest neighbours of precision/recall (default 3)")
    g.add_argument("--threads", type=int_in(1, 4096, "a thread count"), default=None,
                   help="torch CPU threads (default: torch's)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.epilog = "Run `admrt eval sweep --help` for the sweep's options."
    _add_feature_options(parser)
    parser.add_argument("--json", type=nonempty, default=None, metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--pr-reference-size", type=int, default=None,
                        help="precision/recall against a fixed random subset of the reference (default: all)")
    # The operands decide between the two forms: `REF SAMPLES` or `sweep ...`.
    parser.add_argument("operands", nargs=argparse.REMAINDER, metavar="REF SAMPLES | sweep ...",
                        help="reference batch (.npz or fashion-test[:SIZE]) and sample batch (.npz)")


def _metrics_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="admrt eval", description=__doc__.split("\n\n")[0])
    _add_feature_options(p)
    p.add_argument("--json", type=nonempty, default=None, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--pr-reference-size", type=int, default=None,
                   help="precision/recall against a fixed random subset of the reference (default: all)")
    p.add_argument("ref", help="reference batch .npz, or fashion-test[:SIZE]")
    p.add_argument("sample", help="sample batch .npz (arr_0 uint8 NHWC)")
    return p


def sweep_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="admrt eval sweep", description=(
        "Sample a model with its noisy classifier over guidance scales and samplers, compute FID, sFID, IS, "
        "precision and recall of each run against a reference set, and write a report (markdown table, "
        "plot, sample grids)."))
    g = p.add_argument_group("models and sampling")
    g.add_argument("--model", default="fashion16-cond", help="diffusion model: file or bundled name")
    g.add_argument("--classifier", default="fashion16-classifier", help="noisy classifier: file or bundled name")
    g.add_argument("--upsampler", default=None, help="optional upsampler (cascade); evaluated at its size")
    g.add_argument("--scales", type=guidance_scale, nargs="+", default=[0.0, 0.5, 1.0, 2.0, 4.0, 8.0],
                   help="classifier scales, one run each")
    g.add_argument("--samplers", type=step_plan, nargs="+", default=["ddim25", "250"],
                   help='steps per run: "ddimN" (DDIM) or "N" (DDPM on N respaced steps); default ddim25 250')
    g.add_argument("--num-samples", type=int_in(20, 2 ** 31 - 1, "a sample count (IS uses 10 splits)"), nargs="+",
                   default=[1000],
                   help="samples per run: one count, or one per sampler (default 1000)")
    g.add_argument("--pr-reference-size", type=int, default=None,
                   help="precision/recall against a fixed random subset of the reference of this size "
                        "(default: as many as the run's samples; 0: the whole reference)")
    g.add_argument("--batch-size", type=positive_int, default=100, help="sampling batch size")
    g.add_argument("--seed", type=int, default=0, help="first per-sample seed (the same in every run)")
    g.add_argument("--backend", default="eager", help="Engine backend: eager | compile | a registered one")
    g.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"),
                   help="precision of the networks' bodies")
    g.add_argument("--reference", default=FASHION_REF,
                   help="reference .npz, or fashion-test (the Fashion-MNIST test split at the samples' size)")
    g.add_argument("--out", type=nonempty, default="docs/guidance_sweep",
                   help="report folder (default docs/guidance_sweep)")
    g.add_argument("--title", default="Guidance sweep: the bundled Fashion-MNIST models", help="the report's title")
    g.add_argument("--merge", type=nonempty, nargs="+", default=None, metavar="DIR",
                   help="sample nothing: merge the reports of earlier sweeps (e.g. one process per sampler) "
                        "into --out")
    _add_feature_options(p)
    return p


def run(args: argparse.Namespace) -> int:
    ops = list(args.operands or [])
    if ops and ops[0] == "sweep":
        return run_sweep_cli(sweep_parser().parse_args(ops[1:]))
    if not ops:
        _metrics_parser().error("give REF SAMPLES, or `sweep ...`")
    margs = _metrics_parser().parse_args(ops, namespace=argparse.Namespace(**{
        k: v for k, v in vars(args).items() if k != "operands"}))
    return run_metrics(margs)


def _threads(args) -> None:
    if args.threads is not None:
        import torch
        torch.set_num_threads(args.threads)


def build_evaluator(args):
    from .evaluator import Evaluator
    from .features import load_feature_network
    weights = args.inception_weights if args.features == "inception" else args.feature_weights
    net = load_feature_network(args.features, weights)
    return Evaluator(net, batch_size=args.eval_batch_size, device=args.device, cache_dir=args.cache_dir,
                     use_cache=not args.no_cache, k=args.k, pr_reference_size=args.pr_reference_size or None)


def fashion_size(spec: str, default_size: int | None = None) -> int | None:
    """SIZE of `fashion-test[:SIZE]` (default_size, else 16, when not given); None for another
    reference. ValueError for a SIZE that is not 1..FASHION_MAX_SIZE pixels."""
    if not (spec == FASHION_REF or spec.startswith(FASHION_REF + ":")):
        return None
    size = spec.split(":", 1)[1] if ":" in spec else str(default_size or 16)
    if not size.isdigit() or not 1 <= int(size) <= FASHION_MAX_SIZE:
        raise ValueError(f"reference {spec!r}: expected fashion-test or fashion-test:SIZE with SIZE the images' side "
                         f"in pixels, from 1 to {FASHION_MAX_SIZE}")
    return int(size)


def resolve_reference(spec: str, default_size: int | None = None):
    """An .npz path as is, or `fashion-test[:SIZE]` -> uint8 (N, S, S, 1) array."""
    size = fashion_size(spec, default_size)
    if size is None:
        return spec
    from .train_features import fashion_uint8
    return fashion_uint8("test", size)[0]


def run_metrics(args) -> int:
    try:
        fashion_size(args.ref, 1)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        check_output_file("--json", args.json)
    _threads(args)
    from .npz import array_info
    ev = build_evaluator(args)
    size = array_info(args.sample)[0][1] if str(args.sample).endswith(".npz") else None
    t0 = time.time()
    result = ev.evaluate(resolve_reference(args.ref, size), args.sample)
    print(f"feature network: {result.feature_network}"
          + ("  (NOT comparable with Inception-v3 figures)" if args.features == "fashion" else ""))
    print(f"Inception Score: {result.inception_score:.4f}")
    print(f"FID: {result.fid:.4f}")
    print(f"sFID: {result.sfid:.4f}")
    print(f"Precision: {result.precision:.4f}")
    print(f"Recall: {result.recall:.4f}")
    print(f"({result.num_samples} samples, {result.num_reference} reference images, {time.time() - t0:.1f}s)")
    if args.json:
        from admrt.io import atomic_write
        text = json.dumps(result.to_dict(), indent=1)
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(text))
    return 0


def merge_reports(dirs, out, title) -> int:
    import shutil

    from .sweep import load_rows, save_grid, write_report
    rows, metas = [], []
    out = Path(out)
    loaded = []
    for d in map(Path, dirs):   # every report read before anything is written
        try:
            loaded.append((d, *load_rows(d / "results.json")))
        except OSError as exc:
            raise UsageError(f"--merge {d}: {exc.strerror or exc} ({d / 'results.json'}; expected the --out folder "
                             "of an earlier sweep)") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"--merge {d}: {d / 'results.json'} is not a sweep's results ({exc})") from None
    check_output_folder("--out", out)
    out.mkdir(parents=True, exist_ok=True)
    for d, r, m in loaded:
        rows += r
        metas.append(m)
        for row in r:
            if not row.grid or (d / row.grid).resolve() == (out / row.grid).resolve():
                continue
            samples = d / "samples" / (row.grid[len("grid_"):-len(".png")] + ".npz")
            if samples.is_file():  # re-render from the saved samples (current grid layout)
                with np.load(samples) as z:
                    images, labels = z["arr_0"], z["arr_1"] if "arr_1" in z else None
                save_grid(out / row.grid, images, labels, int(labels.max()) + 1 if labels is not None else 1, 8)
            else:
                shutil.copyfile(d / row.grid, out / row.grid)
    meta = {"command": "\n".join(m.get("command", "") for m in metas)
            + "\nadmrt eval sweep --merge " + " ".join(map(str, dirs)) + f" --out {out}"}
    for key in dict.fromkeys(k for m in metas for k in m if k != "command"):
        values = list(dict.fromkeys(str(m[key]) for m in metas if key in m))
        meta[key] = values[0] if len(values) == 1 else "; ".join(values)
    path = write_report(rows, out, meta, title=title)
    print(f"wrote {path}")
    return 0


def run_sweep_cli(args) -> int:
    if args.merge:
        return merge_reports(args.merge, args.out, args.title)
    from .sweep import SweepConfig, run_sweep, sampler_label, write_report
    try:   # every argument before any work or write
        config = SweepConfig(scales=tuple(args.scales), samplers=tuple(args.samplers),
                             num_samples=tuple(args.num_samples), batch_size=args.batch_size, seed=args.seed)
        is_fashion = fashion_size(args.reference, 1) is not None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not is_fashion and not Path(args.reference).is_file():
        raise UsageError(f"--reference={args.reference!r}: no such file; expected a reference batch .npz or "
                         "fashion-test[:SIZE]")
    check_output_folder("--out", args.out)
    _threads(args)
    import torch

    import admrt
    model = admrt.load_model(args.model, device=args.device)
    clf = admrt.load_model(args.classifier, device=args.device) if args.classifier else None
    up = admrt.load_model(args.upsampler, device=args.device) if args.upsampler else None
    engine = admrt.Engine(model, classifier=clf, upsampler=up, backend=args.backend, dtype=args.dtype,
                          device=args.device)
    size = (up or model).config.image_size
    ev = build_evaluator(args)
    t0 = time.time()
    ref = ev.reference(resolve_reference(args.reference, size))
    print(f"reference: {args.reference} at {size}x{size}, {len(ref)} images ({time.time() - t0:.0f}s)")
    if args.pr_reference_size is None:
        rows = []
        for i, steps in enumerate(config.samplers):   # P/R reference matched to each sampler's count
            ev.pr_reference_size = config.samples_for(i) if config.samples_for(i) < len(ref) else None
            sub = SweepConfig(config.scales, (steps,), (config.samples_for(i),), config.batch_size, config.seed,
                              config.grid_per_class)
            rows += run_sweep(engine, ev, ref, sub, out_dir=args.out)
    else:
        ev.pr_reference_size = args.pr_reference_size or None
        rows = run_sweep(engine, ev, ref, config, out_dir=args.out)
    meta = {
        "command": "admrt eval sweep " + " ".join(shlex.quote(a) for a in sys.argv[3:])
        if sys.argv[1:3] == ["eval", "sweep"] else "admrt eval sweep (called from Python)",
        "model": args.model, "classifier": args.classifier, "upsampler": args.upsampler,
        "reference": f"{args.reference} ({len(ref)} images at {size}x{size})",
        "feature network": f"{ev.network.name} (sha256 {ev.network.fingerprint[:16]})",
        "samples per run": ", ".join(f"{sampler_label(s)}: {config.samples_for(i)}"
                                     for i, s in enumerate(config.samplers)),
        "seeds": f"{config.seed}, {config.seed + 1}, ... (the same in every run of a sampler)",
        "precision/recall reference": ("a fixed random subset (seed 0) of the reference, as large as the "
                                       "run's sample set" if args.pr_reference_size is None else
                                       f"{args.pr_reference_size or 'all'} reference images"),
        "labels": "0..9 cycling", "backend": args.backend, "dtype": args.dtype, "device": args.device,
        "torch threads": torch.get_num_threads(), "admrt": admrt.__version__,
        "total seconds": round(time.time() - t0),
    }
    if args.features == "fashion":
        meta["description"] = (
            "Metrics use admrt's bundled Fashion-MNIST feature CNN (admrt/bundled/fashion_features.safetensors), "
            "not Inception-v3: the numbers rank these runs against each other and are NOT comparable with "
            "the paper's Inception-based FID/IS/precision/recall.")
    path = write_report(rows, args.out, meta, title=args.title)
    print(f"wrote {path}")
    return 0
