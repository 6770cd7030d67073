"""Train a model from a YAML experiment file: FP32 baseline or CoDeQ quantization-aware training.

    python run_training.py --config configs/quickstart.yaml [--device cuda] [--set key.path=value]
                           [--dry-run] [--resume auto|PATH] [--verbose]

Exit codes: 0 done (or --dry-run found nothing wrong); 1 the run failed (non-finite loss, unusable
checkpoint, data set missing); 2 bad config or command line, nothing was created; 3 stopped by
SIGTERM or SIGUSR1 after writing a checkpoint: run the same command with --resume auto to continue.
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.nn.utils import parametrize

from src import distributed
from src.checkpoint import (CHECKPOINT_FORMAT, CheckpointError, load_checkpoint, load_model_state, restore_rng,
                            rng_state, save_checkpoint)
from src.compression import CompressionMonitor
from src.config import ConfigError, TrainConfig, config_differences, config_to_dict, load_config, runtime_keys
from src.data import DATASET_REGISTRY, DatasetPair, build_loaders
from src.device_data import device_loaders
from src.experiment import (LossTerm, build_loss_terms, build_model, build_optimizer, build_scheduler,
                            resolve_device, run_name, seed_everything)
from src.performance import StepSettings, keep_freed_memory
from src.quantizer import DeadZoneLDZCompander, UniformSymmetric
from src.report import write_run_report
from src.tracking import RunTracker, rewind_metrics
from src.train import EpochState, NonFiniteLossError, train, validate
from src.utils_quantization import owns_weight

QUANTIZER_REGISTRY = {"uniform": UniformSymmetric, "deadzone": DeadZoneLDZCompander}

EXIT_OK = 0
EXIT_FAILURE = 1  # the run started but could not go on: non-finite loss, unusable checkpoint, missing data
EXIT_CONFIG_ERROR = 2  # bad config or command line; nothing was loaded or written
EXIT_PREEMPTED = 3  # SIGTERM/SIGUSR1: a checkpoint was written; resume with --resume auto

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# A multi-process run agrees on stopping every this many steps (a collective); one process checks every step.
DISTRIBUTED_STOP_POLL = 10
LAST_CHECKPOINT, BEST_CHECKPOINT = "last.pt", "best.pt"

log = logging.getLogger("codeq")


class RunFailure(RuntimeError):
    """A fault that ends a started run; its message is the one line the user sees."""


class Preempted(Exception):
    """A stop signal arrived; the checkpoint to resume from has been written."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment YAML file")
    parser.add_argument("--device", help="override the config's device: cpu, cuda, cuda:N or mps")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override any config key (repeatable; the value is parsed as YAML)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the config, build model, quantizers, optimizer and loss terms, print a summary "
                             "and exit without loading data or writing anything")
    parser.add_argument("--resume", metavar="auto|PATH",
                        help="continue from a checkpoint: PATH, or `auto` for the run directory's last.pt "
                             "(starts fresh when there is none)")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks with error messages")
    return parser.parse_args(argv)


@dataclass
class Setup:
    """Everything a run builds before it touches data or disk; building it is the last config check."""

    config: TrainConfig
    device: torch.device
    name: str
    num_classes: int
    model: nn.Module
    quantized: list[str]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_terms: list[LossTerm]

    @property
    def resolved(self) -> dict[str, Any]:
        return config_to_dict(self.config)


def prepare(config: TrainConfig, device: torch.device) -> Setup:
    """Seed and build model, quantizers, optimizer, scheduler and loss terms; a bad value raises ConfigError."""
    seed_everything(config.seed)
    num_classes = DATASET_REGISTRY[config.dataset].num_classes
    model, quantized = build_model(config, num_classes, QUANTIZER_REGISTRY)
    model.to(device)
    optimizer = build_optimizer(model, config)
    return Setup(config, device, run_name(config, QUANTIZER_REGISTRY, distributed.world_size()), num_classes, model,
                 quantized, optimizer, build_scheduler(optimizer, config), build_loss_terms(config))


