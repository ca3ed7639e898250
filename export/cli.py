"""`admrt export aoti`: the stack as an AOTInductor package folder for the Python-free runtime
(`admrt-sample`, the C++ API of engine/csrc/admrt.h) and `admrt sample --package`."""
from __future__ import annotations

import argparse
import sys

from admrt.cli import CommandError, Interrupted


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    a = sub.add_parser("aoti", help="AOTInductor package: denoiser.pt2, classifier_grad.pt2, upsampler.pt2, "
                                    "manifest.json")
    a.add_argument("--model", default=None,
                   help="preset name or checkpoint path, as `admrt sample` takes it; default: the bundled stack "
                        "(base, classifier, upsampler)")
    a.add_argument("--model-preset", default=None, help="preset of a released .pt checkpoint")
    a.add_argument("--classifier", default=None, help="noisy classifier for guidance; 'none' for no guidance")
    a.add_argument("--classifier-preset", default=None, help="preset of a released classifier .pt checkpoint")
    a.add_argument("--upsampler", default=None, help="upsampler; 'none' for one stage")
    a.add_argument("--upsampler-preset", default=None, help="preset of a released upsampler .pt checkpoint")
    a.add_argument("--gd-flags", default=None, metavar="FLAGS",
                   help="guided-diffusion's flags of the model (and classifier), as `admrt sample --gd-flags` "
                        "takes them: they give the presets (and model_path / classifier_path the files)")
    a.add_argument("--upsampler-gd-flags", default=None, metavar="FLAGS",
                   help="guided-diffusion's super_res_sample.py flags of --upsampler")
    a.add_argument("--steps", default="ddim25",
                   help="comma-separated step plans whose tables the package carries, e.g. ddim25,250 (ddimN: DDIM, "
                        "N: DDPM respaced); the first is the default (default ddim25)")
    a.add_argument("--upsampler-steps", default=None,
                   help="the upsampler's step plans (default: --steps; 100 for the bundled stack)")
    a.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="precision of the networks' bodies, fixed in the package (default fp32)")
    a.add_argument("--device", default=None, help="cpu or cuda: the device the package is compiled for "
                                                  "(default: cuda if available)")
    a.add_argument("--max-batch", type=int, default=64, help="the largest batch the package takes (default 64)")
    a.add_argument("--out", required=True, help="the package folder to create")
    a.add_argument("--force", action="store_true", help="replace an existing package folder")


def run(args: argparse.Namespace) -> int:
    import torch

    from admrt.engine.cli import DEFAULT_STACK_UPSAMPLER_STEPS, _models

    from .aoti import export_aoti, parse_step_plans

    try:
        parse_step_plans(args.steps)
        if args.upsampler_steps is not None:
            parse_step_plans(args.upsampler_steps)
    except ValueError as exc:
        raise CommandError(f"--{exc}") from None
    if args.max_batch < 2:
        raise CommandError(f"--max-batch={args.max_batch}: expected an int >= 2")
    from pathlib import Path
    if Path(args.out).exists() and not args.force:
        raise CommandError(f"--out={args.out!r}: exists; choose another folder or pass --force to "
                         "replace it")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = _models(args, device)
    model, clf, up = loaded.model, loaded.classifier, loaded.upsampler
    up_steps = args.upsampler_steps
    if up is not None and up_steps is None and args.model is None and args.upsampler is None:
        up_steps = DEFAULT_STACK_UPSAMPLER_STEPS
    try:
        report = export_aoti(model, clf, up, out=args.out, steps=args.steps, upsampler_steps=up_steps,
                             dtype=args.dtype, device=device, max_batch=args.max_batch, overwrite=args.force,
                             log=lambda m: print(m, file=sys.stderr))
    except (ValueError, FileExistsError) as exc:
        raise CommandError(f"{exc}") from None
    except KeyboardInterrupt:
        raise Interrupted(f"nothing was written (no {args.out}; the temporary folder is removed)") from None
    for role, (export_s, compile_s) in report.seconds.items():
        print(f"admrt export: {role}: export {export_s:.1f} s, compile {compile_s:.1f} s, "
              f"max error vs eager {report.errors[role]:.2g}", file=sys.stderr)
    print(f"admrt export: wrote {report.out}")
    return 0
