"""The training loop of ADM's three networks (guided-diffusion's TrainLoop role): one `Trainer`
with a task object per network (training/tasks.py), checkpoints through training/checkpoints.py.

Determinism and distribution. Everything random about a step except dropout (the data order,
t, the noise, the augmentations) is drawn on the CPU from a generator seeded by (seed, step)
for the whole *global* batch; each rank takes its slice, each microbatch its sub-slice. Hence
(a) resuming at step k replays exactly the batches of an uninterrupted run (dropout's RNG
state is checkpointed too), and (b) 1 process, N DDP processes and any gradient accumulation
see the same global batch and, up to float rounding, the same gradient: the loss of each
microbatch is sum(per-sample loss * importance weight) / global_batch * world_size, and DDP
averages over ranks. Multi-GPU: launch with `torchrun --nproc_per_node N` (NCCL on CUDA, gloo
on CPU); no MPI.

Precision: fp32; fp16 = autocast + dynamic loss scaling (torch.amp.GradScaler; a step whose
gradients overflow is skipped, EMA included, as the reference's MixedPrecisionTrainer); bf16 =
autocast. The master weights and the optimizer state stay fp32.
"""
from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

import admrt
from admrt.checkpoint import stored_preset
from admrt.config import Preset

from .checkpoints import (config_diff, flatten_optimizer, latest_checkpoint, load_weights, read_state,
                          save_tensors, unflatten_optimizer)
from .config import DTYPES, KIND_OF_TASK, TrainConfig, resumable_changes
from .ema import EMA
from .losses import make_sampler
from .tasks import Batch, make_task


class NonFiniteError(ValueError):
    """The loss or the weights became NaN/Inf: the run stops; no such checkpoint is written."""


def _generator(seed: int, stream: int, index: int) -> torch.Generator:
    """A CPU generator for (seed, stream, index): distinct streams never share a seed."""
    return torch.Generator().manual_seed(((seed & 0xFFFFFFFF) << 32) ^ (stream << 28) ^ (index & 0x0FFFFFFF))


