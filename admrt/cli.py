"""The `admrt` command: sample | train | export | eval | bench.

Each subcommand lives beside what it drives and provides `add_arguments(parser)` and
`run(args)`; its module is imported only when that subcommand runs.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "sample": ("admrt.engine.cli", "sample images with a model (default: the bundled Fashion-MNIST stack)"),
    "train": ("admrt.training.cli", "train the diffusion UNet, the noisy classifier or the upsampler"),
    "export": ("admrt.export.cli", "export the stack for the Python-free runtime (AOTInductor packages)"),
    "eval": ("admrt.evaluation.cli", "FID, sFID, IS, precision/recall; guidance sweeps"),
    "bench": ("admrt.benchmark", "throughput and latency of the engine against the reference"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(prog="admrt", description=__doc__.splitlines()[0])
    sub = top.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in COMMANDS:
        top.parse_args(argv or ["--help"])
        return 2
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"admrt {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
