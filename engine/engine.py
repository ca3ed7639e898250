"""The Engine: guided ADM sampling (ADM-G) and the two-stage cascade (ADM-G -> ADM-U) of
Dhariwal & Nichol (2021), on the C++ core.

Python only prepares the model handle: the two units (Denoiser, ClassifierGradient) through a
backend, each stage's shapes and default variance, and its coefficient tables per step plan
(admrt.diffusion.build_tables). Everything a request does -- validation, per-image seeds,
fixed-size batches with the last one padded, the cascade, progress, cancel -- is the C++
driver's (engine/csrc/context.cpp, admrt::Context), the same code an exported package runs
under `admrt-sample`; every step runs in a C++ `Sampler` context (engine/csrc/sampler.cpp),
which on CUDA captures one whole step as a CUDA graph and replays it.

    eng = admrt.Engine(model, classifier=clf, dtype="fp16")
    out = eng.sample(classes=[1, 2, 3], steps="ddim25", guidance=1.0, seeds=[7, 8, 9])
    out.images  # uint8 (N, H, W, C);  out.labels  # int64 (N,)

    eng = admrt.Engine.from_package("stack.aoti")       # an exported package, same driver
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from admrt.config import DiffusionConfig
from admrt.diffusion import build_tables, default_variance
from admrt.models.units import ClassifierGradient, Denoiser, ModelInfo, device_of

from admrt import core
from .backends import AUTO, choose_backend, get_backend

log = logging.getLogger(__name__)

_SEED_MOD = 2 ** 64

Progress = Union[bool, Callable[[int, int], None], None]
Steps = Union[str, int, Sequence[int], None]


@dataclass(frozen=True)
class SampleResult:
    """images: uint8 (N, H, W, C), final stage; labels: int64 (N,) or None (unconditional, no
    guidance); seeds: the per-sample seeds (uint64); base_images: uint8 low-res stage of a
    cascade, else None; samples: float32 (N, C, H, W) x_0 of the final stage, before
    quantisation (only with sample(keep_float=True))."""

    images: np.ndarray
    labels: Optional[np.ndarray]
    seeds: np.ndarray
    base_images: Optional[np.ndarray] = None
    samples: Optional[np.ndarray] = None


@dataclass(frozen=True)
class StageInfo:
    """A stage of a Python-built stack: its network's shapes and its diffusion process."""

    role: str
    info: ModelInfo
    diffusion: DiffusionConfig


