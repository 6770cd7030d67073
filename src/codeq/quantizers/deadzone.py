"""CoDeQ's learnable dead-zone quantizer (Wenshøj et al., arXiv 2512.12981, Sec. 3)."""
from __future__ import annotations

import inspect
from collections import defaultdict
from collections.abc import Sequence
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


def learned_bits(logit_bit: Tensor, max_bits: int, min_bits: int) -> Tensor:
    """b = round(tanh|logit_bit| (max_bits - min_bits) + min_bits), straight-through; any shape."""
    return round_ste(torch.tanh(logit_bit.abs()) * (max_bits - min_bits) + min_bits)


def dead_zone_and_step(absmax: Tensor, logit_dz: Tensor, bits: Tensor) -> tuple[Tensor, Tensor]:
    """(dead-zone width d, step s) = (2R (1 - tanh|logit_dz|), (R - d/2) / (Q - 1/2) + 1e-8) with Q = 2^(b-1) - 1
    (arXiv 2512.12981, Sec. 3); element-wise, so one layer (0-dim tensors) or many stacked give the same values."""
    deadzone = 2 * absmax * (1 - torch.tanh(logit_dz.abs()))
    return deadzone, (absmax - deadzone / 2) / (levels(bits) - 0.5) + 1e-8


class DeadZoneRound(torch.autograd.Function):
    """The element-wise part of the dead-zone quantizer in one autograd node: what ``DeadZoneLDZCompander.forward``
    computes from the latent weight w, the step s and the offset delta, bit for bit, with its straight-through
    gradients written out instead of recorded op by op (the fast path of ``quantize_together``).

    With m = relu(|w| - delta) / s, c = clip(round(sign(w) m), -Q, Q) and output sign(c) delta + s c, and round, clip
    and relu passing gradients straight through: d out / d w = 1 (0 where w = 0, as abs' gradient),
    d out / d delta = sign(c) - sign(w) (non-zero in the dead zone only), and d out / d s = c - sign(w) m (the
    rounding and clipping residue). Q gets no gradient (it only bounds the clip).
    """

    @staticmethod
    def forward(ctx: Any, weight: Tensor, step: Tensor, offset: Tensor, largest_code: Tensor) -> Tensor:
        sign = torch.sign(weight)
        # relu(|w| - delta) / s, equal to forward's relu before the division since s > 0.
        magnitude = (weight.abs() - offset).div_(step).clamp_min_(0)
        codes = torch.round(magnitude).clamp_max_(largest_code).mul_(sign)
        ctx.save_for_backward(sign, magnitude, codes)
        return torch.sign(codes).mul_(offset).add_(codes * step)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        sign, magnitude, codes = ctx.saved_tensors
        grad_step = (grad * (codes - magnitude * sign)).sum()
        grad_offset = (grad * (torch.sign(codes) - sign)).sum()
        return grad * sign.abs(), grad_step, grad_offset, None


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
        return learned_bits(self.logit_bit, self.max_bits, self.min_bits)

    def step_params(self, absmax: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(bits b, dead-zone width d, step s) for a tensor whose robust absmax is ``absmax`` (0-dim tensors)."""
        bits = self.bit_width()
        return bits, *dead_zone_and_step(absmax, self.logit_dz, bits)

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

    @classmethod
    def quantize_together(cls, quantizers: Sequence[DeadZoneLDZCompander], weights: Sequence[Tensor],
                          absmaxes: Sequence[Tensor]) -> list[Tensor]:
        """``[q(w, absmax) for q, w, absmax in zip(...)]`` for many layers in few operations: the eager fast path
        that ``codeq.attach.weights_quantized_once`` takes once per training step.

        The forward values are ``forward``'s bit for bit, the gradients the same up to float rounding (a test holds
        both to ``forward``, the reference). The scalars (bits, dead zone, step, offset) of all layers with the
        same settings and dtype are computed as vectors (dozens of 0-dim operations a layer cost more than the
        element-wise work on a CPU), and each weight in one autograd node (``DeadZoneRound``).

        Args:
            quantizers: the layers' quantizers (instances of this class).
            weights: their latent weights, any shapes, float dtypes.
            absmaxes: their robust absmaxes (0-dim, as ``robust_absmax`` gives them).

        Returns:
            The fake-quantized weights, each in its weight's shape and dtype.
        """
        outputs: list[Tensor | None] = [None] * len(weights)
        groups: dict[tuple, list[int]] = defaultdict(list)
        latents = [weight if weight.dtype in (torch.float32, torch.float64) else weight.float() for weight in weights]
        for index, (quantizer, latent) in enumerate(zip(quantizers, latents, strict=True)):
            settings = (quantizer.learnable_bit, quantizer.max_bits, quantizer.fixed_bit_val, quantizer.min_bits)
            groups[(*settings, latent.dtype, latent.device)].append(index)
        for (learnable, max_bits, fixed_bits, min_bits, dtype, _), indices in groups.items():
            absmax = torch.stack([absmaxes[index].to(dtype) for index in indices])
            logit_dz = torch.stack([quantizers[index].logit_dz for index in indices])
            if learnable:
                bits = learned_bits(torch.stack([quantizers[index].logit_bit for index in indices]), max_bits, min_bits)
            else:
                bits = absmax.new_full(absmax.shape, float(fixed_bits))
            deadzone, step = dead_zone_and_step(absmax, logit_dz, bits)
            offset = deadzone / 2 - step / 2
            largest = levels(bits).detach()
            for index, s, delta, q in zip(indices, step.unbind(), offset.unbind(), largest.unbind(), strict=True):
                outputs[index] = DeadZoneRound.apply(latents[index], s, delta, q).to(weights[index].dtype)
        return outputs

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
