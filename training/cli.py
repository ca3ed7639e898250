"""`admrt train diffusion|classifier|upsampler`: train an ADM network on Fashion-MNIST or a
folder of images, with a progress bar, a CSV loss log (and TensorBoard when installed),
periodic sample grids and resumable checkpoints.

    admrt train diffusion --data fashion-mnist --preset fashion16-cond --steps 8000 \
        --batch-size 256 --lr 2e-4 --ema 0.9999 --dtype bf16 --out runs/base
    torchrun --nproc_per_node 4 -m admrt.training.cli diffusion ...   # multi-GPU (DDP)
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch

DEFAULT_PRESETS = {"diffusion": "fashion16-cond", "classifier": "fashion16-classifier",
                   "upsampler": "fashion-upsample16-32"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", choices=("diffusion", "classifier", "upsampler"), help="which network to train")
    p.add_argument("--data", default="fashion-mnist",
                   help="'fashion-mnist' (Debian's dataset-fashion-mnist) or a folder of images "
                        "(class = file-name prefix before the first '_')")
    p.add_argument("--data-root", default=None, help="folder of the Fashion-MNIST IDX .gz files "
                   "(default /usr/share/datasets/fashion-mnist)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--preset", default=None, help="model preset (default: the bundled one of the task)")
    p.add_argument("--gd-flags", default=None, metavar="FLAGS",
                   help="the network and diffusion as guided-diffusion's image_train.py / classifier_train.py / "
                        "super_res_train.py flags give them (\"--image_size 64 --num_channels 128 ... --use_kl "
                        "True\"), instead of --preset; its training flags (lr, batch_size, ...) are not read: "
                        "pass admrt's options (docs/migration.md)")
    p.add_argument("--steps", type=int, default=10000, help="optimizer steps in all")
    p.add_argument("--batch-size", type=int, default=128, help="global batch per optimizer step")
    p.add_argument("--microbatch", type=int, default=0, help="per-process microbatch (gradient accumulation)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--ema", type=float, nargs="*", default=None,
                   help="EMA rates (default 0.9999 for diffusion/upsampler, none for the classifier)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    p.add_argument("--schedule-sampler", choices=("uniform", "loss-second-moment"), default="uniform")
    p.add_argument("--anneal-lr", action="store_true", help="decay the learning rate linearly to 0")
    p.add_argument("--grad-clip", type=float, default=0.0)
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    p.add_argument("--random-crop", action="store_true", help="random resized crops (classifier default)")
    p.add_argument("--no-random-crop", action="store_true")
    p.add_argument("--unnoised", action="store_true", help="classifier on clean images at t = 0")
    p.add_argument("--fused-kernels", action="store_true", help="use the fused Triton kernels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--out", required=True, help="output folder (checkpoints, log.csv, grids)")
    p.add_argument("--resume", default=None, help="a state_*.safetensors file or a run folder")
    p.add_argument("--save-every", type=int, default=2000)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--sample-every", type=int, default=0, help="write a sample grid every N steps (0: never)")
    p.add_argument("--export", default=None, help="also write the final weights (the first EMA, "
                   "else the model) to this .safetensors file")
    p.add_argument("--time-limit", type=float, default=0.0, help="stop after this many seconds")
    p.add_argument("--eval-images", type=int, default=2000, help="test-split images for the final evaluation")


def run(args: argparse.Namespace) -> int:
    import admrt

    from .data import FashionMNIST, make_dataset
    from .trainers import KIND_OF_TASK, TrainConfig, Trainer, evaluate, init_distributed, timer

    rank, world, device = init_distributed()
    if args.device:
        device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if args.gd_flags is not None:
        if args.preset is not None:
            raise SystemExit("admrt train: --preset and --gd-flags both give the model; pass one")
        try:
            preset = admrt.preset_from_flags(KIND_OF_TASK[args.task], **admrt.parse_flags(args.gd_flags))
        except ValueError as exc:
            raise SystemExit(f"admrt train: --gd-flags: {exc}") from None
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
                            channels=m.in_channels)
    else:
        dataset = make_dataset(args.data, m.image_size, channels=m.in_channels,
                               class_cond=m.num_classes is not None or args.task == "classifier")
        test = None
    n_classes = m.out_channels if m.kind == "classifier" else m.num_classes
    if n_classes is not None and getattr(dataset, "num_classes", n_classes) > n_classes:
        raise ValueError(f"data={args.data!r} has {dataset.num_classes} classes; preset {preset.name!r} "
                         f"has {n_classes}")

    torch.manual_seed(args.seed)
    model = admrt.create_model(preset, device=device)
    out = Path(args.out)
    trainer = Trainer(model, dataset, cfg, out_dir=out, device=device)
    if args.resume:
        step = trainer.resume(args.resume)
        if rank == 0:
            print(f"resumed from step {step}", file=sys.stderr)

    logger = _Logger(out, enabled=rank == 0, total=cfg.steps, start=trainer.step, every=args.log_every)
    callbacks = []
    if args.sample_every and rank == 0 and args.task != "classifier":
        callbacks.append((args.sample_every, _SampleGrid(out)))
    elapsed = timer()
    try:
        if args.time_limit > 0:
            # check the clock every log interval; stop cleanly (with a checkpoint) when over.
            while trainer.step < cfg.steps:
                target = min(cfg.steps, trainer.step + max(args.log_every, 1))
                trainer.train(target, log=logger, save_every=args.save_every, callbacks=callbacks,
                              save_at_end=False)
                over = torch.tensor(float(elapsed() > args.time_limit), device=device)
                if world > 1:
                    torch.distributed.all_reduce(over)
                if over.item() > 0:
                    break
        else:
            trainer.train(cfg.steps, log=logger, save_every=args.save_every, callbacks=callbacks,
                          save_at_end=False)
    finally:
        logger.close()
    if trainer.step % max(args.save_every, 1):
        trainer.save()
    wall = elapsed()
    final_model = next(iter(trainer.ema.models.values()), trainer.model)
    if rank == 0:
        summary = {"steps": trainer.step, "wall_s": round(wall, 1), "device": _device_name(device),
                   "last": logger.last}
        if test is not None:
            summary["test"] = evaluate(final_model, test, cfg, preset, device=device)
        print("summary:", summary)
        (out / "summary.txt").write_text(repr(summary) + "\n")
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

    def __init__(self, out: Path, enabled: bool, total: int, start: int, every: int):
        self.enabled, self.every, self.last = enabled, max(every, 1), {}
        self.start_time = time.perf_counter()
        self._acc: dict[str, float] = {}
        self._n = 0
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        self.csv_path = out / "log.csv"
        self._csv = open(self.csv_path, "a", newline="")
        self._writer = None
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, dynamic_ncols=True, mininterval=2.0)
        except ImportError:
            self.bar = None
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
            self._csv.close()
            if self.tb is not None:
                self.tb.close()


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
        Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(
            self.out / f"grid_{trainer.step:06d}.png")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="admrt train", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