def describe(setup: Setup) -> str:
    """The --dry-run summary."""
    config, model = setup.config, setup.model
    run_dir = Path(config.save_dir) / setup.name
    if (run_dir / LAST_CHECKPOINT).is_file():
        where = f"{run_dir} (holds {LAST_CHECKPOINT}: start with --resume auto to continue it)"
    else:
        where = f"{run_dir} ({'exists, no checkpoint' if run_dir.exists() else 'new'})"
    skipped = [name for name, module in model.named_modules()
               if owns_weight(module) and not parametrize.is_parametrized(module, "weight")]
    size = sum(p.numel() for p in model.parameters())
    lines = [
        "dry run: the config is valid; no data was loaded and nothing was written",
        f"run name:   {setup.name}",
        f"run dir:    {where}",
        f"device:     {setup.device}",
        f"model:      {config.model} ({size:,} parameters), img_size {config.img_size}, "
        f"{config.dataset} ({setup.num_classes} classes), {config.epochs} epochs of batch {config.batch_size}",
    ]
    if config.quantizer is None:
        lines.append("quantizer:  none (FP32 baseline)")
    else:
        lines.append(f"quantizer:  {config.quantizer.name} {config.quantizer.kwargs}")
        lines.append(f"quantized:  {len(setup.quantized)} layers: {', '.join(setup.quantized) or '-'}")
        lines.append(f"FP32:       {len(skipped)} layers: {', '.join(skipped) or '-'}")
    lines.append(f"optimizer:  {config.optimizer.type}")
    for group in setup.optimizer.param_groups:
        options = {key: value for key, value in group.items() if key in group_options_shown(config)}
        numel = sum(p.numel() for p in group["params"])
        lines.append(f"  {group['name']:<5} {len(group['params']):>4} tensors {numel:>11,} values  "
                     + " ".join(f"{key}={value}" for key, value in options.items()))
    scheduler = config.lr_scheduler
    lines.append(f"scheduler:  {scheduler.type}" + (f" over {config.epochs} epochs to {scheduler.eta_min:g}"
                                                   if scheduler.type == "cosine" else ""))
    terms = [f"{term.weight:g} * {term.name}({', '.join(f'{k}={v}' for k, v in spec.kwargs.items())})"
             for term, spec in zip(setup.loss_terms, config.loss_terms)]
    lines.append(f"loss terms: {' + '.join(terms) if terms else 'none'}")
    return "\n".join(lines)


def group_options_shown(config: TrainConfig) -> set[str]:
    """The optimizer options the config set in any group (torch fills in the rest with its defaults)."""
    groups = config.optimizer.param_groups
    return {key for options in (groups.base, groups.dz, groups.bit) if options for key in options.optimizer_options()}


@dataclass
class Start:
    """Where a run begins: its directory and, when resuming, the checkpoint it continues from."""

    run_dir: Path
    checkpoint: dict[str, Any] | None = None
    path: Path | None = None


def locate(setup: Setup, resume: str | None) -> Start:
    """The run directory and the checkpoint to resume, refusing to overwrite one or to resume another config."""
    run_dir = Path(setup.config.save_dir) / setup.name
    if resume is None:
        if (run_dir / LAST_CHECKPOINT).is_file():
            raise ConfigError("save_dir", f"{run_dir} already holds a checkpoint ({LAST_CHECKPOINT})",
                              "pass --resume auto to continue that run, or choose a new save_dir (or run_name)")
        return Start(run_dir)
    path = run_dir / LAST_CHECKPOINT if resume == "auto" else Path(resume)
    if not path.is_file():
        if resume == "auto":
            log.info("--resume auto: no checkpoint in %s yet, starting the run", run_dir)
            return Start(run_dir)
        raise ConfigError("--resume", f"{path} does not exist", "pass an existing checkpoint file or `auto`")
    checkpoint = load_checkpoint(path)
    differences = config_differences(setup.resolved, checkpoint["config"])
    if differences:
        raise ConfigError(", ".join(differences), f"differs from the config of checkpoint {path}",
                          f"use that run's values (its config.yaml) or a new save_dir; only {', '.join(runtime_keys())} "
                          f"may change on resume")
    if setup.config.epochs < checkpoint["epoch"]:
        raise ConfigError("epochs", f"{setup.config.epochs} is fewer than the {checkpoint['epoch']} epochs the "
                          f"checkpoint has done", f"set epochs to at least {checkpoint['epoch']}")
    return Start(path.parent, checkpoint, path)


def restore_training_state(setup: Setup, checkpoint: dict[str, Any], path: Path) -> None:
    """Model, optimizer and scheduler as the checkpoint left them; epochs may have been extended."""
    load_model_state(setup.model, checkpoint["model"], path)
    try:
        setup.optimizer.load_state_dict(checkpoint["optimizer"])
        setup.scheduler.load_state_dict(checkpoint["scheduler"])
    except (KeyError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"checkpoint {path} has optimizer or scheduler state that does not fit this run "
                              f"({str(error).splitlines()[0]}); resume it with the config that wrote it") from None
    if hasattr(setup.scheduler, "T_max") and setup.scheduler.T_max != setup.config.epochs:
        log.info("epochs extended from %d to %d: the cosine schedule now ends at epoch %d",
                 setup.scheduler.T_max, setup.config.epochs, setup.config.epochs)
        setup.scheduler.T_max = setup.config.epochs


