"""The run machinery behind ``run_training.py``: build a run from its config, find where it starts (fresh, or
resuming a checkpoint), train epoch by epoch with checkpoints, and report.

``prepare`` builds everything that needs no data or disk (the last config check); ``locate`` picks the run
directory and the checkpoint to resume, with the same refusals for ``--dry-run`` as for a real start;
``TrainingRun`` owns the run directory (an exclusive lock for the run's life), the loaders, the epoch loop
and its checkpoints.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from torch import nn
from torch.nn.utils import parametrize

from codeq.app.checkpoint import (
    BEST_CHECKPOINT,
    CHECKPOINT_FORMAT,
    LAST_CHECKPOINT,
    checkpoint_path,
    load_checkpoint,
    load_model_state,
    restore_rng,
    rng_state,
    save_checkpoint,
)
from codeq.app.config import TrainConfig, config_differences, config_to_dict, runtime_keys
from codeq.app.experiment import build_loss_terms, build_model, optimizer_for, run_name, scheduler_for, seed_everything
from codeq.app.report import REPORT_FILES, example_input, write_run_report
from codeq.app.targets import budget_text, build_budget, check_outcome, describe_budget
from codeq.app.tracking import RunTracker, rewind_metrics
from codeq.attach import owns_weight
from codeq.bn import has_batch_norm
from codeq.budget import BudgetController
from codeq.compression import BopsSettings, CompressionMonitor
from codeq.data.base import DatasetPair, declared_classes, load_dataset
from codeq.data.loaders import build_loaders
from codeq.data.on_device import device_loaders
from codeq.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    NonFiniteLossError,
    Preempted,
    RunFailure,
    cannot_write,
    first_line,
)
from codeq.io import atomic_write
from codeq.optim import scheduled_learning_rates, warn_if_dead_zone_collapses
from codeq.regularizers import LossTerm
from codeq.training import distributed
from codeq.training.loop import EpochState, recalibrate, train, validate
from codeq.training.step_settings import StepSettings

LOCK_FILE = ".lock"

log = logging.getLogger("codeq")


class StopSignal(Protocol):
    """What the epoch loop asks about stop signals (``run_training.StopRequest`` answers)."""

    signal_name: str | None

    def __call__(self, step: int) -> bool: ...

    def anywhere(self) -> bool: ...


@dataclass
class Setup:
    """Everything a run builds before it touches disk; building it is the last config check."""

    config: TrainConfig
    device: torch.device
    name: str
    num_classes: int
    model: nn.Module
    quantized: list[str]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_terms: list[LossTerm]
    data: DatasetPair | None = field(default=None, repr=False)  # loaded early when the data set declares no classes
    budget: BudgetController | None = None  # the config's target, checked (TrainingRun builds the run's own)

    @property
    def resolved(self) -> dict[str, Any]:
        return config_to_dict(self.config)


def load_data(config: TrainConfig) -> DatasetPair:
    """The config's data set. Raises RunFailure naming the data set and directory when it cannot be read."""
    try:
        return load_dataset(config.dataset, config.data_dir, config.img_size)
    except DataError:
        raise  # names the file and what to do with it already
    except (OSError, RuntimeError, ValueError) as error:  # missing, unreadable or corrupt files
        raise RunFailure(f"cannot load data set {config.dataset!r} from {config.data_dir!r}: "
                         f"{first_line(error)}; "
                         f"point data_dir at the data set") from None


def prepare(config: TrainConfig, device: torch.device) -> Setup:
    """Seed and build model, quantizers, optimizer, scheduler and loss terms; a bad value raises ConfigError. A data
    set that declares no number of classes is loaded here, since the model needs it."""
    seed_everything(config.seed)
    num_classes, data = declared_classes(config.dataset), None
    if num_classes is None:
        data = load_data(config)
        num_classes = data.num_classes
    model, quantized = build_model(config, num_classes)
    model.to(device)
    optimizer = optimizer_for(model, config)
    setup = Setup(config, device, run_name(config, distributed.world_size()), num_classes, model, quantized,
                  optimizer, scheduler_for(optimizer, config), build_loss_terms(config), data)
    setup.budget = build_budget(setup, total_steps=1)
    return setup


