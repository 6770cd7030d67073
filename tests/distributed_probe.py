"""Run by tests/test_distributed.py under torchrun: one DDP epoch from deliberately different initial
weights per process, BatchNorm statistics re-estimated by each process on its own batches, then each process saves
what it holds and measures.

    torchrun --nproc-per-node=2 tests/distributed_probe.py CONFIG OUT_DIR
"""
import json
import sys
from pathlib import Path

import torch
from torch import nn

from codeq.app.config import load_config
from codeq.app.experiment import build_loss_terms, build_model, optimizer_for, seed_everything
from codeq.compression import layer_stats, summary
from codeq.data.base import load_dataset
from codeq.data.loaders import build_loaders
from codeq.training import distributed
from codeq.training.loop import recalibrate, train, validate
from codeq.training.step_settings import StepSettings


def main(config_path: str, out_dir: str) -> None:
    config = load_config(config_path)
    device = distributed.setup(torch.device("cpu"))
    rank = distributed.rank()
    seed_everything(config.seed + rank)  # DDP must make the replicas equal regardless
    data = load_dataset(config.dataset, config.data_dir, config.img_size)
    model, _ = build_model(config, data.num_classes)
    optimizer = optimizer_for(model, config)
    loss_terms = build_loss_terms(config)
    criterion = nn.CrossEntropyLoss()
    train_loader, val_loader = build_loaders(data, config.batch_size, 0, torch.Generator().manual_seed(config.seed),
                                             rank=rank, world_size=distributed.world_size())
    distributed.set_epoch(train_loader, 1)
    train_metrics = train(train_loader, distributed.wrap(model, device), criterion, optimizer, 1, device, loss_terms)
    # Each process re-estimates BatchNorm statistics on batches of its own share: they must end equal anyway.
    recalibrated = recalibrate(model, train_loader, 2, config.batch_size, config.seed, 1, StepSettings(device))
    val_metrics = validate(val_loader, model, criterion, device)
    out = Path(out_dir)
    torch.save(model.state_dict(), out / f"rank{rank}.pt")
    report = {"train": train_metrics, "val": val_metrics, "compression": summary(layer_stats(model)),
              "loss_terms": [float(weight * fn(model, **kwargs)) for fn, weight, kwargs in loss_terms],
              "val_batches": len(val_loader), "recalibrated": recalibrated}
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    distributed.teardown(finished=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
