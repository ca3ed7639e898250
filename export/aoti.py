"""AOTInductor packages: the two units (admrt.models.units: Denoiser, ClassifierGradient) exported
with torch.export (dynamic batch) and compiled ahead of time, for the Python-free runtime
(engine/csrc/admrt.h, Stack::load_package, `admrt-sample`) and `admrt.Engine.from_package`.

A package is a folder:
    denoiser.pt2         the base model, (x_t, t, y) -> [eps | v]
    classifier_grad.pt2  grad_x log p(y | x_t): forward and backward in one graph (make_fx of
                         ClassifierGradient, weights as explicit inputs), when a classifier is given
    upsampler.pt2        (x_t, t, y, low_res) -> [eps | v], when an upsampler is given
    manifest.json        format version, admrt/torch versions, device, dtype, batch bounds, each
                         model's preset and diffusion process, each unit's content hash (sha256 of
                         the .pt2 file: the runtime refuses a unit that differs from it), and the
                         coefficient tables of every requested step plan (built once, by
                         admrt.diffusion)

Export writes into a temporary folder beside the target, checks every unit as the C++ runtime
loads it against eager on random inputs at two batch sizes, and only then renames the folder
into place; an existing package is never overwritten silently.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn

from admrt import core
from admrt.io import hash_file

from .stack import (ExportReport, check_stack, example_inputs, low_res_size, model_entry, parse_step_plans,
                    staging_folder, weights_fingerprint)

PACKAGE_FORMAT = "admrt-aoti"
FORMAT_VERSION = core.PACKAGE_FORMAT_VERSION  # one source: engine/csrc/admrt.h
MANIFEST = "manifest.json"
FILES = {"model": "denoiser.pt2", "classifier": "classifier_grad.pt2", "upsampler": "upsampler.pt2"}
# Agreement of a loaded package with eager on random inputs: max |diff| / max(1, max |eager|).
CHECK_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2}


def compile_unit(unit: nn.Module, example: list, path: Path, max_batch: int) -> tuple[float, float]:
    """torch.export with a dynamic batch in [1, max_batch], then AOTInductor into `path`."""
    from torch.export import Dim, export

    batch = Dim("batch", min=1, max=max_batch)
    t0 = time.perf_counter()
    program = export(unit, tuple(example), dynamic_shapes=tuple({0: batch} for _ in example))
    t1 = time.perf_counter()
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    return t1 - t0, time.perf_counter() - t1


def export_aoti(model: nn.Module, classifier: Optional[nn.Module] = None, upsampler: Optional[nn.Module] = None,
                *, out: str | os.PathLike, steps: str | Sequence[str] = "ddim25",
                upsampler_steps: str | Sequence[str] | None = None, dtype: str = "fp32",
                device: str | torch.device | None = None, max_batch: int = 64, overwrite: bool = False,
                log=print) -> ExportReport:
    """Export the stack (base model, optional classifier and upsampler) as an AOTInductor
    package folder `out`, for the device the models are on (or `device`) at `dtype`.

    steps / upsampler_steps: the step plans whose tables the manifest carries (the first is the
    default; the upsampler's default to the base's). max_batch: the largest batch the package
    takes (it is compiled for 1..max_batch).
    """
    from admrt import __version__
    from admrt.models.units import ClassifierGradient, Denoiser, device_of

    out = Path(out)
    if not isinstance(max_batch, int) or max_batch < 2:
        raise ValueError(f"max_batch={max_batch!r}: expected an int >= 2")
    if dtype not in CHECK_TOLERANCE:
        raise ValueError(f"dtype={dtype!r}: expected one of {tuple(CHECK_TOLERANCE)}")
    plans = parse_step_plans(steps)
    up_plans = plans if upsampler_steps is None else parse_step_plans(upsampler_steps)
    device = device_of(model, device)

    roles, infos = check_stack(model, classifier, upsampler)
    manifest = {
        "format": PACKAGE_FORMAT, "format_version": FORMAT_VERSION, "admrt_version": __version__,
        "torch_version": torch.__version__, "device": device.type, "dtype": dtype,
        "batch": {"min": 1, "max": max_batch}, "seeded_noise": core.SEEDED_NOISE_FORMAT,
        "default_steps": plans[0], "default_upsampler_steps": up_plans[0] if upsampler is not None and upsampler_steps is not None else None,
        "models": {role: model_entry(module, infos[role], role, FILES[role], up_plans if role == "upsampler" else plans)
                   for role, module in roles},
        "weights": weights_fingerprint(dict(roles)),
    }
    seconds, errors = {}, {}
    with staging_folder(out, overwrite) as tmp:
        units = {}
        for role, module in roles:
            info = infos[role]
            low = low_res_size(info)
            example = example_inputs(info, 2, device, low)
            if role == "classifier":
                unit = ClassifierGradient(module, dtype, device=device)
                traced = unit.graph(*example, dynamic_batch=True)
            else:
                unit = Denoiser(module, dtype, device=device)
                traced = unit
            log(f"admrt export: {role}: exporting and compiling {FILES[role]} (batch 1..{max_batch}, {dtype}, "
                f"{device.type}); this takes minutes")
            seconds[role] = compile_unit(traced, example, tmp / FILES[role], max_batch)
            manifest["models"][role]["sha256"] = hash_file(tmp / FILES[role]).hexdigest()
            units[role] = (unit, low)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        errors = check_package(tmp, units, infos, dtype, device)
    return ExportReport(out, seconds, errors)


def check_package(folder: Path, units: dict, infos: dict, dtype: str, device: torch.device) -> dict:
    """Run every unit of the package as the C++ runtime loads it (admrt.engine.backends.load_package)
    on random inputs at batch 1 and 3, against the eager unit; raise if one disagrees."""
    from admrt.engine.backends import load_package

    package = load_package(str(folder), str(device))
    errors = {}
    for role, (unit, low) in units.items():
        worst = 0.0
        for batch, seed in ((1, 1), (3, 2)):
            example = example_inputs(infos[role], batch, device, low, seed)
            got = package.run(role, example)
            want = unit(*example)
            scale = max(1.0, float(want.abs().max()))
            worst = max(worst, float((got - want).abs().max()) / scale)
        errors[role] = worst
        if not worst <= CHECK_TOLERANCE[dtype]:
            raise RuntimeError(f"admrt export: {role}: the compiled package differs from eager by {worst:.3g} "
                               f"(relative), more than {CHECK_TOLERANCE[dtype]} for {dtype}; nothing was written")
    return errors
