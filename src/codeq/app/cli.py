"""codeq: quantization-aware training with CoDeQ (arXiv 2512.12981) from YAML experiment files.

    codeq train --config configs/quickstart.yaml     # train (FP32 or CoDeQ), checkpoint, report
    codeq evaluate runs/NAME                         # validation accuracy of a checkpoint or export
    codeq report runs/NAME | --compare runs/A runs/B # compression report, or the paper's table of runs
    codeq export runs/NAME model.onnx                # deployable ONNX (or .codeq)
    codeq sweep sweeps/FILE.yaml [--run]             # expand a sweep into its tasks, or run them all here

``codeq COMMAND --help`` lists a command's options. Exit codes: 0 done, 1 a run that could not go on,
2 a bad config, argument or input file, 3 / 130 stopped by a signal / Ctrl-C after a checkpoint.
"""
from __future__ import annotations

import argparse
import sys
from types import ModuleType

from codeq.app import evaluate, export, report, sweep, train

COMMANDS: dict[str, ModuleType] = {"train": train, "evaluate": evaluate, "report": report, "export": export,
                                   "sweep": sweep}


# Each sub-command is a module of codeq.app with add_arguments(parser) and run(args) -> exit code.


def summary(module: ModuleType) -> str:
    """The first sentence of a command module's docstring, without its ``codeq <command>:`` prefix."""
    paragraph = " ".join((module.__doc__ or "").strip().split("\n\n")[0].split())
    return paragraph.split(": ", 1)[-1].split(". ")[0].split("; ")[0].replace("``", "").rstrip(".")


def command_parser(command: str, prog: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of one sub-command (``prog``: the name its usage line shows)."""
    module = COMMANDS[command]
    parser = argparse.ArgumentParser(prog=prog or f"codeq {command}", description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``codeq`` with ``argv`` (default: the command line); returns the exit code."""
    parser = argparse.ArgumentParser(prog="codeq", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        sub = commands.add_parser(name, help=summary(module), description=module.__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
    args = parser.parse_args(argv)
    return COMMANDS[args.command].run(args)


def run_command(command: str, argv: list[str] | None = None, prog: str | None = None) -> int:
    """One sub-command with its own arguments (``run_training.py`` is ``run_command("train", ...)``)."""
    args = command_parser(command, prog).parse_args(argv)
    return COMMANDS[command].run(args)


if __name__ == "__main__":
    sys.exit(main())
