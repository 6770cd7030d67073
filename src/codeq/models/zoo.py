"""Models of torchvision and timm: ``model: torchvision.<name>`` or ``model: timm.<name>`` in a config.

Published weights (``pretrained: true``) are read from the local cache only, never downloaded: torchvision's from
``$TORCH_HOME/hub/checkpoints`` (``torch.hub.get_dir()``), timm's from the Hugging Face cache (or, for weights timm
also publishes as a URL, torch's). A missing file is one config error naming the file and where to put it.
Loading is the library's own, so its per-model conventions hold (inception's input transform, timm's
position-embedding resampling); a head for another number of classes than the weights' is freshly initialised,
with a notice naming it.
"""
from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from codeq.errors import ConfigError, first_line

log = logging.getLogger(__name__)

# torchvision models built for one input size take it as an argument (224 by default).
TORCHVISION_SIZE_ARGUMENTS: dict[str, Callable[[int], dict[str, Any]]] = {
    "vit_": lambda size: {"image_size": size},
    "maxvit_": lambda size: {"input_size": (size, size)},
}
# Auxiliary classifiers make these return a tuple in training; torchvision removes them the same way when it loads
# their weights without aux_logits.
TORCHVISION_AUX_HEADS = {"googlenet": ("aux1", "aux2"), "inception_v3": ("AuxLogits",)}
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def close_matches(name: str, choices: list[str], library: str, listing: str) -> str:
    """The fix of an unknown-name error: up to three close matches and where the whole list is."""
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(f'{library}.{match}' for match in close)}? " if close else ""
    return f"{hint}{listing} lists all {len(choices)}"