class StopRequest:
    """Remembers a SIGTERM or SIGUSR1 (Slurm preemption or time limit): the run finishes its current
    step, writes a checkpoint and exits with EXIT_PREEMPTED. Polled by ``train`` after every step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.signal_name: str | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for number in STOP_SIGNALS:
            self.previous[number] = signal.signal(number, self.handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def handle(self, number: int, frame: object) -> None:
        self.signal_name = signal.Signals(number).name

    def anywhere(self) -> bool:
        """True on every process when any process got a stop signal (a collective when distributed)."""
        return distributed.any_process(self.signal_name is not None, self.device)

    def __call__(self, step: int) -> bool:
        if distributed.world_size() == 1:
            return self.signal_name is not None
        return step % DISTRIBUTED_STOP_POLL == 0 and self.anywhere()


def load_data(config: TrainConfig) -> DatasetPair:
    try:
        return DATASET_REGISTRY[config.dataset].build(config.data_dir, config.img_size)
    except (OSError, RuntimeError, ValueError) as error:  # missing, unreadable or corrupt files
        raise RunFailure(f"cannot load data set {config.dataset!r} from {config.data_dir!r}: "
                         f"{str(error).splitlines()[0] if str(error) else type(error).__name__}; "
                         f"point data_dir at the data set") from None


class TrainingRun:
    """One run directory: data, tracker, the epoch loop and its checkpoints."""

    def __init__(self, setup: Setup, start: Start, stop: StopRequest) -> None:
        self.setup, self.run_dir, self.stop = setup, start.run_dir, stop
        config, checkpoint = setup.config, start.checkpoint
        self.resolved = setup.resolved
        self.criterion = nn.CrossEntropyLoss()
        data = load_data(config)
        self.generator = torch.Generator().manual_seed(config.seed)
        if config.data_on_device:
            self.train_loader, self.val_loader = device_loaders(
                config.dataset, data, config.img_size, config.batch_size, setup.device, config.seed,
                rank=distributed.rank(), world_size=distributed.world_size())
        else:
            self.train_loader, self.val_loader = build_loaders(
                data, config.batch_size, config.workers, self.generator, pin_memory=setup.device.type == "cuda",
                rank=distributed.rank(), world_size=distributed.world_size())
        if distributed.world_size() > 1:
            log.info("global batch %d (%d processes x batch_size %d)", config.batch_size * distributed.world_size(),
                     distributed.world_size(), config.batch_size)

        self.step_settings = StepSettings(setup.device, config.amp, config.channels_last)
        self.epoch, self.global_step, self.best_val_acc = 0, 0, 0.0
        self.epoch_state, wandb_id = EpochState(), None
        if checkpoint is not None:
            self.restore(checkpoint, start.path)
            wandb_id = checkpoint["wandb_id"]
        if distributed.is_main_process():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            rewind_metrics(self.run_dir / "metrics.jsonl", self.epoch)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(self.resolved, sort_keys=False))
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
            "config": self.resolved, "run_name": setup.name, "rng": rng_state(self.generator),
            "grad_scaler": scaler.state_dict() if scaler is not None else None, "wandb_id": self.tracker.wandb_id,
        }

    def save(self, best: bool = False) -> None:
        if distributed.is_main_process():
            state = self.checkpoint_state()
            save_checkpoint(state, self.run_dir / LAST_CHECKPOINT)
            if best:
                save_checkpoint(state, self.run_dir / BEST_CHECKPOINT)
        distributed.barrier()

    def preempt(self) -> None:
        self.save()
        log.warning("%s: checkpoint written at epoch %d step %d; resume with --resume auto", self.stop.signal_name,
                    self.epoch + 1, self.epoch_state.step)
        self.tracker.finish()
        raise Preempted(self.run_dir / LAST_CHECKPOINT)

    def train_epoch(self, epoch: int) -> dict[str, float] | None:
        """One epoch's training (continuing an interrupted one); None when a stop signal cut it short."""
        config = self.setup.config
        distributed.set_epoch(self.train_loader, epoch)
        if self.epoch_state.step:
            self.train_loader.sampler.set_epoch(epoch, start=self.epoch_state.step * config.batch_size)
        steps_before = self.epoch_state.step
        try:
            metrics = train(self.train_loader, self.train_model, self.criterion, self.setup.optimizer, epoch,
                            self.setup.device, self.setup.loss_terms, log_interval=config.log_interval,
                            state=self.epoch_state, stop=self.stop, step_settings=self.step_settings)
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
        setup, config = self.setup, self.setup.config
        compression: dict[str, float] = {}
        for epoch in range(self.epoch + 1, config.epochs + 1):
            if self.stop.anywhere():
                self.preempt()
            lr = setup.optimizer.param_groups[0]["lr"]
            train_metrics = self.train_epoch(epoch)
            if train_metrics is None:
                self.preempt()
            # Unwrapped: each process validates its own batches, and DDP would sync buffers in every forward.
            val_metrics = validate(self.val_loader, self.forward_model, self.criterion, setup.device,
                                   log_interval=config.log_interval, step_settings=self.step_settings)
            setup.scheduler.step()
            compression = self.compression_monitor.epoch_metrics()
            record = {"epoch": epoch, "loss": train_metrics["loss"], "train_acc": train_metrics["acc"],
                      "val_loss": val_metrics["loss"], "val_acc": val_metrics["acc"], "lr": lr, **compression}
            self.tracker.log(record)
            improved = val_metrics["acc"] > self.best_val_acc
            self.best_val_acc = max(self.best_val_acc, val_metrics["acc"])
            self.epoch, self.epoch_state = epoch, EpochState()
            self.save(best=improved)
            log.info("epoch %d/%d loss %.4f train_acc %.4f val_acc %.4f%s", epoch, config.epochs, record["loss"],
                     record["train_acc"], record["val_acc"],
                     f" sparsity {compression['sparsity']:.4f} bits {compression['mean_bits']:.2f}"
                     if compression else "")
        if self.stop.anywhere() and self.epoch < config.epochs:
            self.preempt()
        if distributed.is_main_process():
            write_run_report(self.run_dir, self.compression_monitor, self.resolved, self.tracker)
        self.tracker.finish({"best_val_acc": self.best_val_acc, **compression})
        sparsity = f" | sparsity {compression['sparsity']:.2%}" if compression else ""
        if distributed.is_main_process():
            print(f"run directory: {self.run_dir} | best val_acc {self.best_val_acc:.2%}{sparsity}")
        return self.run_dir


