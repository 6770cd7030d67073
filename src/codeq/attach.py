"""Attaching weight quantizers to a model as ``torch.nn.utils.parametrize`` parametrizations, and quantizing its
weights once per step.

After attachment ``module.weight`` is the fake-quantized weight, recomputed from the latent
weight ``module.parametrizations.weight.original`` on access; the quantizer's own parameters
(``...parametrizations.weight.0.quantizer.logit_dz``) are ordinary model parameters.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from codeq.quantizers.percentile import robust_absmaxes

log = logging.getLogger(__name__)
# exclude_layers entries starting with these are a regular expression matched against the whole module name, or
# the name of the module's class (or of a class it derives from).
REGEX_PREFIX, TYPE_PREFIX = "re:", "type:"
# Normalisation layers own a weight but scale activations rather than combine them: quantizing it is rarely meant.
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def excluded(name: str, exclude_layers: Sequence[str], module: nn.Module | None = None) -> bool:
    """Whether module ``name`` stays FP32: an entry is a substring of its name, an entry ``re:PATTERN`` matches
    all of the name (``re:^(conv1|fc)$`` keeps the first and last layer of a ResNet in FP32), or an entry
    ``type:CLASS`` names ``module``'s class or a class it derives from (``type:BatchNorm2d``, ``type:LayerNorm``).

    Raises:
        re.error: an ``re:`` entry is not a valid regular expression.
    """
    for pattern in exclude_layers:
        if pattern.startswith(REGEX_PREFIX):
            if re.fullmatch(pattern[len(REGEX_PREFIX):], name):
                return True
        elif pattern.startswith(TYPE_PREFIX):
            if module is not None and pattern[len(TYPE_PREFIX):] in {cls.__name__ for cls in type(module).__mro__}:
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
        # The quantized weight when weights_quantized_once computed it with the other layers' (quantize_together).
        self.output: Tensor | None = None

    def forward(self, weight: Tensor) -> Tensor:
        if not self.enabled:
            return weight
        if self.output is not None:
            return self.output
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

    A module is skipped when an entry of ``exclude_layers`` matches it (``excluded``: a substring of its name,
    ``re:PATTERN``, ``type:CLASS``); an entry that matches no such module (a typo) gets a warning. Quantized
    normalisation layers (BatchNorm, LayerNorm, GroupNorm, RMSNorm) get a warning naming them and the ``type:``
    entries that would exclude them. Returns the names of the quantized modules.

    Raises:
        re.error: an ``re:`` entry is not a valid regular expression.
    """
    attached, skipped = [], []
    for name, module in model.named_modules():
        if not owns_weight(module) or parametrize.is_parametrized(module, "weight"):
            continue
        if excluded(name, exclude_layers, module):
            skipped.append(name)
            continue
        # The quantizer's own parameters live where the weight does, also when the model was moved first.
        parametrization = FakeQuantParametrization(quantizer(**quantizer_kwargs), enabled).to(module.weight.device)
        parametrize.register_parametrization(module, "weight", parametrization)
        attached.append(name)
    log.info("quantized %d layers with %s: %s", len(attached), quantizer.__name__, ", ".join(attached))
    if skipped:
        log.info("left %d layers in FP32 (exclude_layers): %s", len(skipped), ", ".join(skipped))
    unmatched = [entry for entry in exclude_layers
                 if not any(excluded(name, [entry], model.get_submodule(name)) for name in skipped)]
    if unmatched:
        warnings.warn(f"exclude_layers {unmatched} match no layer that owns a weight, so they exclude nothing; "
                      "entries are a substring of a layer's name, 're:PATTERN' or 'type:CLASS' "
                      "(see model.named_modules())", UserWarning, stacklevel=user_stacklevel())
    warn_about_quantized_norms(model, attached)
    return attached


def warn_about_quantized_norms(model: nn.Module, attached: Sequence[str]) -> None:
    """One warning naming the normalisation layers among ``attached`` and the entries that would exclude them."""
    norms: dict[str, list[str]] = {}
    for name in attached:
        module = model.get_submodule(name)
        if isinstance(module, NORM_LAYERS):
            norms.setdefault(type(module).__bases__[0].__name__, []).append(name)
    if not norms:
        return
    names = [name for group in norms.values() for name in group]
    shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    entries = ", ".join(f"'{TYPE_PREFIX}{kind}'" for kind in norms)
    warnings.warn(f"quantizing {len(names)} normalisation layer{'s' if len(names) > 1 else ''} ({shown}): their "
                  f"weights scale activations and are rarely quantized; exclude them with exclude_layers "
                  f"[{entries}]", UserWarning, stacklevel=user_stacklevel())


