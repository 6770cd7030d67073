"""Regularisers added to the task loss, and their registry. Each is ``fn(model, **kwargs) -> Tensor`` (a 0-dim
tensor on the model's device); a config's ``loss_terms`` entry adds ``lambda * fn(model, **kwargs)``.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from src.errors import RegistrationError
from src.registry import Registry
from src.utils_quantization import latent_weight


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
    """Group lasso over input columns of every Linear and Conv2d, on the latent weights.

    A Conv2d weight [out, in, kh, kw] is read as [out, in*kh*kw], one group per column.
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
