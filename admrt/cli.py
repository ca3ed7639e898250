"""The `admrt` command: sample | serve | train | export | cache | eval | bench.

Each subcommand lives beside what it drives and provides `add_arguments(parser)` and
`run(args)`; its module is imported only when that subcommand runs. `admrt bench` runs the
benchmark of the source checkout (bench/measure.py: bench/ is not installed; an editable install
finds it beside the package, and says so in one line when it is absent).

One error path for every command: an expected failure (a bad file, preset, path or setting:
`CommandError`, `ValueError`, `OSError`) prints one line `admrt <command>: <message>` and exits
1; a bad option or option value is one line too (exit 2): the parser's own checks, the value
types below (an int out of range, a non-finite float, an empty string, a device this machine
lacks) and `UsageError` for a value refused once the command knows more (e.g. the memory --num
needs). Ctrl-C prints one line saying what was kept and exits 130. A traceback means a bug in
admrt, or `--debug` was given.
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import re
import sys
from pathlib import Path

from admrt.export import MissingPackageError

COMMANDS = {
    "sample": ("admrt.engine.cli", "sample images with a model (default: the bundled Fashion-MNIST stack)"),
    "serve": ("admrt.engine.serve", "an HTTP server that batches requests step by step (POST /v1/images/generations)"),
    "train": ("admrt.training.cli", "train the diffusion UNet, the noisy classifier or the upsampler"),
    "export": ("admrt.export.cli", "export the stack: AOTInductor packages (Python-free runtime), ONNX, TensorRT engines"),
    "cache": ("admrt.engine.cache_cli", "list or clear the compile cache (what backend auto and the compiled "
                                        "backends compiled, kept between runs)"),
    "eval": ("admrt.evaluation.cli", "FID, sFID, IS, precision/recall; guidance sweeps"),
    "bench": ("measure", "throughput and latency of the engine against the reference (bench/measure.py of a "
                         "source checkout)"),
}
BENCH = Path(__file__).resolve().parent.parent / "bench"   # beside the package in an editable install
EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class CommandError(Exception):
    """An expected failure of a command; `main` prints `admrt <command>: <message>`."""


class UsageError(CommandError):
    """A bad option value found after parsing (before any work or write): exit 2, like the parser's."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, carrying what the command kept (e.g. "the finished shards are kept: ...")."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions as written and appends "(default: X)" to every option's help that does
    not state its default itself."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (default is not None and default is not False and default is not argparse.SUPPRESS
                and "default" not in text and action.option_strings):
            text += f" (default: {' '.join(map(str, default)) if isinstance(default, list) else default})"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """argparse with admrt's help formatter and one-line usage errors (exit 2)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see `{self.prog} --help`)\n")

    def _get_value(self, action, arg_string):
        # An option type's refusal (OptionValueError) reads `--flag=VALUE: expected ...`, as the
        # commands' own checks and admrt-sample's read; argparse's other messages are kept.
        try:
            return super()._get_value(action, arg_string)
        except argparse.ArgumentError as exc:
            cause = exc.__context__
            if not isinstance(cause, OptionValueError):
                raise
            flag = action.option_strings[-1] if action.option_strings else action.metavar or action.dest
            shown = arg_string if re.fullmatch(r"[\w.:,+-]+", arg_string) else repr(arg_string)
            raise argparse.ArgumentError(None, f"{flag}={shown}: {cause}") from None


# -- option value types: a refusal is one line `admrt CMD: --flag=VALUE: expected ...` (exit 2)

SEED_MAX = 2 ** 64 - 1  # seeds are uint64 in both front ends (admrt-sample's --seed too)


class OptionValueError(argparse.ArgumentTypeError):
    """An option type's refusal: what was expected (ArgumentParser adds the flag and the value)."""


def int_in(lo: int, hi: int, what: str = "an int"):
    """An option type: an int from lo to hi (inclusive)."""
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            value = None
        if value is None or not lo <= value <= hi:
            raise OptionValueError(f"expected {what} from {lo} to {hi}")
        return value
    parse.__name__ = what
    return parse


def positive_int(text: str) -> int:
    """An option type: an int from 1 to 2**63 - 1."""
    try:
        value = int(text, 10)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise OptionValueError("expected a positive int")
    if value >= 2 ** 63:
        raise OptionValueError("expected a positive int below 2**63")
    return value


seed_value = int_in(0, SEED_MAX, "an integer")


def finite_float(text: str) -> float:
    """An option type: a finite float (no nan or inf)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise OptionValueError("expected a finite number")
    return value


def nonempty(text: str) -> str:
    """An option type: a non-empty string (an empty --out or --steps is a slip, not the default)."""
    if not text.strip():
        raise OptionValueError("expected a value (leave the option out for its default)")
    return text


def device_value(text: str) -> str:
    """An option type: a device this machine has (admrt.io.check_device, the one check)."""
    from admrt.io import device_problem

    problem = device_problem(text)
    if problem is not None:
        raise OptionValueError(problem)
    return text


def _version() -> str:
    import admrt
    import torch
    return f"admrt {admrt.__version__} (torch {torch.__version__}, python {sys.version.split()[0]})"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("ADMRT_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    top = ArgumentParser(prog="admrt", description=__doc__.split("\n\n")[0],
                         epilog="--debug (anywhere, or ADMRT_DEBUG=1): show the traceback of an error")
    top.add_argument("--version", action="version", version=_version())
    sub = top.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in COMMANDS:
        top.parse_args(argv or ["--help"])
        top.error(f"unknown command {argv[0]!r}; expected one of {', '.join(COMMANDS)}")
    name = argv[0]
    prog = f"admrt {name}"
    try:
        module = bench_module() if name == "bench" else importlib.import_module(COMMANDS[name][0])
        parser = ArgumentParser(prog=prog, description=COMMANDS[name][1])
        module.add_arguments(parser)
        args = parser.parse_args(argv[1:])
        return int(module.run(args) or 0)
    except KeyboardInterrupt as exc:
        if debug:
            raise
        kept = f"; {exc}" if isinstance(exc, Interrupted) and str(exc) else ""
        print(f"{prog}: interrupted{kept}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (CommandError, ValueError, OSError, MissingPackageError) as exc:
        if debug:
            raise
        print(f"{prog}: {error_line(exc)}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_ERROR


def bench_module():
    """bench/measure.py of the source checkout, imported as `measure` with bench/ on sys.path (its
    own imports, e.g. gd_oracle, are bench/'s modules)."""
    path = BENCH / "measure.py"
    if not path.is_file():
        raise CommandError(f"the benchmark is not installed with admrt: it runs from a source checkout's "
                           f"bench/measure.py (an editable install: pip install -e CHECKOUT), and there is "
                           f"none beside this admrt ({path} is absent)")
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module("measure")


def error_line(exc: BaseException) -> str:
    """One line for an expected error; an OSError names its file, as the OS reports it."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    # `python -m admrt.cli` (torchrun): run the imported module's main, so that the commands'
    # CommandError / Interrupted are the classes it catches (not copies in __main__).
    from admrt.cli import main as _main
    sys.exit(_main())