def statistics_for(model: nn.Module, checkpoint: dict[str, Any], config: TrainConfig, batches: int | None,
                   train_loader: Callable[[], Iterable], step_settings: StepSettings) -> str | None:
    """Give ``model``, built from ``checkpoint``, the BatchNorm statistics it is evaluated or exported with, and say
    which: the checkpoint's when they were re-estimated for its weights (a run writes them so), otherwise re-estimated
    now on training batches, unless told otherwise.

    Args:
        batches: re-estimate on this many training batches; 0: keep the stored statistics; None: 0 when the
            checkpoint's were re-estimated, else the config's ``bn_recalibration_batches``.
        train_loader: makes the run's training loader (called only when the statistics are re-estimated).

    Returns:
        One line for the user; None for a model without BatchNorm.

    Raises:
        whatever ``train_loader`` raises when the data cannot be read.
    """
    if not has_batch_norm(model):
        return None
    stored = checkpoint.get("bn_recalibrated", 0)
    if batches is None:
        batches = 0 if stored else config.bn_recalibration_batches
    if not batches:
        if stored:
            return f"BatchNorm statistics: re-estimated on {stored} training batches when the checkpoint was written"
        return "BatchNorm statistics: training's running averages, as stored (--bn-batches N re-estimates them)"
    used = recalibrate(model, train_loader(), batches, config.batch_size, config.seed, checkpoint["epoch"],
                       step_settings)
    stale = "" if stored else " (the checkpoint held training's running averages)"
    return f"BatchNorm statistics: re-estimated now on {used} training batches of {config.dataset}{stale}"


@dataclass
class Start:
    """Where a run begins: its directory and, when resuming, the checkpoint it continues from."""

    run_dir: Path
    checkpoint: dict[str, Any] | None = None
    path: Path | None = None

    @property
    def finished(self) -> bool:
        return self.checkpoint is not None and self.checkpoint["epoch"] >= self.checkpoint["config"]["epochs"]


def extended_run(setup: Setup) -> Path | None:
    """The run directory under save_dir whose checkpoint has this config in all but run-time keys (``epochs``
    among them): ``--resume auto --set epochs=N`` continues that run rather than starting one under the new name."""
    candidates = [path.parent for path in sorted(Path(setup.config.save_dir).glob(f"*/{LAST_CHECKPOINT}"))
                  if (path.parent / "config.yaml").is_file()]
    matches = [run_dir for run_dir in candidates
               if not config_differences(setup.resolved, yaml.safe_load((run_dir / "config.yaml").read_text()) or {})]
    return matches[0] if len(matches) == 1 else None


def locate(setup: Setup, resume: str | None) -> Start:
    """The run directory and the checkpoint to resume (``resume``: None, ``auto``, a checkpoint or a run directory).

    Raises:
        ConfigError: a fresh start in a directory that holds a checkpoint, a missing checkpoint, a checkpoint of
            another config (run-time keys may differ), or fewer epochs than the checkpoint has done.
        CheckpointError: the checkpoint cannot be read.
    """
    run_dir = Path(setup.config.save_dir) / setup.name
    blocked = next((path for path in (run_dir, *run_dir.parents) if path.exists() and not path.is_dir()), None)
    if blocked is not None:
        raise ConfigError("save_dir", f"cannot create {run_dir}: {blocked} is a file", "choose a save_dir that is a "
                          "directory, or one that does not exist yet")
    if resume is None:
        refuse_if_checkpointed(run_dir)
        return Start(run_dir)
    if resume == "auto":
        if not (run_dir / LAST_CHECKPOINT).is_file() and setup.config.run_name is None:
            run_dir = extended_run(setup) or run_dir
        path = run_dir / LAST_CHECKPOINT
        if not path.is_file():
            log.info("--resume auto: no checkpoint in %s yet, starting the run", run_dir)
            return Start(run_dir)
    else:
        path = checkpoint_path(resume)
        if not path.is_file():
            raise ConfigError("--resume", f"{path} does not exist", "pass a checkpoint, a run directory or `auto`")
    checkpoint = load_checkpoint(path)
    differences = config_differences(setup.resolved, checkpoint["config"])
    if differences:
        raise ConfigError(", ".join(differences), f"differs from the config of checkpoint {path}",
                          f"use that run's values (its config.yaml) or a new save_dir; only "
                          f"{', '.join(runtime_keys())} may change on resume")
    if setup.config.epochs < checkpoint["epoch"]:
        raise ConfigError("epochs", f"{setup.config.epochs} is fewer than the {checkpoint['epoch']} epochs the "
                          f"checkpoint has done", f"set epochs to at least {checkpoint['epoch']}")
    checkpoint["config"] = {**checkpoint["config"], "epochs": setup.config.epochs}
    return Start(path.parent, checkpoint, path)


