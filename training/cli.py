"""`admrt train diffusion|classifier|upsampler`: train an ADM network on Fashion-MNIST or a
folder of images, with a progress bar, a CSV loss log (and TensorBoard when installed),
periodic sample grids and resumable checkpoints.

The output folder is a run folder (engine/csrc/runfolder.h, bound as admrt.core.RunFolder):
OUT/run.json records the task, preset, data and every training setting; rerunning the same
command continues from the latest checkpoint, a command with other settings is refused (naming
them) while OUT holds checkpoints, and `--resume CKPT` continues a checkpoint's run (into an
empty --out, it forks it). A folder holding another command's work (an `admrt sample` run) or
checkpoints without their run.json is refused. Every argument, the --resume file (read as a
training state, one line if it is not one) and the memory a step needs (measured on the meta
device) are checked before OUT is touched; a run that fails before its first checkpoint removes
what it made (RunFolder.abandon). A non-finite loss or weights stop the run with an error naming
the step; Ctrl-C writes a checkpoint of the last finished step and exits 130.

    admrt train diffusion --data fashion-mnist --preset fashion16-cond --steps 8000 \
        --batch-size 256 --lr 2e-4 --ema 0.9999 --dtype bf16 --out runs/base
    torchrun --nproc_per_node 4 -m admrt.training.cli diffusion ...   # multi-GPU (DDP)
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from admrt.cli import CommandError, Interrupted, device_value, int_in, nonempty, positive_int, seed_value
from admrt.io import atomic_write
from admrt.core import RunFolder

DEFAULT_PRESETS = {"diffusion": "fashion16-cond", "classifier": "fashion16-classifier",
                   "upsampler": "fashion-upsample16-32"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", choices=("diffusion", "classifier", "upsampler"), help="which network to train")
    p.add_argument("--data", default="fashion-mnist",
                   help="'fashion-mnist' (Debian's dataset-fashion-mnist) or a folder of images "
                        "(class = file-name prefix before the first '_')")
    p.add_argument("--data-root", default=None, help="folder of the Fashion-MNIST IDX .gz files "
                   "(default /usr/share/datasets/fashion-mnist)")
    p.add_argument("--limit", type=positive_int, default=None, help="use only the first N training images")
    p.add_argument("--preset", default=None, help="model preset (default: the bundled one of the task)")
    p.add_argument("--gd-flags", default=None, metavar="FLAGS",
                   help="the network and diffusion as guided-diffusion's image_train.py / classifier_train.py / "
                        "super_res_train.py flags give them (\"--image_size 64 --num_channels 128 ... --use_kl "
                        "True\"), instead of --preset; its training flags (lr, batch_size, ...) are not read: "
                        "pass admrt's options (docs/migration.md)")
    p.add_argument("--steps", type=positive_int, default=10000, help="optimizer steps in all (a resumed run may raise it)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="global batch per optimizer step")
    p.add_argument("--microbatch", type=int_in(0, 2 ** 63 - 1, "an int"), default=0,
                   help="per-process microbatch (gradient accumulation); 0: the whole per-process batch")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--ema", type=float, nargs="*", default=None,
                   help="EMA rates (default 0.9999 for diffusion/upsampler, none for the classifier)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="fp32, fp16 (autocast + dynamic loss scaling) or bf16 (autocast); master weights stay fp32")
    p.add_argument("--schedule-sampler", choices=("uniform", "loss-second-moment"), default="uniform",
                   help="how timesteps are drawn: uniformly, or by importance from the loss history")
    p.add_argument("--anneal-lr", action="store_true", help="decay the learning rate linearly to 0")
    p.add_argument("--grad-clip", type=float, default=0.0, help="clip the gradient norm to this (0: no clipping)")
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    p.add_argument("--random-crop", action="store_true", help="random resized crops (classifier default)")
    p.add_argument("--no-random-crop", action="store_true", help="no random resized crops (also for the classifier)")
    p.add_argument("--unnoised", action="store_true", help="classifier on clean images at t = 0")
    p.add_argument("--fused-kernels", action="store_true", help="use the fused Triton kernels")
    p.add_argument("--seed", type=seed_value, default=0, help="seed of the data order, timesteps, noise and init")
    p.add_argument("--device", type=device_value, default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--out", type=nonempty, required=True, help="the run folder (run.json, checkpoints, log.csv, grids); "
                   "rerunning the same command resumes from its latest checkpoint")
    p.add_argument("--resume", default=None, help="continue the run of a checkpoint: a state_*.safetensors file or "
                   "a run folder (its latest); into an empty --out it forks that run (default: --out's own run)")
    p.add_argument("--save-every", type=int, default=2000,
                   help="write a checkpoint every N steps (0: only at the end); one is always written at the end")
    p.add_argument("--log-every", type=int, default=50,
                   help="a log.csv row (the means since the last row) every N steps; NaN checks at the same rate")
    p.add_argument("--sample-every", type=int, default=0, help="write a sample grid every N steps (0: never)")
    p.add_argument("--export", default=None, help="also write the final weights (the first EMA, "
                   "else the model) to this .safetensors file (default: none)")
    p.add_argument("--time-limit", type=float, default=0.0,
                   help="stop after this many seconds, with a checkpoint (0: no limit)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log.csv is written all the same)")
    p.add_argument("--eval-images", type=int, default=2000, help="test-split images for the final evaluation")


def _check_arguments(args) -> None:
    """The options the trainer does not check itself, before anything is loaded or written."""
    checks = [("--save-every", args.save_every, args.save_every >= 0, "an int >= 0 (0: only at the end)"),
              ("--log-every", args.log_every, args.log_every >= 1, "a positive int"),
              ("--sample-every", args.sample_every, args.sample_every >= 0, "an int >= 0 (0: never)"),
              ("--time-limit", args.time_limit, args.time_limit >= 0, "seconds >= 0 (0: no limit)"),
              ("--limit", args.limit, args.limit is None or args.limit > 0, "a positive int"),
              ("--eval-images", args.eval_images, args.eval_images >= 0, "an int >= 0"),
              ("--ema", args.ema, all(0 <= r < 1 for r in args.ema or ()), "rates in [0, 1)"),
              ("--export", args.export, args.export is None or args.export.endswith(".safetensors"),
               "a .safetensors file name")]
    for flag, value, ok, expected in checks:
        if not ok:
            raise CommandError(f"{flag}={value!r}: expected {expected}")
    if Path(args.out).is_file():
        raise CommandError(f"--out={args.out!r}: a file, not a folder")


def _check_batch(args, cfg, world: int) -> None:
    """The batch split over processes and microbatches (Trainer's rule), before the folder is touched."""
    if cfg.batch_size % world:
        raise CommandError(f"--batch-size={cfg.batch_size}: expected a multiple of the {world} processes")
    local = cfg.batch_size // world
    if cfg.microbatch and local % cfg.microbatch:
        raise CommandError(f"--microbatch={cfg.microbatch}: expected a divisor of the per-process batch {local} "
                           f"(--batch-size {cfg.batch_size} over {world} process{'es' if world > 1 else ''})")


def _activation_bytes(preset, cfg) -> int | None:
    """Bytes the autograd graph keeps per training image (the tensors saved for backward), measured
    by one training loss on the meta device (no memory, no compute). None if it cannot be measured."""
    import admrt

    from .tasks import Batch, make_task

    try:
        b = 2
        model = admrt.create_model(preset, device="meta")
        c = preset.model
        meta = lambda *shape, dtype=torch.float32: torch.zeros(*shape, device="meta", dtype=dtype)  # noqa: E731
        x = (b, c.in_channels, c.image_size, c.image_size)
        batch = Batch(x=meta(*x), y=meta(b, dtype=torch.int64), t=meta(b, dtype=torch.int64), weights=meta(b),
                      noise=meta(*x), flip=meta(b, dtype=torch.bool), crop=meta(b, 3))
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            make_task(cfg, preset).losses(model, batch, cfg)
        return total // b
    except Exception:  # an op without a meta kernel: no estimate (the run goes on unchecked)
        return None


def _available_bytes(device: torch.device) -> int | None:
    """Memory a run on `device` can still take: the free GPU memory, or the kernel's MemAvailable."""
    try:
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[0]
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, RuntimeError, ValueError):
        pass
    return None


