"""One epoch of training, one pass of validation, and the BatchNorm re-estimation between them."""
from __future__ import annotations

import contextlib
import functools
import logging
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from codeq.attach import quantization_for
from codeq.bn import batch_inputs, has_batch_norm, recalibrate_bn
from codeq.data.loaders import statistics_batches
from codeq.errors import NonFiniteLossError
from codeq.regularizers import LossTerm, check_loss_value
from codeq.training.distributed import (
    all_reduce_sum,
    average_batch_norm_statistics,
    is_main_process,
    rank,
    sync_buffers,
    world_size,
)
from codeq.training.step_settings import StepSettings

log = logging.getLogger(__name__)


@dataclass
class EpochState:
    """How far an epoch has got: optimizer steps done and the running sums behind its loss and
    accuracy (over every process). A checkpoint written mid-epoch keeps it, so the resumed epoch
    reports exactly what an uninterrupted one would."""

    step: int = 0
    loss_sum: float = 0.0
    correct: float = 0.0
    count: int = 0
    # The loss's parts: ``task_loss`` (the criterion) and ``loss_<name>`` (each weighted loss term).
    part_sums: dict[str, float] = field(default_factory=dict)


class Progress:
    """A tqdm bar on a terminal; plain periodic log lines otherwise (Slurm logs, CI).

    Both show the images per second the loop gets from its loader and the share of the time it spent waiting for
    them (near 0 % when the loader keeps up; high when it is the bottleneck). Items are ``(inputs, targets)``
    batches; the images are counted from ``targets``.
    """

    def __init__(self, iterable: Iterable, total: int, desc: str, log_interval: int = 50) -> None:
        self.total, self.desc, self.log_interval = total, desc, log_interval
        self.interactive = sys.stdout.isatty() and is_main_process()
        self.images, self.waited = 0, 0.0
        if self.interactive:
            from tqdm import tqdm

            self.iterable = tqdm(self.timed(iterable), total=total, desc=desc, leave=False, dynamic_ncols=True)
        else:
            self.iterable = self.timed(iterable)
        self.start = time.perf_counter()

    def timed(self, iterable: Iterable) -> Iterator:
        """``iterable``'s batches, counting their images and the time spent waiting for each."""
        iterator = iter(iterable)
        while True:
            asked = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.waited += time.perf_counter() - asked
            self.images += len(batch[1])
            yield batch

    def __iter__(self):
        return iter(self.iterable)

    def throughput(self) -> str:
        """``<images per second> img/s, <share> waiting for data`` since the start."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return f"{self.images / elapsed:.0f} img/s, {self.waited / elapsed:.0%} waiting for data"

    def update(self, step: int, **values: float) -> None:
        text = " ".join(f"{k}={v:.4g}" for k, v in values.items())
        if self.interactive:
            self.iterable.set_postfix_str(f"{text} {self.throughput()}", refresh=False)
        elif step % self.log_interval == 0 or step == self.total:
            rate = step / max(time.perf_counter() - self.start, 1e-9)
            log.info("%s step %d/%d %s (%.1f it/s, %s)", self.desc, step, self.total, text, rate, self.throughput())

    def close(self) -> None:
        if self.interactive:
            self.iterable.close()


class RunningMean:
    """Sample-weighted running averages of loss, its parts and accuracy, kept on the device (no per-step sync)."""

    def __init__(self, device: torch.device, start: EpochState | None = None) -> None:
        start = start or EpochState()
        self.device = device
        self.loss_sum = torch.tensor(start.loss_sum, device=device, dtype=torch.float64)
        self.correct = torch.tensor(start.correct, device=device, dtype=torch.float64)
        self.part_sums = {name: torch.tensor(value, device=device, dtype=torch.float64)
                          for name, value in start.part_sums.items()}
        self.count = start.count

    def add(self, loss: Tensor, logits: Tensor, targets: Tensor, parts: dict[str, Tensor] | None = None) -> None:
        batch = targets.shape[0]
        self.loss_sum += loss.detach().double() * batch
        self.correct += (logits.detach().argmax(dim=1) == targets).sum()
        for name, value in (parts or {}).items():
            total = self.part_sums.setdefault(name, torch.zeros((), device=self.device, dtype=torch.float64))
            total += value.detach().double() * batch
        self.count += batch

    def totals(self) -> EpochState:
        """The sums over every process (``step`` left 0)."""
        names = sorted(self.part_sums)
        totals = torch.stack([self.loss_sum, self.correct, self.loss_sum.new_tensor(self.count),
                              *(self.part_sums[name] for name in names)])
        loss_sum, correct, count, *parts = all_reduce_sum(totals).tolist()
        return EpochState(0, loss_sum, correct, int(count), dict(zip(names, parts)))

    def result(self) -> dict[str, float]:
        """Averages over the samples of every process: ``loss``, ``acc`` and each part of the loss."""
        totals = self.totals()
        count = max(totals.count, 1)
        return {"loss": totals.loss_sum / count, "acc": totals.correct / count,
                **{name: value / count for name, value in totals.part_sums.items()}}


def raise_if_nonfinite(losses: Tensor, epoch: int, first_step: int) -> None:
    """``losses`` holds the per-step losses of steps ``first_step, first_step + 1, ...``."""
    bad = torch.nonzero(~torch.isfinite(losses))
    if len(bad):
        index = int(bad[0])
        raise NonFiniteLossError(epoch, first_step + index, float(losses[index]))


def train(
    train_loader: Iterable,
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    device: torch.device | str,
    loss_fns: Sequence[LossTerm] | None = None,
    log_interval: int = 50,
    state: EpochState | None = None,
    stop: Callable[[int], bool] | None = None,
    step_settings: StepSettings | None = None,
    after_step: Callable[[], object] | None = None,
) -> dict[str, float]:
    """Train ``model`` for one epoch; the loss is ``criterion(output, target) + sum(weight * fn(model, **kwargs))``
    over the ``(fn, weight, kwargs)`` triples of ``loss_fns``. Each term's value is checked at the first step
    (``codeq.regularizers.check_loss_value``): anything but a number or a one-element tensor raises LossTermError,
    and a constant (a number, a tensor no gradient connects to a parameter) is warned about once.

    Returns the sample-averaged total ``loss`` and training accuracy ``acc``; with loss terms also
    ``task_loss`` (the criterion's part) and ``loss_<fn name>`` (each weighted term). A ``state`` with
    ``step > 0`` continues an interrupted epoch (``train_loader`` then yields only the batches
    after that step) and is updated in place on return; ``stop(step)`` is asked after every step
    and ends the epoch early when true; ``after_step()`` is called after every optimizer step, before ``stop`` (a
    budget controller adjusting the compression pressure). A NaN or infinite loss raises NonFiniteLossError, checked
    wherever the loss is read anyway (progress lines) and at the end. ``step_settings`` sets
    autocast and channels-last batches (default: FP32, as the batches come).
    """
    model.train()
    device = torch.device(device)
    step_settings = step_settings or StepSettings(device)
    state = state if state is not None else EpochState()
    first_step = state.step + 1
    meter = RunningMean(device, state)
    losses = torch.zeros(len(train_loader), device=device)
    progress = Progress(train_loader, state.step + len(train_loader), f"epoch {epoch} train", log_interval)
    step = state.step
    quantization = functools.partial(quantization_for(model), model)
    for step, (inputs, targets) in enumerate(progress, start=first_step):
        inputs = step_settings.inputs(inputs)
        targets = targets.to(device, non_blocking=True)
        with step_settings.autocast(), quantization():
            logits = model(inputs)
            loss = criterion(logits, targets)
        parts = {"task_loss": loss} if loss_fns else {}
        for index, (fn, weight, kwargs) in enumerate(loss_fns or ()):
            fn_name = getattr(fn, "__name__", type(fn).__name__)
            value = fn(model, **kwargs)
            if step == first_step:
                check_loss_value(fn_name, value)
            if not isinstance(value, Tensor):  # a number, warned about above
                value = torch.tensor(float(value), device=device)
            term = weight * value
            loss = loss + term
            name = f"loss_{fn_name}"
            parts[name if name not in parts else f"{name}_{index}"] = term
        optimizer.zero_grad(set_to_none=True)
        step_settings.backward_and_step(loss, optimizer)
        meter.add(loss, logits, targets, parts)
        losses[step - first_step] = loss.detach()
        if after_step is not None:
            after_step()
        if progress.interactive or step % log_interval == 0 or step == progress.total:
            raise_if_nonfinite(losses[: step - first_step + 1], epoch, first_step)
            progress.update(step, loss=loss.item(), **{name: value.item() for name, value in parts.items()})
        if stop is not None and stop(step):
            break
    progress.close()
    raise_if_nonfinite(losses[: step - first_step + 1], epoch, first_step)
    sync_buffers(model)
    totals = meter.totals()
    state.step, state.loss_sum, state.correct, state.count, state.part_sums = (
        step, totals.loss_sum, totals.correct, totals.count, totals.part_sums)
    return meter.result()


@torch.no_grad()
def validate(
    val_loader: Iterable, model: nn.Module, criterion: nn.Module, device: torch.device | str, log_interval: int = 50,
    step_settings: StepSettings | None = None,
) -> dict[str, float]:
    """Loss and accuracy over ``val_loader``; the quantizers' percentiles are selected once for the pass, and an
    eager model's fake-quantized weights computed once (``codeq.attach.quantized_step``)."""
    model.eval()
    device = torch.device(device)
    step_settings = step_settings or StepSettings(device)
    meter = RunningMean(device)
    progress = Progress(val_loader, len(val_loader), "validate", log_interval)
    with quantization_for(model)(model):
        for inputs, targets in progress:
            inputs = step_settings.inputs(inputs)
            targets = targets.to(device, non_blocking=True)
            with step_settings.autocast():
                logits = model(inputs)
                loss = criterion(logits, targets)
            meter.add(loss, logits, targets)
    progress.close()
    return meter.result()


@contextlib.contextmanager
def generators_untouched(device: torch.device) -> Iterator[None]:
    """Python's, numpy's and torch's global generators (CPU and ``device``'s) are as they were after the block."""
    python, numpy_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy_state)


def recalibrate(model: nn.Module, train_loader: Iterable, batches: int, batch_size: int, seed: int, epoch: int,
                step_settings: StepSettings) -> int:
    """Re-estimate ``model``'s BatchNorm statistics with its quantized weights (``codeq.recalibrate_bn``) on
    ``batches`` training batches of its own (``codeq.data.loaders.statistics_batches``), prepared as training
    prepares them (``step_settings``: channels-last, autocast).

    It changes nothing else a run depends on: no parameter, no generator (the batches draw from their own, and
    augmentation that draws from the global ones is undone), not the training order. With several processes each
    uses its own batches and all end with the mean of their statistics. ``model`` is the unwrapped eager module.

    Returns:
        The batches used per process; 0 for a model without BatchNorm (nothing runs).
    """
    if not has_batch_norm(model):
        return 0
    loader = statistics_batches(train_loader, batches, batch_size, seed, epoch, rank(), world_size())
    with generators_untouched(step_settings.device), step_settings.autocast():
        used = recalibrate_bn(model, (step_settings.inputs(batch_inputs(batch)) for batch in loader), batches)
    average_batch_norm_statistics(model)
    return used
