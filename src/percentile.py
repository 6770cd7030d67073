"""The quantizers' robust range: the 99th percentile of |w| with linear interpolation."""
from __future__ import annotations

import math

import torch
from torch import Tensor


@torch.no_grad()
def robust_absmax(weight: Tensor, q: float = 0.99) -> Tensor:
    """q-quantile of |weight| as ``torch.quantile(..., interpolation='linear')`` defines it.

    Unlike ``torch.quantile`` it has no 2^24-element limit. The result carries no gradient.
    """
    magnitudes = weight.detach().abs().flatten()
    position = q * (magnitudes.numel() - 1)
    lower = math.floor(position)
    upper = min(lower + 1, magnitudes.numel() - 1)
    low_value = magnitudes.kthvalue(lower + 1).values
    high_value = magnitudes.kthvalue(upper + 1).values
    return low_value + (position - lower) * (high_value - low_value)
