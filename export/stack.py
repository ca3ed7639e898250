"""What every export format shares (AOTInductor packages, ONNX, TensorRT): the stack's checks
(base UNet, optional noisy classifier and upsampler that fit it), the step plans and their
coefficient tables (built once, by admrt.diffusion), each model's manifest entry, example inputs
and the weights fingerprint that run records compare."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn

from admrt.io import hash_weights, pid_alive


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote and measured, per unit: seconds (aoti: (export, compile)) and the
    error against eager of the unit as its runtime loads it (aoti: max |diff| / max(1, max |eager|);
    onnx: relative_error, None where not checked)."""

    out: Path
    seconds: dict
    errors: dict


def check_stack(model: nn.Module, classifier: Optional[nn.Module] = None,
                upsampler: Optional[nn.Module] = None) -> tuple[list, dict]:
    """([(role, module)], {role: ModelInfo fitted to the stack}) for a base UNet with an optional
    classifier and upsampler; raises ValueError naming the role whose kind or size does not fit."""
    from admrt.models.units import ModelInfo

    infos = {"model": ModelInfo.of(model, "model")}
    if infos["model"].kind != "unet":
        raise ValueError(f"model: expected a diffusion UNet, got a {infos['model'].kind!r} model")
    roles = [("model", model)]
    if classifier is not None:
        infos["classifier"] = ModelInfo.of(classifier, "classifier").fitted(infos["model"].image_size)
        if infos["classifier"].kind != "classifier":
            raise ValueError(f"classifier: expected a noisy classifier, got a {infos['classifier'].kind!r} model")
        roles.append(("classifier", classifier))
    if upsampler is not None:
        infos["upsampler"] = ModelInfo.of(upsampler, "upsampler")
        if infos["upsampler"].kind != "superres":
            raise ValueError(f"upsampler: expected a SuperRes model, got a {infos['upsampler'].kind!r} model")
        if infos["upsampler"].low_res_size not in (None, infos["model"].image_size):
            raise ValueError(f"upsampler: conditioned on {infos['upsampler'].low_res_size}px images, but the model "
                             f"samples {infos['model'].image_size}px")
        infos["upsampler"] = infos["upsampler"].fitted(low_res_size=infos["model"].image_size)
        roles.append(("upsampler", upsampler))
    return roles, infos


def parse_step_plans(steps: str | Sequence[str]) -> list[str]:
    """"ddim25 250 10,10,5" -> ["ddim25", "250", "10,10,5"]: the step plans whose tables an export
    carries, separated by spaces or ';' (a plan's own commas cut sections), each parsed by the
    core's StepPlan (grammar: engine/csrc/plan.h) and kept in its canonical text; the first is the
    default."""
    from admrt.core import StepPlan

    items = steps.replace(";", " ").split() if isinstance(steps, str) else [str(s) for s in steps]
    plans = []
    for item in items:
        try:
            plan = str(StepPlan.parse(item, "steps"))
        except ValueError as exc:
            hint = " (separate step plans with spaces: 'ddim25 250')" if "," in item and "ddim" in item else ""
            raise ValueError(f"{exc}{hint}") from None
        if plan not in plans:
            plans.append(plan)
    if not plans:
        raise ValueError(f"steps={steps!r}: expected at least one step plan such as 'ddim25'")
    return plans


def schedule_entry(diffusion, plan: str) -> dict:
    """A step plan's method, step counts and coefficient tables (admrt.diffusion.build_tables)."""
    from admrt.diffusion import build_tables
    from admrt.core import StepPlan

    parsed = StepPlan.parse(plan)
    tables = build_tables(diffusion, parsed)
    return {"method": parsed.method,
            "num_steps": tables.num_timesteps,
            "original_num_steps": tables.original_num_steps,
            "rescale_timesteps": tables.rescale_timesteps,
            "tables": {name: t.tolist() for name, t in tables.tensors().items()}}


