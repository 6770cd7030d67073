"""``init_from``: weights loaded into a model before its quantizers are attached (train FP32, then compress).

The source is a run directory (its ``last.pt``) or a checkpoint of this tool, FP32 or QAT, or a plain ``state_dict``
file as torchvision and timm save them (``.pt``, ``.pth``, ``.bin`` or ``.safetensors``; also nested under
``state_dict`` or ``model``, and with the ``module.`` prefix DistributedDataParallel adds). A QAT checkpoint gives its
latent weights (``<layer>.parametrizations.weight.original`` -> ``<layer>.weight``); its quantizers' own state is
left out, since the run attaches fresh ones. Keys whose shapes differ from the model's (a classifier for another
number of classes) are skipped with a notice; any other missing or unexpected key is a config error.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from codeq.app.checkpoint import REQUIRED_KEYS, checkpoint_path, load_checkpoint
from codeq.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

LATENT_WEIGHT = ".parametrizations.weight.original"
PARAMETRIZATIONS = ".parametrizations."
NESTING_KEYS = ("state_dict", "model")
DDP_PREFIX = "module."
# BatchNorm's step counter: absent from checkpoints written before torch 0.4.1, and unused unless momentum is None.
OPTIONAL_SUFFIXES = ("num_batches_tracked",)
SHOWN = 5


def listing(keys: list[str]) -> str:
    return ", ".join(keys[:SHOWN]) + (f" ... ({len(keys)} in all)" if len(keys) > SHOWN else "")


def is_tensor_dict(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(item, Tensor) for item in value.values())


def plain_state(path: Path) -> dict[str, Tensor]:
    """The state dict in a file that is not a checkpoint of this tool.

    Raises:
        ConfigError: unreadable, or no name -> tensor mapping in it.
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            content: Any = load_file(str(path), device="cpu")
        else:
            content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the same user error
        # torch's own message for a foreign pickle recommends weights_only=False, which this tool never uses.
        raise ConfigError("init_from", f"{path} is not a torch.save or safetensors file this tool reads "
                          f"({type(error).__name__})", "pass a checkpoint, a run directory or a state_dict saved "
                          "with torch.save") from None
    if isinstance(content, dict) and not is_tensor_dict(content):
        content = next((content[key] for key in NESTING_KEYS if is_tensor_dict(content.get(key))), content)
    if not is_tensor_dict(content):
        raise ConfigError("init_from", f"{path} holds no state_dict (a mapping of names to tensors, at the top or "
                          f"under {' or '.join(NESTING_KEYS)})", "save the model's state_dict() with torch.save")
    if all(key.startswith(DDP_PREFIX) for key in content):
        content = {key.removeprefix(DDP_PREFIX): tensor for key, tensor in content.items()}
    return content


def latent_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A model state of this tool with quantizers attached, as the plain model's state: latent weights under the
    weight's own name, the quantizers' parameters and buffers left out."""
    plain = {}
    for key, tensor in state.items():
        if key.endswith(LATENT_WEIGHT):
            plain[key.removesuffix(LATENT_WEIGHT) + ".weight"] = tensor
        elif PARAMETRIZATIONS not in key:
            plain[key] = tensor
    return plain


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """The plain-model state dict ``init_from`` names (see the module docstring).

    Raises:
        ConfigError: the path does not exist, or holds no usable weights.
    """
    path = checkpoint_path(path)
    if not path.is_file():
        raise ConfigError("init_from", f"{path} does not exist", "pass a checkpoint, a run directory or a state_dict "
                          "file")
    try:
        peek = torch.load(path, map_location="meta", weights_only=True) if path.suffix != ".safetensors" else None
    except Exception:  # noqa: BLE001 - not a torch.save file: plain_state names the problem
        peek = None
    if isinstance(peek, dict) and all(key in peek for key in REQUIRED_KEYS):
        try:
            return latent_state(load_checkpoint(path)["model"])
        except CheckpointError as error:
            raise ConfigError("init_from", str(error), "pass another checkpoint") from None
    return plain_state(path)


def load_initial_weights(model: nn.Module, path: str | Path) -> list[str]:
    """Copy the weights ``path`` holds into ``model`` (no quantizers attached yet); returns the keys skipped because
    their shapes differ, after a notice naming them.

    Raises:
        ConfigError: the file cannot be used, or keys other than those are missing or unexpected.
    """
    theirs = read_weights(path)
    mine = model.state_dict()
    missing = [key for key in mine if key not in theirs and not key.endswith(OPTIONAL_SUFFIXES)]
    unexpected = [key for key in theirs if key not in mine]
    if missing or unexpected:
        detail = "; ".join(f"{label}: {listing(keys)}" for label, keys in (("missing", missing),
                                                                          ("unexpected", unexpected)) if keys)
        raise ConfigError("init_from", f"{path} holds weights of another model ({detail})",
                          "pass weights of this model (only keys of another shape, such as a classifier for another "
                          "number of classes, are skipped)")
    skipped = [key for key in theirs if theirs[key].shape != mine[key].shape]
    if skipped:
        log.warning("init_from: skipped %s (shapes differ: %s); they keep their fresh initialisation", listing(skipped),
                    ", ".join(f"{list(theirs[key].shape)} -> {list(mine[key].shape)}" for key in skipped[:SHOWN]))
    model.load_state_dict({key: tensor for key, tensor in theirs.items() if key not in skipped}, strict=False)
    log.info("init_from: loaded %d tensors from %s", len(theirs) - len(skipped), path)
    return skipped
