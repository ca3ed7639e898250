"""The Engine: guided ADM sampling (ADM-G) and the two-stage cascade (ADM-G -> ADM-U) of
Dhariwal & Nichol (2021), on the C++ core.

Python only prepares: coefficient tables (admrt.diffusion), the two units (Denoiser,
ClassifierGradient) through a backend, labels validated once, guidance scales and seeds per
sample, and fixed-size batches (the last one padded). Every step of the reverse process runs in
a C++ `Sampler` context (engine/csrc/sampler.cpp), which on CUDA captures one whole step as a
CUDA graph and replays it.

    eng = admrt.Engine(model, classifier=clf, dtype="fp16")
    out = eng.sample(classes=[1, 2, 3], steps="ddim25", guidance=1.0, seeds=[7, 8, 9])
    out.images  # uint8 (N, H, W, C);  out.labels  # int64 (N,)
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from admrt.config import DiffusionConfig
from admrt.diffusion import DiffusionTables, build_tables, default_variance
from admrt.models.units import ClassifierGradient, Denoiser, ModelInfo, device_of

from . import _core
from .backends import get_backend

log = logging.getLogger(__name__)

METHODS = {"ddpm": _core.Method.DDPM, "ddim": _core.Method.DDIM}
VARIANCES = {"learned_range": _core.Variance.LEARNED_RANGE, "fixed_small": _core.Variance.FIXED_SMALL,
             "fixed_large": _core.Variance.FIXED_LARGE}
NOISE_MODES = {"seeded": _core.NoiseMode.SEEDED, "reference": _core.NoiseMode.REFERENCE}
# What an image's seed means (engine/csrc/philox.h); recorded by `admrt sample` in run.json.
SEEDED_NOISE_FORMAT = "philox4x32-10 box-muller keyed (seed, draw, element)"
_SEED_MOD = 2 ** 64
_UPSAMPLER_STREAM = _core.UPSAMPLER_STREAM  # the upsampler stage's seed is derive_seed(seed, this)

Progress = Union[bool, Callable[[int, int], None], None]


@dataclass(frozen=True)
class SampleResult:
    """images: uint8 (N, H, W, C), final stage; labels: int64 (N,) or None (unconditional, no
    guidance); seeds: the per-sample seeds (seeded noise); base_images: uint8 low-res stage of a
    cascade, else None; samples: float32 (N, C, H, W) x_0 of the final stage, before
    quantisation (only with sample(keep_float=True))."""

    images: np.ndarray
    labels: Optional[np.ndarray]
    seeds: np.ndarray
    base_images: Optional[np.ndarray] = None
    samples: Optional[np.ndarray] = None


@dataclass(frozen=True)
class _Stage:
    role: str
    info: ModelInfo
    diffusion: DiffusionConfig
    denoiser: Callable  # the backend's callable over the stage's Denoiser


@dataclass(frozen=True)
class _Plan:
    method: object    # _core.Method
    tables: DiffusionTables
    schedule: object  # _core.Schedule
    variance: object  # _core.Variance
    respacing: object


def _parse_steps(steps: Union[str, int, Sequence[int]]) -> tuple[str, Union[str, tuple[int, ...]]]:
    """(method, respacing): "ddimN" -> DDIM, anything else ("250", "10,10,5", 25) -> DDPM."""
    if isinstance(steps, str):
        return ("ddim" if steps.strip().startswith("ddim") else "ddpm"), steps.strip()
    if isinstance(steps, (int, np.integer)):
        return "ddpm", (int(steps),)
    return "ddpm", tuple(int(s) for s in steps)


def _choice(table: dict, value, name: str):
    """One parser for the core's enums: the string a user gave -> the bound enum value."""
    if value not in table:
        raise ValueError(f"{name}={value!r}: expected one of {tuple(table)}")
    return table[value]


