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
import math
import os
import sys
from pathlib import Path

import numpy as np

from admrt.cli import CommandError, Interrupted
from admrt.distributed import leaving_process_group
from admrt.io import atomic_write
from admrt.runfolder import RunFolder, device_description, file_fingerprint
from admrt.stack_loading import DEFAULT_STACK, DEFAULT_STACK_UPSAMPLER_STEPS
from admrt.stack_loading import load_models as _models  # the name _run calls it by

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
    p.add_argument("--classifier-preset", default=None, help="preset of a released classifier .pt checkpoint")
    p.add_argument("--upsampler", default=None, help="upsampler (preset name or path); 'none' for one stage")
    p.add_argument("--upsampler-preset", default=None, help="preset of a released upsampler .pt checkpoint")
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
                   help="images per shard: the run is written as OUT/shards/shard_NNNNN.npz files of this many "
                        "images, each atomically, and a rerun of the same command samples only the missing ones "
                        "(default: 4 batches)")
    p.add_argument("--seed", type=int, default=0, help="image i gets seed SEED + i (default 0)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0)")
    p.add_argument("--noise", choices=("seeded", "reference"), default="seeded",
                   help="seeded: each image's noise comes from its own seed (counter-based), the same at any batch "
                        "size, position and device; reference: one torch generator drawn in guided-diffusion's "
                        "order, for parity with it (images then depend on the batch size; uncaptured)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                   help="precision of the networks' body convolutions (default fp32; fp16 with --gd-flags "
                        "'--use_fp16 True')")
    p.add_argument("--backend", default="eager",
                   help="eager | compile | aoti | onnxruntime | tensorrt (engine/backends.py), or one registered "
                        "with admrt.engine.register_backend (default eager)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--out", default="samples", help="the run folder (default ./samples): run.json, shards/, the final "
                                                    ".npz and grid.png; a rerun of the same command resumes it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


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
        raise CommandError(f"--package holds the models, their precision and backend; drop {', '.join(given)}")
    if args.noise != "seeded":
        raise CommandError(f"--noise={args.noise}: a package draws seeded noise only")
    try:
        engine = Engine.from_package(args.package, device=device)
        args.batch_size = args.batch_size or engine.default_batch_size
        ctx = engine.context(args.steps, args.upsampler_steps, args.batch_size, args.eta)
    except (ValueError, RuntimeError) as exc:
        raise CommandError(f"{exc}") from None
    args.steps, args.upsampler_steps = ctx.params.steps, ctx.params.upsampler_steps or None
    return engine


def _record(args, shard_size, engine, loaded, device) -> dict:
    """What a rerun must match to resume (written to OUT/run.json)."""
    if args.package is not None:  # the same record as admrt-sample writes (engine/csrc/tools/admrt_sample.cpp)
        return {"package": str(Path(args.package).resolve()), "steps": args.steps,
                "upsampler_steps": args.upsampler_steps, "guidance": args.guidance, "classes": args.classes,
                "num": args.num, "seed": args.seed, "eta": args.eta, "noise": "seeded", "shard_size": shard_size,
                "seeded_noise": engine.package.seeded_noise, "weights": engine.package.weights,
                "device": "cuda" if engine.package.device.startswith("cuda") else "cpu"}
    record = {key: getattr(args, key) for key in RUN_KEYS if key != "shard_size"}
    record.update(shard_size=shard_size, batch_size=args.batch_size, backend=args.backend,
                  device=device_description(device),
                  models=[getattr(m, "preset", None) and m.preset.name for m in loaded[:3]],
                  weights=[file_fingerprint(s) if isinstance(s, Path) else s for s in loaded.sources])
    if args.noise == "seeded":  # shards drawn with another noise map must not be mixed in
        from admrt.engine.engine import SEEDED_NOISE_FORMAT
        record["seeded_noise"] = SEEDED_NOISE_FORMAT
    return record


def _method_options(args) -> dict:
    """Engine.sample's options that only eager-model runs take (a package fixes them)."""
    if args.package is not None:
        return {}
    return {"method": args.method, "clip_denoised": args.clip_denoised}


def run(args: argparse.Namespace) -> int:
    import torch

    for flag in ("num", "batch_size", "shard_size"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise CommandError(f"--{flag.replace('_', '-')}={value}: expected a positive int")
    rank, world = _ranks()
    dist = None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if world > 1:
        import torch.distributed as dist
        if device.startswith("cuda") and args.device is None:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    with leaving_process_group():
        return _run(args, device, rank, world, dist)


def _labels(args, engine) -> np.ndarray | None:
    """The run's labels: --classes cycled over --num, else 0, 1, ... cycling (None: unlabelled)."""
    if args.classes:
        try:
            chosen = [int(c) for c in args.classes.split(",")]
        except ValueError:
            raise CommandError(f"--classes={args.classes!r}: expected comma-separated ints") from None
        return np.resize(np.asarray(chosen, dtype=np.int64), args.num)
    k = engine.num_classes
    return None if k is None else np.arange(args.num, dtype=np.int64) % k


def _validate(args, engine, labels, shard_size) -> None:
    """Every argument checked before anything is written (a rejected command leaves nothing
    behind): the engine's own checks of `sample`, phrased with the command's options."""
    if args.package is not None:
        try:
            engine.context(args.steps, args.upsampler_steps, args.batch_size, args.eta).validate(
                [] if labels is None else labels.tolist(), [] if args.guidance is None else [args.guidance],
                args.num)
        except (ValueError, RuntimeError) as exc:
            raise CommandError(str(exc)) from None
        return
    if args.guidance not in (None, 0) and engine.classifier_info is None:
        raise CommandError(f"--guidance={args.guidance}: guidance needs a --classifier (this run has none); "
                           "pass --classifier, or --guidance 0")
    try:
        engine.check(classes=None if labels is None else labels, num=args.num, steps=args.steps,
                     guidance=args.guidance, seeds=args.seed, batch_size=args.batch_size, eta=args.eta,
                     noise=args.noise, upsampler_steps=args.upsampler_steps, method=args.method)
    except (TypeError, ValueError) as exc:
        raise CommandError(str(exc)) from None


def _run(args, device, rank, world, dist) -> int:
    from .engine import Engine

    out = Path(args.out)
    args.clip_denoised = True
    if args.package is not None:
        args.num = args.num or DEFAULT_NUM
        engine = _package_engine(args, device)
        loaded = None
    else:
        loaded = _models(args, device)
        _gd_sampling_options(args)
        args.steps, args.num = args.steps or DEFAULT_STEPS, args.num or DEFAULT_NUM
        args.batch_size, args.dtype = args.batch_size or DEFAULT_BATCH, args.dtype or "fp32"
        if args.num <= 0 or args.batch_size <= 0:
            raise CommandError(f"num_samples={args.num} and batch_size={args.batch_size} (--gd-flags) "
                               "must be positive")
        if loaded.upsampler is not None and args.upsampler_steps is None and args.model is None \
                and args.upsampler is None:
            args.upsampler_steps = DEFAULT_STACK_UPSAMPLER_STEPS
        try:
            engine = Engine(loaded.model, classifier=loaded.classifier, upsampler=loaded.upsampler,
                            backend=args.backend, dtype=args.dtype, device=device)
        except (TypeError, ValueError) as exc:
            raise CommandError(f"{exc}") from None
    shard_size = args.shard_size or 4 * args.batch_size
    labels = _labels(args, engine)
    _validate(args, engine, labels, shard_size)

    n_shards = math.ceil(args.num / shard_size)
    shard_paths = [out / "shards" / f"shard_{s:05d}.npz" for s in range(n_shards)]
    # Rank 0 holds the folder (lock, record); every rank stops on a mismatch.
    folder, error = RunFolder(out, "admrt sample"), None
    if rank == 0:
        try:
            folder.lock()
            (out / "shards").mkdir(parents=True, exist_ok=True)
            finished = sum(1 for p in (out / "shards").glob("shard_*.npz"))
            folder.check_record(_record(args, shard_size, engine, loaded, device), finished=finished,
                                may_differ=("batch_size",) if args.noise == "seeded" else ())
        except (CommandError, ValueError, OSError) as exc:  # every rank learns of it (no rank left waiting)
            folder.unlock()
            error = str(exc)
    if dist is not None:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise CommandError(error)
    try:
        return _sample_shards(args, engine, labels, shard_size, shard_paths, rank, world, dist)
    except KeyboardInterrupt:
        raise Interrupted("the finished shards are kept: rerun the same command to resume") from None
    finally:
        folder.unlock()


def _sample_shards(args, engine, labels, shard_size, shard_paths, rank, world, dist) -> int:
    out, n_shards = Path(args.out), len(shard_paths)
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

    parts = [_read_shard(p) for p in shard_paths]
    images = np.concatenate([p[0] for p in parts])
    labels_out = np.concatenate([p[1] for p in parts]) if parts[0][1] is not None else None
    shape_str = "x".join(str(d) for d in images.shape)
    final = out / f"samples_{shape_str}.npz"
    _save_npz(final, images, labels_out)
    save_grid(out / "grid.png", images)
    print(f"admrt sample: wrote {final} and {out / 'grid.png'}")
    return 0


def _read_shard(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(images, labels) of a finished shard; a damaged one is named, with how to redo it."""
    try:
        with np.load(path) as z:
            return z["arr_0"], (z["arr_1"] if "arr_1" in z else None)
    except Exception as exc:  # zip, pickle or header errors of a file damaged outside admrt
        raise CommandError(f"{path}: damaged shard ({type(exc).__name__}: {exc}); delete it and rerun the same "
                           "command to sample it again") from None