def user_stacklevel() -> int:
    """``warnings.warn``'s stacklevel, called from the function that warns, of the innermost frame outside the codeq
    package: the warning then names the user's line (``codeq.prepare(...)``), whichever codeq functions lie between."""
    package = str(Path(__file__).parent) + os.sep
    level, frame = 1, inspect.currentframe().f_back
    while frame is not None and frame.f_code.co_filename.startswith(package):
        level, frame = level + 1, frame.f_back
    return level


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
    """Switch every attached fake-quantizer of ``model`` on or off, in place (off: each layer computes with its
    latent FP32 weight, as if no quantizer were attached; the quantizers and their parameters stay).

    Args:
        model: a model after ``prepare`` (a model without quantizers is left as it is).
        enabled: True to quantize, False to run the latent weights.

    Examples:
        >>> codeq.toggle_quantization(model, False)  # the FP32 model the latent weights make
        >>> fp32_accuracy = evaluate(model)
        >>> codeq.toggle_quantization(model, True)
    """
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
    absmaxes are selected together (``percentiles_selected_together``), and the layers whose quantizer class
    offers ``quantize_together`` (the dead-zone quantizer does) are quantized together by it: the same values
    as each quantizer's ``forward``, in far fewer operations (docs/benchmarks.md).
    """
    with parametrize.cached():
        with percentiles_selected_together(model) as layers:
            together = quantized_together(layers)
            try:
                for module in layers:
                    module.weight  # noqa: B018 (the access fills the cache)
            finally:
                for parametrization in together:
                    parametrization.output = None
        yield


def quantized_together(modules: Sequence[nn.Module]) -> list[FakeQuantParametrization]:
    """Give each parametrization whose quantizer's class defines ``quantize_together`` itself (a subclass may
    change what ``forward`` computes) and has its robust absmax (``percentiles_selected_together``) its output,
    computed with the other layers of its class; returns them."""
    by_class: dict[type, list[tuple[nn.Module, FakeQuantParametrization]]] = {}
    for module in modules:
        parametrization = fake_quantization(module)
        if parametrization.absmax_given and "quantize_together" in vars(type(parametrization.quantizer)):
            by_class.setdefault(type(parametrization.quantizer), []).append((module, parametrization))
    done = []
    for cls, members in by_class.items():
        outputs = cls.quantize_together([p.quantizer for _, p in members],
                                        [latent_weight(module) for module, _ in members],
                                        [p.absmax for _, p in members])
        for (_, parametrization), output in zip(members, outputs, strict=True):
            parametrization.output = output
            done.append(parametrization)
    return done


def is_compiled(model: nn.Module) -> bool:
    """True when ``model`` is, or wraps (as DistributedDataParallel does), what ``torch.compile`` returns."""
    return any(isinstance(module, torch._dynamo.eval_frame.OptimizedModule) for module in model.modules())


def quantization_for(model: nn.Module) -> Callable[[nn.Module], contextlib.AbstractContextManager]:
    """How ``quantized_step`` quantizes ``model``: ``percentiles_selected_together`` for a compiled model,
    ``weights_quantized_once`` for an eager one (a loop asks once, then enters it every step)."""
    return percentiles_selected_together if is_compiled(model) else weights_quantized_once


def quantized_step(model: nn.Module) -> contextlib.AbstractContextManager:
    """The block one training step's forward (or a whole validation pass) of ``model`` runs in: each weight is
    quantized once in it, however many times the forward reads it.

    An eager model computes all its fake-quantized weights on entry (``weights_quantized_once``); a compiled one
    (``torch.compile``, also under DDP) quantizes inside its graph, fused with the rest, from percentiles selected
    for all layers on entry (``percentiles_selected_together``): on an H200 its validation batches cost 1.47x
    FP32 with the weights quantized by eager GPU ops up front, and 1.13x in an earlier version that quantized them
    in the graph (docs/benchmarks.md). The caller need not know which: both give the same weights.

    Put the forward and the loss inside the block and the optimizer step after it; the latent weights must not
    change inside. A model without quantizers runs as it would without the block.

    Args:
        model: the model, with quantizers attached by ``prepare`` (or a compiled or DDP-wrapped one).

    Returns:
        A context manager.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.

    Examples:
        >>> with codeq.quantized_step(model):
        ...     loss = criterion(model(inputs), targets)
        >>> loss.backward(); optimizer.step()
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantized_step(model=...) takes an nn.Module, got {type(model).__name__}")
    return quantization_for(model)(model)


