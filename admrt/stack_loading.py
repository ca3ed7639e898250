"""The models a command line names, loaded: what `admrt sample` (admrt.engine.cli) and
`admrt export` (admrt.export.cli) share. A role is a path (.safetensors, or a released .pt with its
preset), a bundled model's name or a preset name (random weights, said on stderr); guided-diffusion's
flags (--gd-flags, --upsampler-gd-flags: admrt.gd_flags) give presets and model paths. Without
--model, the bundled Fashion-MNIST stack (DEFAULT_STACK). Errors are CommandErrors naming the option.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import NamedTuple

from admrt.cli import CommandError

DEFAULT_STACK = ("fashion16-cond", "fashion16-classifier", "fashion-upsample16-32")
# `admrt sample`'s base plan (and the first plan of an export). It stays guided-diffusion's DDIM-25:
# at 10000 samples no solver with <= 10 model calls matched its FID on the bundled models
# (docs/solvers/README.md: DDIM-25 0.609, dpmpp2m-sde10 0.662, dpmpp2m-sde8 0.776).
DEFAULT_STEPS = "ddim25"
# The bundled upsampler is short-trained: DDIM-25 leaves speckle, DDPM-100 gives clean images
# (training/RECIPES.md), so the default stack samples its second stage with DDPM-100.
DEFAULT_STACK_UPSAMPLER_STEPS = "100"


class LoadedModels(NamedTuple):
    model: object
    classifier: object
    upsampler: object
    sources: tuple  # per role: the weights file (a Path), "random (seed 0)", or None (no such role)


def load_model_spec(spec: str, preset, role: str, device: str):
    """(module, where its weights come from) for a path, bundled name or preset name."""
    import admrt
    from admrt.checkpoint import bundled_path

    if Path(spec).exists() or bundled_path(spec).exists():
        try:
            module = admrt.load_model(spec, preset=preset, device=device)
        except (ValueError, OSError) as exc:
            raise CommandError(f"--{role}={spec!r}: {exc}") from None
        return module, Path(spec) if Path(spec).exists() else bundled_path(spec)
    if spec in admrt.PRESETS:
        print(f"admrt sample: {role} {spec!r}: no weights found (no file, not bundled); using RANDOM weights "
              "of that preset (initialised from seed 0): the images will be noise", file=sys.stderr)
        import torch
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same random model on every run, so a resumed run matches
            return admrt.create_model(spec, device=device), "random (seed 0)"
    raise CommandError(f"--{role}={spec!r}: not a file, a bundled model or a preset name")


def gd_settings(args) -> dict:
    """Read --gd-flags / --upsampler-gd-flags (replaced on args by the typed flags, which run.json
    records): {role: (the flags' model_path / classifier_path or None, Preset)}."""
    from admrt.gd_flags import infer_kind, parse_flags, preset_from_flags

    found = {}
    for option in ("gd-flags", "upsampler-gd-flags"):
        value = getattr(args, option.replace("-", "_"), None)
        if value is None:
            continue
        try:
            flags = parse_flags(value)
            if option == "gd-flags":
                if infer_kind(flags) == "superres":
                    raise ValueError("these are an upsampler's flags (large_size/small_size): pass them as "
                                     "--upsampler-gd-flags, with a base model")
                found["model"] = (flags.get("model_path") or None, preset_from_flags("unet", **flags))
                if flags.get("classifier_path") or args.classifier not in (None, "none"):
                    found["classifier"] = (flags.get("classifier_path") or None,
                                           preset_from_flags("classifier", **flags))
            else:
                found["upsampler"] = (flags.get("model_path") or None, preset_from_flags("superres", **flags))
        except ValueError as exc:
            raise CommandError(f"--{option}: {exc}") from None
        setattr(args, option.replace("-", "_"), flags)
    return found


def load_models(args, device) -> LoadedModels:
    """The stack the command line names (--model, --classifier, --upsampler, their --*-preset and
    --gd-flags / --upsampler-gd-flags): the bundled stack when no --model is given; a role given
    as 'none', or left out beside an explicit --model, is None."""
    gd = gd_settings(args)
    for role in ("model", "classifier", "upsampler"):
        if role in gd and getattr(args, f"{role}_preset") is not None:
            raise CommandError(f"--{role}-preset and --{'upsampler-' if role == 'upsampler' else ''}"
                             "gd-flags both give the preset; pass one")
    if "model" in gd and args.model is None:
        args.model = gd["model"][0]
        if args.model is None:
            raise CommandError("--gd-flags: no --model_path in the flags; pass --model PATH")
    if "upsampler" in gd and args.upsampler is None:
        args.upsampler = gd["upsampler"][0]
        if args.upsampler is None:
            raise CommandError("--upsampler-gd-flags: no --model_path in the flags; pass --upsampler PATH")
    if "model" in gd and args.classifier is None:
        args.classifier = gd["classifier"][0] if "classifier" in gd else "none"  # image_sample.py: none
    preset_of = {role: (gd[role][1] if role in gd else getattr(args, f"{role}_preset"))
                 for role in ("model", "classifier", "upsampler")}
    explicit = args.model is not None
    model = load_model_spec(args.model or DEFAULT_STACK[0], preset_of["model"], "model", device)
    clf_spec = args.classifier if args.classifier is not None else (None if explicit else DEFAULT_STACK[1])
    up_spec = args.upsampler if args.upsampler is not None else (None if explicit else DEFAULT_STACK[2])
    clf = (None, None) if clf_spec in (None, "none") else load_model_spec(clf_spec, preset_of["classifier"],
                                                                          "classifier", device)
    up = (None, None) if up_spec in (None, "none") else load_model_spec(up_spec, preset_of["upsampler"],
                                                                        "upsampler", device)
    return LoadedModels(model[0], clf[0], up[0], (model[1], clf[1], up[1]))


def upsampler_steps(args, loaded: LoadedModels):
    """--upsampler-steps, or DEFAULT_STACK_UPSAMPLER_STEPS when the bundled stack's upsampler runs
    (no --model, no --upsampler), else None (the base model's plan)."""
    if loaded.upsampler is not None and args.upsampler_steps is None and args.model is None and args.upsampler is None:
        return DEFAULT_STACK_UPSAMPLER_STEPS
    return args.upsampler_steps
