"""`admrt export aoti | onnx | tensorrt`: the stack (base model, classifier, upsampler) as
- aoti: an AOTInductor package folder for the Python-free runtime (`admrt-sample`, the C++ API of
  engine/csrc/admrt.h) and `admrt sample --package`;
- onnx: ONNX files (admrt.export.onnx), optionally with the fused ops as custom-domain nodes;
- tensorrt: TensorRT engines built from that ONNX (admrt.export.tensorrt; needs TensorRT).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from admrt.cli import CommandError, Interrupted, device_value, nonempty
from admrt.stack_loading import DEFAULT_STEPS


def _add_stack_arguments(a: argparse.ArgumentParser, dtypes=("fp32", "fp16", "bf16")) -> None:
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
    a.add_argument("--steps", default=DEFAULT_STEPS,
                   help="step plans whose tables the export carries, separated by spaces, e.g. 'ddim25 250 10,10,5' "
                        "(ddimN: DDIM; N or a,b,c: DDPM respaced; dpmpp2m10 etc.: solvers; grammar in "
                        "engine/csrc/plan.h); the first is the default (default: admrt sample's default)")
    a.add_argument("--upsampler-steps", default=None,
                   help="the upsampler's step plans (default: --steps; 100 for the bundled stack)")
    a.add_argument("--dtype", choices=dtypes, default="fp32",
                   help="precision of the networks' bodies, fixed in the export")
    a.add_argument("--out", type=nonempty, required=True, help="the folder to create")
    a.add_argument("--force", action="store_true", help="replace an existing folder")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from admrt.cli import HelpFormatter

    from .onnx import DEFAULT_OPSET, DTYPES, OPSETS

    sub = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    a = sub.add_parser("aoti", formatter_class=HelpFormatter,
                       help="AOTInductor package: denoiser.pt2, classifier_grad.pt2, upsampler.pt2, manifest.json")
    _add_stack_arguments(a)
    a.add_argument("--device", type=device_value, default=None,
                   help="cpu or cuda: the device the package is compiled for (default: cuda if available)")
    a.add_argument("--max-batch", type=int, default=64, help="the largest batch the package takes")

    o = sub.add_parser("onnx", formatter_class=HelpFormatter,
                       help="ONNX: denoiser.onnx, classifier.onnx, classifier_grad.onnx, upsampler.onnx")
    _add_stack_arguments(o, DTYPES)
    o.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset, one of {', '.join(map(str, OPSETS))} (GroupNormalization needs 21; the "
                        "Attention node 23)")
    o.add_argument("--fused-ops", action="store_true",
                   help="group norm + AdaGN + SiLU and attention as custom-domain nodes (admrt.GroupNormAct, "
                        "AdaGroupNormAct, QKVAttention) for runtimes that supply the kernels")
    o.add_argument("--no-check", action="store_true",
                   help="write the files checked by onnx.checker only, not run against eager in onnxruntime (for "
                        "fp16 --fused-ops graphs, whose custom nodes nothing here runs)")
    o.add_argument("--device", type=device_value, default="cpu",
                   help="the device the export is checked on (cpu, or cuda with onnxruntime-gpu)")

    t = sub.add_parser("tensorrt", formatter_class=HelpFormatter,
                       help="TensorRT engines from the ONNX export (needs TensorRT and an NVIDIA GPU)")
    _add_stack_arguments(t, DTYPES)
    t.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset of the intermediate export")
    t.add_argument("--fused-ops", action="store_true",
                   help="build with admrt's Triton kernels as TensorRT plugins (admrt.export.trt_plugins)")
    t.add_argument("--min-batch", type=int, default=1, help="the optimisation profile's smallest batch")
    t.add_argument("--opt-batch", type=int, default=16, help="the batch TensorRT tunes for")
    t.add_argument("--max-batch", type=int, default=64, help="the optimisation profile's largest batch")


def _check_common(args) -> None:
    from .stack import parse_step_plans

    try:
        parse_step_plans(args.steps)
        if args.upsampler_steps is not None:
            parse_step_plans(args.upsampler_steps)
    except ValueError as exc:
        raise CommandError(f"--{exc}") from None
    if Path(args.out).exists() and not args.force:
        raise CommandError(f"--out={args.out!r}: exists; choose another folder or pass --force to replace it")
    _check_writable(Path(args.out))
    if getattr(args, "opset", None) is not None:
        from .onnx import check_options, require_onnx
        require_onnx()
        try:
            check_options(args.dtype, args.opset)
        except ValueError as exc:
            raise CommandError(f"--{exc}") from None


def _check_writable(out: Path) -> None:
    """Fail before minutes of export when the folder's parent cannot take it."""
    import os
    import tempfile

    from .stack import staging_prefix

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(dir=out.parent, prefix=staging_prefix(out), suffix=".tmp"))
    except OSError as exc:
        raise CommandError(f"--out={str(out)!r}: cannot create it in {str(out.parent)!r} "
                           f"({exc.strerror or exc})") from None