def refuse_if_checkpointed(run_dir: Path) -> None:
    """Raises ConfigError when ``run_dir`` holds a checkpoint: a fresh start never overwrites a run."""
    if (run_dir / LAST_CHECKPOINT).is_file():
        raise ConfigError("save_dir", f"{run_dir} already holds a checkpoint ({LAST_CHECKPOINT})",
                          "pass --resume auto to continue that run, or choose a new save_dir (or run_name)")


def describe(setup: Setup, start: Start) -> str:
    """The ``--dry-run`` summary: what a real start with the same arguments would do."""
    config, model = setup.config, setup.model
    if start.checkpoint is not None:
        where = f"{start.run_dir} (resumes {start.path} at epoch {start.checkpoint['epoch'] + 1})"
    else:
        where = f"{start.run_dir} ({'exists, no checkpoint' if start.run_dir.exists() else 'new'})"
    skipped = [name for name, module in model.named_modules()
               if owns_weight(module) and not parametrize.is_parametrized(module, "weight")]
    size = sum(p.numel() for p in model.parameters())
    # A data set that declares no number of classes is read by prepare(), for the model's head.
    read = "the data set was read for its number of classes" if setup.data is not None else "no data was loaded"
    lines = [
        f"dry run: the config is valid; {read} and nothing was written",
        f"run name:   {start.run_dir.name}",
        f"run dir:    {where}",
        f"device:     {setup.device}",
        f"model:      {config.model} ({size:,} parameters), img_size {config.img_size}, "
        f"{config.dataset} ({setup.num_classes} classes), {config.epochs} epochs of batch {config.batch_size}",
    ]
    if config.plugins:
        lines.append(f"plugins:    {', '.join(config.plugins)}")
    if config.quantizer is None:
        lines.append("quantizer:  none (FP32 baseline)")
    else:
        lines.append(f"quantizer:  {config.quantizer.name} {config.quantizer.kwargs}")
        lines.append(f"quantized:  {len(setup.quantized)} layers: {', '.join(setup.quantized) or '-'}")
        lines.append(f"FP32:       {len(skipped)} layers: {', '.join(skipped) or '-'}")
    lines.append(f"optimizer:  {config.optimizer.type}")
    shown = group_options_shown(config)
    for group in setup.optimizer.param_groups:
        options = {key: value for key, value in group.items() if key in shown}
        numel = sum(p.numel() for p in group["params"])
        lines.append(f"  {group['name']:<5} {len(group['params']):>4} tensors {numel:>11,} values  "
                     + " ".join(f"{key}={value}" for key, value in options.items()))
    schedule = config.lr_scheduler
    arguments = ", ".join(f"{key}={value}" for key, value in schedule.schedule_kwargs().items())
    warmup = f" after {schedule.warmup_epochs} warm-up epochs" if schedule.warmup_epochs else ""
    lines.append(f"scheduler:  {schedule.type}{f'({arguments})' if arguments else ''} over {config.epochs} "
                 f"epochs{warmup}")
    terms = [f"{term.weight:g} * {spec.name}({', '.join(f'{k}={v}' for k, v in term.kwargs.items())})"
             for term, spec in zip(setup.loss_terms, config.loss_terms)]
    lines.append(f"loss terms: {' + '.join(terms) if terms else 'none'}")
    lines += describe_budget(setup.budget)
    warning = dz_collapse_warning(config, None)
    if warning:
        lines.append(f"warning:    {warning}")
    return "\n".join(lines)


def dz_collapse_warning(config: TrainConfig, epoch_steps: int | None) -> str | None:
    dz = config.optimizer.param_groups.dz
    return warn_if_dead_zone_collapses(config.optimizer.type, dz.optimizer_options() if dz else None, epoch_steps)


def group_options_shown(config: TrainConfig) -> set[str]:
    """The optimizer options the config set in any group (torch fills in the rest with its defaults)."""
    groups = config.optimizer.param_groups
    return {key for options in (groups.base, groups.dz, groups.bit) if options for key in options.optimizer_options()}


