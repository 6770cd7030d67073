"""What both benchmarks share: the benchmarked models, their clocks, the machine's load and the JSON results file."""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from codeq.attach import attach_weight_quantizers, latent_weight, quantized_layers
from codeq.models import create_model
from codeq.quantizers import DeadZoneLDZCompander

# The dead-zone quantizer's settings the benchmarks time: 4 bits with a learnable dead zone, the bit-width learnable
# (round(tanh(0.35) * (8 - 2) + 2) = 4 bits to start from) or fixed.
QAT_SETTINGS = {
    "learnable": {"fixed_bit_val": 4, "max_bits": 8, "init_bit_logit": 0.35, "learnable_bit": True,
                  "learnable_deadzone": True},
    "fixed": {"fixed_bit_val": 4, "max_bits": 8, "learnable_bit": False, "learnable_deadzone": True},
}


class PlainDeadZone(DeadZoneLDZCompander):
    """The dead-zone quantizer without its fast path: a subclass does not inherit ``quantize_together``, so every
    step runs the reference, ``forward``, layer by layer (what the fast path is measured against)."""


@dataclass
class BenchModel:
    """A network, its input size and batch, and the layers left FP32 (norms)."""

    build: Callable[[], nn.Module]
    img_size: int
    batch_size: int
    exclude: tuple[str, ...]

    def quantize(self, model: nn.Module, bits: str = "learnable", reference: bool = False) -> nn.Module:
        """``model`` (one of ``build``'s) with a dead-zone quantizer (``QAT_SETTINGS[bits]``) on every layer but the
        excluded ones; with ``reference``, one that always runs the plain ``forward`` (``PlainDeadZone``)."""
        quantizer = PlainDeadZone if reference else DeadZoneLDZCompander
        attach_weight_quantizers(model, self.exclude, quantizer, QAT_SETTINGS[bits])
        return model


def torchvision_resnet18() -> nn.Module:
    from torchvision.models import resnet18

    return resnet18(num_classes=10)


MODELS = {
    "resnet20": BenchModel(lambda: create_model("resnet20", 10, 32), 32, 128, ("bn",)),
    "resnet18": BenchModel(torchvision_resnet18, 224, 32, ("bn", "downsample.1")),
    "vit": BenchModel(lambda: create_model("vit", 10, 224), 224, 32, ("norm",)),
}


def model_names(text: str) -> list[str]:
    """``--models``: comma-separated keys of MODELS, or ``none`` for none (an argparse type)."""
    names = [] if text == "none" else text.split(",")
    unknown = [name for name in names if name not in MODELS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown model {unknown[0]!r}: choose from {', '.join(MODELS)}, or none")
    return names


def latent_weights(model: nn.Module) -> list[torch.Tensor]:
    """The latent weights of every quantized layer of ``model``."""
    return [latent_weight(module) for _, module, _ in quantized_layers(model)]


def synchronizer(device: torch.device) -> Callable[[], None] | None:
    """What waits for ``device``'s queued work (for ``timed``); None where calls return when done (CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "mps":
        return torch.mps.synchronize
    return None

# wall: elapsed time; cpu: CPU time of this process (all its threads), which a busy shared machine inflates less.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(run: Callable[[], object], clock: str, synchronize: Callable[[], None] | None = None) -> float:
    """Seconds ``run`` takes by ``clock`` (a key of CLOCKS); ``synchronize`` (waiting for a GPU's queued work)
    runs before the clock starts and before it stops."""
    now = CLOCKS[clock]
    if synchronize is not None:
        synchronize()
    start = now()
    run()
    if synchronize is not None:
        synchronize()
    return now() - start


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (Linux), else what platform knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def write_results(path: str | Path, results: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    return path
