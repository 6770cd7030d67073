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

import torch.nn.functional as F
from torch import Tensor, nn

from src.errors import ConfigError, RegistrationError
from src.model_zoo import resolve_timm, resolve_torchvision, torchvision_model
from src.registry import Registry


def check_model(name: str, builder: Any) -> None:
    parameters = inspect.signature(builder).parameters if callable(builder) else {}
    if not {"num_classes", "img_size"} <= set(parameters):
        raise RegistrationError("model", name, "does not take num_classes and img_size",
                                "a model is fn(num_classes: int, img_size: int) -> nn.Module")


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample spatially and zero-pad the new channels (no parameters)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        extra = out_channels - in_channels
        self.padding = (0, 0, 0, 0, extra // 2, extra - extra // 2)

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, :: self.stride, :: self.stride], self.padding)


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        needs_projection = stride != 1 or in_channels != out_channels
        self.shortcut = PadShortcut(in_channels, out_channels, stride) if needs_projection else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: three stages of n blocks with 16, 32 and 64 channels."""

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, channels = [], 16
        for stage_index, width in enumerate((16, 32, 64)):
            blocks = []
            for block_index in range(blocks_per_stage):
                stride = 2 if stage_index > 0 and block_index == 0 else 1
                blocks.append(BasicBlock(channels, width, stride))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


def cifar_resnet(depth: int, num_classes: int, img_size: int) -> nn.Module:
    # Global average pooling makes the network size-agnostic; below 8 px the stride-2 stages collapse.
    if img_size < 8:
        raise ValueError(f"resnet{depth} needs img_size >= 8, got {img_size}")
    return CifarResNet(depth, num_classes)


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

    Raises:
        ConfigError: no such model; ``pretrained`` for a model without published weights, or whose weights are not
            in the local cache.
        ValueError: the model cannot take ``img_size``.
    """
    builder = MODEL_REGISTRY.choose("model", name)
    if not pretrained:
        return builder(num_classes=num_classes, img_size=img_size)
    if "pretrained" not in inspect.signature(builder).parameters:
        raise ConfigError("pretrained", f"model {name!r} has no published weights",
                          "set pretrained: false, or choose torchvision.<name>, timm.<name>, resnet18 or resnet50")
    return builder(num_classes=num_classes, img_size=img_size, pretrained=True)
