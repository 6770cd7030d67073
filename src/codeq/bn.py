"""BatchNorm statistics that match the quantized weights they normalise.

During quantization-aware training the running mean and variance of a BatchNorm layer average activations over many
steps, while the dead zone changes the quantized weights (and so those activations) every step: the statistics lag
the weights that are evaluated, and a network can score near chance in eval mode while it trains near 100 %.
Re-estimating them with the final quantized weights, on a few training batches in train mode without gradients, as
a cumulative average, removes the lag.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from codeq.attach import quantized_step

BATCH_NORMS = nn.modules.batchnorm._BatchNorm


def has_batch_norm(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm layer that tracks running statistics."""
    return any(isinstance(module, BATCH_NORMS) and module.track_running_stats for module in model.modules())


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Iterable, batches: int = 5) -> int:
    """Re-estimate every BatchNorm layer's running mean and variance with ``model``'s current (quantized) weights.

    The statistics are reset, then ``batches`` batches of ``loader`` run forward in train mode, without gradients
    and with each weight quantized once (``quantized_step``), and each layer keeps the cumulative average over them
    (``momentum=None``). Momentum and the train/eval mode of every module are restored after. Nothing else changes:
    no parameter, no quantizer, no optimizer state. Layers without running statistics are left alone.

    Args:
        model: the model, with or without quantizers, on its device.
        loader: batches of training data: each item a tensor ``[N, ...]`` or a tuple/list whose first element is
            one (``(inputs, targets)`` as a DataLoader yields them); moved to the model's device.
        batches: how many batches to use (at least 1); fewer when ``loader`` runs out first.

    Returns:
        The number of batches used (0 when ``model`` has no BatchNorm layer, which then is not run).

    Raises:
        ValueError: ``batches`` is below 1, or ``loader`` yields no batch.
        TypeError: ``model`` is not an ``nn.Module``, ``loader`` is a tensor rather than batches of one, or a batch
            is neither a tensor nor a tuple/list starting with one.

    Examples:
        >>> codeq.recalibrate_bn(model, train_loader, batches=5)
        5
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"recalibrate_bn(model=...) takes an nn.Module, got {type(model).__name__}")
    if isinstance(loader, Tensor):  # iterating it would give single items without their batch dimension
        raise TypeError("recalibrate_bn(loader=...) takes batches (a DataLoader, a list of [N, ...] tensors), got one "
                        "tensor: pass [inputs]")
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ValueError(f"recalibrate_bn(batches={batches!r}): use at least 1 batch")
    norms = [module for module in model.modules() if isinstance(module, BATCH_NORMS) and module.track_running_stats]
    if not norms:
        return 0
    modes = {module: module.training for module in model.modules()}
    momenta = {module: module.momentum for module in norms}
    device = next(model.parameters()).device
    used = 0
    try:
        for module in norms:
            module.reset_running_stats()
            module.momentum = None  # a cumulative average over the batches below
        model.train()
        with quantized_step(model):
            for batch in loader:
                model(batch_inputs(batch).to(device, non_blocking=True))
                used += 1
                if used == batches:
                    break
    finally:
        for module, training in modes.items():
            module.train(training)
        for module, momentum in momenta.items():
            module.momentum = momentum
    if not used:
        raise ValueError("recalibrate_bn(loader=...): the loader yielded no batch")
    return used


def batch_inputs(batch: object) -> Tensor:
    """The inputs of a batch: the batch itself, or the first element of a tuple or list."""
    inputs = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if not isinstance(inputs, Tensor):
        raise TypeError(f"recalibrate_bn(loader=...): a batch must be a tensor or a tuple/list starting with one, "
                        f"got {type(batch).__name__}")
    return inputs