def prepare(model: nn.Module, name: str = "deadzone", kwargs: dict[str, Any] | None = None,
            exclude_layers: Sequence[str] = ()) -> nn.Module:
    """Attach a weight quantizer to every layer of ``model`` that owns a weight, in place, and return ``model``.

    The words and meaning are those of a config's ``quantizer:`` section. Each layer gets its own quantizer
    ``QUANTIZER_REGISTRY[name](**kwargs)`` as a ``torch.nn.utils.parametrize`` parametrization: ``layer.weight``
    becomes the fake-quantized weight (same shape and dtype), computed from the latent FP32 weight
    ``layer.parametrizations.weight.original``; the quantizer's parameters (``logit_dz``, ``logit_bit``) become
    model parameters (see ``param_groups``). Build the optimizer after ``prepare``.

    Args:
        model: any ``nn.Module``; its layers may already be on their device.
        name: a registered quantizer: ``"deadzone"`` (CoDeQ, ``DeadZoneLDZCompander``), ``"uniform"``
            (``UniformSymmetric``) or one a plugin registered.
        kwargs: keyword arguments of the quantizer class. CoDeQ's defaults: ``fixed_bit_val=4, max_bits=8,
            init_bit_logit=3.0, init_deadzone_logit=3.0, learnable_bit=True, learnable_deadzone=True``; note that
            ``learnable_bit`` is on by default, so ``{"fixed_bit_val": 4}`` alone learns bit-widths up to 8 bits:
            pass ``learnable_bit=False`` for fixed 4-bit weights.
        exclude_layers: layers that stay FP32: a substring of the layer's name (``"bn"``), ``"re:PATTERN"``
            matched against the whole name (``"re:^(conv1|fc)$"``), or ``"type:CLASS"`` naming the layer's class
            or a base class (``"type:BatchNorm2d"``, ``"type:LayerNorm"``). Quantized normalisation layers get a
            warning naming them.

    Returns:
        ``model`` itself, with quantizers attached.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``name`` not a string (settings go in ``kwargs``), or
            ``exclude_layers`` is a string rather than a list.
        ValueError: an unknown ``name``, ``kwargs`` the quantizer does not take or refuses (a bit-width out of
            range), a bad ``re:`` pattern, or a model that already has quantizers.

    Examples:
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> codeq.prepare(model, "deadzone", {"fixed_bit_val": 4, "learnable_bit": False},
        ...               exclude_layers=["type:BatchNorm2d"])
        >>> optimizer = torch.optim.AdamW(codeq.param_groups(model, base={"lr": 1e-3},
        ...                                                  dz={"lr": 1e-3, "weight_decay": 5.0}))
    """
    from codeq.quantizers import QUANTIZER_REGISTRY

    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare(model=...) takes an nn.Module, got {type(model).__name__}")
    if isinstance(exclude_layers, str) or not all(isinstance(entry, str) for entry in exclude_layers):
        raise TypeError(f"prepare(exclude_layers=...) takes a list of strings, got {exclude_layers!r}")
    if not isinstance(name, str):
        raise TypeError(f"prepare(name=...) takes a quantizer's name such as 'deadzone', got {type(name).__name__}; "
                        "pass its settings as kwargs={...}")
    if name not in QUANTIZER_REGISTRY:
        raise ValueError(f"prepare(name={name!r}): unknown quantizer; choose one of "
                         f"{', '.join(QUANTIZER_REGISTRY)} (or register your own in QUANTIZER_REGISTRY)")
    if any(True for _ in quantized_layers(model)):
        raise ValueError("prepare(model=...): the model already has quantizers attached")
    quantizer_cls, kwargs = QUANTIZER_REGISTRY[name], dict(kwargs or {})
    try:
        quantizer_cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"prepare(kwargs={kwargs!r}): {quantizer_cls.__name__} refuses them ({error})") from None
    try:
        attach_weight_quantizers(model, list(exclude_layers), quantizer_cls, kwargs)
    except re.error as error:
        raise ValueError(f"prepare(exclude_layers=...): an re: entry is not a valid regular expression ({error})"
                         ) from None
    return model