def restore_training_state(setup: Setup, checkpoint: dict[str, Any], path: Path) -> None:
    """Model, optimizer and scheduler as the checkpoint left them; epochs may have been extended, and the learning
    rates then follow the longer schedule.

    Raises:
        CheckpointError: the checkpoint's model, optimizer or scheduler state does not fit this run.
    """
    load_model_state(setup.model, checkpoint["model"], path)
    try:
        setup.optimizer.load_state_dict(checkpoint["optimizer"])
        setup.scheduler.load_state_dict(checkpoint["scheduler"])
    except (KeyError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"checkpoint {path} has optimizer or scheduler state that does not fit this run "
                              f"({first_line(error)}); resume it with the config that wrote it") from None
    scheduled_learning_rates(setup.scheduler)


def lock_run_directory(run_dir: Path) -> int:
    """An exclusive ``flock`` on ``run_dir/.lock``, held until the returned descriptor is closed or the process
    dies (the kernel releases it then: a stale lock never blocks).

    Raises:
        ConfigError: another live process holds it.
    """
    descriptor = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(descriptor, 32).decode(errors="replace").strip() or "another process"
        os.close(descriptor)
        raise ConfigError("save_dir", f"{run_dir} is in use by a running run (pid {holder})",
                          "wait for it to finish, or give this run another run_name or save_dir") from None
    try:
        os.ftruncate(descriptor, 0)
        os.write(descriptor, str(os.getpid()).encode())
    except OSError as error:
        os.close(descriptor)
        raise OSError(error.errno, error.strerror, str(run_dir / LOCK_FILE)) from error
    return descriptor