class Engine:
    """Samples from an ADM model, optionally guided by a noisy classifier and followed by an
    upsampler.

    model: admrt UNet (admrt.create_model / load_model) or a guided-diffusion UNetModel.
    classifier: noisy classifier (EncoderUNet, admrt's or guided-diffusion's) for guidance, or None.
    upsampler: SuperRes model (admrt's or guided-diffusion's) conditioned on the base model's uint8
        output, or None.
    backend: "eager", "compile" (torch.compile, fullgraph), "aoti" (AOTInductor), "onnxruntime",
        "tensorrt" (engine/backends.py), or one registered with register_backend.
    dtype: "fp32" | "fp16" | "bf16" for the networks' body convolutions (norms, embeddings and
        heads stay fp32). Applied to inference copies (admrt.engine.Denoiser /
        ClassifierGradient): the given modules are not changed.
    channels_last: run the networks in NHWC; None: as the models' weights are.
    cuda_graphs: on CUDA with seeded noise, capture one whole step as a CUDA graph once per
        batch shape and replay it (the default); False runs every step uncaptured. Reference
        noise (guided-diffusion's draw order, torch's generator) always runs uncaptured.
    diffusion / upsampler_diffusion: the processes the models were trained with; by default
        their presets' (an admrt model records it), else an error asks for it.
    device: where to sample; default: the model's device.
    """

    def __init__(self, model: nn.Module, classifier: Optional[nn.Module] = None,
                 upsampler: Optional[nn.Module] = None, backend: str = "eager", dtype: str = "fp32", *,
                 diffusion: Optional[DiffusionConfig] = None,
                 upsampler_diffusion: Optional[DiffusionConfig] = None,
                 device: Union[str, torch.device, None] = None, cuda_graphs: bool = True,
                 channels_last: Optional[bool] = None):
        for role, module in (("model", model), ("classifier", classifier), ("upsampler", upsampler)):
            if not isinstance(module, nn.Module) and (module is not None or role == "model"):
                raise TypeError(f"{role}={module!r}: expected a torch.nn.Module (admrt.load_model(...) loads one "
                                f"from a file or bundled name), got {type(module).__name__}")
        self.backend_name, self.dtype = backend, dtype
        backend_impl = get_backend(backend)
        self.device = device_of(model, device)
        self.cuda_graphs = bool(cuda_graphs) and backend_impl.capturable
        if cuda_graphs and not backend_impl.capturable and self.device.type == "cuda":
            _log_once(f"backend={backend!r} runs the steps uncaptured (its runtime is not captured in the core's "
                      "CUDA graphs)")
        units = dict(dtype=dtype, channels_last=channels_last, device=self.device)

        self.base = self._stage(model, "model", diffusion, ("unet",), backend_impl, units)
        self.upsampler = None
        if upsampler is not None:
            self.upsampler = self._stage(upsampler, "upsampler", upsampler_diffusion, ("superres",), backend_impl,
                                         units, low_res_size=self.base.info.image_size)
            low = self.upsampler.info.low_res_size
            if low is not None and low != self.base.info.image_size:
                raise ValueError(f"upsampler: conditioned on {low}x{low} images, but the model samples "
                                 f"{self.base.info.image_size}x{self.base.info.image_size}")
            if self.upsampler.info.in_channels != self.base.info.in_channels:
                raise ValueError(f"upsampler: in_channels={self.upsampler.info.in_channels} differs from the "
                                 f"model's {self.base.info.in_channels}")
        self.classifier_info = None
        self._grad = None
        if classifier is not None:
            info = ModelInfo.of(classifier, "classifier")
            if info.kind != "classifier":
                raise ValueError(f"classifier: expected a noisy classifier (EncoderUNet), got a {info.kind!r} model")
            size, base = info.image_size, self.base.info
            if size is not None and size != base.image_size:
                raise ValueError(f"classifier: it classifies {size}x{size} images, but the model samples "
                                 f"{base.image_size}x{base.image_size}")
            if info.in_channels != base.in_channels:
                raise ValueError(f"classifier: in_channels={info.in_channels} differs from the model's "
                                 f"{base.in_channels}")
            self.classifier_info = info.fitted(base.image_size)
            unit = ClassifierGradient(classifier, **units)
            unit.info = self.classifier_info   # compiled backends trace it at the base model's size
            self._grad = backend_impl.classifier_gradient(unit)
        self._contexts: dict[str, tuple[tuple, object]] = {}  # role -> (key, _core.Sampler)

    @staticmethod
    def from_package(folder, device: Union[str, torch.device, None] = None, cuda_graphs: bool = True):
        """An exported AOTInductor package (`admrt export aoti`) run by the C++ Context that the
        Python-free `admrt-sample` runs (engine/package.py): same batching, cascade and seeds."""
        from .package import PackageEngine
        return PackageEngine(folder, device=None if device is None else str(device), cuda_graphs=cuda_graphs)

    def _stage(self, module, role, diffusion, expect, backend_impl, units, low_res_size=None) -> _Stage:
        info = ModelInfo.of(module, role)
        if info.kind not in expect:
            raise ValueError(f"{role}: expected a model of kind {expect}, got {info.kind!r}")
        if diffusion is None:
            preset = getattr(module, "preset", None)
            if preset is None:
                raise ValueError(f"{role}: it records no preset, so its diffusion process is unknown; pass "
                                 f"{'diffusion' if role == 'model' else 'upsampler_diffusion'}=DiffusionConfig(...)")
            diffusion = preset.diffusion
        info = info.fitted(low_res_size=low_res_size)
        unit = Denoiser(module, **units)
        unit.info = info   # compiled backends trace it with the low-res size the stack gives
        return _Stage(role, info, diffusion, backend_impl.denoiser(unit))

    @property
    def num_classes(self) -> Optional[int]:
        """Labels the run accepts: the classifier's classes if guided, else the model's."""
        if self.classifier_info is not None:
            return self.classifier_info.out_channels
        return self.base.info.num_classes

    def steps_per_batch(self, steps: Union[str, int] = "ddim25", upsampler_steps: Union[str, int, None] = None) -> int:
        """Network evaluations of one batch (both stages of a cascade): for progress bars."""
        n = len(build_tables(self.base.diffusion, _parse_steps(steps)[1]).timestep_map)
        if self.upsampler is not None:
            up = steps if upsampler_steps is None else upsampler_steps
            n += len(build_tables(self.upsampler.diffusion, _parse_steps(up)[1]).timestep_map)
        return n

    def sample(self, classes: Optional[Sequence[int]] = None, steps: Union[str, int] = "ddim25",
               guidance: Union[float, Sequence[float], None] = None,
               seeds: Union[int, Sequence[int], None] = None, batch_size: int = 16, *,
               num: Optional[int] = None, eta: float = 0.0, clip_denoised: bool = True,
               noise: str = "seeded", variance: Optional[str] = None, method: Optional[str] = None,
               upsampler_steps: Union[str, int, None] = None, check_finite: bool = True,
               keep_float: bool = False, progress: Progress = False) -> SampleResult:
        """Sample len(classes) images (or `num`).

        classes: one label per image; None: `num` images with labels 0, 1, ..., cycling over the
            classes (class-conditional or guided), or unlabelled (unconditional, unguided).
        steps: "ddimN" (DDIM), or "N" / "a,b,c" / N (DDPM on the respaced process).
        guidance: classifier scale, one for all or one per image; None: 1.0 with a classifier,
            0 without. Non-zero needs a classifier.
        seeds: one per image, or an int s for s, s+1, ...; None: 0, 1, .... In "seeded" noise an
            image depends only on its seed (and class, scale, steps), not on the batch or the
            device. In "reference" noise one generator draws as guided-diffusion does: seeded
            with the first seed, or the global torch generator when seeds is None.
        batch_size: images per network call; every batch has min(batch_size, N) images, the
            last one padded (and the padding dropped), so one captured step serves them all.
        variance: "learned_range" | "fixed_small" | "fixed_large"; None: learned_range for a
            learned-sigma model, else fixed_small or fixed_large as its diffusion's sigma_small
            says (the reference's create_gaussian_diffusion).
        method: "ddpm" | "ddim" to override what `steps` implies (guided-diffusion's use_ddim over
            a respacing such as "250"); both stages of a cascade.
        upsampler_steps: the cascade's second stage (default: `steps`).
        check_finite: raise if a model output, gradient or the sample is NaN/Inf, naming the
            first bad step (a device flag per step, read once after each batch).
        keep_float: also return the float x_0 (result.samples).
        progress: True for a tqdm bar, or a callable(done, total) over all steps of the run.
        """
        labels, n, scales, noise_mode, seed_arr, base_plan, up_plan = self._prepare(
            classes, steps, guidance, seeds, batch_size, num, eta, noise, variance, method, upsampler_steps)
        generator = None
        if noise == "reference" and seeds is not None:
            generator = torch.Generator(self.device).manual_seed(int(seed_arr[0]))
        if noise == "reference" and self.cuda_graphs and self.device.type == "cuda":
            _log_once("noise='reference' runs the steps uncaptured (guided-diffusion's draw order comes from "
                      "torch's generator); seeded noise is captured in CUDA graphs")
        guided = self._grad is not None and bool(np.any(scales != 0))  # decided once, on the host
        common = dict(noise=noise_mode, eta=float(eta), clip_denoised=bool(clip_denoised),
                      check_finite=bool(check_finite))

        bsz = min(int(batch_size), n)
        batches = math.ceil(n / bsz)
        total = batches * (base_plan.tables.num_timesteps + (up_plan.tables.num_timesteps if up_plan else 0))
        bar, on_step = _progress(progress, total)
        images, base_images, floats = [], [], []
        try:
            for start in range(0, n, bsz):
                real = min(bsz, n - start)
                idx = _padded_index(start, real, bsz)    # the last batch repeats its last image
                y = None if labels is None else torch.as_tensor(labels[idx], device=self.device)
                b_seeds = seed_arr[idx]
                g = torch.tensor(scales[idx], dtype=torch.float32, device=self.device) if guided else None
                ctx = self._context(self.base, base_plan, bsz, guided, common)
                x = ctx.sample(y=y, guidance=g, seeds=_seed_tensor(b_seeds, self.device), generator=generator,
                               progress=on_step)
                img = _core.to_uint8_nhwc(x)
                if self.upsampler is not None:
                    base_images.append(img[:real].cpu().numpy())
                    # ADM-U is conditioned on the saved low-res samples (uint8 -> [-1, 1]).
                    low_res = img.permute(0, 3, 1, 2).float() / 127.5 - 1
                    up_seeds = np.asarray([_core.derive_seed(int(s), _UPSAMPLER_STREAM) for s in b_seeds],
                                          dtype=np.uint64)
                    ctx = self._context(self.upsampler, up_plan, bsz, False, common)
                    x = ctx.sample(y=y, low_res=low_res, seeds=_seed_tensor(up_seeds, self.device),
                                   generator=generator, progress=on_step)
                    img = _core.to_uint8_nhwc(x)
                images.append(img[:real].cpu().numpy())
                if keep_float:
                    floats.append(x[:real].cpu().numpy())
        finally:
            if bar is not None:
                bar.close()
        return SampleResult(
            images=np.concatenate(images), labels=labels, seeds=seed_arr,
            base_images=np.concatenate(base_images) if base_images else None,
            samples=np.concatenate(floats) if floats else None)

    def check(self, classes: Optional[Sequence[int]] = None, steps: Union[str, int] = "ddim25",
              guidance: Union[float, Sequence[float], None] = None,
              seeds: Union[int, Sequence[int], None] = None, batch_size: int = 16, *,
              num: Optional[int] = None, eta: float = 0.0, noise: str = "seeded", variance: Optional[str] = None,
              method: Optional[str] = None, upsampler_steps: Union[str, int, None] = None) -> None:
        """Validate `sample`'s arguments without sampling (what a run checks before it writes
        anything): raises the error `sample` would."""
        self._prepare(classes, steps, guidance, seeds, batch_size, num, eta, noise, variance, method,
                      upsampler_steps)

    # -----------------------------------------------------------------------------------------

    def _prepare(self, classes, steps, guidance, seeds, batch_size, num, eta, noise, variance, method,
                 upsampler_steps):
        labels, n = self._labels(classes, num)
        scales = self._guidance(guidance, n)
        noise_mode = _choice(NOISE_MODES, noise, "noise")
        seed_arr = _seeds(seeds, n)
        if not _is_int(batch_size) or batch_size <= 0:
            raise ValueError(f"batch_size={batch_size!r}: expected a positive int")
        if not isinstance(eta, (int, float, np.floating, np.integer)) or not (eta >= 0 and math.isfinite(eta)):
            raise ValueError(f"eta={eta!r}: expected a finite eta >= 0")
        base_plan = self._plan(self.base, steps, method, variance)
        up_plan = None
        if self.upsampler is not None:
            up_plan = self._plan(self.upsampler, steps if upsampler_steps is None else upsampler_steps, method,
                                 None)
        return labels, n, scales, noise_mode, seed_arr, base_plan, up_plan

    def _context(self, stage: _Stage, plan: _Plan, batch: int, guided: bool, common: dict):
        """The stage's Sampler context for this plan and batch size: kept while they stay the
        same (its buffers and captured graph are reused), rebuilt when they change."""
        key = (plan.method, plan.respacing, plan.variance, batch, guided, tuple(sorted(common.items())))
        cached = self._contexts.get(stage.role)
        if cached is not None and cached[0] == key:
            return cached[1]
        self._contexts.pop(stage.role, None)  # free the old buffers and graph first
        info = stage.info
        p = _core.default_params()
        p.method, p.variance = plan.method, plan.variance
        p.prediction = _core.Prediction.XSTART if stage.diffusion.predict_xstart else _core.Prediction.EPS
        p.eta, p.clip_denoised, p.check_finite = common["eta"], common["clip_denoised"], common["check_finite"]
        p.noise = common["noise"]
        p.cuda_graphs = self.cuda_graphs
        p.batch_size = batch
        p.image_shape = [info.in_channels, info.image_size, info.image_size]
        if info.kind == "superres":
            low = info.low_res_size
            p.low_res_shape = [info.in_channels, low, low]
        p.device = self.device
        ctx = _core.Sampler(stage.denoiser, self._grad if guided else None, plan.schedule, p)
        self._contexts[stage.role] = (key, ctx)
        return ctx

    def _labels(self, classes, num) -> tuple[Optional[np.ndarray], int]:
        """Labels validated once, on the host, before sampling (nothing checks them per step)."""
        k = self.num_classes
        if num is not None and (not _is_int(num) or num <= 0):
            raise ValueError(f"num={num!r}: expected a positive int")
        if classes is None:
            if num is None:
                raise ValueError("num=None: give classes=[...] or a positive num")
            return (None if k is None else np.arange(num, dtype=np.int64) % k), int(num)
        labels = _whole_numbers(classes, "classes")
        if num is not None and num != labels.size:
            raise ValueError(f"num={num}: differs from len(classes)={labels.size}")
        if labels.size == 0:
            raise ValueError("classes=[]: expected at least one class")
        if k is None:
            raise ValueError("classes: the model is unconditional and there is no classifier; pass num= instead")
        bad = np.unique(labels[(labels < 0) | (labels >= k)])
        if bad.size:
            raise ValueError(f"classes: {bad[:5].tolist()} out of range; expected ids in [0, {k})")
        model_k = self.base.info.num_classes
        if model_k is not None and model_k < k and labels.max() >= model_k:
            raise ValueError(f"classes: {labels[labels >= model_k][:5].tolist()} out of range for the model; "
                             f"expected ids in [0, {model_k})")
        return labels, int(labels.size)

    def _guidance(self, guidance, n) -> np.ndarray:
        if guidance is None:
            guidance = 1.0 if self._grad is not None else 0.0
        try:
            scales = np.broadcast_to(np.asarray(guidance, dtype=np.float64), (n,)) if np.ndim(guidance) == 0 \
                else np.asarray(guidance, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"guidance={guidance!r}: expected a number or one number per image") from None
        if scales.shape != (n,):
            raise ValueError(f"guidance: expected one scale or {n} (one per image), got {scales.size}")
        if not np.isfinite(scales).all():
            raise ValueError(f"guidance={guidance!r}: expected finite scales")
        if self._grad is None and np.any(scales != 0):
            raise ValueError(f"guidance={guidance!r} needs a classifier, and this engine has none "
                             "(Engine(..., classifier=...)); or pass guidance=0")
        return scales

    def _plan(self, stage: _Stage, steps, method, variance) -> _Plan:
        implied, respacing = _parse_steps(steps)
        method = method or implied
        method_enum = _choice(METHODS, method, "method")
        tables = build_tables(stage.diffusion, respacing)
        if variance is None:
            variance = default_variance(stage.info.learn_sigma, stage.diffusion)
        variance_enum = _choice(VARIANCES, variance, "variance")
        if variance == "learned_range" and not stage.info.learn_sigma:
            raise ValueError(f"variance='learned_range': the model outputs {stage.info.out_channels} channels, "
                             f"not 2*{stage.info.in_channels} (eps and variance values)")
        schedule = _core.Schedule(tables.tensors(), tables.original_num_steps, tables.rescale_timesteps)
        return _Plan(method_enum, tables, schedule, variance_enum, respacing)