def torch_hub_checkpoint(url: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` keeps the file of ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def check_input_size(name: str, img_size: int, build: Callable[[], nn.Module]) -> None:
    """Run the model ``build`` makes, on the meta device (shapes only, no arithmetic), on one ``img_size`` input.

    Raises:
        ValueError: the model cannot take that input size (reported as a config error on img_size).
    """
    with torch.device("meta"):
        probe = build().eval()
        try:
            probe(torch.empty(1, 3, img_size, img_size))
        except NotImplementedError:  # an operator without a meta kernel: the size cannot be checked here
            return
        except (RuntimeError, ValueError, AssertionError, IndexError) as error:
            raise ValueError(f"{name} cannot take {img_size}x{img_size} inputs ({first_line(error)})") from None


def resolve_torchvision(key: str, name: str) -> Callable[..., nn.Module]:
    """The builder of torchvision classification model ``name``.

    Raises:
        ConfigError: torchvision has no classification model of that name (close matches listed).
    """
    from torchvision import models

    known = models.list_models(module=models)
    if name not in known:
        raise ConfigError(key, f"unknown torchvision classification model {name!r}",
                          close_matches(name, known, "torchvision", "torchvision.models.list_models()"))

    def build(num_classes: int, img_size: int, pretrained: bool = False) -> nn.Module:
        return torchvision_model(name, num_classes, img_size, pretrained)

    build.__name__ = f"torchvision.{name}"
    return build


def torchvision_model(name: str, num_classes: int, img_size: int, pretrained: bool = False) -> nn.Module:
    """torchvision's ``name`` for ``num_classes`` classes at ``img_size``; ``pretrained``: with its default weights
    from the local cache (the head replaced by a fresh one when ``num_classes`` differs from the weights').

    Raises:
        ConfigError: the weights are not in the cache, or cannot be read.
        ValueError: the model cannot take ``img_size``.
    """
    from torchvision import models

    size = next((arguments(img_size) for prefix, arguments in TORCHVISION_SIZE_ARGUMENTS.items()
                 if name.startswith(prefix)), {})
    check_input_size(f"torchvision.{name}", img_size, lambda: models.get_model(name, num_classes=num_classes, **size))
    if not pretrained:
        model = models.get_model(name, num_classes=num_classes, **size)
    else:
        weights = models.get_model_weights(name).DEFAULT
        path = torch_hub_checkpoint(weights.url)
        if not path.is_file():
            raise ConfigError("pretrained", f"torchvision's {name} weights ({weights}) are not in the local cache "
                              f"and are never downloaded here",
                              f"place {path.name} (from {weights.url}) in {path.parent}")
        try:
            model = models.get_model(name, weights=weights, **size)  # reads the cached file: nothing is downloaded
        except (RuntimeError, OSError, EOFError, KeyError) as error:
            raise ConfigError("pretrained", f"cannot read {path} ({first_line(error)})",
                              f"replace it with {weights.url}") from None
        if len(weights.meta["categories"]) != num_classes:
            replace_head(model, models.get_model(name, num_classes=num_classes, **size), f"torchvision's {name}")
    if name in TORCHVISION_AUX_HEADS:
        model.aux_logits = False
        for head in TORCHVISION_AUX_HEADS[name]:
            setattr(model, head, None)
    return model


def replace_head(model: nn.Module, fresh: nn.Module, source: str) -> None:
    """Put ``fresh``'s modules in ``model`` wherever a parameter's shape differs (the classifier for another number
    of classes), with a notice naming them."""
    theirs = dict(fresh.named_parameters())
    owners = sorted({key.rpartition(".")[0] for key, parameter in model.named_parameters()
                     if key in theirs and theirs[key].shape != parameter.shape})
    for owner in owners:
        parent, _, child = owner.rpartition(".")
        setattr(model.get_submodule(parent), child, fresh.get_submodule(owner))
    log.warning("pretrained: %s weights are for another number of classes; %s start%s from a fresh initialisation",
                source, ", ".join(owners), "s" if len(owners) == 1 else "")


def resolve_timm(key: str, name: str) -> Callable[..., nn.Module]:
    """The builder of timm model ``name`` (``arch`` or ``arch.tag``).

    Raises:
        ConfigError: timm has no such model (close matches listed).
    """
    import timm

    if not timm.is_model(name):
        raise ConfigError(key, f"unknown timm model {name!r}", close_matches(name, timm.list_models(), "timm",
                                                                            "timm.list_models()"))

    def build(num_classes: int, img_size: int, pretrained: bool = False) -> nn.Module:
        return timm_model(name, num_classes, img_size, pretrained)

    build.__name__ = f"timm.{name}"
    return build


def timm_cached_weights(config: Any) -> Path | None:
    """The local file of the weights timm's pretrained config ``config`` names: in the Hugging Face cache, else in
    torch's hub cache (weights timm also publishes as a URL); None when neither holds it."""
    from huggingface_hub import constants, try_to_load_from_cache

    if config.hf_hub_id:
        repo, _, revision = config.hf_hub_id.partition("@")
        for filename in (HF_WEIGHT_FILES[0], config.hf_hub_filename or HF_WEIGHT_FILES[1]):
            found = try_to_load_from_cache(repo, filename, cache_dir=constants.HF_HUB_CACHE, revision=revision or None)
            if isinstance(found, str):
                return Path(found)
    if config.url and torch_hub_checkpoint(config.url).is_file():
        return torch_hub_checkpoint(config.url)
    return None


def timm_placement(config: Any) -> str:
    """Where to put timm's weights so that ``timm_cached_weights`` finds them, as the fix of a config error."""
    from huggingface_hub import constants

    places = []
    if config.hf_hub_id:
        repo = config.hf_hub_id.partition("@")[0]
        places.append(f"download {HF_WEIGHT_FILES[0]} of https://huggingface.co/{repo} into the Hugging Face cache "
                      f"{constants.HF_HUB_CACHE} (`huggingface-cli download {repo} {HF_WEIGHT_FILES[0]}` where there "
                      f"is network, then copy models--{repo.replace('/', '--')} there)")
    if config.url:
        path = torch_hub_checkpoint(config.url)
        places.append(f"place {path.name} (from {config.url}) in {path.parent}")
    return " or ".join(places)


def timm_model(name: str, num_classes: int, img_size: int, pretrained: bool = False) -> nn.Module:
    """timm's ``name`` for ``num_classes`` classes at ``img_size`` (passed on to models of a fixed input size);
    ``pretrained``: with its published weights from the local cache.

    Raises:
        ConfigError: no published weights, or they are not in the cache, or cannot be read.
        ValueError: the model cannot take ``img_size``.
    """
    import timm
    from timm.models import get_pretrained_cfg

    config = get_pretrained_cfg(name)
    size = {"img_size": img_size} if config is not None and config.fixed_input_size else {}
    check_input_size(f"timm.{name}", img_size, lambda: timm.create_model(name, num_classes=num_classes, **size))
    if not pretrained:
        return timm.create_model(name, num_classes=num_classes, **size)
    if config is None or not (config.hf_hub_id or config.url):
        raise ConfigError("pretrained", f"timm publishes no weights for {name}", "set pretrained: false")
    path = timm_cached_weights(config)
    if path is None:
        raise ConfigError("pretrained", f"timm's {name} weights are not in the local cache and are never "
                          f"downloaded here", timm_placement(config))
    try:
        # A file source makes timm load exactly this file, with its own key conversions and head handling.
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path), "source": ""},
                                  num_classes=num_classes, **size)
    except (RuntimeError, OSError, EOFError, KeyError) as error:
        raise ConfigError("pretrained", f"cannot read {path} ({first_line(error)})", timm_placement(config)) from None
    if config.num_classes != num_classes:
        log.warning("pretrained: timm's %s weights are for %d classes; %s starts from a fresh initialisation for %d",
                    name, config.num_classes, config.classifier, num_classes)
    return model