class BatchIndices:
    """Indices of the global batch of each step: the data set is walked in a random order per
    epoch (permutation seeded by (seed, epoch)), batches running across epoch boundaries."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n <= 0:
            raise ValueError("the data set is empty")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = torch.randperm(self.n, generator=_generator(self.seed, 1, epoch))
        return self._perms[epoch]

    def __call__(self, step: int) -> torch.Tensor:
        pos = torch.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs = pos // self.n
        out = torch.empty_like(pos)
        for e in epochs.unique().tolist():
            m = epochs == e
            out[m] = self._perm(e)[pos[m] % self.n]
        return out


def dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the process group that torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK); NCCL on
    CUDA, gloo on CPU. Without torchrun: rank 0 of 1 and no process group."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), device


class Trainer:
    """Trains `model` (from admrt.create_model / load_model) on `dataset` (items (x, y), or an
    in-memory data set with `.images` and `.labels` tensors, which is indexed on the device).

        trainer = Trainer(model, FashionMNIST("train", 16), TrainConfig("diffusion", steps=1000))
        trainer.train(log=print)
    """

    def __init__(self, model: nn.Module, dataset, config: TrainConfig, *, out_dir=None,
                 device=None, num_workers: int = 0):
        preset: Preset | None = getattr(model, "preset", None)
        if preset is None:
            raise ValueError("model: expected a model from admrt.create_model/load_model (it has no .preset)")
        if preset.model.kind != KIND_OF_TASK[config.task]:
            raise ValueError(f"task={config.task!r} trains a {KIND_OF_TASK[config.task]!r} model; "
                             f"preset {preset.name!r} is a {preset.model.kind!r}")
        self.config, self.preset = config, preset
        self.rank, self.world = dist_info()
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        local = config.batch_size // self.world
        if config.batch_size % self.world:
            raise ValueError(f"batch_size={config.batch_size}: expected a multiple of the world size {self.world}")
        self.local_batch = local
        self.micro = config.microbatch or local
        if local % self.micro:
            raise ValueError(f"microbatch={config.microbatch}: expected a divisor of the per-rank batch {local}")
        self.out_dir = Path(out_dir) if out_dir is not None else None

        self.model = model.to(self.device).train()
        if hasattr(model, "set_fused_kernels"):
            model.set_fused_kernels(config.fused_kernels)
        elif config.fused_kernels:
            raise ValueError("fused_kernels=True: this model has no set_fused_kernels()")
        self.task = make_task(config, preset)
        self.sampler = make_sampler(config.schedule_sampler, self.task.tables.num_timesteps)
        self.ema = EMA(model, config.ema_rates)
        self.opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.dtype == "fp16")
        self.ddp = None
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.step = 0
        self.last_saved: Path | None = None
        self._first_bad = torch.full((), -1, dtype=torch.int64, device=self.device)  # first non-finite loss

        self.dataset = dataset
        self.in_memory = hasattr(dataset, "images") and hasattr(dataset, "labels")
        if self.in_memory:
            self._images = dataset.images.to(self.device)
            self._labels = dataset.labels.to(self.device)
        self.indices = BatchIndices(len(dataset), config.batch_size, config.seed)
        self.num_workers = num_workers
        c = preset.model
        self.sample_shape = (c.in_channels, c.image_size, c.image_size)

    # -- batches ---------------------------------------------------------------------------
    def global_randomness(self, step: int) -> dict[str, torch.Tensor]:
        """t, weights, noise, flips and crops of the whole global batch of `step` (CPU)."""
        g = _generator(self.config.seed, 2, step)
        b = self.config.batch_size
        t, w = self.sampler.sample(b, g)
        noise = torch.randn((b, *self.sample_shape), generator=g)
        flip = torch.rand(b, generator=g) < 0.5
        u = torch.rand(b, 3, generator=g)
        crop = torch.stack([0.8 + 0.2 * u[:, 0], 2 * u[:, 1] - 1, 2 * u[:, 2] - 1], dim=1)
        return {"t": t, "weights": w, "noise": noise, "flip": flip, "crop": crop}

    def local_batch_for(self, step: int) -> Batch:
        """This rank's part of the global batch of `step`, on the device."""
        lo, hi = self.rank * self.local_batch, (self.rank + 1) * self.local_batch
        idx = self.indices(step)[lo:hi]
        r = {k: v[lo:hi] for k, v in self.global_randomness(step).items()}
        if self.in_memory:
            idx_d = idx.to(self.device)
            x, y = self._images[idx_d], self._labels[idx_d]
        else:
            items = [self.dataset[int(i)] for i in idx]
            x = torch.stack([it[0] for it in items])
            y = torch.stack([torch.as_tensor(it[1], dtype=torch.int64) for it in items])
        return Batch(x=x, y=y, **r).to(self.device)

    # -- one optimizer step ------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        if self.config.anneal_lr:
            return self.config.lr * (1.0 - step / self.config.steps)
        return self.config.lr

    def run_step(self) -> dict[str, float]:
        """One optimizer step on the global batch of `self.step`; returns the global means
        (loss terms as 0-dim tensors on the device, lr and loss scale as floats)."""
        cfg = self.config
        batch = self.local_batch_for(self.step)
        net = self.ddp or self.model
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.opt.zero_grad(set_to_none=True)
        autocast_dtype = DTYPES[cfg.dtype]
        sums = {k: torch.zeros((), device=self.device) for k in self.task.metrics}
        losses_all = []
        n_micro = self.local_batch // self.micro
        for m in range(n_micro):
            mb = batch.slice(m * self.micro, (m + 1) * self.micro)
            sync = self.ddp is None or m == n_micro - 1
            with (nullcontext() if sync else self.ddp.no_sync()):
                with torch.autocast(self.device.type, dtype=autocast_dtype or torch.float32,
                                    enabled=autocast_dtype is not None):
                    terms = self.task.losses(net, mb, cfg)
                # sum over the global batch / B, times world (DDP averages over ranks)
                loss = (terms["loss"] * mb.weights).sum() * (self.world / cfg.batch_size)
                self.scaler.scale(loss).backward()
            for k in sums:
                if k in terms:
                    sums[k] += terms[k].detach().float().sum()
            losses_all.append(terms["loss"].detach().float())
        local_losses = torch.cat(losses_all)

        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else None
        grad_norm = None
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.opt)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip))
        self.scaler.step(self.opt)
        self.scaler.update()
        skipped = scale_before is not None and self.scaler.get_scale() < scale_before
        if not skipped:
            self.ema.update(self.model)

        # Global metrics and the importance sampler's loss history (identical on every rank).
        t_global = self.global_randomness(self.step)["t"] if self.sampler.name != "uniform" else None
        stacked = torch.stack([sums[k] for k in self.task.metrics])
        if self.world > 1:
            dist.all_reduce(stacked)
            if t_global is not None:
                gathered = [torch.empty_like(local_losses) for _ in range(self.world)]
                dist.all_gather(gathered, local_losses)
                local_losses = torch.cat(gathered)
        if t_global is not None:
            self.sampler.update(t_global, local_losses.cpu())
        if not skipped:  # a skipped fp16 step (overflow) is the loss scaler's business, as the reference's
            bad = ~torch.isfinite(stacked[self.task.metrics.index("loss")])
            self._first_bad = torch.where(bad & (self._first_bad < 0), self.step, self._first_bad)
        # 0-dim device tensors: no host sync here (the logger converts them when it writes).
        out = {k: v / cfg.batch_size for k, v in zip(self.task.metrics, stacked.detach())}
        if "vb" in out and "vb" not in terms:
            del out["vb"]
        out["lr"] = self.lr_at(self.step)
        if scale_before is not None:
            out["loss_scale"] = scale_before
            out["skipped"] = float(skipped)
        if grad_norm is not None:
            out["grad_norm"] = grad_norm
        self.step += 1
        return out

    def train(self, steps: int | None = None, *, log: Callable[[int, dict], None] | None = None,
              save_every: int = 0, callbacks: list[tuple[int, Callable[["Trainer"], None]]] = (),
              save_at_end: bool = True, check_every: int = 50, stop: Callable[[], bool] | None = None) -> dict:
        """Run until `self.step == steps` (default: config.steps). `log(step, metrics)` after each
        step; a checkpoint every `save_every` steps and, if `save_at_end`, at the end (when
        out_dir is set);
        `callbacks`: (every, fn(trainer)) pairs, e.g. sample grids. The loss and weights are
        checked for NaN/Inf every `check_every` steps and before every checkpoint
        (`check_finite`); `stop()` (e.g. Ctrl-C seen) ends the loop early, between two steps."""
        steps = self.config.steps if steps is None else steps
        metrics = {}
        while self.step < steps and not (stop is not None and stop()):
            metrics = self.run_step()
            if check_every and self.step % check_every == 0:
                self.check_finite()
            if log is not None:
                log(self.step, metrics)
            if self.out_dir is not None and save_every and self.step % save_every == 0:
                self.save()
            for every, fn in callbacks:
                if every and self.step % every == 0:
                    fn(self)
        if save_at_end and self.out_dir is not None and (not save_every or self.step % save_every):
            self.save()
        return metrics

    def check_finite(self) -> None:
        """Raise NonFiniteError if a loss since the start, or a weight now, is NaN/Inf, naming the
        first bad step and the last checkpoint (one host synchronisation)."""
        first_bad = int(self._first_bad)
        weights_ok = first_bad < 0 and bool(torch.stack([p.detach().isfinite().all()
                                                         for p in self.model.parameters()]).all())
        if first_bad < 0 and weights_ok:
            return
        what = (f"the loss of step {first_bad} is not finite (NaN or Inf)" if first_bad >= 0 else
                f"the weights after step {self.step} are not finite (NaN or Inf)")
        kept = (f"the last good checkpoint is {self.last_saved}" if self.last_saved is not None else
                "no checkpoint of this run was written")
        raise NonFiniteError(f"{what}: training diverged (lr={self.config.lr:g}, dtype={self.config.dtype}); "
                             f"stopped without saving it; {kept}")

    # -- checkpoints -----------------------------------------------------------------------
    def _rng_states(self) -> dict[str, torch.Tensor]:
        states = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.world > 1:
            gathered: list = [None] * self.world
            dist.all_gather_object(gathered, {k: v.tolist() for k, v in states.items()})
            return {f"rng/{k}/{r}": torch.tensor(s[k], dtype=torch.uint8)
                    for r, s in enumerate(gathered) for k in s}
        return {f"rng/{k}/0": v for k, v in states.items()}

    def save(self, out_dir=None) -> Path | None:
        """Write model, EMA and training state for the current step (rank 0 writes; every
        rank must call, for the RNG states)."""
        out = Path(out_dir or self.out_dir)
        self.check_finite()  # never a checkpoint of diverged weights
        rng = self._rng_states()
        tag = f"{self.step:06d}"
        path = out / f"state_{tag}.safetensors"
        if self.rank != 0:
            self.last_saved = path  # every rank knows the last checkpoint (rank 0 writes it)
            return None
        out.mkdir(parents=True, exist_ok=True)
        meta = {"step": self.step, "train_config": self.config.to_json(), "world_size": self.world,
                "dataset_size": len(self.dataset)}
        admrt.save_model(self.model, out / f"model_{tag}.safetensors", preset=self.preset,
                         extra_metadata=meta)
        for rate, m in self.ema.models.items():
            admrt.save_model(m, out / f"ema_{EMA.name(rate)}_{tag}.safetensors", preset=self.preset,
                             extra_metadata={**meta, "ema_rate": rate})
        tensors, opt_meta = flatten_optimizer(self.opt.state_dict())
        tensors.update(rng)
        tensors.update({f"sampler/{k}": v for k, v in self.sampler.state_dict().items()})
        state_meta = {**meta, "optimizer": opt_meta, "scaler": self.scaler.state_dict(),
                      "model_file": f"model_{tag}.safetensors"}
        save_tensors(tensors, path, {k: json.dumps(v) if not isinstance(v, str) else v
                                             for k, v in state_meta.items()})
        self.last_saved = path
        return path

    def resume(self, path) -> int:
        """Restore model, EMA, optimizer, loss scaler, sampler, step and RNG states from a
        checkpoint: a state_*.safetensors file or a folder (its latest complete checkpoint)."""
        state_path = latest_checkpoint(path)
        folder = state_path.parent
        meta, tensors = read_state(state_path)
        step = meta["step"]
        tag = f"{step:06d}"
        self._check_resumable(state_path, meta["train_config"], meta)
        model_path = folder / f"model_{tag}.safetensors"
        stored = stored_preset(model_path) if model_path.is_file() else None
        if stored is not None and (stored.model, stored.diffusion) != (self.preset.model, self.preset.diffusion):
            raise ValueError(f"resume={str(state_path)!r}: the run trains preset {stored.name!r}, this trainer "
                             f"{self.preset.name!r} (" + config_diff(stored, self.preset) + ")")
        load_weights(self.model, model_path, self.preset.name)
        for rate, m in self.ema.models.items():
            p = folder / f"ema_{EMA.name(rate)}_{tag}.safetensors"
            if p.exists():
                load_weights(m, p, self.preset.name)
            else:  # a rate that run did not keep starts from the model
                m.load_state_dict(self.model.state_dict())
        try:
            self.opt.load_state_dict(unflatten_optimizer(tensors, meta["optimizer"], self.device))
            self.scaler.load_state_dict(meta["scaler"])
        except (KeyError, ValueError, TypeError, IndexError, AttributeError, RuntimeError) as exc:
            raise ValueError(f"{state_path}: damaged training state (optimizer or loss scaler: "
                             f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})") from None
        self.sampler.load_state_dict({k[len("sampler/"):]: v for k, v in tensors.items()
                                      if k.startswith("sampler/")})
        saved_world = int(meta.get("world_size", 1))
        if saved_world == self.world and f"rng/cpu/{self.rank}" in tensors:
            torch.set_rng_state(tensors[f"rng/cpu/{self.rank}"])
            if self.device.type == "cuda" and f"rng/cuda/{self.rank}" in tensors:
                torch.cuda.set_rng_state(tensors[f"rng/cuda/{self.rank}"], self.device)
        self.step = step
        self.last_saved = state_path
        return step

    def _check_resumable(self, state_path: Path, saved: dict, meta: dict) -> None:
        check_resumable(state_path, meta, self.config, len(self.dataset))


def check_resumable(state_path: Path, meta: dict, config: TrainConfig, dataset_size: int) -> None:
    """A resumed run continues the same run: the settings that decide a step (all of TrainConfig
    but resumable_changes) and the data set's size must be those of the checkpoint (`meta`, as
    read_state returns it)."""
    saved, now = meta["train_config"], json.loads(config.to_json())
    changed = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
               if k not in resumable_changes(config) and saved.get(k) != now.get(k)]
    size = meta.get("dataset_size")
    if size is not None and str(size) != str(dataset_size):
        changed.append(f"data set size: {size} -> {dataset_size}")
    if changed:
        raise ValueError(f"resume={str(state_path)!r}: the checkpoint's run has other settings ("
                         + "; ".join(changed) + "); pass the run's settings to resume it")


def timer() -> Callable[[], float]:
    start = time.perf_counter()
    return lambda: time.perf_counter() - start
