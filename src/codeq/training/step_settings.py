"""How a training or validation step runs on its device: autocast precision, memory format, compilation.

``StepSettings`` carries the config keys ``amp`` and ``channels_last`` into ``train`` and
``validate``. Autocast covers the forward pass and the criterion only: the latent weights, the
fake-quantizers (their percentile and rounding run in FP32 whatever the autocast dtype, since
autocast leaves elementwise and selection ops alone), the loss terms and the optimizer stay FP32.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class StepSettings:
    """Autocast dtype (``amp``: bf16, fp16 or None), the fp16 GradScaler, and channels-last batches."""

    def __init__(self, device: torch.device | str, amp: str | None = None, channels_last: bool = False) -> None:
        if amp is not None and amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {', '.join(AMP_DTYPES)} or None, got {amp!r}")
        self.device = torch.device(device)
        self.amp = amp
        self.channels_last = channels_last
        # fp16's narrow exponent underflows small gradients; bf16 has FP32's range and needs no scaling.
        self.scaler = torch.amp.GradScaler(self.device.type) if amp == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AMP_DTYPES[self.amp])

    def inputs(self, batch: Tensor) -> Tensor:
        """``batch`` on the device, channels-last when asked for and it is an image batch."""
        batch = batch.to(self.device, non_blocking=True)
        if self.channels_last and batch.dim() == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    def backward_and_step(self, loss: Tensor, optimizer: torch.optim.Optimizer) -> None:
        """``loss.backward()`` and ``optimizer.step()``, through the GradScaler under fp16."""
        if self.scaler is None:
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)  # skipped when the scaled gradients overflowed
        self.scaler.update()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Convert 4-D parameters (latent conv weights included) to channels-last when asked for."""
        return model.to(memory_format=torch.channels_last) if self.channels_last else model
