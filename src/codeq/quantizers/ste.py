"""Straight-through estimators (STE) and the code range of a signed symmetric quantizer.

Each ``*_ste`` function computes its rounding, clipping or ReLU in the forward pass and passes the gradient through
unchanged in the backward pass (Bengio et al. 2013), as CoDeQ trains its latent weights and logits (arXiv
2512.12981, Sec. 3).
"""
from __future__ import annotations

import torch
from torch import Tensor


def round_ste(x: Tensor) -> Tensor:
    """round() forward (to nearest, ties to even), identity backward."""
    return x + (torch.round(x) - x).detach()


def clamp_ste(x: Tensor, bound: Tensor | float) -> Tensor:
    """clamp(-bound, bound) forward, identity backward."""
    return x + (torch.clamp(x, -bound, bound) - x).detach()


def relu_ste(x: Tensor) -> Tensor:
    """relu() forward, identity backward."""
    return x + (torch.relu(x) - x).detach()


def levels(bits: Tensor | int) -> Tensor | int:
    """Largest integer code Q = 2^(bits-1) - 1 of a symmetric signed quantizer with ``bits`` bits."""
    return 2 ** (bits - 1) - 1
