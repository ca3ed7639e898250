"""`admrt sample`: images from a model (default: the bundled Fashion-MNIST stack, guided base ->
upsampler), written as guided-diffusion's sample scripts do: an .npz with arr_0 (uint8 NHWC)
and arr_1 (labels), plus a PNG grid.

A run is cut into shards of --shard-size images (OUT/shards/shard_00000.npz, ...), each written
atomically (temporary file + os.replace); a rerun with the same arguments skips the finished
shards, so an interrupted large run resumes. OUT/run.json records the arguments of the run.

`--package DIR` samples from an exported AOTInductor package through the C++ Context that
`admrt-sample` runs (the same run folder: either program resumes the other's run). Under
`torchrun --nproc_per_node N -m admrt.cli sample ...` rank r samples the shards s with
s % N == r on its own GPU (cuda:LOCAL_RANK), and rank 0 writes the final .npz once all are done.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from admrt.io import atomic_write

DEFAULT_STACK = ("fashion16-cond", "fashion16-classifier", "fashion-upsample16-32")
# The bundled upsampler is short-trained: DDIM-25 leaves speckle, DDPM-100 gives clean images
# (training/RECIPES.md), so the default stack samples its second stage with DDPM-100.
DEFAULT_STACK_UPSAMPLER_STEPS = "100"
RUN_KEYS = ("model", "classifier", "upsampler", "steps", "upsampler_steps", "guidance", "classes", "num",
            "seed", "eta", "noise", "dtype", "shard_size")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="preset name or checkpoint path (.safetensors, or a released .pt with --model-preset); "
                        f"default: the bundled stack {', '.join(DEFAULT_STACK)}")
    p.add_argument("--model-preset", default=None, help="preset of a released .pt checkpoint")
    p.add_argument("--package", default=None,
                   help="an exported package folder (admrt export aoti) instead of --model/--classifier/--upsampler: "
                        "runs the C++ runtime that admrt-sample runs")
    p.add_argument("--classifier", default=None,
                   help="noisy classifier (preset name or path) for guidance; 'none' for no guidance")
    p.add_argument("--classifier-preset", default=None)
    p.add_argument("--upsampler", default=None, help="upsampler (preset name or path); 'none' for one stage")
    p.add_argument("--upsampler-preset", default=None)
    p.add_argument("--steps", default=None, help="ddimN (DDIM) or N / a,b,c (DDPM respaced); default ddim25 "
                                                 "(with --package: a step plan it carries, default its first)")
    p.add_argument("--upsampler-steps", default=None, help="steps of the upsampler stage (default: --steps; "
                        f"{DEFAULT_STACK_UPSAMPLER_STEPS} (DDPM) for the bundled stack)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier scale (default 1.0 with a classifier, 0 without)")
    p.add_argument("--classes", default=None,
                   help="comma-separated labels, cycled over --num images (default 0,1,2,... cycling)")
    p.add_argument("--num", type=int, default=16, help="number of images (default 16)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per network call (default 16; with --package at most its bound)")
    p.add_argument("--shard-size", type=int, default=None,
                   help="images per shard file (default: 4 batches); a rerun resumes from finished shards")
    p.add_argument("--seed", type=int, default=0, help="image i gets seed SEED + i (default 0)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0)")
    p.add_argument("--noise", choices=("seeded", "reference"), default="seeded")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    p.add_argument("--backend", default="eager", help="eager | compile | a registered compiled backend")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--out", default="samples", help="output folder (default ./samples)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _load(spec: str, preset: str | None, role: str, device: str):
    import admrt
    from admrt.checkpoint import bundled_path

    if Path(spec).exists() or bundled_path(spec).exists():
        return admrt.load_model(spec, preset=preset, device=device)
    if spec in admrt.PRESETS:
        print(f"admrt sample: {role} {spec!r}: no weights found (no file, not bundled); using RANDOM weights "
              "of that preset (initialised from seed 0): the images will be noise", file=sys.stderr)
        import torch
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same random model on every run, so a resumed run matches
            return admrt.create_model(spec, device=device)
    raise SystemExit(f"admrt sample: --{role}={spec!r}: not a file, a bundled model or a preset name")


def _models(args, device):
    explicit = args.model is not None
    model = _load(args.model or DEFAULT_STACK[0], args.model_preset, "model", device)
    clf_spec = args.classifier if args.classifier is not None else (None if explicit else DEFAULT_STACK[1])
    up_spec = args.upsampler if args.upsampler is not None else (None if explicit else DEFAULT_STACK[2])
    clf = None if clf_spec in (None, "none") else _load(clf_spec, args.classifier_preset, "classifier", device)
    up = None if up_spec in (None, "none") else _load(up_spec, args.upsampler_preset, "upsampler", device)
    return model, clf, up


def _save_npz(path: Path, images: np.ndarray, labels: np.ndarray | None) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            if labels is None:
                np.savez(f, images)
            else:
                np.savez(f, images, labels)
    atomic_write(path, write)


def save_grid(path: Path, images: np.ndarray, max_images: int = 64, min_side: int = 512) -> None:
    """A square-ish PNG grid of the first `max_images` uint8 NHWC images, enlarged by an integer
    factor (nearest neighbour) to at least `min_side` pixels so small images can be seen."""
    from PIL import Image

    imgs = images[:max_images]
    n, h, w, c = imgs.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + 2) + 2, cols * (w + 2) + 2, c), dtype=np.uint8)
    for i, im in enumerate(imgs):
        r, q = divmod(i, cols)
        grid[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + q * (w + 2):2 + q * (w + 2) + w] = im
    pil = Image.fromarray(grid[..., 0] if c == 1 else grid)
    factor = max(1, min_side // max(pil.size))
    if factor > 1:
        pil = pil.resize((pil.size[0] * factor, pil.size[1] * factor), Image.NEAREST)
    atomic_write(path, lambda tmp: pil.save(tmp, format="PNG"))


def _ranks():
    """(rank, world size) under torchrun (RANK / WORLD_SIZE), else (0, 1)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _package_engine(args, device):
    from .engine import Engine

    given = [f"--{k.replace('_', '-')}" for k in ("model", "model_preset", "classifier", "classifier_preset",
                                                  "upsampler", "upsampler_preset") if getattr(args, k) is not None]
    given += ["--dtype"] * (args.dtype != "fp32") + ["--backend"] * (args.backend != "eager")
    if given:
        raise SystemExit(f"admrt sample: --package holds the models, their precision and backend; drop {', '.join(given)}")
    if args.noise != "seeded":
        raise SystemExit(f"admrt sample: --noise={args.noise}: a package draws seeded noise only")
    try:
        engine = Engine.from_package(args.package, device=device)
        args.batch_size = args.batch_size or engine.default_batch_size
        ctx = engine.context(args.steps, args.upsampler_steps, args.batch_size, args.eta)
    except (ValueError, RuntimeError) as exc:
        raise SystemExit(f"admrt sample: {exc}") from None
    args.steps, args.upsampler_steps = ctx.params.steps, ctx.params.upsampler_steps or None
    return engine