class TrainingRun:
    """One run directory: its lock, data, tracker, the epoch loop and its checkpoints."""

    def __init__(self, setup: Setup, start: Start, stop: StopSignal) -> None:
        self.setup, self.run_dir, self.stop = setup, start.run_dir, stop
        config, checkpoint = setup.config, start.checkpoint
        self.resolved = setup.resolved
        self.criterion = nn.CrossEntropyLoss()
        data = setup.data or load_data(config)  # first: a missing data set leaves no run directory behind
        self.lock, self.tracker = None, None
        # What a failure leaves to resume from: (epochs done, steps into the next) of the last.pt on disk.
        self.saved_at = None if checkpoint is None else (checkpoint["epoch"], checkpoint["epoch_step"])
        if distributed.is_main_process():
            with self.writing(self.run_dir):
                self.run_dir.mkdir(parents=True, exist_ok=True)
                self.lock = lock_run_directory(self.run_dir)
        try:
            if checkpoint is None and distributed.is_main_process():  # a run may have finished here since locate()
                refuse_if_checkpointed(self.run_dir)
            self.set_up(data, checkpoint, start.path)
        except BaseException:
            self.close()  # a failed start leaves the run directory to the next one
            raise

    def set_up(self, data: DatasetPair, checkpoint: dict[str, Any] | None, path: Path | None) -> None:
        """Loaders, state (restored from ``checkpoint``), config.yaml, tracker and the models the loop runs."""
        setup, config = self.setup, self.setup.config
        self.generator = torch.Generator().manual_seed(config.seed)
        if config.data_on_device:
            self.train_loader, self.val_loader = device_loaders(
                config.dataset, data, config.img_size, config.batch_size, setup.device, config.seed,
                rank=distributed.rank(), world_size=distributed.world_size())
        else:
            pin_memory = setup.device.type == "cuda" if config.pin_memory is None else config.pin_memory
            self.train_loader, self.val_loader = build_loaders(
                data, config.batch_size, config.workers, self.generator, pin_memory=pin_memory,
                rank=distributed.rank(), world_size=distributed.world_size(),
                persistent_workers=config.persistent_workers, prefetch_factor=config.prefetch_factor)
        dz_collapse_warning(config, len(self.train_loader))
        if distributed.world_size() > 1:
            log.info("global batch %d (%d processes x batch_size %d)", config.batch_size * distributed.world_size(),
                     distributed.world_size(), config.batch_size)

        self.step_settings = StepSettings(setup.device, config.amp, config.channels_last)
        self.epoch, self.global_step, self.best_val_acc = 0, 0, 0.0
        # Batches the model's BatchNorm statistics were re-estimated on since its weights last changed (0: stale).
        self.recalibrated = 0 if checkpoint is None else checkpoint.get("bn_recalibrated", 0)
        self.cost_logged = False
        self.epoch_state, wandb_id = EpochState(), None
        self.budget = build_budget(setup, config.epochs * len(self.train_loader), self.val_loader.dataset[0][0],
                                   sync=functools.partial(distributed.broadcast_value, device=setup.device))
        if checkpoint is not None:
            self.restore(checkpoint, path)
            wandb_id = checkpoint["wandb_id"]
        if distributed.is_main_process():
            with self.writing(self.run_dir):
                rewind_metrics(self.run_dir / "metrics.jsonl", self.epoch)
                atomic_write(self.run_dir / "config.yaml", yaml.safe_dump(self.resolved, sort_keys=False))
        self.tracker = RunTracker(self.run_dir, setup.name, config.wandb_project, self.resolved, resume_id=wandb_id)
        self.step_settings.prepare_model(setup.model)
        self.forward_model = torch.compile(setup.model) if config.use_compile else setup.model
        self.train_model = distributed.wrap(self.forward_model, setup.device)
        self.compression_monitor = CompressionMonitor(setup.model, self.val_loader.dataset[0][0])
        if checkpoint is not None:
            # Last, so nothing above draws from the restored generators.
            restore_rng(checkpoint["rng"], self.generator)

    def restore(self, checkpoint: dict[str, Any], path: Path) -> None:
        """Training state and progress as ``checkpoint`` left them (its RNG states come last, in __init__)."""
        restore_training_state(self.setup, checkpoint, path)
        scaler = self.step_settings.scaler
        if scaler is not None and checkpoint.get("grad_scaler"):
            scaler.load_state_dict(checkpoint["grad_scaler"])
        self.epoch, self.global_step = checkpoint["epoch"], checkpoint["step"]
        self.best_val_acc = checkpoint["best_val_acc"]
        self.epoch_state = EpochState(checkpoint["epoch_step"], **checkpoint["epoch_sums"])
        if self.budget is not None:
            self.budget.load_state_dict(checkpoint["budget"])
        if not distributed.is_main_process():  # the sums are totals over all processes: count them once
            self.epoch_state = EpochState(checkpoint["epoch_step"])
        log.info("resuming %s at epoch %d, step %d of it", path, self.epoch + 1, self.epoch_state.step)

    def checkpoint_state(self) -> dict[str, Any]:
        setup, scaler = self.setup, self.step_settings.scaler
        sums = asdict(self.epoch_state)
        return {
            "format": CHECKPOINT_FORMAT, "model": setup.model.state_dict(), "optimizer": setup.optimizer.state_dict(),
            "scheduler": setup.scheduler.state_dict(), "epoch": self.epoch, "epoch_step": sums.pop("step"),
            "epoch_sums": sums, "step": self.global_step, "best_val_acc": self.best_val_acc,
            "config": self.resolved, "run_name": setup.name, "num_classes": setup.num_classes,
            "rng": rng_state(self.generator),
            "grad_scaler": scaler.state_dict() if scaler is not None else None, "wandb_id": self.tracker.wandb_id,
            "bn_recalibrated": self.recalibrated,
            "budget": self.budget.state_dict() if self.budget is not None else None,
        }

    def save(self, best: bool = False) -> None:
        """last.pt (and best.pt when ``best``). best.pt goes first: a failure in between leaves last.pt at the
        previous epoch, which resumes to write both again."""
        if distributed.is_main_process():
            state = self.checkpoint_state()
            with self.writing(self.run_dir / LAST_CHECKPOINT):
                if best:
                    save_checkpoint(state, self.run_dir / BEST_CHECKPOINT)
                save_checkpoint(state, self.run_dir / LAST_CHECKPOINT)
            self.saved_at = (self.epoch, self.epoch_state.step)
        distributed.barrier()

    def survivor(self) -> str:
        """What the run leaves to resume from, in words."""
        if self.saved_at is None:
            return "no checkpoint had been written yet"
        epoch, step = self.saved_at
        return f"{self.run_dir / LAST_CHECKPOINT} from epoch {epoch}{f' (+{step} steps)' if step else ''} is intact"

    @contextlib.contextmanager
    def writing(self, path: Path) -> Iterator[None]:
        """A file of the run that cannot be written (a full disk, a quota, a save_dir made read-only) ends the run
        with one line naming the file, the cause and the checkpoint that survived (RunFailure, exit 1)."""
        try:
            yield
        except OSError as error:
            if self.tracker is not None:
                with contextlib.suppress(Exception):  # W&B may not manage on a full disk either
                    self.tracker.finish()
            raise unwritable(error, path, self.survivor(), self.run_dir) from None

    def recalibrate(self, epoch: int) -> float | None:
        """Re-estimate the BatchNorm statistics for this epoch's weights (config ``bn_recalibration_batches``); the
        seconds it took, None when it is off or the model has no BatchNorm."""
        config = self.setup.config
        if not config.bn_recalibration_batches:
            return None
        started = time.perf_counter()
        self.recalibrated = recalibrate(self.setup.model, self.train_loader, config.bn_recalibration_batches,
                                        config.batch_size, config.seed, epoch, self.step_settings)
        return time.perf_counter() - started if self.recalibrated else None

    def recalibration_cost(self, seconds: float | None, epoch_seconds: float) -> str:
        """The re-estimation's cost for the first epoch line of this process (once: it hardly varies)."""
        if seconds is None or self.cost_logged:
            return ""
        self.cost_logged = True
        return (f" (BatchNorm statistics re-estimated on {self.recalibrated} batches: {seconds:.2f} s, "
                f"{seconds / epoch_seconds:.1%} of the epoch)")

    def preempt(self) -> None:
        self.save()
        self.tracker.finish()
        raise Preempted(self.stop.signal_name, self.epoch + 1, self.epoch_state.step)

    def train_epoch(self, epoch: int) -> dict[str, float] | None:
        """One epoch's training (continuing an interrupted one); None when a stop signal cut it short."""
        config = self.setup.config
        distributed.set_epoch(self.train_loader, epoch)
        if self.epoch_state.step:
            self.train_loader.sampler.set_epoch(epoch, start=self.epoch_state.step * config.batch_size)
        steps_before = self.epoch_state.step
        self.recalibrated = 0  # the weights change from here on
        try:
            metrics = train(self.train_loader, self.train_model, self.criterion, self.setup.optimizer, epoch,
                            self.setup.device, self.setup.loss_terms, log_interval=config.log_interval,
                            state=self.epoch_state, stop=self.stop, step_settings=self.step_settings,
                            after_step=self.budget.step if self.budget is not None else None)
        except NonFiniteLossError as error:
            last = self.run_dir / LAST_CHECKPOINT
            kept = (f"the last good checkpoint {last} (epoch {self.epoch}) is untouched" if last.is_file()
                    else "no checkpoint had been written yet")
            self.tracker.finish()
            raise RunFailure(f"{error}; {kept}; lower the learning rates or the loss-term lambdas") from None
        self.global_step += self.epoch_state.step - steps_before
        self.train_loader.sampler.set_epoch(epoch)
        return metrics if self.epoch_state.step == len(self.train_loader) else None

    def run(self) -> Path:
        """Every remaining epoch, then the run report; returns the run directory. Raises Preempted after writing a
        checkpoint when a stop signal arrived."""
        setup, config = self.setup, self.setup.config
        compression: dict[str, float] = {}
        record: dict[str, Any] = {}
        for epoch in range(self.epoch + 1, config.epochs + 1):
            if self.stop.anywhere():
                self.preempt()
            lr = setup.optimizer.param_groups[0]["lr"]
            started = time.perf_counter()
            train_metrics = self.train_epoch(epoch)
            if train_metrics is None:
                self.preempt()
            recalibration = self.recalibrate(epoch)
            # Unwrapped: each process validates its own batches, and DDP would sync buffers in every forward.
            val_metrics = validate(self.val_loader, self.forward_model, self.criterion, setup.device,
                                   log_interval=config.log_interval, step_settings=self.step_settings)
            epoch_seconds = time.perf_counter() - started
            setup.scheduler.step()
            compression = self.compression_monitor.epoch_metrics(BopsSettings.of(self.resolved))
            parts = {name: value for name, value in train_metrics.items() if name not in ("loss", "acc")}
            record = {"epoch": epoch, "loss": train_metrics["loss"], **parts, "train_acc": train_metrics["acc"],
                      "val_loss": val_metrics["loss"], "val_acc": val_metrics["acc"], "lr": lr, **compression,
                      **(self.budget.record() if self.budget is not None else {})}
            with self.writing(self.tracker.metrics_path):
                self.tracker.log(record)
            warn_if_collapsed(record, setup.num_classes)
            improved = val_metrics["acc"] > self.best_val_acc
            self.best_val_acc = max(self.best_val_acc, val_metrics["acc"])
            self.epoch, self.epoch_state = epoch, EpochState()
            self.save(best=improved)
            log.info("epoch %d/%d loss %.4f%s train_acc %.4f val_acc %.4f%s%s%s",
                     epoch, config.epochs, record["loss"],
                     "".join(f" {name} {value:.4f}" for name, value in parts.items()), record["train_acc"],
                     record["val_acc"], f" sparsity {compression['sparsity']:.4f} bits {compression['mean_bits']:.2f}"
                     if compression else "", budget_text(record, self.budget),
                     self.recalibration_cost(recalibration, epoch_seconds))
        if self.stop.anywhere() and self.epoch < config.epochs:
            self.preempt()
        if distributed.is_main_process():
            with self.writing(self.run_dir):
                write_run_report(self.run_dir, self.compression_monitor, self.resolved, self.tracker)
        self.tracker.finish({"best_val_acc": self.best_val_acc, **compression})
        sparsity = f" | sparsity {compression['sparsity']:.2%}" if compression else ""
        if distributed.is_main_process():
            print(f"run directory: {self.run_dir} | best val_acc {self.best_val_acc:.2%}{sparsity}")
        check_outcome(self.budget, record.get("val_acc"), setup.num_classes, self.run_dir, self.epoch)
        return self.run_dir

    def close(self) -> None:
        """Release the run directory's lock."""
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None


