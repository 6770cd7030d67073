"""Weight fake-quantizers: the CoDeQ dead-zone compander and a plain uniform baseline.

A quantizer is an ``nn.Module`` mapping a latent weight tensor to its fake-quantized
value (same shape, same dtype). Gradients pass straight through every rounding and
clipping step so the latent weights keep learning; CoDeQ's two scalars ``logit_dz``
and ``logit_bit`` learn through the dead-zone width and the step size.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from src.percentile import robust_absmax


def round_ste(x: Tensor) -> Tensor:
    """round() forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def clamp_ste(x: Tensor, bound: Tensor | float) -> Tensor:
    """clamp(-bound, bound) forward, identity backward."""
    return x + (torch.clamp(x, -bound, bound) - x).detach()


def levels(bits: Tensor | int) -> Tensor | int:
    """Largest integer code Q of a symmetric signed quantizer with ``bits`` bits."""
    return 2 ** (bits - 1) - 1


class DeadZoneQuantize(torch.autograd.Function):
    """The dead-zone compander's elementwise part, fused: ``apply(w, offset, step, max_code)``.

    Forward: codes c = clip(round(sign(w) relu(|w| - offset) / step), -Q, Q) and output
    sign(c) offset + step c, by the same floating-point operations as the straight-through graph
    (``x + (f(x) - x).detach()`` equals ``f(x)`` exactly for round, clip and relu here), so the
    output is bit-identical to it. Backward returns what autograd derives through that graph
    with round, clip and relu passed straight through:

    * weight: ``((g * step) / step) * sign(w) * sign(w)``, the graph's own rounding steps;
    * offset: sum g (sign(c) - sign(w));  step: sum g (c - x) with x the unrounded code;
    * max_code: none (the clip passes gradients straight through).

    Autograd through the graph runs ~18 elementwise ops forward and more backward; this runs 14
    forward and 6 backward and keeps three tensors for backward.
    """

    @staticmethod
    def forward(ctx, weight: Tensor, offset: Tensor, step: Tensor, max_code: Tensor) -> Tensor:
        sign = torch.sign(weight)
        scaled = weight.abs().sub_(offset).relu_().mul_(sign).div_(step)
        codes = torch.round(scaled).clamp_(-max_code, max_code)
        code_sign = torch.sign(codes)
        output = (code_sign * offset).add_(codes * step)
        ctx.save_for_backward(sign, step, codes.sub_(scaled), code_sign.sub_(sign))
        return output

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        sign, step, rounding_error, sign_change = ctx.saved_tensors
        grad_weight = grad_offset = grad_step = None
        if ctx.needs_input_grad[0]:
            grad_weight = (grad * step).div_(step).mul_(sign).mul_(sign)
        if ctx.needs_input_grad[1]:
            grad_offset = (grad * sign_change).sum()
        if ctx.needs_input_grad[2]:
            grad_step = (grad * rounding_error).sum()
        return grad_weight, grad_offset, grad_step, None


class DeadZoneLDZCompander(nn.Module):
    """CoDeQ's learnable dead-zone quantizer (Wenshøj et al., arXiv 2512.12981).

    With R the 99th percentile of |w|, b bits and Q = 2^(b-1) - 1 levels per sign:
    dead-zone width d = 2R(1 - tanh|logit_dz|), step s = (R - d/2)/(Q - 1/2) + 1e-8,
    offset delta = d/2 - s/2, codes w_bar = clip(round(sign(w) relu(|w| - delta)/s), -Q, Q)
    and output sign(w_bar) delta + s w_bar. Weights with |w| <= d/2 become exactly zero.
    """

    min_bits = 2
    bits_kwarg = "fixed_bit_val"

    def __init__(
        self,
        fixed_bit_val: int = 4,
        max_bits: int = 8,
        init_bit_logit: float = 3.0,
        init_deadzone_logit: float = 3.0,
        learnable_bit: bool = True,
        learnable_deadzone: bool = True,
    ) -> None:
        super().__init__()
        if not self.min_bits <= max_bits <= 8:
            raise ValueError(f"max_bits must be in {self.min_bits}..8, got {max_bits}")
        if not self.min_bits <= fixed_bit_val <= max_bits:
            raise ValueError(f"fixed_bit_val must be in {self.min_bits}..max_bits={max_bits}, got {fixed_bit_val}")
        self.fixed_bit_val = int(fixed_bit_val)
        self.max_bits = int(max_bits)
        self.learnable_bit = bool(learnable_bit)
        self.learnable_deadzone = bool(learnable_deadzone)
        self.logit_dz = nn.Parameter(torch.tensor(float(init_deadzone_logit)), requires_grad=self.learnable_deadzone)
        self.logit_bit = nn.Parameter(torch.tensor(float(init_bit_logit)), requires_grad=self.learnable_bit)

    def bit_width(self) -> Tensor:
        """Current bit-width b (a float tensor holding an integer; differentiable via STE when learnable)."""
        if not self.learnable_bit:
            return self.logit_bit.detach().new_full((), float(self.fixed_bit_val))  # a device fill, no host copy
        span = self.max_bits - self.min_bits
        return round_ste(torch.tanh(self.logit_bit.abs()) * span + self.min_bits)

    def step_params(self, absmax: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(bits, dead-zone width d, step s) for a tensor whose robust absmax is ``absmax``."""
        bits = self.bit_width()
        deadzone = 2 * absmax * (1 - torch.tanh(self.logit_dz.abs()))
        step = (absmax - deadzone / 2) / (levels(bits) - 0.5) + 1e-8
        return bits, deadzone, step

    def grid(self, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(bits, step s, offset delta): ``weight`` quantizes to sign(c) delta + s c, c in [-Q, Q]."""
        bits, deadzone, step = self.step_params(robust_absmax(weight))
        return bits, step, deadzone / 2 - step / 2

    def forward(self, weight: Tensor) -> Tensor:
        bits, step, offset = self.grid(weight)
        return DeadZoneQuantize.apply(weight, offset, step, levels(bits))

    @torch.no_grad()
    def stats(self, weight: Tensor) -> dict[str, float]:
        """Read-outs for reporting: bit-width, dead-zone width and step size for ``weight``."""
        bits, deadzone, step = self.step_params(robust_absmax(weight))
        return {"bits": float(bits), "deadzone": float(deadzone), "step": float(step)}

    def extra_repr(self) -> str:
        return (f"max_bits={self.max_bits}, learnable_bit={self.learnable_bit}, "
                f"learnable_deadzone={self.learnable_deadzone}")


class UniformSymmetric(nn.Module):
    """Symmetric uniform quantizer with absmax scale s = max|w|/Q and straight-through rounding."""

    bits_kwarg = "bitwidth"

    def __init__(self, bitwidth: int = 8) -> None:
        super().__init__()
        if not 2 <= bitwidth <= 8:
            raise ValueError(f"bitwidth must be in 2..8, got {bitwidth}")
        self.bitwidth = int(bitwidth)

    def scale(self, weight: Tensor) -> Tensor:
        # The clamp keeps an all-zero tensor at zero instead of 0/0.
        return (weight.detach().abs().max() / levels(self.bitwidth)).clamp_min(torch.finfo(weight.dtype).tiny)

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
