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
directory and W&B run. ``codeq sweep FILE`` validates every task and prints their number;
``codeq sweep FILE --task I`` prints task I's arguments to ``codeq train``, one per line.
"""
from __future__ import annotations

import argparse
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from codeq.app.config import RUN_NAME_CHARACTERS, TrainConfig, load_config, read_yaml, suggest
from codeq.app.experiment import run_name
from codeq.errors import ArgumentError, ConfigError, report_error

SWEEP_KEYS = ("configs", "grid", "set", "name")


@dataclass
class SweepTask:
    config: str
    overrides: list[str]

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
    """Every task of the sweep, each validated like ``run_training.py`` would (bad input raises ConfigError)."""
    name, configs, grid, shared = read_sweep(path)
    tasks = []
    combinations = itertools.product(configs, *grid.values())
    for index, (config_path, *values) in enumerate(combinations):
        overrides = shared + [override(key, value) for key, value in zip(grid, values)]
        config: TrainConfig = load_config(config_path, overrides)
        label = "_".join([f"{name}_{index:02d}", run_name(config),
                          *(slug(key, value) for key, value in zip(grid, values))])
        tasks.append(SweepTask(config_path, overrides + [f"run_name={label}"]))
    return tasks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", help="sweep YAML file")
    parser.add_argument("--task", type=int, help="print this task's arguments, one per line")


def run(args: argparse.Namespace) -> int:
    try:
        tasks = expand(args.sweep)
        if args.task is not None and not 0 <= args.task < len(tasks):
            raise ArgumentError(f"{args.sweep}: task {args.task} does not exist; it has tasks 0..{len(tasks) - 1}")
    except ConfigError as error:
        error.source = error.source or args.sweep
        return report_error(error, "sweep")
    except ArgumentError as error:
        return report_error(error, "sweep")
    if args.task is None:
        print(len(tasks))
        return 0
    print("\n".join(tasks[args.task].arguments()))
    return 0
