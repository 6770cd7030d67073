"""``codeq train``: train a model from a YAML experiment file, FP32 baseline or CoDeQ quantization-aware training.

    codeq train --config configs/quickstart.yaml [--device cuda] [--set key.path=value]
                [--dry-run] [--resume auto|PATH] [--verbose]

(``python run_training.py`` takes the same arguments.)

Exit codes: 0 done (or --dry-run found nothing wrong); 1 the run failed (non-finite loss, unusable
checkpoint, data set missing); 2 bad config or command line, nothing was created; 3 stopped by
SIGTERM or SIGUSR1 after writing a checkpoint; 130 stopped by Ctrl-C after writing a checkpoint.
After 3 or 130, run the same command with --resume auto to continue.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import logging.handlers
import signal
import sys
import traceback
from collections.abc import Iterator

import torch

from codeq.app.config import load_config
from codeq.app.experiment import resolve_device
from codeq.app.trainer import describe, locate, prepare, train_and_evaluate
from codeq.errors import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PREEMPTED,
    CheckpointError,
    ConfigError,
    Preempted,
    RunFailure,
    report_error,
)
from codeq.training import distributed
from codeq.training.memory import keep_freed_memory

# Slurm's scancel, time limit and preemption send SIGTERM (or the USR1 our batch scripts ask for).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# A multi-process run agrees on stopping every this many steps (a collective); one process checks every step.
DISTRIBUTED_STOP_POLL = 10

log = logging.getLogger("codeq")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="experiment YAML file")
    parser.add_argument("--device", help="override the config's device: cpu, cuda, cuda:N or mps")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override any config key (repeatable; the value is parsed as YAML)")
    parser.add_argument("--dry-run", action="store_true",
                        help="run every check a real start runs, build model, quantizers, optimizer and loss terms, "
                             "print a summary and exit without loading data or writing anything")
    parser.add_argument("--resume", metavar="auto|PATH",
                        help="continue from a checkpoint: a file, a run directory, or `auto` for this config's run "
                             "(starts fresh when there is none)")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks with error messages")


class SignalCatcher:
    """A context in which ``handle(number, frame)`` receives the signals ``signals``; their handlers before it are
    put back at its end."""

    signals: tuple[signal.Signals, ...] = STOP_SIGNALS

    def __enter__(self) -> SignalCatcher:
        self.previous = {number: signal.signal(number, self.handle) for number in self.signals}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def handle(self, number: int, frame: object) -> None:
        raise NotImplementedError


class StopRequest(SignalCatcher):
    """Remembers a SIGTERM, SIGUSR1 (Slurm preemption or time limit) or a first Ctrl-C: the run finishes its current
    step, writes a checkpoint and exits with EXIT_PREEMPTED (EXIT_INTERRUPTED for Ctrl-C). A second Ctrl-C aborts
    at once. Polled by ``train`` after every step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.signal_name: str | None = None

    def handle(self, number: int, frame: object) -> None:
        if number == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt
        # Recorded before anything is printed: a second Ctrl-C can interrupt this handler (Python runs handlers
        # between bytecodes), and once the line is out it must find the first one recorded.
        self.signal_name = signal.Signals(number).name
        if number == signal.SIGINT:
            print("interrupt: finishing the step and writing a checkpoint (Ctrl-C again aborts at once)",
                  file=sys.stderr)

    def anywhere(self) -> bool:
        """True on every process when any process got a stop signal (a collective when distributed)."""
        return distributed.any_process(self.signal_name is not None, self.device)

    def __call__(self, step: int) -> bool:
        if distributed.world_size() == 1:
            return self.signal_name is not None
        return step % DISTRIBUTED_STOP_POLL == 0 and self.anywhere()


@contextlib.contextmanager
def held_logs(handler: logging.Handler, hold: bool) -> Iterator[None]:
    """Hold ``handler``'s log lines back while the config is checked: a bad config then prints its one
    error line and nothing else; a good one lets them through."""
    if not hold:
        yield
        return
    root = logging.getLogger()
    memory = logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1, target=handler)
    root.removeHandler(handler)
    root.addHandler(memory)
    try:
        yield
    except BaseException:
        memory.buffer.clear()
        raise
    finally:
        root.removeHandler(memory)
        root.addHandler(handler)
        memory.close()  # flushes what is left into handler


def train_from_arguments(args: argparse.Namespace, log_handler: logging.Handler) -> int:
    overrides = args.set + ([f"device={args.device}"] if args.device else [])
    with StopRequest(torch.device("cpu")) as stop:  # early: a signal during start-up still ends in a checkpoint
        with held_logs(log_handler, hold=not args.verbose):
            config = load_config(args.config, overrides)
            device = distributed.setup(resolve_device(config.device))
            setup = prepare(config, device)
            start = locate(setup, args.resume)
        stop.device = device
        if args.dry_run:
            print(describe(setup, start))
            return EXIT_OK
        keep_freed_memory()
        try:
            train_and_evaluate(setup, start, stop)
        except Preempted as stopped:
            if stopped.signal_name == "SIGINT":
                print(f"interrupted: checkpoint written at epoch {stopped.epoch} step {stopped.step}; "
                      f"resume with --resume auto", file=sys.stderr)
                return EXIT_INTERRUPTED
            log.warning("%s", stopped)
            return EXIT_PREEMPTED
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    """The ``codeq train`` command: logging to stderr for the run's life, the run, and its exit code."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.ERROR if distributed.launched_as_other_rank() else logging.INFO)  # rank 0 speaks for all
    logging.captureWarnings(True)
    finished = False
    try:
        code = train_from_arguments(args, handler)
        finished = True
        return code
    except ConfigError as error:
        error.source = error.source or args.config
        return report_error(error, "train", args.verbose, quiet=distributed.launched_as_other_rank())
    except (RunFailure, CheckpointError) as error:
        return report_error(error, "train", args.verbose, failures=(RunFailure, CheckpointError),
                            quiet=distributed.launched_as_other_rank())
    except KeyboardInterrupt:
        if args.verbose:
            traceback.print_exc()
        print("aborted by a second Ctrl-C: the epoch in progress was not checkpointed; --resume auto continues from "
              "the last checkpoint", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        distributed.teardown(finished)
        logging.captureWarnings(False)
        root.removeHandler(handler)
