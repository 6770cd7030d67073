"""Model zoo and its registry: CIFAR ResNets (He et al. 2016, option-A shortcuts), timm's ViT-Tiny, an MLP, and
every torchvision classification model and timm model (``torchvision.<name>``, ``timm.<name>``; ``resnet18`` and
``resnet50`` are torchvision's).

A model is ``fn(num_classes: int, img_size: int) -> nn.Module``; ``create_model(name, num_classes,
img_size)`` builds any entry of ``MODEL_REGISTRY``. A builder raises ValueError for an input size
it cannot take (reported as a config error on ``img_size``). A builder that also takes ``pretrained``
can start from published weights (``pretrained: true``).
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial
from typing import Any

from torch import nn

from codeq.errors import ConfigError, RegistrationError
from codeq.models.cifar_resnet import cifar_resnet
from codeq.models.zoo import resolve_timm, resolve_torchvision, torchvision_model
from codeq.registry import Registry


def check_model(name: str, builder: Any) -> None:
    parameters = inspect.signature(builder).parameters if callable(builder) else {}
    if not {"num_classes", "img_size"} <= set(parameters):
        raise RegistrationError("model", name, "does not take num_classes and img_size",
                                "a model is fn(num_classes: int, img_size: int) -> nn.Module")


def vit_tiny(num_classes: int, img_size: int) -> nn.Module:
    import timm  # imported lazily: timm adds a second to start-up and only ViT runs need it

    if img_size % 16:
        raise ValueError(f"vit (patch 16) needs img_size divisible by 16, got {img_size}")
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, img_size=img_size)


def mlp(num_classes: int, img_size: int, hidden: int = 256) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(3 * img_size * img_size, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


MODEL_REGISTRY: Registry[Callable[..., nn.Module]] = Registry("model", {
    **{f"resnet{depth}": partial(cifar_resnet, depth) for depth in (20, 32, 44, 56, 110)},
    "vit": vit_tiny,
    "mlp": mlp,
    **{name: partial(torchvision_model, name) for name in ("resnet18", "resnet50")},
}, check=check_model)
MODEL_REGISTRY.add_family("torchvision", resolve_torchvision)
MODEL_REGISTRY.add_family("timm", resolve_timm)


def create_model(name: str, num_classes: int, img_size: int, pretrained: bool = False) -> nn.Module:
    """Model ``name`` of MODEL_REGISTRY for ``num_classes`` classes and ``img_size`` inputs; ``pretrained``: from
    its published weights.

    Args:
        name: a registered model: ``resnet20`` ... ``resnet110``, ``vit``, ``mlp``, ``resnet18``,
            ``resnet50``, ``torchvision.<name>``, ``timm.<name>`` (extra ``timm``), or one a plugin registered.
        num_classes: outputs of the classifier.
        img_size: the side of the square input images in pixels (inputs ``[N, 3, img_size, img_size]``).
        pretrained: load the published weights from the local torchvision or Hugging Face cache (no download).

    Returns:
        The ``nn.Module``, in train mode, without quantizers (``prepare`` attaches them).

    Raises:
        ConfigError: no such model; ``pretrained`` for a model without published weights, or whose weights are not
            in the local cache.
        ValueError: the model cannot take ``img_size``.

    Examples:
        >>> model = codeq.create_model("resnet20", num_classes=10, img_size=32)
        >>> model(torch.zeros(8, 3, 32, 32)).shape
        torch.Size([8, 10])
    """
    builder = MODEL_REGISTRY.choose("model", name)
    if not pretrained:
        return builder(num_classes=num_classes, img_size=img_size)
    if "pretrained" not in inspect.signature(builder).parameters:
        raise ConfigError("pretrained", f"model {name!r} has no published weights",
                          "set pretrained: false, or choose torchvision.<name>, timm.<name>, resnet18 or resnet50")
    return builder(num_classes=num_classes, img_size=img_size, pretrained=True)
