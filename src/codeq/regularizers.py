"""Regularisers added to the task loss, and their registry. Each is ``fn(model, **kwargs) -> Tensor`` (a 0-dim
tensor on the model's device); a config's ``loss_terms`` entry, or a ``LossTerm``, adds
``lambda * fn(model, **kwargs)``.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from codeq.attach import latent_weight
from codeq.errors import RegistrationError
from codeq.registry import Registry


class LossTerm(NamedTuple):
    """One regulariser as ``train`` takes it: the loss adds ``weight * fn(model, **kwargs)``. A plain
    ``(fn, weight, kwargs)`` tuple (the seed's triple) is the same thing.

    Examples:
        >>> term = codeq.LossTerm(codeq.dz_l2, 1e-4, {})
        >>> loss = task_loss + term.weight * term.fn(model, **term.kwargs)
    """

    fn: Callable[..., Tensor]
    weight: float
    kwargs: dict[str, Any]


def check_loss(name: str, fn: Any) -> None:
    parameters = list(inspect.signature(fn).parameters.values()) if callable(fn) else []
    if not parameters or parameters[0].kind not in (parameters[0].POSITIONAL_ONLY, parameters[0].POSITIONAL_OR_KEYWORD):
        raise RegistrationError("loss term", name, "does not take the model as its first argument",
                                "a loss term is fn(model, **kwargs) -> Tensor")


LOSS_REGISTRY: Registry[Callable[..., Tensor]] = Registry("loss term", check=check_loss)


def column_norm_sum(weight: Tensor) -> Tensor:
    """Sum over input columns of each column's L2 norm, for a weight shaped [out, in, ...].

    The gradient of a norm at exactly zero is taken as zero (PyTorch's subgradient choice),
    so a fully pruned column does not produce NaNs.
    """
    matrix = weight.reshape(weight.shape[0], -1)
    return torch.linalg.vector_norm(matrix, ord=2, dim=0).sum()


@LOSS_REGISTRY.register()
def group_lasso(model: nn.Module, lambda_linear: float, lambda_conv: float) -> Tensor:
    """Group lasso (Yuan & Lin, 2006) over the input columns of every Linear and Conv2d, on the latent weights, as
    in structured sparsity learning (Wen et al., 2016): the sum of each column's L2 norm, which drives whole columns
    (an input feature of a Linear, one input position of a convolution's kernel) to zero.

    A Conv2d weight [out, in, kh, kw] is read as [out, in*kh*kw], one group per column. The gradient at a column
    that is exactly zero is taken as zero.

    Args:
        model: any ``nn.Module``, with or without quantizers (the latent weights are penalised).
        lambda_linear: strength for the Linear layers (0 leaves them out).
        lambda_conv: strength for the Conv2d layers (0 leaves them out).

    Returns:
        A 0-dim tensor on the model's device, differentiable: ``lambda_linear * sum over Linear layers +
        lambda_conv * sum over Conv2d layers``; 0 when no layer counts.

    Examples:
        >>> loss = criterion(model(inputs), targets) + codeq.group_lasso(model, lambda_linear=1e-4, lambda_conv=1e-4)
    """
    total = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            strength = lambda_linear
        elif isinstance(module, nn.Conv2d):
            strength = lambda_conv
        else:
            continue
        if strength == 0:
            continue
        term = strength * column_norm_sum(latent_weight(module))
        total = term if total is None else total + term
    if total is None:
        return torch.zeros((), device=next(model.parameters()).device)
    return total


def quantizer_logits(model: nn.Module, name: str) -> list[Tensor]:
    """Every quantizer's trainable parameter ``name`` (``logit_dz`` or ``logit_bit``), in module order."""
    return [parameter for parameter_name, parameter in model.named_parameters()
            if parameter_name.rsplit(".", 1)[-1] == name and parameter.requires_grad]


def logit_l2(model: nn.Module, name: str) -> Tensor:
    """Sum over the quantized layers of their ``name`` logit squared; 0 when no such logit trains."""
    logits = quantizer_logits(model, name)
    if not logits:
        return torch.zeros((), device=next(model.parameters()).device)
    return torch.stack([logit.reshape(()) for logit in logits]).square().sum()


@LOSS_REGISTRY.register()
def dz_l2(model: nn.Module) -> Tensor:
    """Σ_ℓ θ_dz,ℓ², the dead-zone pressure of CoDeQ's objective (arXiv 2512.12981, Eq. 16): with a config's
    ``lambda`` it is the paper's λ_dz Σ θ_dz². Shrinking |θ_dz| widens each layer's dead zone d = 2R(1 - tanh|θ_dz|)
    (Eq. 15), so a larger λ prunes more.

    An L2 term in the loss is weight decay 2λ on the ``dz`` group only with SGD (or Adam's coupled decay); AdamW's
    decoupled decay skips Adam's normalisation, so its numbers are not the paper's λ (docs/paper.md).

    Args:
        model: a model after ``prepare``.

    Returns:
        A 0-dim float32 tensor on the model's device, differentiable in the ``logit_dz`` parameters; 0 when no
        quantizer has a learnable dead zone.

    Examples:
        >>> model = codeq.prepare(torchvision.models.resnet18(), exclude_layers=["type:BatchNorm2d"])
        >>> loss = criterion(model(inputs), targets) + 0.02 * codeq.dz_l2(model) + 0.1 * codeq.bit_l2(model)
    """
    return logit_l2(model, "logit_dz")


@LOSS_REGISTRY.register()
def bit_l2(model: nn.Module) -> Tensor:
    """Σ_ℓ θ_bit,ℓ², the bit-width pressure of CoDeQ's objective with learnable bit-widths (arXiv 2512.12981,
    Eq. 19): with a config's ``lambda`` it is the paper's λ_bit Σ θ_bit². Shrinking |θ_bit| lowers each layer's
    bit-width b = round(tanh|θ_bit|(b_max - b_min) + b_min) (Eq. 18, b_min = 2).

    In a config, the paper's ResNet-20 objective (Sec. 6.1) is
    ``loss_terms: [{name: dz_l2, lambda: 0.01}, {name: bit_l2, lambda: 0.01}]``.

    Args:
        model: a model after ``prepare`` with ``learnable_bit=True`` (CoDeQ's default).

    Returns:
        A 0-dim float32 tensor on the model's device, differentiable in the ``logit_bit`` parameters; 0 when no
        quantizer has a learnable bit-width (fixed 4 bits).

    Examples:
        >>> model = codeq.prepare(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), kwargs={"init_bit_logit": 3.0})
        >>> codeq.bit_l2(model)  # two layers, each 3.0²
        tensor(18., grad_fn=<SumBackward0>)
    """
    return logit_l2(model, "logit_bit")
