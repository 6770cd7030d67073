"""The interface every weight quantizer fits, its check, and the generic read-outs used where a quantizer offers none.

A quantizer is an ``nn.Module`` class whose ``__init__`` takes keyword arguments (the config's ``quantizer.kwargs``)
and whose ``forward(weight)`` returns the fake-quantized weight, same shape and dtype. That is all a user must write
(see ``Quantizer``); everything else the project reads from a quantizer is optional, with a generic fallback
(``layer_readout`` and ``nominal_bits`` here, the codebook of ``codeq.export.packed``).
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from codeq.errors import RegistrationError

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
        ``quantize_together(quantizers, weights, absmaxes) -> list[Tensor]`` (classmethod, with
            ``takes_robust_absmax``): many layers' ``forward`` at once, the same values, for the eager training
            step (``weights_quantized_once``); taken only for instances of the class that defines it.
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
