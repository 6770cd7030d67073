"""``codeq sweep``: sweep files, a list of configs times a grid of ``--set`` overrides, one Slurm array task each.

    # sweeps/dz_decay.yaml
    configs: [configs/quickstart.yaml]               # one or more experiment files
    grid:                                            # every combination of these values
      optimizer.param_groups.dz.weight_decay: [1.0, 3.0, 10.0]
      quantizer.kwargs.fixed_bit_val: [2, 4]
    set: [epochs=30]                                 # overrides shared by every task (optional)
    name: dz_decay                                   # prefix of the run names (default: the file name)

Task ``i`` trains ``configs x grid`` combination ``i`` (configs vary slowest) under its own
``run_name`` ``<name>_<i>_<generated run name>_<grid values>``, so each task gets its own run
directory and W&B run; seeds are a grid key like any other (``seed: [0, 1, 2]``).

    codeq sweep FILE                 # validate every task, print their number (slurm/sweep.sh's array size)
    codeq sweep FILE --task I        # task I's arguments to ``codeq train``, one per line (one array task)
    codeq sweep FILE --run [--device D] [--fail-fast]   # every task here, one after another

``--run`` trains each task as ``codeq train --resume auto`` in a process of its own: a finished task is
skipped, an interrupted one resumes from its checkpoint, and a failing one is reported in one line while
the sweep goes on with the next (``--fail-fast`` stops there). Ctrl-C, SIGTERM or SIGUSR1 stop the task in
progress as they stop ``codeq train`` (it finishes its step and writes a checkpoint) and end the sweep;
run the same command again to continue. Exit codes: 0 every task finished, 1 a task failed, 2 a bad sweep
file, 3 / 130 stopped by a signal / Ctrl-C.
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from codeq.app.checkpoint import LAST_CHECKPOINT, load_checkpoint
from codeq.app.config import (
    RUN_NAME_CHARACTERS,
    TrainConfig,
    config_differences,
    config_to_dict,
    load_config,
    read_yaml,
    suggest,
)
from codeq.app.experiment import run_name
from codeq.app.train import STOP_SIGNALS, SignalCatcher
from codeq.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PREEMPTED,
    ArgumentError,
    CheckpointError,
    ConfigError,
    report_error,
)

SWEEP_KEYS = ("configs", "grid", "set", "name")
# What stops a task of a local sweep, as it stops `codeq train` (SIGHUP: the terminal closed, nothing left behind).
FORWARDED_SIGNALS = (*STOP_SIGNALS, signal.SIGHUP)


@dataclass
class SweepTask:
    config: str
    overrides: list[str]
    validated: TrainConfig = field(repr=False, compare=False)

    @property
    def run_dir(self) -> Path:
        return Path(self.validated.save_dir) / run_name(self.validated)

    def arguments(self) -> list[str]:
        return ["--config", self.config, *(part for override in self.overrides for part in ("--set", override))]


def override(key: str, value: Any) -> str:
    """``key=value`` with the value written as YAML, the way ``--set`` reads it back."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return f"{key}={text.removesuffix('...').strip()}"


def slug(key: str, value: Any) -> str:
    """``leaf=value`` in characters a directory name can hold."""
    text = re.sub(r"[^\w.+-]+", "-", str(value)).strip("-")
    return f"{key.rsplit('.', 1)[-1]}={text}"


def string_list(data: dict[str, Any], key: str, source: str) -> list[str]:
    value = data.get(key, [])
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(key, "must be a list of strings", f"write `{key}: [a, b]`", source)
    return value


def read_sweep(path: str | Path) -> tuple[str, list[str], dict[str, list[Any]], list[str]]:
    """(name, configs, grid, shared overrides) of a sweep file, with its shape checked."""
    source = str(path)
    data = read_yaml(path)
    for key in data:
        if key not in SWEEP_KEYS:
            raise ConfigError(str(key), "unknown sweep key", suggest(str(key), SWEEP_KEYS), source)
    configs = string_list(data, "configs", source)
    if not configs:
        raise ConfigError("configs", "no config listed", "list one or more experiment files under `configs:`", source)
    grid = data.get("grid") or {}
    if not isinstance(grid, dict):
        raise ConfigError("grid", "must be a mapping of key paths to lists of values",
                          "write `grid: {key.path: [1, 2]}`", source)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid.{key}", "must be a non-empty list of values", f"write `{key}: [value1, value2]`",
                              source)
    name = str(data.get("name") or Path(path).stem)
    if not re.fullmatch(RUN_NAME_CHARACTERS, name):
        raise ConfigError("name", f"{name!r} cannot be part of a directory name", "use letters, digits and _.=+-",
                          source)
    return name, configs, grid, string_list(data, "set", source)