def warn_if_collapsed(record: dict[str, Any], num_classes: int) -> None:
    """Warn when an epoch ends with nearly every quantized weight pruned and validation accuracy at chance."""
    if record.get("sparsity", 0.0) > 0.99 and record["val_acc"] <= 1.5 / num_classes:
        log.warning("epoch %d: %.2f %% of the quantized weights are zero and val_acc %.4f is at chance (%.4f): the "
                    "dead zones have collapsed; lower the dz group's weight_decay or lr", record["epoch"],
                    100 * record["sparsity"], record["val_acc"], 1 / num_classes)


def train_and_evaluate(setup: Setup, start: Start, stop: StopSignal) -> Path:
    """Run every remaining epoch of ``setup`` from ``start``; returns the run directory. Raises Preempted when
    ``stop`` saw a signal (after writing a checkpoint)."""
    if start.finished:
        if all((start.run_dir / name).is_file() for name in REPORT_FILES) or not distributed.is_main_process():
            log.info("%s has finished all %d epochs; nothing to do", start.path, setup.config.epochs)
        else:
            write_missing_report(setup, start)
        return start.run_dir
    run = TrainingRun(setup, start, stop)
    try:
        return run.run()
    finally:
        run.close()


def write_missing_report(setup: Setup, start: Start) -> None:
    """The report of a finished run whose report files could not all be written (a full disk at its end).

    Raises:
        RunFailure: they still cannot be written.
    """
    log.info("%s has finished all %d epochs; writing its report", start.path, setup.config.epochs)
    load_model_state(setup.model, start.checkpoint["model"], start.path)
    descriptor = None
    try:
        descriptor = lock_run_directory(start.run_dir)
        monitor = CompressionMonitor(setup.model, example_input(setup.resolved))
        write_run_report(start.run_dir, monitor, setup.resolved)
    except OSError as error:
        kept = f"{start.path} from epoch {start.checkpoint['epoch']} is intact"
        raise unwritable(error, start.run_dir, kept, start.run_dir) from None
    finally:
        if descriptor is not None:
            os.close(descriptor)


def unwritable(error: OSError, path: Path, kept: str, run_dir: Path) -> RunFailure:
    """The one line for a file of a run that cannot be written: which file, why (a full disk, a quota, a read-only
    save_dir), what survived (``kept``) and how to go on."""
    return cannot_write(error, path, f"{kept}; free space (or make {run_dir} writable), then rerun with --resume auto")
