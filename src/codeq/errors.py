"""Every exception a user can meet, the exit code each one ends a command with, and the one way to print it.

Commands (``codeq train|evaluate|report|export|sweep``, ``run_training.py``) print an error's one line
(``report_error``) and exit with its code; ``--verbose`` adds the traceback.
"""
from __future__ import annotations

import sys
import traceback

EXIT_OK = 0
EXIT_FAILURE = 1  # the run started but could not go on: non-finite loss, unusable checkpoint, missing data
EXIT_CONFIG_ERROR = 2  # bad config, command line or input file; nothing was loaded or written
EXIT_PREEMPTED = 3  # SIGTERM/SIGUSR1: a checkpoint was written; resume with --resume auto
EXIT_INTERRUPTED = 130  # Ctrl-C (the shell's 128 + SIGINT): a checkpoint was written; resume with --resume auto


def first_line(error: BaseException, with_type: bool = False, limit: int | None = None) -> str:
    """An exception as one line: its message's first line (at most ``limit`` characters), or its type when it has
    no message; ``with_type`` puts the type first (``OSError: ...``)."""
    text = str(error).strip()
    line = text.splitlines()[0][:limit] if text else ""
    if not line:
        return type(error).__name__
    return f"{type(error).__name__}: {line}" if with_type else line


class ConfigError(ValueError):
    """A bad config value: ``key`` is the dotted path, ``fix`` tells the user what to do."""

    def __init__(self, key: str, problem: str, fix: str, source: str = "") -> None:
        self.key, self.problem, self.fix, self.source = key, problem, fix, source
        super().__init__(self.line())

    def line(self) -> str:
        where = f"{self.source}: " if self.source else ""
        key = f"{self.key}: " if self.key else ""
        return f"config error: {where}{key}{self.problem}; {self.fix}"


class RegistrationError(ConfigError):
    """A quantizer, model, loss term, data set, optimizer or scheduler that does not fit its registry's interface."""

    def __init__(self, kind: str, name: str, problem: str, fix: str) -> None:
        super().__init__(f"{kind} {name!r}", problem, fix)


class ArgumentError(ValueError):
    """A command-line argument that cannot be used (a file suffix, options that do not go together)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says which file and what to do."""


class ExportError(ValueError):
    """A model or file that cannot be exported or read back; the message says which and why."""


class RunFailure(RuntimeError):
    """A fault that ends a started run; its message is the one line the user sees."""


class DataError(RunFailure):
    """A file of the data set that cannot be used (an image PIL cannot read); the message names it.

    Raised in a DataLoader worker, it is raised again in the main process with the worker's traceback as its
    message; only the original line is kept, so the user still sees one line.
    """

    def __init__(self, message: str) -> None:
        if message.startswith("Caught ") and "Original Traceback" in message:
            message = message.rstrip().splitlines()[-1].partition(": ")[2]
        super().__init__(message)


def cannot_write(error: OSError, path: object, after: str) -> RunFailure:
    """The one line for a file that could not be written (a full disk, a quota, a read-only folder): which file, the
    cause, then ``after`` (what survived and what to do)."""
    return RunFailure(f"cannot write {error.filename or path}: {error.strerror or first_line(error)}; {after}")


class LossTermError(RunFailure):
    """A loss term returned what cannot be added to the loss (not a number or a one-element tensor)."""


class Preempted(Exception):
    """A stop signal arrived; the checkpoint to resume from has been written at ``epoch`` (1-based, the one in
    progress) after ``step`` of its steps."""

    def __init__(self, signal_name: str | None, epoch: int, step: int) -> None:
        self.signal_name, self.epoch, self.step = signal_name, epoch, step
        super().__init__(f"{signal_name}: checkpoint written at epoch {epoch} step {step}; resume with --resume auto")


class NonFiniteLossError(ArithmeticError):
    """The training loss became NaN or infinite; the weights after that step are unusable."""

    def __init__(self, epoch: int, step: int, value: float) -> None:
        self.epoch, self.step, self.value = epoch, step, value
        super().__init__(f"non-finite loss ({value}) at epoch {epoch}, step {step}")


def report_error(error: BaseException, command: str, verbose: bool = False,
                 failures: tuple[type[BaseException], ...] = (RunFailure,), quiet: bool = False) -> int:
    """Print ``error`` as one line on stderr and return the exit code the ``command`` (``train``, ``export``, ...)
    ends with: a bad config is its ``ConfigError.line()`` and EXIT_CONFIG_ERROR; an error of the ``failures`` types
    (a run that cannot go on) is ``error: ...`` and EXIT_FAILURE; anything else (a bad argument, checkpoint or file)
    is ``<command> error: ...`` and EXIT_CONFIG_ERROR. With ``verbose`` the traceback comes first; ``quiet`` prints
    nothing (the other processes of a distributed run: rank 0 speaks for all)."""
    if isinstance(error, ConfigError):
        line, code = error.line(), EXIT_CONFIG_ERROR
    elif isinstance(error, failures):
        line, code = f"error: {first_line(error)}", EXIT_FAILURE
    else:
        line, code = f"{command} error: {first_line(error)}", EXIT_CONFIG_ERROR
    if not quiet:
        if verbose:
            traceback.print_exception(error)
        print(line, file=sys.stderr)
    return code