class Engine:
    """Samples from an ADM model, optionally guided by a noisy classifier and followed by an
    upsampler.

    model: admrt UNet (admrt.create_model / load_model) or a guided-diffusion UNetModel.
    classifier: noisy classifier (EncoderUNet, admrt's or guided-diffusion's) for guidance, or None.
    upsampler: SuperRes model (admrt's or guided-diffusion's) conditioned on the base model's uint8
        output, or None.
    backend: "auto" (the default: the backend measured fastest for the device, backends.choose_backend:
        on CPU "aoti" for a base model under 50M parameters, else "openvino"; on CUDA "eager";
        compiled once per machine into the compile cache), "eager", "compile" (torch.compile,
        fullgraph), "aoti" (AOTInductor), "onnxruntime", "openvino" (CPU), "tensorrt"
        (engine/backends.py), or one registered with register_backend. A backend "auto" picked that
        cannot run here falls back to "eager" with a logged warning; a named one raises.
    cache_dir: the compile cache's folder (admrt.engine.cache: default $ADMRT_CACHE_DIR, else
        $XDG_CACHE_HOME/admrt, else ~/.cache/admrt), for the backends that compile.
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

    Engine.from_package(folder) runs an exported AOTInductor package through the same driver.
    """

    def __init__(self, model: nn.Module, classifier: Optional[nn.Module] = None,
                 upsampler: Optional[nn.Module] = None, backend: str = "auto", dtype: str = "fp32", *,
                 diffusion: Optional[DiffusionConfig] = None,
                 upsampler_diffusion: Optional[DiffusionConfig] = None,
                 device: Union[str, torch.device, None] = None, cuda_graphs: bool = True,
                 channels_last: Optional[bool] = None, cache_dir: Union[str, "os.PathLike", None] = None):
        for role, module in (("model", model), ("classifier", classifier), ("upsampler", upsampler)):
            if not isinstance(module, nn.Module) and (module is not None or role == "model"):
                raise TypeError(f"{role}={module!r}: expected a torch.nn.Module (admrt.load_model(...) loads one "
                                f"from a file or bundled name), got {type(module).__name__}")
        self.device = device_of(model, device)
        automatic = backend == AUTO
        if automatic:
            backend, why = choose_backend(self.device, (model, classifier, upsampler))
            if why:
                log.warning("backend='auto' runs %r: %s", backend, why)
        self.backend_name, self.dtype = backend, dtype
        backend_impl = get_backend(backend)
        self.cuda_graphs = bool(cuda_graphs)
        if cuda_graphs and not backend_impl.capturable and self.device.type == "cuda":
            _log_once(f"backend={backend!r} runs the steps uncaptured (its runtime is not captured in the core's "
                      "CUDA graphs)")
        units = dict(dtype=dtype, channels_last=channels_last, device=self.device)

        base_info = ModelInfo.of(model, "model")
        self.base = StageInfo("model", base_info, _diffusion_of(model, "model", diffusion))
        self.upsampler = None
        if upsampler is not None:
            info = ModelInfo.of(upsampler, "upsampler").fitted(low_res_size=base_info.image_size)
            self.upsampler = StageInfo("upsampler", info, _diffusion_of(upsampler, "upsampler", upsampler_diffusion))
        self.classifier_info = None
        if classifier is not None:
            self.classifier_info = ModelInfo.of(classifier, "classifier").fitted(base_info.image_size)

        # The eager units first: the core checks that the stages fit together (kinds, sizes,
        # channels) before a backend spends time compiling them.
        modules = {"model": model, "classifier": classifier, "upsampler": upsampler}
        eager = {role: _unit(modules[role], role, info, units) for role, info in self._infos().items()}
        self.stack = self._build_stack(eager, capturable=True)
        # role -> the callable the core runs (the backend's unit): for profiling and checks.
        self.units = eager
        if backend != "eager":
            try:
                self.units = _backend_units(backend_impl, eager, cache_dir)
                self.stack = self._build_stack(self.units, capturable=backend_impl.capturable)
            except Exception as exc:
                if not automatic:
                    raise
                log.warning("backend='auto': %s failed here (%s); running 'eager' (pass backend=%r to see the "
                            "error)", backend, str(exc).split("\n")[0], backend)
                self.backend_name, self.units = "eager", eager
        self._context_key, self._context = None, None

    @classmethod
    def from_package(cls, folder, device: Union[str, torch.device, None] = None,
                     cuda_graphs: bool = True) -> "Engine":
        """An exported AOTInductor package (`admrt export aoti`), loaded once and run by the C++
        driver that the Python-free `admrt-sample` runs: same validation, batching, cascade and
        seeds. Its precision, device type and step plans were fixed at export."""
        self = cls.__new__(cls)
        self.stack = core.Stack.load_package(str(folder), "" if device is None else str(device))
        self.backend_name, self.dtype = "aoti", self.stack.dtype
        self.device = torch.device(self.stack.device)
        self.cuda_graphs = bool(cuda_graphs)
        self.base = self.upsampler = self.classifier_info = None
        self.units = {}  # the package's units run inside the core (Stack.run calls one)
        self._context_key, self._context = None, None
        return self

    # -----------------------------------------------------------------------------------------

    @property
    def package(self) -> Optional[str]:
        """The package folder this engine runs, or None for models given from Python."""
        return self.stack.package or None

    @property
    def num_classes(self) -> Optional[int]:
        """Labels the run accepts: the classifier's classes if guided, else the model's."""
        return self.stack.num_classes

    @property
    def default_batch_size(self) -> int:
        return min(16, self.stack.max_batch) if self.stack.max_batch else 16

    def context(self, steps: Steps = None, upsampler_steps: Steps = None, batch_size: Optional[int] = None, *,
                eta: float = 0.0, noise: str = "seeded", method: Optional[str] = None,
                variance: Optional[str] = None, clip_denoised: bool = True, check_finite: bool = True,
                keep_float: bool = False, dynamic_threshold: float = 0.0,
                guidance_interval: Optional[Sequence[int]] = None, guidance_every: int = 1, keep: bool = True):
        """The C++ driver (`core.Context`) for these settings. The last one is kept while the
        settings stay the same (its buffers and captured graphs are reused); keep=False makes a
        fresh one without replacing it. Raises ValueError for a bad setting (one message for
        every front end: the core's)."""
        if batch_size is None:
            batch_size = self.default_batch_size
        if not _is_int(batch_size):
            raise ValueError(f"batch_size={batch_size!r}: expected a positive int")
        if not isinstance(eta, (int, float, np.floating, np.integer)) or isinstance(eta, bool):
            raise ValueError(f"eta={eta!r}: expected a finite eta >= 0")
        p = core.Context.default_params()
        p.steps, p.upsampler_steps = _plan_text(steps, "steps"), _plan_text(upsampler_steps, "upsampler_steps")
        p.method, p.variance = method or "", variance or ""
        p.noise, p.batch_size, p.eta = str(noise), int(batch_size), float(eta)
        p.clip_denoised, p.check_finite, p.keep_float = bool(clip_denoised), bool(check_finite), bool(keep_float)
        p.cuda_graphs = self.cuda_graphs
        _guidance_options(p, dynamic_threshold, guidance_interval, guidance_every)
        key = (p.steps, p.upsampler_steps, p.method, p.variance, p.noise, p.batch_size, p.eta, p.clip_denoised,
               p.check_finite, p.keep_float, p.dynamic_threshold, p.guidance_t_min, p.guidance_t_max,
               p.guidance_every)
        if keep and self._context is not None and self._context_key == key:
            return self._context
        if not keep:
            return core.Context(self.stack, p)
        self._context_key, self._context = None, None  # free the old buffers and graphs first
        self._context = core.Context(self.stack, p)
        self._context_key = key
        return self._context

    def steps_per_batch(self, steps: Steps = None, upsampler_steps: Steps = None, **settings) -> int:
        """Network evaluations of one batch (both stages of a cascade): for progress bars."""
        return self.context(steps, upsampler_steps, keep=False, **settings).steps_per_batch()

    def sample(self, classes: Optional[Sequence[int]] = None, steps: Steps = None,
               guidance: Union[float, Sequence[float], None] = None,
               seeds: Union[int, Sequence[int], None] = None, batch_size: Optional[int] = None, *,
               num: Optional[int] = None, eta: float = 0.0, clip_denoised: bool = True,
               noise: str = "seeded", variance: Optional[str] = None, method: Optional[str] = None,
               upsampler_steps: Steps = None, check_finite: bool = True,
               keep_float: bool = False, dynamic_threshold: float = 0.0,
               guidance_interval: Optional[Sequence[int]] = None, guidance_every: int = 1,
               progress: Progress = False) -> SampleResult:
        """Sample len(classes) images (or `num`).

        classes: one label per image; None: `num` images with labels 0, 1, ..., cycling over the
            classes (class-conditional or guided), or unlabelled (unconditional, unguided).
        steps: a step plan (grammar: engine/csrc/plan.h): "ddimN" (DDIM), "N" / "a,b,c" / N (DDPM
            on the respaced process), "ddim:250" (DDIM over that respacing), a multistep solver
            with N model calls: "dpmpp2m10", "dpmpp3m10", "dpmpp2m-sde20", "unipc2m8", "unipc3m8"
            (uniform in t; "-logsnr" appended: uniform in log-SNR). Default: the stack's
            (README), or a package's first plan (a package runs the respacings it was exported with).
        guidance: classifier scale, one for all or one per image; None: 1.0 with a classifier,
            0 without. Non-zero needs a classifier.
        seeds: one per image, or an int s for s, s+1, ...; None: 0, 1, .... In "seeded" noise an
            image depends only on its seed (and class, scale, steps), not on the batch or the
            device. In "reference" noise one generator draws as guided-diffusion does: seeded
            with the first seed, or the global torch generator when seeds is None.
        batch_size: images per network call (default 16, or a package's bound if smaller); every
            batch has min(batch_size, N) images, the last one padded (and the padding dropped),
            so one captured step serves them all.
        variance: "learned_range" | "fixed_small" | "fixed_large"; None: learned_range for a
            learned-sigma model, else fixed_small or fixed_large as its diffusion's sigma_small
            says (the reference's create_gaussian_diffusion).
        method: a method name ("ddpm", "ddim", "dpmpp2m", ...) to override what `steps` implies
            (guided-diffusion's use_ddim over a respacing such as "250"); both stages of a cascade.
        dynamic_threshold: Imagen's dynamic thresholding of x_0 at this percentile (e.g. 0.995)
            instead of the clamp to [-1, 1]; 0: off.
        guidance_interval: (t_min, t_max) model timesteps (0 .. T-1) where the classifier runs
            (Kynkaenniemi et al. 2024); elsewhere it is not run. None: every step.
        guidance_every: run the classifier on every k-th call only (0, k, 2k, ...).
        upsampler_steps: the cascade's second stage (default: `steps`, or a package's default).
        check_finite: raise if a model output, gradient or the sample is NaN/Inf, naming the
            first bad step (a device flag per step, read once after each batch).
        keep_float: also return the float x_0 (result.samples).
        progress: True for a tqdm bar, or a callable(done, total) over all steps of the run.
        """
        ctx = self.context(steps, upsampler_steps, batch_size, eta=eta, noise=noise, method=method,
                           variance=variance, clip_denoised=clip_denoised, check_finite=check_finite,
                           keep_float=keep_float, dynamic_threshold=dynamic_threshold,
                           guidance_interval=guidance_interval, guidance_every=guidance_every)
        if noise == "reference" and self.cuda_graphs and self.device.type == "cuda":
            _log_once("noise='reference' runs the steps uncaptured (guided-diffusion's draw order comes from "
                      "torch's generator); seeded noise is captured in CUDA graphs")
        request = _request(classes, guidance, seeds, num)
        bar, on_step = _progress(progress)
        try:
            images, labels, base, floats, seed_list = ctx.sample(*request, progress=on_step)
        finally:
            if bar is not None:
                bar.close()
        return SampleResult(images=images.numpy(), labels=None if labels is None else labels.numpy(),
                            seeds=np.asarray(seed_list, dtype=np.uint64),
                            base_images=None if base is None else base.numpy(),
                            samples=None if floats is None else floats.numpy())

    def check(self, classes: Optional[Sequence[int]] = None, steps: Steps = None,
              guidance: Union[float, Sequence[float], None] = None,
              seeds: Union[int, Sequence[int], None] = None, batch_size: Optional[int] = None, *,
              num: Optional[int] = None, eta: float = 0.0, noise: str = "seeded", variance: Optional[str] = None,
              method: Optional[str] = None, upsampler_steps: Steps = None, dynamic_threshold: float = 0.0,
              guidance_interval: Optional[Sequence[int]] = None, guidance_every: int = 1) -> None:
        """Validate `sample`'s arguments without sampling (what a run checks before it writes
        anything): raises the error `sample` would."""
        ctx = self.context(steps, upsampler_steps, batch_size, eta=eta, noise=noise, method=method,
                           variance=variance, dynamic_threshold=dynamic_threshold,
                           guidance_interval=guidance_interval, guidance_every=guidance_every, keep=False)
        classes_, guidance_, seeds_, num_ = _request(classes, guidance, seeds, num)
        ctx.validate(classes_, guidance_, seeds_, num_)

    # -----------------------------------------------------------------------------------------

    def _infos(self) -> dict[str, ModelInfo]:
        infos = {"model": self.base.info}
        if self.classifier_info is not None:
            infos["classifier"] = self.classifier_info
        if self.upsampler is not None:
            infos["upsampler"] = self.upsampler.info
        return infos

    def _build_stack(self, units: dict, capturable: bool):
        """The core's model handle over these units (each stage's shapes, variance, tables)."""
        stages = {}
        for role, info in self._infos().items():
            stage = self.upsampler if role == "upsampler" else self.base
            shape = [info.in_channels, info.image_size, info.image_size]  # fitted: the classifier's too
            kwargs = dict(role=role, kind=info.kind, image_shape=shape, num_classes=info.num_classes,
                          out_channels=info.out_channels, unit=units[role])
            if role == "classifier":
                kwargs["num_classes"] = info.out_channels
            else:
                diffusion = stage.diffusion
                kwargs.update(variance=default_variance(info.learn_sigma, diffusion),
                              prediction=core.Prediction.XSTART if diffusion.predict_xstart else core.Prediction.EPS,
                              schedule=_schedule_builder(diffusion))
                if info.kind == "superres":
                    low = info.low_res_size
                    kwargs["low_res_shape"] = [] if low is None else [info.in_channels, low, low]
            stages[role] = core.Stage(**kwargs)
        return core.Stack(stages["model"], stages.get("classifier"), stages.get("upsampler"),
                           device=str(self.device), dtype=self.dtype, capturable=capturable)


