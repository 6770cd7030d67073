"""Conversion: the plain model a compressed one deploys as, with its quantized weights in place of latent ones."""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from codeq.attach import latent_weight, quantizer_of


def compressed_weight(module: nn.Module) -> Tensor:
    """The weight as deployed: quantized by its quantizer (even while fake-quantization is toggled off)."""
    quantizer = quantizer_of(module)
    weight = latent_weight(module)
    return (quantizer(weight) if quantizer is not None else weight).detach()


def inference_state(model: nn.Module) -> dict[str, Tensor]:
    """The state dict of the plain model the compressed one deploys as: quantized weights in place of
    latent ones, no quantizer parameters. It loads into ``create_model(...)`` without quantizers."""
    state = {key: tensor for key, tensor in model.state_dict().items() if "parametrizations." not in key}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            state[f"{name}.weight" if name else "weight"] = compressed_weight(module)
    return state


def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` without parametrizations: each parametrized tensor is a plain Parameter holding its
    latent (unparametrized) value. ``model`` keeps its quantizers.

    Not ``remove_parametrizations`` on a deep copy: the copy shares its injected ``Parametrized*`` class with the
    original, and removal deletes that class's property, which leaves the original without its weight.
    """
    copied = copy.deepcopy(model)
    for module in list(copied.modules()):
        if parametrize.is_parametrized(module):
            latent = {name: parametrization.original for name, parametrization in module.parametrizations.items()}
            module.__class__ = type(module).__bases__[0]
            del module._modules["parametrizations"]
            for name, parameter in latent.items():
                module.register_parameter(name, parameter)
    return copied


@torch.no_grad()
def convert(model: nn.Module) -> nn.Module:
    """A plain copy of ``model``: quantizers removed, each quantized weight replaced by its fake-quantized value.

    The copy computes what ``model`` computes with its quantizers on (for any input, in the same mode), on the
    same device and in the same train/eval mode, and holds no ``logit_dz``/``logit_bit`` parameters; its
    ``state_dict`` loads into the architecture built without quantizers. ``model`` is not changed.

    Args:
        model: an ``nn.Module``, with quantizers attached (``codeq.prepare``) or without (a plain deep copy).

    Returns:
        The converted ``nn.Module``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.

    Examples:
        >>> plain = codeq.convert(model)
        >>> torch.equal(plain(x), model(x))  # in eval mode
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert(model=...) takes an nn.Module, got {type(model).__name__}")
    plain = plain_copy(model)
    plain.load_state_dict(inference_state(model))
    return plain
