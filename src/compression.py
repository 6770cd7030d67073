"""Compression read-outs of a quantized model: per-layer bit-width, dead zone, step and sparsity."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from src.utils_quantization import quantized_layers


@dataclass
class LayerStats:
    name: str
    bits: float
    deadzone: float
    step: float
    numel: int
    nonzero: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero / max(self.numel, 1)


@torch.no_grad()
def layer_stats(model: nn.Module) -> list[LayerStats]:
    """One entry per quantized layer, measured on its current fake-quantized weight."""
    stats = []
    for name, module, parametrization in quantized_layers(model):
        latent = module.parametrizations.weight.original
        quantized = parametrization.quantizer(latent)
        readout = parametrization.quantizer.stats(latent)
        stats.append(LayerStats(name, readout["bits"], readout["deadzone"], readout["step"],
                                quantized.numel(), int(torch.count_nonzero(quantized))))
    return stats


def summary(stats: list[LayerStats]) -> dict[str, float]:
    """Global sparsity (share of all quantized weights that are zero), mean layer sparsity and bit-width."""
    if not stats:
        return {}
    total = sum(s.numel for s in stats)
    return {
        "sparsity": 1.0 - sum(s.nonzero for s in stats) / total,
        "mean_layer_sparsity": sum(s.sparsity for s in stats) / len(stats),
        "mean_bits": sum(s.bits for s in stats) / len(stats),
    }


def as_rows(stats: list[LayerStats]) -> list[dict]:
    return [{**asdict(s), "sparsity": s.sparsity} for s in stats]