def _diffusion_of(module: nn.Module, role: str, diffusion: Optional[DiffusionConfig]) -> DiffusionConfig:
    if diffusion is not None:
        return diffusion
    preset = getattr(module, "preset", None)
    if preset is None:
        raise ValueError(f"{role}: it records no preset, so its diffusion process is unknown; pass "
                         f"{'diffusion' if role == 'model' else 'upsampler_diffusion'}=DiffusionConfig(...)")
    return preset.diffusion


def _unit(module: nn.Module, role: str, info: ModelInfo, units: dict):
    """The eager unit of a stage: Denoiser or ClassifierGradient over an inference copy."""
    unit = ClassifierGradient(module, **units) if role == "classifier" else Denoiser(module, **units)
    unit.info = info   # compiled backends trace it with the sizes the stack gives
    return unit


def _schedule_builder(diffusion: DiffusionConfig):
    """plan -> the core's Schedule of `diffusion` respaced by the plan (admrt.diffusion)."""
    def schedule(plan):
        tables = build_tables(diffusion, plan)
        return core.Schedule(tables.tensors(), tables.original_num_steps, tables.rescale_timesteps)
    return schedule


def _guidance_options(p, dynamic_threshold, guidance_interval, guidance_every) -> None:
    """Type checks of the thresholding and guidance-interval settings; the core checks the values."""
    if not isinstance(dynamic_threshold, (int, float, np.floating, np.integer)) or isinstance(dynamic_threshold, bool):
        raise ValueError(f"dynamic_threshold={dynamic_threshold!r}: expected a percentile in (0, 1), or 0 (off)")
    p.dynamic_threshold = float(dynamic_threshold)
    if guidance_interval is not None:
        if (isinstance(guidance_interval, (str, bytes)) or not hasattr(guidance_interval, "__len__")
                or len(guidance_interval) != 2 or not all(_is_int(v) for v in guidance_interval)):
            raise ValueError(f"guidance_interval={guidance_interval!r}: expected (t_min, t_max), two model timesteps")
        p.guidance_t_min, p.guidance_t_max = int(guidance_interval[0]), int(guidance_interval[1])
    if not _is_int(guidance_every):
        raise ValueError(f"guidance_every={guidance_every!r}: expected a positive int")
    p.guidance_every = int(guidance_every)


