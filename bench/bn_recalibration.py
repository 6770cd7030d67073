"""What BatchNorm re-estimation costs a run: per epoch, the training epoch, the re-estimation before validation
(``codeq.training.loop.recalibrate``, config ``bn_recalibration_batches``) and the validation pass, timed in one
process as the trainer runs them, with the re-estimation's share of the epoch.

    python bench/bn_recalibration.py [--config configs/quickstart.yaml] [--epochs 3] [--set key=value ...]
                                     [--threads N] [--json OUT.json]

The last line is the median share over the epochs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from codeq.app.config import load_config
from codeq.app.experiment import resolve_device
from codeq.app.trainer import load_data, prepare
from codeq.data.loaders import build_loaders
from codeq.training.loop import recalibrate, train, validate
from codeq.training.step_settings import StepSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path, help="write the timings here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(args.config, args.set)
    setup = prepare(config, resolve_device(config.device))
    train_loader, val_loader = build_loaders(load_data(config), config.batch_size, config.workers,
                                             torch.Generator().manual_seed(config.seed))
    settings, criterion = StepSettings(setup.device, config.amp, config.channels_last), nn.CrossEntropyLoss()
    batches = config.bn_recalibration_batches or 5
    epochs = []
    for epoch in range(1, args.epochs + 1):
        train_loader.sampler.set_epoch(epoch)
        started = time.perf_counter()
        train(train_loader, setup.model, criterion, setup.optimizer, epoch, setup.device, setup.loss_terms,
              log_interval=10**9, step_settings=settings)
        trained = time.perf_counter()
        used = recalibrate(setup.model, train_loader, batches, config.batch_size, config.seed, epoch, settings)
        recalibrated = time.perf_counter()
        metrics = validate(val_loader, setup.model, criterion, setup.device, log_interval=10**9,
                           step_settings=settings)
        validated = time.perf_counter()
        setup.scheduler.step()
        epochs.append({"epoch": epoch, "train_s": trained - started, "recalibrate_s": recalibrated - trained,
                       "validate_s": validated - recalibrated, "batches": used, "val_acc": metrics["acc"],
                       "share": (recalibrated - trained) / (validated - started)})
        row = epochs[-1]
        print(f"epoch {epoch}: train {row['train_s']:.2f} s, re-estimation {row['recalibrate_s']:.3f} s on {used} "
              f"batches ({row['share']:.1%} of the epoch), validation {row['validate_s']:.2f} s, val_acc "
              f"{row['val_acc']:.4f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": args.config, "overrides": args.set, "epochs": epochs}, indent=2))
    print(f"median share of an epoch: {statistics.median(row['share'] for row in epochs):.1%}")


if __name__ == "__main__":
    main()
