"""`admrt sample`: images from a model (default: the bundled Fashion-MNIST stack, guided base ->
upsampler), written as guided-diffusion's sample scripts do: an .npz with arr_0 (uint8 NHWC)
and arr_1 (labels), plus a PNG grid.

The run itself is the C++ library's (engine/csrc/runfolder.cpp, `core.run_samples`, the one
implementation that `admrt-sample` runs too): validation, OUT/run.json, the lock, shards of
--shard-size images (OUT/shards/shard_00000.npz, ...) written atomically, a rerun with the same
arguments skipping the finished shards, and the final .npz. This file parses the options, loads the
models into an Engine, adds the record fields that describe them (presets, weights files, backend,
precision), and writes grid.png from the final .npz.

`--package DIR` samples from an exported AOTInductor package: the same record as `admrt-sample`
writes, so either program resumes the other's run. Under `torchrun --nproc_per_node N -m
admrt.cli sample ...` rank r samples the shards s with s % N == r on its own GPU (cuda:LOCAL_RANK),
and rank 0 writes the final .npz once all are done.
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import numpy as np

from admrt.cli import (SEED_MAX, CommandError, Interrupted, OptionValueError, UsageError, device_value, finite_float,
                       nonempty, positive_int, seed_value)
from admrt.distributed import leaving_process_group
from admrt.io import atomic_write, device_description, file_fingerprint
from admrt.core import Method
from admrt.stack_loading import (DEFAULT_STACK, DEFAULT_STACK_UPSAMPLER_STEPS, DEFAULT_STEPS, load_models,
                                 upsampler_steps)

# The options that name the models a run samples from: recorded beside the request's own fields,
# which run_samples records itself (engine/csrc/runfolder.cpp, run_record).
MODEL_KEYS = ("model", "classifier", "upsampler", "method", "dtype", "gd_flags", "upsampler_gd_flags")
DEFAULT_NUM, DEFAULT_BATCH = 16, 16


METHODS = tuple(name.lower() for name in Method.__members__)  # the core's samplers (engine/csrc/plan.h)


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
    p.add_argument("--steps", type=nonempty, default=None, help="step plan: ddimN (DDIM), N / a,b,c (DDPM respaced), or a solver "
                                                 "with N model calls: dpmpp2mN, dpmpp3mN, dpmpp2m-sdeN, unipc2mN, "
                                                 "unipc3mN (append -logsnr for a log-SNR grid); default "
                                                 f"{DEFAULT_STEPS} (with --package: a step plan it carries, "
                                                 "default its first)")
    p.add_argument("--method", choices=METHODS, default=None,
                   help="sampler over the --steps respacing (default: ddim for ddimN, else ddpm); "
                        "guided-diffusion's --use_ddim")
    p.add_argument("--upsampler-steps", default=None, help="steps of the upsampler stage (default: --steps; "
                        f"{DEFAULT_STACK_UPSAMPLER_STEPS} (DDPM) for the bundled stack)")
    p.add_argument("--guidance", type=finite_float, default=None,
                   help="classifier scale (default 1.0 with a classifier, 0 without)")
    p.add_argument("--classes", type=class_list, default=None,
                   help="comma-separated labels, cycled over --num images (default 0,1,2,... cycling)")
    p.add_argument("--num", type=positive_int, default=None, help=f"number of images (default {DEFAULT_NUM})")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="images per network call (default 16; with --package at most its bound)")
    p.add_argument("--shard-size", type=positive_int, default=None,
                   help="images per shard: the run is written as OUT/shards/shard_NNNNN.npz files of this many "
                        "images, each atomically, and a rerun of the same command samples only the missing ones "
                        "(default: 4 batches)")
    p.add_argument("--seed", type=seed_value, default=0,
                   help=f"image i gets seed SEED + i, from 0 to {SEED_MAX} (wrapping past it; default 0)")
    add_step_options(p)
    p.add_argument("--noise", choices=("seeded", "reference"), default="seeded",
                   help="seeded: each image's noise comes from its own seed (counter-based), the same at any batch "
                        "size, position and device; reference: one torch generator drawn in guided-diffusion's "
                        "order, for parity with it (images then depend on the batch size; uncaptured)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                   help="precision of the networks' body convolutions (default fp32; fp16 with --gd-flags "
                        "'--use_fp16 True')")
    add_backend_arguments(p)
    p.add_argument("--device", type=device_value, default=None,
                   help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--out", type=nonempty, default="samples", help="the run folder (default ./samples): run.json, shards/, the final "
                                                    ".npz and grid.png; a rerun of the same command resumes it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_step_options(p: argparse.ArgumentParser) -> None:
    """The step options beside the plan: --eta, --guidance-interval, --guidance-every,
    --dynamic-threshold (admrt sample's and admrt serve's)."""
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0)")
    p.add_argument("--guidance-interval", type=int, nargs=2, default=None, metavar=("T_MIN", "T_MAX"),
                   help="run the classifier only at model timesteps T_MIN..T_MAX (0..T-1); elsewhere it is not run")
    p.add_argument("--guidance-every", type=int, default=1, metavar="K",
                   help="run the classifier on every K-th model call only (default 1)")
    p.add_argument("--dynamic-threshold", type=float, default=0.0, metavar="P",
                   help="Imagen's dynamic thresholding of x_0 at percentile P (e.g. 0.995) instead of the clamp")


def add_backend_arguments(p: argparse.ArgumentParser) -> None:
    """--backend and --cache-dir: admrt sample's and admrt serve's."""
    p.add_argument("--backend", default="auto",
                   help="auto | eager | compile | aoti | onnxruntime | openvino | tensorrt (engine/backends.py), or "
                        "one registered with admrt.engine.register_backend. auto (default): the backend measured "
                        "fastest for the device (CPU: aoti for a model under 50M parameters, else openvino, compiled "
                        "on the first run and kept in the compile cache; CUDA: eager with whole-step CUDA graphs)")
    p.add_argument("--cache-dir", default=None,
                   help="the compile cache (default $ADMRT_CACHE_DIR, else $XDG_CACHE_HOME/admrt, else ~/.cache/admrt; "
                        "admrt cache list | clear)")


def models_engine(args, loaded, device):
    """The Engine of the models a command line loaded (admrt sample's and admrt serve's), on
    --backend with --dtype (default fp32) and --cache-dir."""
    from .engine import Engine

    try:
        return Engine(loaded.model, classifier=loaded.classifier, upsampler=loaded.upsampler, backend=args.backend,
                      dtype=args.dtype or "fp32", device=device, cache_dir=args.cache_dir)
    except (TypeError, ValueError, OSError) as exc:
        raise CommandError(f"{exc}") from None


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


def package_engine(args, device):
    """Engine.from_package for --package (also `admrt serve`'s); the model options are refused beside it."""
    from .engine import Engine

    given = [f"--{k.replace('_', '-')}" for k in ("model", "model_preset", "classifier", "classifier_preset",
                                                  "upsampler", "upsampler_preset", "gd_flags", "upsampler_gd_flags",
                                                  "dtype") if getattr(args, k) is not None]
    given += ["--backend"] * (args.backend != "auto")
    if given:
        raise CommandError(f"--package holds the models, their precision and backend; drop {', '.join(given)}")
    try:
        engine = Engine.from_package(args.package, device=device)
    except (ValueError, RuntimeError) as exc:
        raise CommandError(f"{exc}") from None
    return engine


def _extra_record(args, loaded, device, backend: str) -> dict:
    """The record fields (OUT/run.json) that describe an Engine built here from models, beside the
    common ones run_samples writes (steps, guidance, classes, num, seed, eta, noise, shard_size,
    ...): a rerun must match them to resume (`backend` is the one that ran: "auto" resolved). A package
    run has none: its record is admrt-sample's."""
    record = {key: getattr(args, key) for key in MODEL_KEYS}
    record.update(backend=backend, device=device_description(device),
                  models=[getattr(m, "preset", None) and m.preset.name for m in loaded[:3]],
                  weights=[file_fingerprint(s) if isinstance(s, Path) else s for s in loaded.sources])
    return record


def run(args: argparse.Namespace) -> int:
    import torch

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


def class_list(text: str) -> list[int]:
    """--classes: comma-separated class ids (ints >= 0; the model's range is the core's to check), cycled
    over --num by run_samples."""
    try:
        ids = [int(c, 10) for c in text.split(",")]
    except ValueError:
        ids = None
    if not ids or not all(0 <= i < 2 ** 63 for i in ids):
        raise OptionValueError("expected comma-separated ints (class ids from 0 to the model's classes - 1)")
    return ids


def _int64(seed: int) -> int:
    """A uint64 seed as the int64 of the same bits (the core's, and admrt-sample's, seed type)."""
    return seed - 2 ** 64 if seed >= 2 ** 63 else seed


def _run(args, device, rank, world, dist) -> int:
    from admrt import core

    out = Path(args.out)
    args.clip_denoised = True
    if args.package is not None:
        args.num = args.num or DEFAULT_NUM
        engine = package_engine(args, device)
        args.batch_size = args.batch_size or engine.default_batch_size
        extra = None
    else:
        loaded = load_models(args, device)
        _gd_sampling_options(args)
        args.steps, args.num = args.steps or DEFAULT_STEPS, args.num or DEFAULT_NUM
        args.batch_size, args.dtype = args.batch_size or DEFAULT_BATCH, args.dtype or "fp32"
        if args.num <= 0 or args.batch_size <= 0:
            raise CommandError(f"num_samples={args.num} and batch_size={args.batch_size} (--gd-flags) "
                               "must be positive")
        args.upsampler_steps = upsampler_steps(args, loaded)
        engine = models_engine(args, loaded, device)
        if args.guidance not in (None, 0) and engine.classifier_info is None:
            raise CommandError(f"--guidance={args.guidance}: guidance needs a --classifier (this run has none); "
                               "pass --classifier, or --guidance 0")
        extra = _extra_record(args, loaded, device, engine.backend_name)
    classes = args.classes or []
    try:
        ctx = engine.context(steps=args.steps, upsampler_steps=args.upsampler_steps, batch_size=args.batch_size,
                             eta=args.eta, noise=args.noise, method=args.method, clip_denoised=args.clip_denoised,
                             dynamic_threshold=args.dynamic_threshold, guidance_interval=args.guidance_interval,
                             guidance_every=args.guidance_every)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CommandError(str(exc).split("\n")[0]) from None
    try:   # the driver's num check (positive; the images fit this machine's memory) before anything is written
        ctx.check_num(args.num)
    except ValueError as exc:
        raise UsageError(f"--{exc}") from None

    bar = None

    def progress(done, total):
        nonlocal bar
        if bar is None:
            from tqdm.auto import tqdm
            bar = tqdm(total=total, unit="step", desc="admrt sample")
        bar.update(done - bar.n)

    def broadcast_error(message):  # rank 0's refusal of the run folder, on every rank
        box = [message]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    try:
        final = core.run_samples(
            ctx, out=str(out), command="admrt sample", num=args.num, classes=classes, guidance=args.guidance,
            seed=_int64(args.seed), shard_size=args.shard_size or 0, extra=extra, rank=rank, world=world,
            progress=progress if not args.no_progress and rank == 0 else None,
            barrier=dist.barrier if dist is not None else None,
            broadcast_error=broadcast_error if dist is not None else None)
    except KeyboardInterrupt:
        raise Interrupted("the finished shards are kept: rerun the same command to resume") from None
    except RuntimeError as exc:  # a write that failed, a damaged package unit: one line
        raise CommandError(str(exc).split("\n")[0]) from None
    finally:
        if bar is not None:
            bar.close()
    if rank != 0:
        return 0
    with np.load(final) as z:
        images = z["arr_0"]
    save_grid(out / "grid.png", images)
    print(f"admrt sample: wrote {final} and {out / 'grid.png'}")
    return 0