def expand(path: str | Path) -> list[SweepTask]:
    """Every task of the sweep, each validated like ``codeq train`` would (bad input raises ConfigError)."""
    name, configs, grid, shared = read_sweep(path)
    tasks = []
    combinations = itertools.product(configs, *grid.values())
    for index, (config_path, *values) in enumerate(combinations):
        overrides = shared + [override(key, value) for key, value in zip(grid, values)]
        config: TrainConfig = load_config(config_path, overrides)
        label = "_".join([f"{name}_{index:02d}", run_name(config),
                          *(slug(key, value) for key, value in zip(grid, values))])
        overrides.append(f"run_name={label}")
        tasks.append(SweepTask(config_path, overrides, load_config(config_path, overrides)))
    return tasks


def finished(task: SweepTask) -> bool:
    """Whether the task's run directory holds a checkpoint of this very config with every epoch done."""
    path = task.run_dir / LAST_CHECKPOINT
    if not path.is_file():
        return False
    try:
        checkpoint = load_checkpoint(path)
    except CheckpointError:
        return False  # the task itself says what is wrong with it
    resolved = config_to_dict(task.validated)
    return checkpoint["epoch"] >= task.validated.epochs and not config_differences(resolved, checkpoint["config"])


class SignalForwarder(SignalCatcher):
    """The sweep's stop signals, passed on to the task in progress. The task runs in a session of its own, so a
    terminal's Ctrl-C reaches it once, through here: a second Ctrl-C is then a second one for the task too (it
    aborts at once), as for ``codeq train``."""

    signals = FORWARDED_SIGNALS

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self.process: subprocess.Popen | None = None
        self.forwarded = 0

    def handle(self, number: int, frame: object) -> None:
        self.received = signal.Signals(number)
        self.forward(self.received)

    def forward(self, number: signal.Signals) -> None:
        if self.process is not None and self.process.poll() is None:
            self.forwarded += 1
            os.killpg(self.process.pid, number)  # the task and its loader workers, as a terminal would

    def run(self, command: list[str]) -> int:
        """``command``'s exit code; a signal that arrived while it started is passed on once it runs."""
        self.process, self.forwarded = subprocess.Popen(command, start_new_session=True), 0
        if self.received is not None and not self.forwarded:
            self.forward(self.received)
        try:
            return self.process.wait()
        finally:
            self.process = None


def run_tasks(tasks: list[SweepTask], sweep: str, device: str | None = None, fail_fast: bool = False) -> int:
    """Every task of ``sweep`` here, one after another, each ``codeq train --resume auto`` in its own process;
    returns the sweep's exit code (module docstring)."""
    failed, counts = [], {"trained": 0, "skipped (finished before)": 0}
    with SignalForwarder() as forwarder:
        for index, task in enumerate(tasks):
            if forwarder.received is not None:
                break
            where = f"task {index}/{len(tasks)} ({task.run_dir})"
            if finished(task):
                print(f"sweep: {where} has finished: skipped", flush=True)
                counts["skipped (finished before)"] += 1
                continue
            print(f"sweep: {where}", flush=True)
            command = [sys.executable, "-m", "codeq", "train", "--resume", "auto", *task.arguments(),
                       *(["--device", device] if device else [])]
            code = forwarder.run(command)
            if forwarder.received is not None:
                break
            if code == EXIT_OK:
                counts["trained"] += 1
                continue
            failed.append(index)
            print(f"sweep error: {where} failed with exit code {code}"
                  f"{'; stopping (--fail-fast)' if fail_fast else '; going on with the next task'}",
                  file=sys.stderr, flush=True)
            if fail_fast:
                break
    if forwarder.received is not None:
        print(f"sweep: stopped by {forwarder.received.name}; run `codeq sweep {sweep} --run` again to resume",
              file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED if forwarder.received == signal.SIGINT else EXIT_PREEMPTED
    done = ", ".join(f"{count} {what}" for what, count in counts.items())
    failures = f", {len(failed)} failed (task {', '.join(map(str, failed))})" if failed else ""
    print(f"sweep: {len(tasks)} tasks: {done}{failures}", flush=True)
    return EXIT_FAILURE if failed else EXIT_OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", help="sweep YAML file")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--task", type=int, help="print this task's arguments, one per line")
    action.add_argument("--run", action="store_true",
                        help="train every task here, one after another (finished ones skipped, interrupted ones "
                             "resumed)")
    parser.add_argument("--device", help="with --run: --device for every task (cpu, cuda, cuda:N, mps)")
    parser.add_argument("--fail-fast", action="store_true",
                        help="with --run: stop at the first failing task (default: report it and go on)")


def run(args: argparse.Namespace) -> int:
    try:
        if (args.device or args.fail_fast) and not args.run:
            raise ArgumentError("--device and --fail-fast go with --run")
        tasks = expand(args.sweep)
        if args.task is not None and not 0 <= args.task < len(tasks):
            raise ArgumentError(f"{args.sweep}: task {args.task} does not exist; it has tasks 0..{len(tasks) - 1}")
    except ConfigError as error:
        error.source = error.source or args.sweep
        return report_error(error, "sweep")
    except ArgumentError as error:
        return report_error(error, "sweep")
    if args.run:
        return run_tasks(tasks, args.sweep, args.device, args.fail_fast)
    if args.task is None:
        print(len(tasks))
        return 0
    print("\n".join(tasks[args.task].arguments()))
    return 0