def _record(args, shard_size, engine, models) -> dict:
    """What a rerun must match to resume (written to OUT/run.json)."""
    if args.package is not None:  # the same record as admrt-sample writes (engine/csrc/tools/admrt_sample.cpp)
        return {"package": str(Path(args.package).resolve()), "steps": args.steps,
                "upsampler_steps": args.upsampler_steps, "guidance": args.guidance, "classes": args.classes,
                "num": args.num, "seed": args.seed, "eta": args.eta, "noise": "seeded", "shard_size": shard_size,
                "seeded_noise": engine.package.seeded_noise}
    record = {key: getattr(args, key) for key in RUN_KEYS if key != "shard_size"}
    record.update(shard_size=shard_size, models=[getattr(m, "preset", None) and m.preset.name for m in models])
    if args.noise == "seeded":  # shards drawn with another noise map must not be mixed in
        from admrt.engine.engine import SEEDED_NOISE_FORMAT
        record["seeded_noise"] = SEEDED_NOISE_FORMAT
    return record


def _check_record(out: Path, record: dict) -> str | None:
    """None if OUT/run.json is absent (then written) or equal to `record`, else the error."""
    manifest = out / "run.json"
    if manifest.exists():
        previous = json.loads(manifest.read_text())
        if previous != record:
            changed = sorted(key for key in set(record) | set(previous) if previous.get(key) != record.get(key))
            return f"admrt sample: {out} holds a run with other arguments ({', '.join(changed)}); use another --out or delete it"
    else:
        atomic_write(manifest, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
    return None


def run(args: argparse.Namespace) -> int:
    import torch

    if args.num <= 0 or (args.batch_size is not None and args.batch_size <= 0):
        raise SystemExit(f"admrt sample: --num={args.num} and --batch-size={args.batch_size} must be positive")
    rank, world = _ranks()
    dist = None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if world > 1:
        import torch.distributed as dist
        if device.startswith("cuda") and args.device is None:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        return _run(args, device, rank, world, dist)
    finally:
        if dist is not None:
            dist.destroy_process_group()


def _run(args, device, rank, world, dist) -> int:
    from .engine import Engine

    out = Path(args.out)
    if args.package is not None:
        engine = _package_engine(args, device)
        models = ()
    else:
        args.steps = args.steps or "ddim25"
        args.batch_size = args.batch_size or 16
        models = model, clf, up = _models(args, device)
        if up is not None and args.upsampler_steps is None and args.model is None and args.upsampler is None:
            args.upsampler_steps = DEFAULT_STACK_UPSAMPLER_STEPS
        engine = Engine(model, classifier=clf, upsampler=up, backend=args.backend, dtype=args.dtype, device=device)
    shard_size = args.shard_size or 4 * args.batch_size
    k = engine.num_classes
    if args.classes:
        try:
            chosen = [int(c) for c in args.classes.split(",")]
        except ValueError:
            raise SystemExit(f"admrt sample: --classes={args.classes!r}: expected comma-separated ints") from None
        labels = np.resize(np.asarray(chosen, dtype=np.int64), args.num)
    else:
        labels = None if k is None else np.arange(args.num, dtype=np.int64) % k

    # Rank 0 checks (or writes) the run record; every rank stops on a mismatch.
    error = None
    if rank == 0:
        (out / "shards").mkdir(parents=True, exist_ok=True)
        error = _check_record(out, _record(args, shard_size, engine, models))
    if dist is not None:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise SystemExit(error)

    n_shards = math.ceil(args.num / shard_size)
    shard_paths = [out / "shards" / f"shard_{s:05d}.npz" for s in range(n_shards)]
    todo = [s for s in range(n_shards) if not shard_paths[s].exists()]
    if len(todo) < n_shards and rank == 0:
        print(f"admrt sample: resuming: {n_shards - len(todo)} of {n_shards} shards already done", file=sys.stderr)
    todo = [s for s in todo if s % world == rank]  # each rank its own shards

    bar = None
    if not args.no_progress and todo and rank == 0:
        from tqdm.auto import tqdm
        per_batch = engine.steps_per_batch(args.steps, args.upsampler_steps)
        n_batches = sum(math.ceil((min((s + 1) * shard_size, args.num) - s * shard_size) / args.batch_size)
                        for s in todo)
        bar = tqdm(total=n_batches * per_batch, unit="step", desc="admrt sample")
    try:
        for s in todo:
            lo, hi = s * shard_size, min((s + 1) * shard_size, args.num)
            result = engine.sample(
                classes=None if labels is None else labels[lo:hi].tolist(), num=hi - lo, steps=args.steps,
                guidance=args.guidance, seeds=[args.seed + i for i in range(lo, hi)], batch_size=args.batch_size,
                eta=args.eta, noise=args.noise, upsampler_steps=args.upsampler_steps,
                progress=(lambda done, total: bar.update(1)) if bar is not None else None)
            _save_npz(shard_paths[s], result.images, result.labels)
    finally:
        if bar is not None:
            bar.close()
    if dist is not None:
        dist.barrier()  # every rank's shards are written
    if rank != 0:
        return 0

    parts = [np.load(p) for p in shard_paths]
    images = np.concatenate([p["arr_0"] for p in parts])
    labels_out = np.concatenate([p["arr_1"] for p in parts]) if "arr_1" in parts[0] else None
    shape_str = "x".join(str(d) for d in images.shape)
    final = out / f"samples_{shape_str}.npz"
    _save_npz(final, images, labels_out)
    save_grid(out / "grid.png", images)
    print(f"admrt sample: wrote {final} and {out / 'grid.png'}")
    return 0
