"""CoDeQ's learnable dead-zone quantizer (Wenshøj et al., arXiv 2512.12981, Sec. 3)."""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

from codeq.quantizers.percentile import robust_absmax
from codeq.quantizers.ste import clamp_ste, levels, relu_ste, round_ste


def check_nonzero_logit(name: str, value: float, learnable: bool, stuck: str) -> None:
    """A learnable logit that enters through tanh|logit| has gradient exactly 0 at 0 and would never move."""
    if learnable and value == 0:
        raise ValueError(f"{name} 0.0 cannot learn: the gradient of tanh|logit| is exactly 0 there, so it stays at 0 "
                         f"({stuck}); start it away from 0, e.g. 3.0")


class DeadZoneLDZCompander(nn.Module):
    """CoDeQ's learnable dead-zone quantizer (Wenshøj et al., arXiv 2512.12981, Sec. 3).

    For a weight tensor w with robust range R (the 99th percentile of |w|, no gradient), bit-width
    b and Q = 2^(b-1) - 1 levels per sign:

    * b = round(tanh|logit_bit| (max_bits - 2) + 2) when learnable, else ``fixed_bit_val``;
    * dead-zone width d = 2R (1 - tanh|logit_dz|);
    * step s = (R - d/2) / (Q - 1/2) + 1e-8 and offset delta = d/2 - s/2;
    * codes c = clip(round(sign(w) relu(|w| - delta) / s), -Q, Q);
    * output sign(c) delta + s c.

    Weights with |w| <= d/2 become exactly zero: the dead zone prunes. round, clip and relu pass
    gradients straight through, so the latent weights, ``logit_dz`` (through d and s) and
    ``logit_bit`` (through Q) all learn. Half-precision weights are quantized in float32 (their
    gradients underflow otherwise) and returned in their own dtype.

    Args:
        fixed_bit_val: bit-width when ``learnable_bit`` is false (2..max_bits).
        max_bits: largest learnable bit-width (2..8).
        init_bit_logit, init_deadzone_logit: starting logits; 0 is refused for a learnable one (no gradient).
        learnable_bit, learnable_deadzone: whether the logits train.

    Calling it on a weight tensor of any shape returns the fake-quantized weight, same shape and dtype;
    ``prepare`` attaches one to each layer, so it is rarely called by hand.

    Raises:
        ValueError: a bit-width out of range or a learnable logit starting at 0.

    Examples:
        >>> quantizer = codeq.DeadZoneLDZCompander(fixed_bit_val=4, learnable_bit=False)
        >>> weight = torch.randn(64, 32)
        >>> quantized = quantizer(weight)             # [64, 32] float32, at most 2 * 7 + 1 = 15 distinct values
        >>> quantizer.stats(weight)                   # {'bits': 4.0, 'deadzone': d, 'step': s}, in weight units
        >>> codeq.prepare(model, "deadzone", {"fixed_bit_val": 4, "learnable_bit": False})  # the same, per layer
    """

    min_bits = 2
    takes_robust_absmax = True

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
        check_nonzero_logit("init_deadzone_logit", init_deadzone_logit, learnable_deadzone,
                            "a dead zone over the whole robust range: nearly every weight pruned")
        check_nonzero_logit("init_bit_logit", init_bit_logit, learnable_bit, f"the bit-width stuck at {self.min_bits}")
        self.fixed_bit_val = int(fixed_bit_val)
        self.max_bits = int(max_bits)
        self.learnable_bit = bool(learnable_bit)
        self.learnable_deadzone = bool(learnable_deadzone)
        self.logit_dz = nn.Parameter(torch.tensor(float(init_deadzone_logit)), requires_grad=self.learnable_deadzone)
        self.logit_bit = nn.Parameter(torch.tensor(float(init_bit_logit)), requires_grad=self.learnable_bit)

    @classmethod
    def nominal_bits(cls, kwargs: dict[str, Any]) -> int:
        """The bit-width a run's name shows: ``max_bits`` when the bit-width is learned, else ``fixed_bit_val``."""
        defaults = {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()}
        settings = {**defaults, **kwargs}
        return int(settings["max_bits"] if settings["learnable_bit"] else settings["fixed_bit_val"])

    def bit_width(self) -> Tensor:
        """Current bit-width b, a 0-dim float tensor holding an integer (straight-through when learnable)."""
        if not self.learnable_bit:
            return self.logit_bit.detach().new_full((), float(self.fixed_bit_val))
        span = self.max_bits - self.min_bits
        return round_ste(torch.tanh(self.logit_bit.abs()) * span + self.min_bits)

    def step_params(self, absmax: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(bits b, dead-zone width d, step s) for a tensor whose robust absmax is ``absmax`` (0-dim tensors)."""
        bits = self.bit_width()
        deadzone = 2 * absmax * (1 - torch.tanh(self.logit_dz.abs()))
        step = (absmax - deadzone / 2) / (levels(bits) - 0.5) + 1e-8
        return bits, deadzone, step

    def forward(self, weight: Tensor, absmax: Tensor | None = None) -> Tensor:
        """``weight`` fake-quantized (same shape and dtype); ``absmax`` is its robust absmax where the caller
        has it already."""
        latent = weight if weight.dtype in (torch.float32, torch.float64) else weight.float()
        absmax = robust_absmax(latent) if absmax is None else absmax.to(latent.dtype)
        bits, deadzone, step = self.step_params(absmax)
        offset = deadzone / 2 - step / 2
        codes = torch.sign(latent) * relu_ste(latent.abs() - offset) / step
        codes = clamp_ste(round_ste(codes), levels(bits))
        output = torch.sign(codes).detach() * offset + step * codes
        return output.to(weight.dtype)

    @torch.no_grad()
    def grid(self, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(bits, step s, offset delta): ``weight`` quantizes to sign(c) delta + s c, c in [-Q, Q]."""
        bits, deadzone, step = self.step_params(robust_absmax(weight.float()))
        return bits, step, deadzone / 2 - step / 2

    @torch.no_grad()
    def stats(self, weight: Tensor) -> dict[str, float]:
        """Read-outs for reports: bit-width, dead-zone width and step size for ``weight``."""
        bits, deadzone, step = self.step_params(robust_absmax(weight.float()))
        return {"bits": float(bits), "deadzone": float(deadzone), "step": float(step)}

    def extra_repr(self) -> str:
        return (f"max_bits={self.max_bits}, learnable_bit={self.learnable_bit}, "
                f"learnable_deadzone={self.learnable_deadzone}")
