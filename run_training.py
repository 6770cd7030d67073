"""Train a model from a YAML experiment file: FP32 baseline or CoDeQ quantization-aware training.

    python run_training.py --config configs/quickstart.yaml [--device cuda] [--set key.path=value]
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
import yaml
from torch import nn

from src import distributed
from src.checkpoint import save_checkpoint
from src.compression import CompressionMonitor
from src.config import ConfigError, TrainConfig, config_to_dict, load_config
from src.data import DATASET_REGISTRY, build_loaders
from src.experiment import (build_loss_terms, build_model, build_optimizer, build_scheduler, resolve_device,
                            run_name, seed_everything)
from src.quantizer import DeadZoneLDZCompander, UniformSymmetric
from src.report import write_run_report
from src.tracking import RunTracker
from src.train import train, validate

QUANTIZER_REGISTRY = {"uniform": UniformSymmetric, "deadzone": DeadZoneLDZCompander}

EXIT_CONFIG_ERROR = 2

log = logging.getLogger("codeq")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment YAML file")
    parser.add_argument("--device", help="override the config's device: cpu, cuda, cuda:N or mps")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override any config key (repeatable; the value is parsed as YAML)")
    return parser.parse_args(argv)


def train_and_evaluate(config: TrainConfig, device: torch.device) -> Path:
    """Run every epoch of ``config`` on ``device``; returns the run directory."""
    seed_everything(config.seed)
    name = run_name(config, QUANTIZER_REGISTRY, distributed.world_size())
    dataset_spec = DATASET_REGISTRY[config.dataset]
    model, _ = build_model(config, dataset_spec.num_classes, QUANTIZER_REGISTRY)
    model.to(device)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    loss_terms = build_loss_terms(config)
    criterion = nn.CrossEntropyLoss()

    data = dataset_spec.build(config.data_dir, config.img_size)
    generator = torch.Generator().manual_seed(config.seed)
    train_loader, val_loader = build_loaders(data, config.batch_size, config.workers, generator,
                                             pin_memory=device.type == "cuda", rank=distributed.rank(),
                                             world_size=distributed.world_size())
    log.info("global batch %d (%d processes x batch_size %d)", config.batch_size * distributed.world_size(),
             distributed.world_size(), config.batch_size)

    run_dir = Path(config.save_dir) / name
    resolved = config_to_dict(config)
    if distributed.is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    tracker = RunTracker(run_dir, name, config.wandb_project, resolved)
    forward_model = torch.compile(model) if config.use_compile else model
    train_model = distributed.wrap(forward_model, device)
    compression_monitor = CompressionMonitor(model, val_loader.dataset[0][0])

    best_val_acc, compression = 0.0, {}
    for epoch in range(1, config.epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        distributed.set_epoch(train_loader, epoch)
        train_metrics = train(train_loader, train_model, criterion, optimizer, epoch, device, loss_terms,
                              log_interval=config.log_interval)
        # Unwrapped: each process validates its own batches, and DDP would sync buffers in every forward.
        val_metrics = validate(val_loader, forward_model, criterion, device, log_interval=config.log_interval)
        scheduler.step()
        compression = compression_monitor.epoch_metrics()
        record = {"epoch": epoch, "loss": train_metrics["loss"], "train_acc": train_metrics["acc"],
                  "val_loss": val_metrics["loss"], "val_acc": val_metrics["acc"], "lr": lr, **compression}
        tracker.log(record)
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "epoch": epoch, "best_val_acc": max(best_val_acc, val_metrics["acc"]), "config": resolved,
                 "wandb_id": tracker.wandb_id}
        improved = val_metrics["acc"] > best_val_acc
        best_val_acc = state["best_val_acc"]
        if distributed.is_main_process():
            save_checkpoint(state, run_dir / "last.pt")
            if improved:
                save_checkpoint(state, run_dir / "best.pt")
        log.info("epoch %d/%d loss %.4f train_acc %.4f val_acc %.4f%s", epoch, config.epochs, record["loss"],
                 record["train_acc"], record["val_acc"],
                 f" sparsity {compression['sparsity']:.4f} bits {compression['mean_bits']:.2f}" if compression else "")
    if distributed.is_main_process():
        write_run_report(run_dir, compression_monitor, resolved, tracker)
    tracker.finish({"best_val_acc": best_val_acc, **compression})
    sparsity = f" | sparsity {compression['sparsity']:.2%}" if compression else ""
    if distributed.is_main_process():
        print(f"run directory: {run_dir} | best val_acc {best_val_acc:.2%}{sparsity}")
    return run_dir


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    overrides = args.set + ([f"device={args.device}"] if args.device else [])
    try:
        config = load_config(args.config, QUANTIZER_REGISTRY, overrides)
        device = distributed.setup(resolve_device(config.device))
    except ConfigError as error:
        error.source = error.source or args.config
        print(error.line(), file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if not distributed.is_main_process():
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 speaks for the run
    try:
        train_and_evaluate(config, device)
    finally:
        distributed.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
