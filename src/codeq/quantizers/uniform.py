"""The uniform baseline: a symmetric per-tensor quantizer with max-abs scaling."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from codeq.quantizers.ste import clamp_ste, levels, round_ste


class UniformSymmetric(nn.Module):
    """Symmetric uniform quantizer: scale s = max|w| / Q, output s clip(round(w / s), -Q, Q), straight-through.

    Args:
        bitwidth: bits per weight (2..8); Q = 2^(bitwidth-1) - 1.

    Calling it on a weight tensor of any shape returns the fake-quantized weight, same shape and dtype. No dead
    zone and nothing learnable: the baseline CoDeQ is compared with.

    Raises:
        ValueError: ``bitwidth`` out of range.

    Examples:
        >>> quantized = codeq.UniformSymmetric(bitwidth=4)(torch.randn(64, 32))  # [64, 32], at most 15 values
        >>> codeq.prepare(model, "uniform", {"bitwidth": 4})                      # one per layer
    """

    def __init__(self, bitwidth: int = 8) -> None:
        super().__init__()
        if not 2 <= bitwidth <= 8:
            raise ValueError(f"bitwidth must be in 2..8, got {bitwidth}")
        self.bitwidth = int(bitwidth)

    def scale(self, weight: Tensor) -> Tensor:
        # The clamp keeps an all-zero tensor at zero instead of 0/0.
        return (weight.detach().abs().max() / levels(self.bitwidth)).clamp_min(torch.finfo(weight.dtype).tiny)

    @torch.no_grad()
    def grid(self, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(bits, step s, offset 0): ``weight`` quantizes to s c, c in [-Q, Q]."""
        step = self.scale(weight)
        return step.new_full((), float(self.bitwidth)), step, torch.zeros_like(step)

    def forward(self, weight: Tensor) -> Tensor:
        step = self.scale(weight)
        return step * clamp_ste(round_ste(weight / step), levels(self.bitwidth))

    @torch.no_grad()
    def stats(self, weight: Tensor) -> dict[str, float]:
        return {"bits": float(self.bitwidth), "deadzone": 0.0, "step": float(self.scale(weight))}

    def extra_repr(self) -> str:
        return f"bitwidth={self.bitwidth}"
