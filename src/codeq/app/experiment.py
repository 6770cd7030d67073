"""Builders that turn a validated config into the objects of a run: device, model, optimizer, schedule, loss terms
and the run's name."""
from __future__ import annotations

import logging
import random
import re

import numpy as np
import torch
from torch import nn

from codeq.app.config import TrainConfig, config_to_dict, render_run_name
from codeq.app.init_weights import load_initial_weights
from codeq.attach import attach_weight_quantizers, excluded
from codeq.errors import ConfigError
from codeq.models import create_model
from codeq.optim import GROUPS, build_optimizer, build_scheduler
from codeq.quantizers import QUANTIZER_REGISTRY
from codeq.quantizers.base import nominal_bits
from codeq.regularizers import LOSS_REGISTRY, LossTerm

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """Parse and check a device name before anything is built.

    Raises:
        ConfigError: an unknown device name, or one this machine does not have.
    """
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", name):
        raise ConfigError("device", f"unknown device {name!r}", "use cpu, cuda, cuda:N or mps")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device", "CUDA is not available on this machine",
                              "run with --device cpu (or mps on a Mac)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError("device", f"{name} does not exist ({torch.cuda.device_count()} GPUs)",
                              "pick an existing GPU index")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device", "MPS is not available on this machine", "run with --device cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_name(config: TrainConfig, world_size: int = 1) -> str:
    """The config's ``run_name`` template rendered (``render_run_name``), else
    ``<model>_<quantizer><bits>b_e<epochs>_lr<lr>`` (``<model>_baseline_...``
    without a quantizer; no ``<bits>b`` for a quantizer that names no bit-width), then ``_<metric><value>`` for a
    compression target. A multi-process run appends ``_gb<global batch>`` (batch_size is per process), so different
    global batches never share a directory."""
    if config.run_name is not None:
        return render_run_name(config.run_name, config_to_dict(config))
    lr = f"{config.optimizer.param_groups.base.lr:g}"
    if config.quantizer is None:
        scheme = "baseline"
    else:
        bits = nominal_bits(QUANTIZER_REGISTRY[config.quantizer.name], config.quantizer.kwargs)
        scheme = config.quantizer.name + (f"{bits}b" if bits is not None else "")
    target = f"_{config.target.metric}{config.target.value:g}" if config.target is not None else ""
    global_batch = f"_gb{config.batch_size * world_size}" if world_size > 1 else ""
    return f"{config.model}_{scheme}_e{config.epochs}_lr{lr}{target}{global_batch}"


def build_model(config: TrainConfig, num_classes: int, initialize: bool = True) -> tuple[nn.Module, list[str]]:
    """The model with its quantizers attached; returns it and the quantized layer names. With ``initialize`` its
    weights come from ``pretrained`` and ``init_from`` (loaded before the quantizers are attached); without, they are
    left as built, for a checkpoint's weights to be loaded.

    Raises:
        ConfigError: an unknown model, an input size it cannot take, weights ``pretrained`` or ``init_from`` cannot
            supply, or a bad ``re:`` pattern in exclude_layers.
    """
    try:
        model = create_model(config.model, num_classes=num_classes, img_size=config.img_size,
                             pretrained=config.pretrained and initialize)
    except ConfigError:
        raise
    except ValueError as error:  # the model builders reject input sizes they cannot take
        raise ConfigError("img_size", str(error), f"choose an img_size that {config.model} accepts") from None
    if initialize and config.init_from is not None:
        load_initial_weights(model, config.init_from)
    if config.quantizer is None:
        return model, []
    spec = config.quantizer
    try:
        attached = attach_weight_quantizers(model, spec.exclude_layers, QUANTIZER_REGISTRY[spec.name], spec.kwargs)
    except re.error as error:
        raise ConfigError("quantizer.exclude_layers", f"invalid regular expression ({error})",
                          "fix the pattern after `re:`") from None
    modules = list(model.named_modules())
    for pattern in spec.exclude_layers:
        if not any(excluded(name, [pattern], module) for name, module in modules):
            log.warning("exclude_layers entry %r matches no module of %s", pattern, config.model)
    return model, attached


def optimizer_for(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """``build_optimizer`` with the config's type and parameter groups."""
    groups = config.optimizer.param_groups
    options = {group: (getattr(groups, group).optimizer_options() if getattr(groups, group) else None)
               for group in GROUPS}
    return build_optimizer(model, config.optimizer.type, options)


def scheduler_for(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """``build_scheduler`` with the config's schedule over ``epochs``."""
    schedule = config.lr_scheduler
    return build_scheduler(optimizer, schedule.type, config.epochs, schedule.warmup_epochs,
                           schedule.warmup_start_factor, **schedule.schedule_kwargs())


def build_loss_terms(config: TrainConfig) -> list[LossTerm]:
    return [LossTerm(LOSS_REGISTRY[term.name], term.weight, term.kwargs) for term in config.loss_terms]
