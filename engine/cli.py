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
RUN_KEYS = ("model", "classifier", "upsampler", "steps", "method", "upsampler_steps", "guidance", "classes", "num",
            "seed", "eta", "noise", "dtype", "gd_flags", "upsampler_gd_flags", "shard_size")
DEFAULT_NUM, DEFAULT_BATCH, DEFAULT_STEPS = 16, 16, "ddim25"


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
    p.add_argument("--gd-flags", default=None, metavar="FLAGS",
                   help="guided-diffusion's flags for the model (and classifier), as its image_sample.py / "
                        "classifier_sample.py take them, in one string: \"--image_size 64 --learn_sigma True ... "
                        "--model_path m.pt\". They build the presets of --model/--classifier (or their "
                        "model_path/classifier_path) and set what they name of timestep_respacing, use_ddim, "
                        "classifier_scale, num_samples, batch_size, clip_denoised, use_fp16; explicit options "
                        "win. docs/migration.md")
    p.add_argument("--upsampler-gd-flags", default=None, metavar="FLAGS",
                   help="guided-diffusion's super_res_sample.py flags for --upsampler (large_size, small_size, ...)")
    p.add_argument("--steps", default=None, help="ddimN (DDIM) or N / a,b,c (DDPM respaced); default ddim25 "
                                                 "(with --package: a step plan it carries, default its first)")
    p.add_argument("--method", choices=("ddpm", "ddim"), default=None,
                   help="sampler over the --steps respacing (default: ddim for ddimN, else ddpm); "
                        "guided-diffusion's --use_ddim")
    p.add_argument("--upsampler-steps", default=None, help="steps of the upsampler stage (default: --steps; "
                        f"{DEFAULT_STACK_UPSAMPLER_STEPS} (DDPM) for the bundled stack)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier scale (default 1.0 with a classifier, 0 without)")
    p.add_argument("--classes", default=None,
                   help="comma-separated labels, cycled over --num images (default 0,1,2,... cycling)")
    p.add_argument("--num", type=int, default=None, help=f"number of images (default {DEFAULT_NUM})")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per network call (default 16; with --package at most its bound)")
    p.add_argument("--shard-size", type=int, default=None,
                   help="images per shard file (default: 4 batches); a rerun resumes from finished shards")
    p.add_argument("--seed", type=int, default=0, help="image i gets seed SEED + i (default 0)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0)")
    p.add_argument("--noise", choices=("seeded", "reference"), default="seeded")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                   help="precision of the networks' body convolutions (default fp32; fp16 with --gd-flags "
                        "'--use_fp16 True')")
    p.add_argument("--backend", default="eager", help="eager | compile | a registered compiled backend")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--out", default="samples", help="output folder (default ./samples)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _load(spec: str, preset, role: str, device: str):
    import admrt
    from admrt.checkpoint import bundled_path

    if Path(spec).exists() or bundled_path(spec).exists():
        try:
            return admrt.load_model(spec, preset=preset, device=device)
        except (ValueError, FileNotFoundError) as exc:
            raise SystemExit(f"admrt sample: --{role}={spec!r}: {exc}") from None
    if spec in admrt.PRESETS:
        print(f"admrt sample: {role} {spec!r}: no weights found (no file, not bundled); using RANDOM weights "
              "of that preset (initialised from seed 0): the images will be noise", file=sys.stderr)
        import torch
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same random model on every run, so a resumed run matches
            return admrt.create_model(spec, device=device)
    raise SystemExit(f"admrt sample: --{role}={spec!r}: not a file, a bundled model or a preset name")


def _gd_settings(args) -> dict:
    """Read --gd-flags / --upsampler-gd-flags (replaced on args by the typed flags, which run.json
    records): {role: (the flags' model_path / classifier_path or None, Preset)}."""
    from admrt.gd_flags import infer_kind, parse_flags, preset_from_flags

    found = {}
    for option in ("gd-flags", "upsampler-gd-flags"):
        value = getattr(args, option.replace("-", "_"), None)
        if value is None:
            continue
        try:
            flags = parse_flags(value)
            if option == "gd-flags":
                if infer_kind(flags) == "superres":
                    raise ValueError("these are an upsampler's flags (large_size/small_size): pass them as "
                                     "--upsampler-gd-flags, with a base model")
                found["model"] = (flags.get("model_path") or None, preset_from_flags("unet", **flags))
                if flags.get("classifier_path") or args.classifier not in (None, "none"):
                    found["classifier"] = (flags.get("classifier_path") or None,
                                           preset_from_flags("classifier", **flags))
            else:
                found["upsampler"] = (flags.get("model_path") or None, preset_from_flags("superres", **flags))
        except ValueError as exc:
            raise SystemExit(f"admrt: --{option}: {exc}") from None
        setattr(args, option.replace("-", "_"), flags)
    return found