def model_entry(module: nn.Module, info, role: str, file: str, plans: list[str]) -> dict:
    """A model's manifest entry: its file, shapes, preset, and (diffusion models) variance,
    diffusion process and the coefficient tables of each step plan."""
    from admrt.diffusion import default_variance

    preset = getattr(module, "preset", None)
    entry = {"file": file, "kind": info.kind, "image_size": info.image_size,
             "in_channels": info.in_channels, "out_channels": info.out_channels,
             "num_classes": info.num_classes, "low_res_size": info.low_res_size,
             "preset": None if preset is None else json.loads(preset.to_json())}
    if role != "classifier":
        if preset is None:
            raise ValueError(f"{role}: it records no preset, so its diffusion process is unknown; load it with "
                             "admrt.load_model(..., preset=...)")
        entry["variance"] = default_variance(info.learn_sigma, preset.diffusion)
        entry["diffusion"] = dataclasses.asdict(preset.diffusion)
        # keyed by respacing: DDPM and DDIM over one respacing share its tables (engine/csrc/plan.h)
        from admrt.core import StepPlan
        entry["schedules"] = {}
        for plan in plans:
            entry["schedules"].setdefault(StepPlan.parse(plan).respacing, schedule_entry(preset.diffusion, plan))
    return entry


def example_inputs(info, batch: int, device, low_res_size=None, seed=0) -> list[torch.Tensor]:
    """Random (x_t, t, y[, low_res]) for a unit with ModelInfo `info` (checks and tracing)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, info.in_channels, info.image_size, info.image_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g).float()
    k = info.num_classes or (info.out_channels if info.kind == "classifier" else 1)
    y = torch.randint(0, k, (batch,), generator=g)
    args = [x, t, y]
    if low_res_size is not None:
        args.append(torch.rand(batch, info.in_channels, low_res_size, low_res_size, generator=g) * 2 - 1)
    return [a.to(device) for a in args]


def weights_fingerprint(modules: dict) -> str:
    """sha256 (first 16 hex digits) of the exported modules' weights: role, key, dtype, shape and
    bytes of every tensor; run records compare it (engine/csrc/runfolder.cpp)."""
    return "sha256:" + hash_weights(modules).hexdigest()[:16]


def low_res_size(info) -> Optional[int]:
    """The low-res side an upsampler is conditioned on (None for other models); its info must be
    fitted to the stack (ModelInfo.fitted) when the module records none."""
    if info.kind != "superres":
        return None
    if info.low_res_size is None:
        raise ValueError("upsampler: it records no low_res_size and no base model gives one; load it with an "
                         "admrt preset")
    return info.low_res_size


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (floored at 1e-12): what the exports' checks compare."""
    return float((got.float() - want.float()).abs().max()) / max(float(want.abs().max()), 1e-12)


def staging_prefix(out: Path) -> str:
    """The name a staging folder of `out` starts with: `.<out>.<pid>.` (then mkdtemp's random part
    and `.tmp`), so that a later export of the same `out` knows whose it is."""
    return f".{out.name}.{os.getpid()}."


def remove_stale_staging(out: Path) -> list[Path]:
    """Remove the staging folders of `out` whose export process is gone (killed: SIGKILL, the OOM
    killer, a power cut), as the run folder removes a killed run's .tmp files; returns them.
    Another live export's folder, and folders of other names, are left alone."""
    out = Path(out)
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(\d+)\.[^.]+\.tmp$")
    removed = []
    if not out.parent.is_dir():
        return removed
    for path in out.parent.iterdir():
        match = pattern.match(path.name)
        if match and path.is_dir() and not path.is_symlink() and not pid_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def staging_folder(out: Path, overwrite: bool):
    """A temporary folder beside `out` (`.<out>.<pid>.<random>.tmp`), renamed to `out` when the
    block succeeds (replacing it when overwrite) and removed when it fails: an export is all there
    or not at all. A killed export's staging folder is removed by the next export of `out`."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"out={str(out)!r}: exists; choose another folder or pass overwrite (--force) "
                              "to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=staging_prefix(out), suffix=".tmp"))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide the folder from other users
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
