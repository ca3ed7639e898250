"""Sampling from an exported AOTInductor package (admrt.export.aoti) from Python, through the
same C++ objects as the Python-free `admrt-sample` program (engine/csrc/admrt.h: Package,
Context), so the two front ends cannot drift: the batching, cascade, seeds and validation are
the C++ Context's.

    eng = admrt.Engine.from_package("stack.aoti")
    out = eng.sample(classes=[1, 2, 3], steps="ddim25", guidance=1.0, seeds=[7, 8, 9])
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from . import _core
from .engine import SampleResult, _is_int, _seeds, _whole_numbers


class PackageEngine:
    """An exported package, loaded once; `sample` mirrors admrt.Engine.sample for what a package
    can do (seeded noise, the step plans it carries, its precision and device)."""

    def __init__(self, folder: Union[str, Path], device: Optional[str] = None, cuda_graphs: bool = True):
        self.package = _core.Package(str(folder), "" if device is None else str(device))
        self.cuda_graphs = bool(cuda_graphs)
        self._contexts: dict[tuple, object] = {}

    @property
    def num_classes(self) -> Optional[int]:
        return self.package.num_classes

    @property
    def default_batch_size(self) -> int:
        return min(16, self.package.max_batch)

    @property
    def dtype(self) -> str:
        return self.package.dtype

    def context(self, steps: Optional[str] = None, upsampler_steps: Optional[str] = None, batch_size: int = 16,
                eta: float = 0.0, clip_denoised: bool = True, check_finite: bool = True, keep_float: bool = False):
        """The C++ Context for these settings (kept, so buffers and captured graphs are reused)."""
        key = (steps, upsampler_steps, int(batch_size), float(eta), bool(clip_denoised), bool(check_finite),
               bool(keep_float))
        ctx = self._contexts.get(key)
        if ctx is None:
            p = _core.Context.default_params()
            p.steps, p.upsampler_steps = steps or "", upsampler_steps or ""
            p.batch_size, p.eta = int(batch_size), float(eta)
            p.clip_denoised, p.check_finite, p.cuda_graphs = clip_denoised, check_finite, self.cuda_graphs
            p.keep_float = bool(keep_float)
            self._contexts.clear()  # one context at a time: free the old buffers and graphs first
            ctx = self._contexts[key] = _core.Context(self.package, p)
        return ctx

    def steps_per_batch(self, steps: Optional[str] = None, upsampler_steps: Optional[str] = None) -> int:
        """Network evaluations of one batch (both stages), without replacing the kept context."""
        p = _core.Context.default_params()
        p.steps, p.upsampler_steps, p.batch_size = steps or "", upsampler_steps or "", self.default_batch_size
        return _core.Context(self.package, p).steps_per_batch()

    def sample(self, classes: Optional[Sequence[int]] = None, steps: Optional[str] = None,
               guidance: Union[float, Sequence[float], None] = None, seeds: Union[int, Sequence[int], None] = None,
               batch_size: Optional[int] = None, *, num: Optional[int] = None, eta: float = 0.0, clip_denoised: bool = True,
               upsampler_steps: Optional[str] = None, check_finite: bool = True, keep_float: bool = False,
               noise: str = "seeded", progress: Optional[Callable[[int, int], None]] = None) -> SampleResult:
        """As admrt.Engine.sample; steps / upsampler_steps: step plans the package carries
        (default: its first). batch_size: default min(16, the package's bound). Packages draw
        seeded noise only."""
        if batch_size is None:
            batch_size = self.default_batch_size
        if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
            raise ValueError(f"batch_size={batch_size!r}: expected a positive int")
        if noise != "seeded":
            raise ValueError(f"noise={noise!r}: a package draws seeded noise only ('reference' is the Python "
                             "Engine's parity mode)")
        ctx = self.context(steps, upsampler_steps, batch_size, eta, clip_denoised, check_finite, keep_float)
        if num is not None and (not _is_int(num) or num <= 0):
            raise ValueError(f"num={num!r}: expected a positive int")
        class_list = [] if classes is None else _whole_numbers(classes, "classes").tolist()
        if classes is not None and not class_list:
            raise ValueError("classes=[]: expected at least one class")
        n = len(class_list) if class_list else (num if num is not None else 0)
        scales = [] if guidance is None else [float(g) for g in np.atleast_1d(np.asarray(guidance, dtype=np.float64))]
        seed_arr = _seeds(seeds, n) if n > 0 else np.zeros(0, dtype=np.uint64)
        images, labels, base, floats = ctx.sample(class_list, scales, [int(s) for s in seed_arr],
                                                  -1 if num is None else int(num), progress)
        return SampleResult(images=images.numpy(), labels=None if labels is None else labels.numpy(),
                            seeds=seed_arr, base_images=None if base is None else base.numpy(),
                            samples=None if floats is None else floats.numpy())