def _gd_sampling_options(args) -> None:
    """The sampling options guided-diffusion's flags name (timestep_respacing, use_ddim,
    classifier_scale, num_samples, batch_size, use_fp16, clip_denoised), where the command line
    gave none. Flags not given leave admrt's defaults."""
    flags = args.gd_flags
    if not flags:
        return
    if args.steps is None and "timestep_respacing" in flags:
        args.steps = flags["timestep_respacing"] or str(flags.get("diffusion_steps", 1000))
    if args.method is None and "use_ddim" in flags:
        args.method = "ddim" if flags["use_ddim"] else "ddpm"
    if args.guidance is None and "classifier_scale" in flags and flags.get("classifier_path"):
        args.guidance = flags["classifier_scale"]
    if args.num is None and "num_samples" in flags:
        args.num = flags["num_samples"]
    if args.batch_size is None and "batch_size" in flags:
        args.batch_size = flags["batch_size"]
    if args.dtype is None and flags.get("use_fp16"):
        args.dtype = "fp16"
    args.clip_denoised = flags.get("clip_denoised", True)


def _models(args, device):
    gd = _gd_settings(args)
    for role in ("model", "classifier", "upsampler"):
        if role in gd and getattr(args, f"{role}_preset") is not None:
            raise SystemExit(f"admrt sample: --{role}-preset and --{'upsampler-' if role == 'upsampler' else ''}"
                             "gd-flags both give the preset; pass one")
    if "model" in gd and args.model is None:
        args.model = gd["model"][0]
        if args.model is None:
            raise SystemExit("admrt sample: --gd-flags: no --model_path in the flags; pass --model PATH")
    if "upsampler" in gd and args.upsampler is None:
        args.upsampler = gd["upsampler"][0]
        if args.upsampler is None:
            raise SystemExit("admrt sample: --upsampler-gd-flags: no --model_path in the flags; pass --upsampler PATH")
    if "model" in gd and args.classifier is None:
        args.classifier = gd["classifier"][0] if "classifier" in gd else "none"  # image_sample.py: none
    preset_of = {role: (gd[role][1] if role in gd else getattr(args, f"{role}_preset"))
                 for role in ("model", "classifier", "upsampler")}
    explicit = args.model is not None
    model = _load(args.model or DEFAULT_STACK[0], preset_of["model"], "model", device)
    clf_spec = args.classifier if args.classifier is not None else (None if explicit else DEFAULT_STACK[1])
    up_spec = args.upsampler if args.upsampler is not None else (None if explicit else DEFAULT_STACK[2])
    clf = None if clf_spec in (None, "none") else _load(clf_spec, preset_of["classifier"], "classifier", device)
    up = None if up_spec in (None, "none") else _load(up_spec, preset_of["upsampler"], "upsampler", device)
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
                                                  "upsampler", "upsampler_preset", "gd_flags", "upsampler_gd_flags",
                                                  "method", "dtype") if getattr(args, k) is not None]
    given += ["--backend"] * (args.backend != "eager")
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
        # A key missing from an older record reads as None (an option that did not exist then).
        changed = sorted(key for key in set(record) | set(previous) if previous.get(key) != record.get(key))
        if changed:
            return f"admrt sample: {out} holds a run with other arguments ({', '.join(changed)}); use another --out or delete it"
    else:
        atomic_write(manifest, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
    return None


def _method_options(args) -> dict:
    """Engine.sample's options that only eager-model runs take (a package fixes them)."""
    if args.package is not None:
        return {}
    return {"method": args.method, "clip_denoised": args.clip_denoised}


def run(args: argparse.Namespace) -> int:
    import torch

    if (args.num is not None and args.num <= 0) or (args.batch_size is not None and args.batch_size <= 0):
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
    args.clip_denoised = True
    if args.package is not None:
        args.num = args.num or DEFAULT_NUM
        engine = _package_engine(args, device)
        models = ()
    else:
        models = model, clf, up = _models(args, device)
        _gd_sampling_options(args)
        args.steps, args.num = args.steps or DEFAULT_STEPS, args.num or DEFAULT_NUM
        args.batch_size, args.dtype = args.batch_size or DEFAULT_BATCH, args.dtype or "fp32"
        if args.num <= 0 or args.batch_size <= 0:
            raise SystemExit(f"admrt sample: num_samples={args.num} and batch_size={args.batch_size} (--gd-flags) "
                             "must be positive")
        if up is not None and args.upsampler_steps is None and args.model is None and args.upsampler is None:
            args.upsampler_steps = DEFAULT_STACK_UPSAMPLER_STEPS
        try:
            engine = Engine(model, classifier=clf, upsampler=up, backend=args.backend, dtype=args.dtype,
                            device=device)
        except (TypeError, ValueError) as exc:
            raise SystemExit(f"admrt sample: {exc}") from None
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
                eta=args.eta, noise=args.noise, upsampler_steps=args.upsampler_steps, **_method_options(args),
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