def _check_fits(args, preset, cfg, device: torch.device, world: int) -> None:
    """Refuse, in one line and before anything is allocated or written, a microbatch whose
    activations alone would not fit in the device's free memory (--batch-size 100000 would
    otherwise allocate until the kernel kills the process)."""
    micro = cfg.microbatch or cfg.batch_size // world
    gib = lambda n: f"{n / 2 ** 30:.1f} GiB"  # noqa: E731
    # Every step draws the whole global batch's noise on the CPU (Trainer.global_randomness) and
    # holds this process's images, noise and x_t: about 4 image-sized fp32 tensors per image, in
    # host memory. Checked first: it needs no activation estimate.
    c = preset.model
    batch_bytes = 4 * c.in_channels * c.image_size ** 2 * 4 * cfg.batch_size
    host_free = _available_bytes(torch.device("cpu"))
    if host_free is not None and batch_bytes > host_free:
        raise CommandError(f"--batch-size={cfg.batch_size}: a step's images and noise alone take about "
                           f"{gib(batch_bytes)}; this machine has {gib(host_free)} free: pass a smaller --batch-size")
    per_image, free = _activation_bytes(preset, cfg), _available_bytes(device)
    if per_image is None or free is None:
        return
    if device.type != "cpu":
        batch_bytes = 0  # the activations live on the GPU, the batch in host memory (checked above)
    if micro * per_image + batch_bytes <= free:
        return
    flag = "--microbatch" if cfg.microbatch else "--batch-size"
    fits = max(1, (free - batch_bytes) // per_image)
    raise CommandError(f"{flag}={cfg.microbatch or cfg.batch_size}: a step of {micro} images per process keeps "
                       f"about {gib(micro * per_image)} of activations ({per_image / 2 ** 20:.1f} MiB per image of "
                       f"preset {preset.name!r}); {device.type} has {gib(free)} free: pass --microbatch "
                       f"{_divisor_at_most(cfg.batch_size // world, fits)} or less (gradient accumulation) or a "
                       "smaller --batch-size")


def _divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of n that is at most limit (a microbatch that fits and splits the batch)."""
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0) if n <= 10 ** 7 else 1


def _check_resume(args, cfg, dataset_size: int) -> None:
    """--resume names a readable training state of a run with these settings (before the folder is touched)."""
    from .checkpoints import latest_checkpoint, read_state
    from .loop import check_resumable

    if not args.resume:
        return
    state = latest_checkpoint(args.resume)
    meta, _ = read_state(state, tensors=False)
    check_resumable(state, meta, cfg, dataset_size)


def _record(args, preset, cfg, dataset_size: int) -> dict:
    """OUT/run.json: what decides the run's checkpoints."""
    return {"command": "train", **json.loads(cfg.to_json()), "preset": json.loads(preset.to_json()),
            "data": args.data, "limit": args.limit, "dataset_size": dataset_size}


def _resume_point(args, cfg, out: Path, folder: RunFolder, record: dict) -> Path | None:
    """The checkpoint this run continues (None: a new run), after the run-folder checks."""
    from .checkpoints import latest_checkpoint, state_files, step_of
    from .config import resumable_changes

    here = state_files(out)
    may_differ = resumable_changes(cfg)
    state = latest_checkpoint(args.resume) if args.resume else None
    own = state is not None and state.parent.resolve() == out.resolve()
    if here and not own and not (out / "run.json").exists():
        hint = (f"continue {args.resume} into an empty --out" if args.resume else
                f"pass --resume {out} to continue them, or use another --out")
        raise CommandError(f"--out={str(out)!r} holds checkpoints (up to step {here[-1][0]}) and no run.json; {hint}")
    if state is not None:
        if own:
            later = [step for step, p in here if p.resolve() != state.resolve() and step > step_of(state)]
            if later:
                raise CommandError(f"--resume={args.resume!r}: {out} has later checkpoints of this run (steps "
                                   f"{', '.join(map(str, later[:5]))}); resume from the latest, or delete those "
                                   "to go back")
        elif here:
            # A fork that has checkpoints of its own: the same command continues the fork.
            folder.check_record(record, finished=len(here), may_differ=may_differ)
            print(f"admrt train: {out} holds this run's checkpoints (up to step {here[-1][0]}): continuing from "
                  f"its latest, not from --resume", file=sys.stderr)
            return here[-1][1]
        # Checkpoints of --out without a run.json are taken only when --resume names them: the
        # state file's own settings are checked against this command's (Trainer.resume).
        folder.check_record(record, finished=len(here), may_differ=may_differ, adopt=own)
        return state
    resumed = folder.check_record(record, finished=len(here), may_differ=may_differ)
    return here[-1][1] if resumed else None


class _CtrlC:
    """The first Ctrl-C (SIGINT) or SIGTERM (torchrun's agent and batch schedulers stop jobs with
    it) asks the loop to stop after the step in flight, a checkpoint follows; a second signal
    stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.seen = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        self.seen = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        print("\nadmrt train: stopping after this step (Ctrl-C again to stop at once)", file=sys.stderr)

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def run(args: argparse.Namespace) -> int:
    import admrt
    from admrt.distributed import leaving_process_group

    from .data import FashionMNIST, make_dataset
    from .config import KIND_OF_TASK, TrainConfig
    from .loop import init_distributed

    _check_arguments(args)
    if args.gd_flags is not None:
        if args.preset is not None:
            raise CommandError("--preset and --gd-flags both give the model; pass one")
        try:
            preset = admrt.preset_from_flags(KIND_OF_TASK[args.task], **admrt.parse_flags(args.gd_flags))
        except ValueError as exc:
            raise CommandError(f"--gd-flags: {exc}") from None
    else:
        preset = admrt.get_preset(args.preset or DEFAULT_PRESETS[args.task])
    ema = args.ema if args.ema is not None else ([] if args.task == "classifier" else [0.9999])
    crop = (args.task == "classifier" or args.random_crop) and not args.no_random_crop
    cfg = TrainConfig(task=args.task, steps=args.steps, batch_size=args.batch_size,
                      microbatch=args.microbatch, lr=args.lr, weight_decay=args.weight_decay,
                      ema_rates=tuple(ema), dtype=args.dtype, schedule_sampler=args.schedule_sampler,
                      anneal_lr=args.anneal_lr, grad_clip=args.grad_clip, random_flip=not args.no_flip,
                      random_crop=crop, noised=not args.unnoised, fused_kernels=args.fused_kernels,
                      seed=args.seed)
    m = preset.model
    if args.data in ("fashion-mnist", "fashion_mnist"):
        dataset = FashionMNIST("train", m.image_size, root=args.data_root, limit=args.limit,
                               channels=m.in_channels)
        test = FashionMNIST("test", m.image_size, root=args.data_root, limit=args.eval_images,
                            channels=m.in_channels) if args.eval_images else None
    else:
        dataset = make_dataset(args.data, m.image_size, channels=m.in_channels,
                               class_cond=m.num_classes is not None or args.task == "classifier")
        test = None
    n_classes = m.out_channels if m.kind == "classifier" else m.num_classes
    if n_classes is not None and getattr(dataset, "num_classes", n_classes) > n_classes:
        raise CommandError(f"--data={args.data!r} has {dataset.num_classes} classes; preset {preset.name!r} "
                           f"has {n_classes}")

    rank, world, device = init_distributed()
    device = torch.device(args.device) if args.device else device  # checked by the parser (device_value)
    _check_batch(args, cfg, world)
    _check_resume(args, cfg, len(dataset))
    _check_fits(args, preset, cfg, device, world)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    out = Path(args.out)
    folder = RunFolder(out, "admrt train")
    with leaving_process_group():
        try:
            return _train(args, preset, cfg, dataset, test, device, rank, world, folder)
        except BaseException:
            folder.abandon()  # a run that finished nothing leaves nothing that it made; finished work stays
            raise
        finally:
            folder.unlock()


def _train(args, preset, cfg, dataset, test, device, rank, world, folder) -> int:
    import admrt

    from .checkpoints import step_of
    from .loop import Trainer, timer
    from .tasks import evaluate

    out = folder.out
    # Rank 0 holds the folder and decides where the run starts; every rank follows.
    decision = [None, None]  # (error, checkpoint to resume)
    if rank == 0:
        try:
            folder.lock()
            state = _resume_point(args, cfg, out, folder, _record(args, preset, cfg, len(dataset)))
            decision[1] = None if state is None else str(state)
        except (CommandError, ValueError, OSError, RuntimeError) as exc:  # every rank learns of it (none left waiting)
            decision[0] = str(exc)
    if world > 1:
        torch.distributed.broadcast_object_list(decision, src=0)
    if decision[0]:
        raise CommandError(decision[0])

    torch.manual_seed(args.seed)
    model = admrt.create_model(preset, device=device)
    trainer = Trainer(model, dataset, cfg, out_dir=out, device=device)
    if decision[1] is not None:
        step = trainer.resume(decision[1])
        if rank == 0:
            print(f"admrt train: resuming from step {step} ({decision[1]})", file=sys.stderr)

    logger = _Logger(out, enabled=rank == 0, total=cfg.steps, start=trainer.step, every=args.log_every,
                     progress=not args.no_progress)
    callbacks = []
    if args.sample_every and rank == 0 and args.task != "classifier":
        callbacks.append((args.sample_every, _SampleGrid(out)))
    elapsed = timer()
    train = dict(log=logger, save_every=args.save_every, callbacks=callbacks, save_at_end=False,
                 check_every=args.log_every)
    with _CtrlC() as ctrl_c:
        try:
            if args.time_limit > 0 or world > 1:
                # Check the clock (and Ctrl-C, on every rank) every log interval; stop with a checkpoint.
                while trainer.step < cfg.steps:
                    trainer.train(min(cfg.steps, trainer.step + args.log_every),
                                  stop=(lambda: ctrl_c.seen) if world == 1 else None, **train)
                    over = torch.tensor(float((args.time_limit > 0 and elapsed() > args.time_limit) or ctrl_c.seen),
                                        device=device)
                    if world > 1:
                        torch.distributed.all_reduce(over)
                    if over.item() > 0:
                        break
            else:
                trainer.train(cfg.steps, stop=lambda: ctrl_c.seen, **train)
            if trainer.last_saved is None or step_of(trainer.last_saved) != trainer.step:
                trainer.save()  # the end (or the stop) always has a checkpoint
        except KeyboardInterrupt:
            kept = f"the last checkpoint is {trainer.last_saved}" if trainer.last_saved else "no checkpoint was written"
            raise Interrupted(f"{kept}: rerun the same command to resume") from None
        finally:
            logger.close()
    if ctrl_c.seen:
        raise Interrupted(f"checkpoint of step {trainer.step} written ({trainer.last_saved}): rerun the same "
                          "command to resume")
    wall = elapsed()
    final_model = next(iter(trainer.ema.models.values()), trainer.model)
    if rank == 0:
        summary = {"steps": trainer.step, "wall_s": round(wall, 1), "device": _device_name(trainer.device),
                   "last": logger.last}
        if test is not None:
            summary["test"] = evaluate(final_model, test, cfg, preset, device=trainer.device)
        print("summary:", summary)
        atomic_write(out / "summary.txt", lambda tmp: Path(tmp).write_text(repr(summary) + "\n"))
        if args.export:
            admrt.save_model(final_model, args.export, preset=preset,
                             extra_metadata={"train_config": cfg.to_json(), "steps": trainer.step,
                                             "summary": repr(summary)})
        for _, fn in callbacks:
            fn(trainer)
    return 0


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


class _Logger:
    """Progress bar, CSV log (log.csv) and TensorBoard (when installed)."""

    def __init__(self, out: Path, enabled: bool, total: int, start: int, every: int, progress: bool = True):
        self.enabled, self.every, self.last = enabled, max(every, 1), {}
        self.start_time = time.perf_counter()
        self._acc: dict[str, float] = {}
        self._n = 0
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        self.csv_path = out / "log.csv"
        _keep_rows_up_to(self.csv_path, start)
        with _naming(self.csv_path):  # appended to, never through a link planted there
            self._csv = os.fdopen(os.open(self.csv_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                                          | os.O_CLOEXEC, 0o644), "a", newline="")
        self._writer = None
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, dynamic_ncols=True, mininterval=2.0)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"))
        except Exception:  # tensorboard not installed: the CSV log is the record
            self.tb = None

    def __call__(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        for k, v in metrics.items():
            self._acc[k] = self._acc.get(k, 0.0) + (v.detach() if torch.is_tensor(v) else v)
        self._n += 1
        if self.bar is not None:
            self.bar.update(1)
        if step % self.every:
            return
        row = {"step": step, "time_s": round(time.perf_counter() - self.start_time, 2)}
        row.update({k: float(v) / self._n for k, v in self._acc.items()})
        self._acc, self._n, self.last = {}, 0, row
        if self._writer is None:
            self._writer = csv.DictWriter(self._csv, fieldnames=list(row), extrasaction="ignore")
            if self._csv.tell() == 0:
                self._writer.writeheader()
        with _naming(self.csv_path):
            self._writer.writerow(row)
            self._csv.flush()
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k in ("loss", "mse", "vb", "acc@1")})
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "time_s"):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            if self.bar is not None:
                self.bar.close()
            with _naming(self.csv_path):
                self._csv.close()
            if self.tb is not None:
                self.tb.close()


@contextlib.contextmanager
def _naming(path: Path):
    """An OSError of a write to `path` names it (a full disk's errno 28 names no file)."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
        raise


def _keep_rows_up_to(path: Path, step: int) -> None:
    """Drop the log rows after `step` (the checkpoint a run resumes from): the resumed run
    writes them again, so none is doubled; a new run (step 0) starts an empty log."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= step]
    if step == 0 or len(kept) == 1:
        kept = []
    if kept != rows:
        buf = io.StringIO()
        csv.writer(buf).writerows(kept)
        atomic_write(path, lambda tmp: Path(tmp).write_text(buf.getvalue()))


class _SampleGrid:
    """Writes grid_{step}.png: one column per class, two rows, sampled from (a copy of) the EMA
    model with admrt.Engine (DDIM 25 steps, seeds 0..2K-1). Base UNets only: an upsampler needs
    a base stage. If the engine cannot run here, says so once and stops trying."""

    def __init__(self, out: Path, steps: str = "ddim25"):
        self.out, self.steps, self.disabled = out, steps, False

    def __call__(self, trainer) -> None:
        if self.disabled:
            return
        import copy

        import numpy as np
        from PIL import Image

        source = next(iter(trainer.ema.models.values()), trainer.model)
        if source.config.kind != "unet":
            print("note: sample grids are written for the base UNet only", file=sys.stderr)
            self.disabled = True
            return
        try:
            from admrt import Engine

            model = copy.deepcopy(source).eval()  # the engine may change its layout and dtype
            k = model.config.num_classes or 8
            # labels cycle 0..K-1: column c of the grid is class c
            res = Engine(model, backend="eager", dtype="fp32").sample(
                num=2 * k, steps=self.steps, seeds=list(range(2 * k)))
        except Exception as exc:  # the engine is another part of admrt; training goes on without grids
            print(f"note: sample grids disabled ({type(exc).__name__}: {exc})", file=sys.stderr)
            self.disabled = True
            return
        imgs = np.asarray(res.images)  # (2K, H, W, C) uint8
        grid = np.concatenate([np.concatenate(list(imgs[r * k:(r + 1) * k]), axis=1) for r in range(2)])
        image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
        atomic_write(self.out / f"grid_{trainer.step:06d}.png", lambda tmp: image.save(tmp, format="PNG"))


def main(argv=None) -> int:
    """`python -m admrt.training.cli` (e.g. under torchrun): `admrt train` with its error path."""
    from admrt.cli import main as admrt_main
    return admrt_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
