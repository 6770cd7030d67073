"""One epoch of training and one pass of validation."""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from src.distributed import all_reduce_sum, is_main_process

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module], Tensor]


class Progress:
    """A tqdm bar on a terminal; plain periodic log lines otherwise (Slurm logs, CI)."""

    def __init__(self, iterable: Iterable, total: int, desc: str, log_interval: int = 50) -> None:
        self.total, self.desc, self.log_interval = total, desc, log_interval
        self.interactive = sys.stdout.isatty() and is_main_process()
        if self.interactive:
            from tqdm import tqdm

            self.iterable = tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)
        else:
            self.iterable = iterable
        self.start = time.perf_counter()

    def __iter__(self):
        return iter(self.iterable)

    def update(self, step: int, **values: float) -> None:
        text = " ".join(f"{k}={v:.4g}" for k, v in values.items())
        if self.interactive:
            self.iterable.set_postfix_str(text, refresh=False)
        elif step % self.log_interval == 0 or step == self.total:
            rate = step / max(time.perf_counter() - self.start, 1e-9)
            log.info("%s step %d/%d %s (%.1f it/s)", self.desc, step, self.total, text, rate)

    def close(self) -> None:
        if self.interactive:
            self.iterable.close()


class RunningMean:
    """Sample-weighted running averages of loss and accuracy, kept on the device (no per-step sync)."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.correct = torch.zeros((), device=device, dtype=torch.float64)
        self.count = 0

    def add(self, loss: Tensor, logits: Tensor, targets: Tensor) -> None:
        batch = targets.shape[0]
        self.loss_sum += loss.detach().double() * batch
        self.correct += (logits.detach().argmax(dim=1) == targets).sum()
        self.count += batch

    def result(self) -> dict[str, float]:
        """Averages over the samples of every process."""
        totals = torch.stack([self.loss_sum, self.correct, self.loss_sum.new_tensor(self.count)])
        loss_sum, correct, count = all_reduce_sum(totals).tolist()
        return {"loss": loss_sum / max(count, 1), "acc": correct / max(count, 1)}


def train(
    train_loader: Iterable,
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    device: torch.device | str,
    loss_fns: Sequence[LossFn] | None = None,
    log_interval: int = 50,
) -> dict[str, float]:
    """Train ``model`` for one epoch; the loss is criterion + sum of ``loss_fns(model)``.

    Returns the sample-averaged total ``loss`` and training accuracy ``acc``.
    """
    model.train()
    device = torch.device(device)
    meter = RunningMean(device)
    progress = Progress(train_loader, len(train_loader), f"epoch {epoch} train", log_interval)
    for step, (inputs, targets) in enumerate(progress, start=1):
        inputs = inputs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        logits = model(inputs)
        loss = criterion(logits, targets)
        for loss_fn in loss_fns or ():
            loss = loss + loss_fn(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        meter.add(loss, logits, targets)
        if progress.interactive or step % log_interval == 0 or step == progress.total:
            progress.update(step, loss=loss.item())
    progress.close()
    return meter.result()


@torch.no_grad()
def validate(
    val_loader: Iterable, model: nn.Module, criterion: nn.Module, device: torch.device | str, log_interval: int = 50
) -> dict[str, float]:
    """Loss and accuracy over ``val_loader``; fake-quantized weights are computed once for the pass."""
    model.eval()
    device = torch.device(device)
    meter = RunningMean(device)
    progress = Progress(val_loader, len(val_loader), "validate", log_interval)
    with parametrize.cached():
        for inputs, targets in progress:
            inputs = inputs.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            logits = model(inputs)
            meter.add(criterion(logits, targets), logits, targets)
    progress.close()
    return meter.result()