def _plan_text(steps: Steps, name: str) -> str:
    """A step plan as the core parses it: text as given, an int N as "N", ints as "a,b,c"."""
    if steps is None:
        return ""
    if isinstance(steps, str):
        return steps
    if _is_int(steps):
        return str(int(steps))
    if isinstance(steps, (list, tuple)) and steps and all(_is_int(s) for s in steps):
        return ",".join(str(int(s)) for s in steps)
    raise TypeError(f"{name}={steps!r}: expected a step plan such as 'ddim25', '250' or '10,10,5'")


def _request(classes, guidance, seeds, num) -> tuple[list, list, list, int]:
    """Python values as the core takes them (classes, guidance, seeds, num); types are checked
    here, values by the core."""
    if num is not None and not _is_int(num):
        raise ValueError(f"num={num!r}: expected a positive int")
    class_list = [] if classes is None else _whole_numbers(classes, "classes").tolist()
    # The core reads an empty list as "not given": an empty list given here is refused instead.
    for name, value in (("classes", classes), ("guidance", guidance), ("seeds", seeds)):
        if value is not None and np.ndim(value) > 0 and len(value) == 0:
            raise ValueError(f"{name}=[]: expected at least one value (or None)")
    if guidance is None:
        scales = []
    else:
        try:
            scales = [float(g) for g in np.atleast_1d(np.asarray(guidance, dtype=np.float64))]
        except (TypeError, ValueError):
            raise TypeError(f"guidance={guidance!r}: expected a number or one number per image") from None
    if seeds is None:
        seed_list = []
    elif np.ndim(seeds) == 0:
        if not _is_int(seeds):
            raise TypeError(f"seeds={seeds!r}: expected an int or one int per image")
        seed_list = [int(seeds) % _SEED_MOD]
    else:
        if not all(_is_int(s) for s in seeds):
            raise TypeError(f"seeds: expected ints, got {[s for s in seeds if not _is_int(s)][:3]}")
        seed_list = [int(s) % _SEED_MOD for s in seeds]
    return class_list, scales, seed_list, None if num is None else int(num)


_logged: set[str] = set()


def _backend_units(backend_impl, eager: dict, cache_dir) -> dict:
    """role -> the backend's unit for each eager unit (with the compile cache, for the backends
    that keep what they compile)."""
    extra = ()
    if backend_impl.cached:
        from .cache import CompileCache
        extra = (CompileCache(cache_dir),)
    return {role: (backend_impl.classifier_gradient(unit, *extra) if role == "classifier"
                   else backend_impl.denoiser(unit, *extra)) for role, unit in eager.items()}


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.info(message)


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


def _progress(progress: Progress):
    """(bar to close, callback(done, total)) for sample(progress=...)."""
    if progress is None or progress is False:
        return None, None
    if callable(progress) and progress is not True:
        return None, progress
    from tqdm.auto import tqdm
    bar = tqdm(unit="step", desc="sampling")

    def step(done, total):
        bar.total = total
        bar.update(1)
    return bar, step
