"""Quantization building blocks: straight-through estimators, the uniform baseline quantizer, and
attaching weight quantizers to a model as ``torch.nn.utils.parametrize`` parametrizations.

After attachment ``module.weight`` is the fake-quantized weight, recomputed from the latent
weight ``module.parametrizations.weight.original`` on access; the quantizer's own parameters
(``...parametrizations.weight.0.quantizer.logit_dz``) are ordinary model parameters.
"""
from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from src.percentile import robust_absmaxes

log = logging.getLogger(__name__)
# exclude_layers entries starting with this are regular expressions matched against the whole module name.
REGEX_PREFIX = "re:"


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


class UniformSymmetric(nn.Module):
    """Symmetric uniform quantizer: scale s = max|w| / Q, output s clip(round(w / s), -Q, Q), straight-through.

    Args:
        bitwidth: bits per weight (2..8); Q = 2^(bitwidth-1) - 1.

    Raises:
        ValueError: ``bitwidth`` out of range.
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


def excluded(name: str, exclude_layers: Sequence[str]) -> bool:
    """Whether module ``name`` stays FP32: an entry is a substring of it, or an entry ``re:PATTERN`` matches
    all of it (``re:^(conv1|fc)$`` keeps the first and last layer of a ResNet in FP32)."""
    for pattern in exclude_layers:
        if pattern.startswith(REGEX_PREFIX):
            if re.fullmatch(pattern[len(REGEX_PREFIX):], name):
                return True
        elif pattern in name:
            return True
    return False


class FakeQuantParametrization(nn.Module):
    """Parametrization that replaces a weight by ``quantizer(weight)`` while enabled."""

    def __init__(self, quantizer: nn.Module, enabled: bool = True) -> None:
        super().__init__()
        self.quantizer = quantizer
        self.enabled = enabled
        # The weight's robust_absmax while percentiles_selected_together holds it (absmax_given), selected with the
        # other layers'. A buffer written in place, not a new tensor each step: a compiled graph reads module
        # tensors as static inputs, and CUDA graphs re-record for every new address (~80 ms a ResNet-20 step on
        # an H200, against ~2.5 ms). Not persistent: it is no state of the model. Made on first use, in the
        # percentile's dtype.
        self.register_buffer("absmax", None, persistent=False)
        self.absmax_given = False

    def forward(self, weight: Tensor) -> Tensor:
        if not self.enabled:
            return weight
        return self.quantizer(weight, self.absmax) if self.absmax_given else self.quantizer(weight)


def owns_weight(module: nn.Module) -> bool:
    """True when ``module`` itself holds a ``weight`` Parameter (or already a quantized one)."""
    return parametrize.is_parametrized(module, "weight") or isinstance(module._parameters.get("weight"), nn.Parameter)


def attach_weight_quantizers(
    model: nn.Module,
    exclude_layers: Sequence[str],
    quantizer: type[nn.Module],
    quantizer_kwargs: dict[str, Any],
    enabled: bool = True,
) -> list[str]:
    """Give every module owning a ``weight`` Parameter its own ``quantizer(**quantizer_kwargs)``.

    A module is skipped when any string of ``exclude_layers`` is a substring of its name, or when an
    entry ``re:PATTERN`` matches its whole name (``excluded``). Returns the names of the quantized modules.

    Raises:
        re.error: an ``re:`` entry is not a valid regular expression.
    """
    attached, skipped = [], []
    for name, module in model.named_modules():
        if not owns_weight(module) or parametrize.is_parametrized(module, "weight"):
            continue
        if excluded(name, exclude_layers):
            skipped.append(name)
            continue
        # The quantizer's own parameters live where the weight does, also when the model was moved first.
        parametrization = FakeQuantParametrization(quantizer(**quantizer_kwargs), enabled).to(module.weight.device)
        parametrize.register_parametrization(module, "weight", parametrization)
        attached.append(name)
    log.info("quantized %d layers with %s: %s", len(attached), quantizer.__name__, ", ".join(attached))
    if skipped:
        log.info("left %d layers in FP32 (exclude_layers): %s", len(skipped), ", ".join(skipped))
    return attached


def fake_quantization(module: nn.Module) -> FakeQuantParametrization | None:
    """The fake-quantizer parametrization on ``module``'s weight, or None."""
    if parametrize.is_parametrized(module, "weight"):
        for parametrization in module.parametrizations.weight:
            if isinstance(parametrization, FakeQuantParametrization):
                return parametrization
    return None


def quantizer_of(module: nn.Module) -> nn.Module | None:
    """The weight quantizer attached to ``module``, or None."""
    parametrization = fake_quantization(module)
    return parametrization.quantizer if parametrization is not None else None


def quantized_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, FakeQuantParametrization]]:
    """(name, module, parametrization) for every module whose weight carries a fake-quantizer."""
    for name, module in model.named_modules():
        parametrization = fake_quantization(module)
        if parametrization is not None:
            yield name, module, parametrization


def latent_weight(module: nn.Module) -> Tensor:
    """The trainable weight of ``module``: the unquantized original when a quantizer is attached."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def toggle_quantization(model: nn.Module, enabled: bool) -> None:
    """Switch every attached fake-quantizer on or off (off: layers see their latent weights)."""
    for _, _, parametrization in quantized_layers(model):
        parametrization.enabled = enabled


@contextlib.contextmanager
def percentiles_selected_together(model: nn.Module) -> Iterator[list[nn.Module]]:
    """Inside the block, each quantizer that takes a robust absmax gets its weight's from one
    ``robust_absmaxes`` call for the whole model, made on entry: one ``topk`` for many layers on a GPU
    instead of one each, also for a compiled model, whose graph then reads them as inputs. Yields the
    model's quantized modules.

    The latent weights must not change inside the block (train's covers the forward, not the
    optimizer step). Only where the quantizer sees the latent weight itself (no other
    parametrization before it).
    """
    layers = [(module, parametrization) for _, module, parametrization in quantized_layers(model)]
    given = [(module, parametrization) for module, parametrization in layers
             if parametrization.enabled and getattr(parametrization.quantizer, "takes_robust_absmax", False)
             and len(module.parametrizations.weight) == 1]
    try:
        if given:
            absmaxes = robust_absmaxes([latent_weight(module) for module, _ in given])
            for (_, parametrization), absmax in zip(given, absmaxes, strict=True):
                held = parametrization.absmax
                if held is None or held.dtype != absmax.dtype or held.device != absmax.device:
                    parametrization.absmax = torch.empty_like(absmax)
            with torch.no_grad():
                torch._foreach_copy_([parametrization.absmax for _, parametrization in given], absmaxes)
            for _, parametrization in given:
                parametrization.absmax_given = True
        yield [module for module, _ in layers]
    finally:
        for _, parametrization in given:
            parametrization.absmax_given = False


@contextlib.contextmanager
def weights_quantized_once(model: nn.Module) -> Iterator[None]:
    """Computes every fake-quantized weight of ``model`` up front and serves ``module.weight`` from
    ``parametrize.cached()`` inside the block: once per training step, or once per validation pass.

    Up front rather than at each layer's turn, so that the layers' own kernels run back to back: on
    a 2-core CPU, ResNet-20's training forward took ~5 ms more with its quantizers interleaved with
    the convolutions than with the same quantizers run first (docs/benchmarks.md). Their robust
    absmaxes are selected together (``percentiles_selected_together``).
    """
    with parametrize.cached():
        with percentiles_selected_together(model) as layers:
            for module in layers:
                module.weight  # noqa: B018 (the access fills the cache)
        yield
