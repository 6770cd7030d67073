"""Weight quantizers: the interface every quantizer fits, its registry, and CoDeQ's dead-zone quantizer.

A quantizer is an ``nn.Module`` class whose ``__init__`` takes keyword arguments (the config's
``quantizer.kwargs``) and whose ``forward(weight)`` returns the fake-quantized weight, same shape
and dtype. That is all a user must write (see ``Quantizer``); everything else the project reads
from a quantizer is optional, with a generic fallback (``layer_readout`` and ``nominal_bits`` here,
the codebook of ``src.export``). ``QUANTIZER_REGISTRY`` checks each class when it is added.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from src.errors import RegistrationError
from src.percentile import robust_absmax
from src.registry import Registry
from src.utils_quantization import UniformSymmetric, clamp_ste, levels, relu_ste, round_ste

# __init__ argument names the run name reads the bit-width from when a quantizer does not say (nominal_bits).
BIT_WIDTH_NAMES = ("bits", "bitwidth", "bit_width", "num_bits", "n_bits", "nbits")


@runtime_checkable
class Quantizer(Protocol):
    """The interface of a weight quantizer class (an ``nn.Module``; one instance per quantized layer).

    Required:
        ``__init__(**kwargs)``: the config's ``quantizer.kwargs``; may raise ValueError or TypeError
            for bad values (shown as a config error naming the key).
        ``forward(weight: Tensor) -> Tensor``: the fake-quantized weight, same shape and dtype;
            gradients reach ``weight`` (straight-through) and the quantizer's own parameters.

    Optional, each with a fallback:
        ``stats(weight) -> {"bits": float, "deadzone": float, "step": float}`` for reports; fallback:
            bits = ceil(log2(number of distinct values)) of the quantized weight, no dead zone or step.
        ``grid(weight) -> (bits, step, offset)``, 0-dim tensors such that the quantized weight is
            ``sign(c) * offset + step * c`` with integer codes ``|c| <= 2^(bits-1) - 1``, for the packed
            and ONNX exports; fallback: a codebook of the distinct values.
        ``nominal_bits(kwargs) -> int | None`` (classmethod): the bit-width the run name shows;
            fallback: the value (or default) of an ``__init__`` argument named as in BIT_WIDTH_NAMES.
        ``takes_robust_absmax = True``: ``forward(weight, absmax)`` accepts the weight's robust absmax
            precomputed for all layers at once (``percentiles_selected_together``).
    """

    def forward(self, weight: Tensor) -> Tensor: ...


def check_quantizer(name: str, cls: Any) -> None:
    """Raises RegistrationError unless ``cls`` is an nn.Module class with its own ``forward`` whose ``__init__``
    takes its arguments by keyword."""
    fix = "a quantizer is an nn.Module class with __init__(self, **kwargs) and forward(self, weight)"
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise RegistrationError("quantizer", name, f"{cls!r} is not an nn.Module class", fix)
    if cls.forward is nn.Module.forward:
        raise RegistrationError("quantizer", name, f"{cls.__name__} defines no forward(weight)", fix)
    positional = [p.name for p in inspect.signature(cls.__init__).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL) and p.name != "self"]
    if positional:
        raise RegistrationError("quantizer", name, f"{cls.__name__}.__init__ takes {', '.join(positional)} "
                                "positionally only, but config kwargs are passed by keyword", fix)


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

    Raises:
        ValueError: a bit-width out of range or a learnable logit starting at 0.
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


QUANTIZER_REGISTRY: Registry[type[nn.Module]] = Registry(
    "quantizer", {"uniform": UniformSymmetric, "deadzone": DeadZoneLDZCompander}, check=check_quantizer)


def nominal_bits(cls: type[nn.Module], kwargs: dict[str, Any]) -> int | None:
    """The bit-width the run name shows for ``cls(**kwargs)`` (``Quantizer.nominal_bits`` or its fallback);
    None when the quantizer names none."""
    if hasattr(cls, "nominal_bits"):
        return cls.nominal_bits(kwargs)
    parameters = inspect.signature(cls.__init__).parameters
    for name in BIT_WIDTH_NAMES:
        if name in kwargs:
            return int(kwargs[name])
        if name in parameters and parameters[name].default is not inspect.Parameter.empty:
            return int(parameters[name].default)
    return None


def distinct_value_bits(quantized: Tensor) -> float:
    """ceil(log2(number of distinct values)) of a tensor, at least 1: the bits an index into its values needs."""
    return float(max(1, math.ceil(math.log2(max(2, torch.unique(quantized).numel())))))


@torch.no_grad()
def layer_readout(quantizer: nn.Module, latent: Tensor, quantized: Tensor) -> dict[str, float | None]:
    """Bit-width, dead-zone width and step of one quantized layer for reports: ``quantizer.stats(latent)`` where the
    quantizer has it, else the bits of its distinct values (``distinct_value_bits``) and no dead zone or step."""
    if hasattr(quantizer, "stats"):
        readout = quantizer.stats(latent)
        return {"bits": float(readout["bits"]), "deadzone": readout.get("deadzone"), "step": readout.get("step")}
    return {"bits": distinct_value_bits(quantized), "deadzone": None, "step": None}