def train_and_evaluate(config: TrainConfig, device: torch.device, resume: str | None = None,
                       stop: StopRequest | None = None, setup: Setup | None = None, start: Start | None = None) -> Path:
    """Run every epoch of ``config`` on ``device`` (continuing a checkpoint with ``resume``: a path or
    ``auto``); returns the run directory. Raises Preempted when ``stop`` saw a signal. ``setup`` and
    ``start`` skip building and locating when the caller has done it."""
    setup = setup or prepare(config, device)
    start = start or locate(setup, resume)
    if start.checkpoint is not None and start.checkpoint["epoch"] == config.epochs:
        log.info("%s has finished all %d epochs; nothing to do", start.path, config.epochs)
        return start.run_dir
    with contextlib.ExitStack() as stack:
        stop = stop or stack.enter_context(StopRequest(device))
        return TrainingRun(setup, start, stop).run()


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


def run(args: argparse.Namespace, log_handler: logging.Handler) -> int:
    overrides = args.set + ([f"device={args.device}"] if args.device else [])
    with StopRequest(torch.device("cpu")) as stop:  # early: a signal during start-up still ends in a checkpoint
        with held_logs(log_handler, hold=not args.verbose):
            config = load_config(args.config, QUANTIZER_REGISTRY, overrides)
            device = distributed.setup(resolve_device(config.device))
            setup = prepare(config, device)
            start = None if args.dry_run else locate(setup, args.resume)
        stop.device = device
        if args.dry_run:
            print(describe(setup))
            return EXIT_OK
        keep_freed_memory()
        try:
            train_and_evaluate(config, device, args.resume, stop, setup, start)
        except Preempted:
            return EXIT_PREEMPTED
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.ERROR if distributed.launched_as_other_rank() else logging.INFO)  # rank 0 speaks for all
    logging.captureWarnings(True)
    finished = False
    try:
        code = run(args, handler)
        finished = True
        return code
    except ConfigError as error:
        error.source = error.source or args.config
        return report(error.line(), args.verbose, EXIT_CONFIG_ERROR)
    except (RunFailure, CheckpointError) as error:
        return report(f"error: {error}", args.verbose, EXIT_FAILURE)
    finally:
        distributed.teardown(finished)
        logging.captureWarnings(False)
        root.removeHandler(handler)


def report(line: str, verbose: bool, code: int) -> int:
    """Print one error line (after the traceback with --verbose) and return the exit code."""
    if verbose:
        traceback.print_exc()
    print(line, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