def _load_stack(args, device: str):
    from admrt.stack_loading import load_models, upsampler_steps

    loaded = load_models(args, device)
    return loaded, upsampler_steps(args, loaded)


def _log(message: str) -> None:
    print(message, file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    _check_common(args)
    try:
        if args.format == "aoti":
            return _run_aoti(args)
        if args.format == "onnx":
            return _run_onnx(args)
        return _run_tensorrt(args)
    except (ValueError, FileExistsError) as exc:
        raise CommandError(f"{exc}") from None
    except KeyboardInterrupt:
        raise Interrupted(f"nothing was written (no {args.out}; the temporary folder is removed)") from None


def _run_aoti(args) -> int:
    import torch

    from .aoti import export_aoti

    if args.max_batch < 2:
        raise CommandError(f"--max-batch={args.max_batch}: expected an int >= 2")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded, up_steps = _load_stack(args, device)
    report = export_aoti(loaded.model, loaded.classifier, loaded.upsampler, out=args.out, steps=args.steps,
                         upsampler_steps=up_steps, dtype=args.dtype, device=device, max_batch=args.max_batch,
                         overwrite=args.force, log=_log)
    for role, (export_s, compile_s) in report.seconds.items():
        _log(f"admrt export: {role}: export {export_s:.1f} s, compile {compile_s:.1f} s, "
             f"max error vs eager {report.errors[role]:.2g}")
    print(f"admrt export: wrote {report.out}")
    return 0


def _run_onnx(args) -> int:
    from .onnx import export_onnx

    loaded, up_steps = _load_stack(args, args.device)
    report = export_onnx(loaded.model, loaded.classifier, loaded.upsampler, out=args.out, steps=args.steps,
                         upsampler_steps=up_steps, dtype=args.dtype, opset=args.opset, fused_ops=args.fused_ops,
                         device=args.device, check=not args.no_check, overwrite=args.force, log=_log)
    for name, seconds in report.seconds.items():
        error = report.errors[name]
        checked = f"max error vs eager in onnxruntime {error:.2g}" if error is not None else "onnx.checker only"
        if args.fused_ops and error is not None:
            checked += " (custom nodes run by admrt's torch references)"
        _log(f"admrt export: {name}: {seconds:.1f} s, {checked}")
    print(f"admrt export: wrote {report.out}")
    return 0


def _run_tensorrt(args) -> int:
    import tempfile

    from .onnx import export_onnx
    from .stack import staging_prefix
    from .tensorrt import export_tensorrt, require_tensorrt

    require_tensorrt()   # before minutes of export
    if not 1 <= args.min_batch <= args.opt_batch <= args.max_batch:
        raise CommandError(f"--min-batch={args.min_batch}, --opt-batch={args.opt_batch}, --max-batch="
                           f"{args.max_batch}: expected 1 <= min <= opt <= max")
    loaded, up_steps = _load_stack(args, "cpu")   # the ONNX is exported and checked on the CPU
    out = Path(args.out)
    # the intermediate ONNX is staged beside --out too: a killed export's is removed by the next one
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=staging_prefix(out), suffix=".tmp") as tmp:
        onnx_dir = Path(tmp) / "onnx"
        export_onnx(loaded.model, loaded.classifier, loaded.upsampler, out=onnx_dir, steps=args.steps,
                    upsampler_steps=up_steps, dtype=args.dtype, opset=args.opset, fused_ops=args.fused_ops,
                    device="cpu", check=not (args.fused_ops and args.dtype != "fp32"), log=_log)
        out = export_tensorrt(onnx_dir, args.out, min_batch=args.min_batch, opt_batch=args.opt_batch,
                              max_batch=args.max_batch, use_plugins=args.fused_ops, overwrite=args.force)
    print(f"admrt export: wrote {out}")
    return 0