def _padded_index(start: int, real: int, size: int) -> np.ndarray:
    """Indices of a batch of `size` starting at `start` with `real` images, the last repeated."""
    idx = np.arange(start, start + size)
    idx[real:] = start + real - 1
    return idx


def _seed_tensor(seeds: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint64 seeds as the int64 bit patterns the core takes."""
    return torch.from_numpy(np.ascontiguousarray(seeds, dtype=np.uint64).view(np.int64)).to(device)


_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.info(message)


def _seeds(seeds, n) -> np.ndarray:
    """Per-image seeds as uint64 (Python ints reduced mod 2**64)."""
    if seeds is None:
        base = [0]
    elif np.ndim(seeds) == 0:
        base = [int(seeds)]
    else:
        base = None
    if base is not None:
        if not _is_int(seeds if seeds is not None else 0):
            raise TypeError(f"seeds={seeds!r}: expected an int or one int per image")
        return np.asarray([(base[0] + i) % _SEED_MOD for i in range(n)], dtype=np.uint64)
    if not all(_is_int(s) for s in seeds):
        raise TypeError(f"seeds: expected ints, got {[s for s in seeds if not _is_int(s)][:3]}")
    arr = [int(s) % _SEED_MOD for s in seeds]
    if len(arr) != n:
        raise ValueError(f"seeds: expected {n} (one per image) or one int, got {len(arr)}")
    return np.asarray(arr, dtype=np.uint64)


def _is_int(x) -> bool:
    """An int (Python, numpy or a 0-dim integer tensor), not a bool or a float."""
    if isinstance(x, torch.Tensor):
        return x.dim() == 0 and not x.is_floating_point() and x.dtype != torch.bool
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _whole_numbers(values, name: str) -> np.ndarray:
    """int64 ids from ints (lists, numpy, torch); a float, bool or string is refused, never truncated."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.dtype == object or not np.issubdtype(arr.dtype, np.integer):
        shown = arr.reshape(-1)[:3].tolist() if arr.ndim else arr.tolist()
        raise TypeError(f"{name}: expected integer ids, got {arr.dtype} values {shown}")
    return arr.astype(np.int64).reshape(-1)


def _progress(progress: Progress, total: int):
    if progress is None or progress is False:
        return None, None
    if callable(progress) and progress is not True:
        done = [0]

        def step(_k, _n):
            done[0] += 1
            progress(done[0], total)
        return None, step
    from tqdm.auto import tqdm
    bar = tqdm(total=total, unit="step", desc="sampling")
    return bar, lambda _k, _n: bar.update(1)
