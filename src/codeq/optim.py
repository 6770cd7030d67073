"""Optimizers and learning-rate schedules: their registries and the builders that apply a config.

Parameters fall into three groups by name (the seed's design): ``*logit_dz*`` -> ``dz``,
``*logit_bit*`` -> ``bit``, the rest -> ``base``; each group has its own lr and weight decay.

A schedule is ``fn(base_lr, epoch, epochs, **kwargs) -> lr``, the learning rate of the epoch
after ``epoch`` completed ones. Being a pure function of the epoch count, it also tells a resumed
run whose ``epochs`` grew what the added epochs' rates are: those of a fresh run that long.
``build_scheduler`` adds the linear warm-up every schedule shares (``warmup_epochs``) and steps
once per epoch.
"""
from __future__ import annotations

import functools
import inspect
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from codeq.errors import ConfigError, RegistrationError
from codeq.registry import Registry

log = logging.getLogger(__name__)

GROUP_MARKERS = {"dz": "logit_dz", "bit": "logit_bit"}
GROUPS = ("base", *GROUP_MARKERS)
# Devices whose fused optimizer kernels update a whole group in one call. On 2 CPU threads ResNet-20's AdamW step
# takes 0.3 ms fused against 1.8 ms in torch's per-parameter loop, where each of the quantizers' 40 scalar
# parameters costs as much as a weight tensor.
FUSED_OPTIMIZER_DEVICES = ("cpu", "cuda")


def check_optimizer(name: str, cls: Any) -> None:
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise RegistrationError("optimizer", name, f"{cls!r} is not a torch.optim.Optimizer class",
                                "register a class that takes (param_groups, **options)")


OPTIMIZER_REGISTRY: Registry[type[torch.optim.Optimizer]] = Registry(
    "optimizer", {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD},
    check=check_optimizer)


def check_schedule(name: str, fn: Any) -> None:
    parameters = list(inspect.signature(fn).parameters) if callable(fn) else []
    if parameters[:3] != ["base_lr", "epoch", "epochs"]:
        raise RegistrationError("lr scheduler", name, "does not take (base_lr, epoch, epochs, **kwargs)",
                                "a schedule is fn(base_lr, epoch, epochs, **kwargs) -> learning rate")


SCHEDULER_REGISTRY: Registry[Callable[..., float]] = Registry("lr scheduler", check=check_schedule)


@SCHEDULER_REGISTRY.register()
def cosine(base_lr: float, epoch: int, epochs: int, eta_min: float = 0.0) -> float:
    """Cosine annealing from ``base_lr`` to ``eta_min`` over ``epochs`` (torch's CosineAnnealingLR, T_max=epochs)."""
    return eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * min(epoch, epochs) / epochs)) / 2


@SCHEDULER_REGISTRY.register()
def step(base_lr: float, epoch: int, epochs: int, step_size: int = 30, gamma: float = 0.1) -> float:
    """``base_lr`` times ``gamma`` after every ``step_size`` epochs (torch's StepLR)."""
    return base_lr * gamma ** (epoch // step_size)


@SCHEDULER_REGISTRY.register()
def multistep(base_lr: float, epoch: int, epochs: int, milestones: Sequence[int] = (), gamma: float = 0.1) -> float:
    """``base_lr`` times ``gamma`` at each epoch in ``milestones`` (torch's MultiStepLR)."""
    return base_lr * gamma ** sum(epoch >= milestone for milestone in milestones)


@SCHEDULER_REGISTRY.register()
def constant(base_lr: float, epoch: int, epochs: int) -> float:
    """``base_lr`` throughout."""
    return base_lr


def warmed_up(schedule: Callable[..., float], base_lr: float, epoch: int, epochs: int, warmup_epochs: int,
              warmup_start_factor: float, **kwargs: Any) -> float:
    """The learning rate after ``epoch`` completed epochs: a linear ramp from ``warmup_start_factor * base_lr`` over
    ``warmup_epochs``, then ``schedule`` over the remaining ``epochs - warmup_epochs``."""
    if epoch < warmup_epochs:
        return base_lr * (warmup_start_factor + (1 - warmup_start_factor) * epoch / warmup_epochs)
    return schedule(base_lr, epoch - warmup_epochs, max(epochs - warmup_epochs, 1), **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, epochs: int, warmup_epochs: int = 0,
                    warmup_start_factor: float = 0.1, **kwargs: Any) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-epoch LambdaLR following ``SCHEDULER_REGISTRY[name]`` for each parameter group (its own base lr).

    Raises:
        ConfigError: unknown schedule name.
    """
    schedule = functools.partial(warmed_up, SCHEDULER_REGISTRY.choose("lr_scheduler.type", name), epochs=epochs,
                                 warmup_epochs=warmup_epochs, warmup_start_factor=warmup_start_factor, **kwargs)

    def factor(base_lr: float) -> Callable[[int], float]:
        return lambda epoch: schedule(base_lr, epoch) / base_lr if base_lr else 0.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [factor(group["lr"]) for group in optimizer.param_groups])


def scheduled_learning_rates(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Set every group's lr to what ``scheduler``'s schedule gives at its epoch count (after loading its state into
    a scheduler built for more epochs: the checkpoint's optimizer holds the shorter schedule's rate)."""
    for group, base_lr, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def group_of(parameter_name: str) -> str:
    """``dz``, ``bit`` or ``base``: the optimizer group a parameter joins by its name."""
    for group, marker in GROUP_MARKERS.items():
        if marker in parameter_name:
            return group
    return "base"


def fused_option(optimizer_cls: type[torch.optim.Optimizer], model: nn.Module) -> dict[str, bool]:
    """``{"fused": True}`` where ``optimizer_cls`` has a fused kernel for the device ``model``'s parameters are on."""
    devices = {parameter.device.type for parameter in model.parameters()}
    fusable = "fused" in inspect.signature(optimizer_cls).parameters and devices <= set(FUSED_OPTIMIZER_DEVICES)
    return {"fused": True} if fusable else {}


def param_groups(model: nn.Module, base: dict[str, Any] | Sequence[dict[str, Any]],
                 dz: dict[str, Any] | None = None, bit: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Parameter groups for any ``torch.optim`` optimizer: the quantizers' ``logit_dz`` in group ``dz``,
    ``logit_bit`` in ``bit``, every other trainable parameter in ``base`` (a config's ``optimizer.param_groups``).

    Every trainable parameter of ``model`` lands in exactly one group. A quantizer group given as None joins
    ``base``; a group given options but without trainable parameters is left out with a warning. Each returned
    group is ``{"params": [...], "name": ..., **options}``.

    Args:
        model: the model after ``prepare`` (its quantizers' logits are parameters then).
        base: the optimizer options of the other parameters (``{"lr": 1e-3, "weight_decay": 5e-4}``), or the
            caller's own groups for them (``[{"params": [...], "weight_decay": 0.01}, ...]``, e.g. a Hugging Face
            or timm split without decay for biases and norms): any ``logit_dz``/``logit_bit`` in them moves to its
            own group, and every trainable parameter of ``model`` must be in one of them.
        dz, bit: the optimizer options of the ``logit_dz`` and ``logit_bit`` parameters, or None. The weight decay
            here is the compression pressure: larger ``dz`` decay, more zeros.

    Returns:
        A list of groups for ``torch.optim.X(groups, ...)``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``base`` is neither options nor a list of groups with
            ``"params"``, or ``dz``/``bit`` is neither options nor None.
        ValueError: a parameter is in two of the caller's groups, or a trainable parameter of ``model`` in none.

    Examples:
        >>> groups = codeq.param_groups(model, base={"lr": 1e-3, "weight_decay": 5e-4},
        ...                             dz={"lr": 1e-3, "weight_decay": 5.0})
        >>> optimizer = torch.optim.AdamW(groups)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"param_groups(model=...) takes an nn.Module, got {type(model).__name__}")
    for argument, options in (("dz", dz), ("bit", bit)):
        if options is not None and not isinstance(options, dict):
            raise TypeError(f"param_groups({argument}={options!r}): give the group's optimizer options as a dict "
                            f"({{'lr': 1e-3, 'weight_decay': 5.0}}) or None")
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    quantizer_options = {"dz": dz, "bit": bit}

    def target(parameter: nn.Parameter) -> str:
        group = group_of(names.get(id(parameter), ""))
        return group if group != "base" and quantizer_options[group] is not None else "base"

    if isinstance(base, dict):
        base_groups = [{"params": trainable, "name": "base", **base}]
    else:
        base_groups = caller_groups(base, trainable, names)
    groups = []
    for group in base_groups:
        params = [parameter for parameter in group["params"] if target(parameter) == "base"]
        if params:
            groups.append({**group, "params": params})
    for group, options in quantizer_options.items():
        params = [parameter for parameter in trainable if target(parameter) == group]
        if options is None:
            joining = sum(group_of(names[id(parameter)]) == group for parameter in trainable)
            if joining:
                log.info("no optimizer group %r configured: its %d parameters join 'base'", group, joining)
            continue
        if not params:
            log.warning("optimizer group %r is configured but the model has no %s parameters that train (no "
                        "quantizer has them, or its learnable flag is off): the group is unused",
                        group, GROUP_MARKERS[group])
            continue
        if options.get("lr") == 0:
            log.warning("optimizer group %r has lr 0: its parameters will not learn", group)
        groups.append({"params": params, "name": group, **options})
    return groups


def caller_groups(groups: Sequence[dict[str, Any]], trainable: list[nn.Parameter],
                  names: dict[int, str]) -> list[dict[str, Any]]:
    """``param_groups``' ``base`` given as the caller's own groups, checked: each a dict with ``params``, no
    parameter twice, every trainable one present. Named ``base`` (``base.N`` for several) unless named already."""
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence):
        got = type(groups).__name__
    else:
        got = next((repr(group)[:80] for group in groups if not (isinstance(group, dict) and "params" in group)), "")
    if got:
        raise TypeError(f"param_groups(base=...) takes optimizer options (a dict, {{'lr': 1e-3}}) or a list of "
                        f"groups, each a dict with 'params'; got {got}")
    seen: set[int] = set()
    checked = []
    for index, group in enumerate(groups):
        params = list(group["params"])
        for parameter in params:
            if id(parameter) in seen:
                raise ValueError(f"param_groups(base=...): parameter {names.get(id(parameter), '?')!r} is in two "
                                 "groups")
            seen.add(id(parameter))
        default = "base" if len(groups) == 1 else f"base.{index}"
        checked.append({**group, "params": params, "name": group.get("name", default)})
    missing = [names[id(parameter)] for parameter in trainable if id(parameter) not in seen]
    if missing:
        raise ValueError(f"param_groups(base=...): {len(missing)} trainable parameters are in none of the groups "
                         f"({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}); add them to a group")
    return checked


def build_optimizer(model: nn.Module, optimizer_type: str, group_options: dict[str, dict[str, Any] | None]
                    ) -> torch.optim.Optimizer:
    """The optimizer ``optimizer_type`` of OPTIMIZER_REGISTRY over ``param_groups(model, **group_options)``.

    Build it after the model is on its device: the optimizer is fused there when torch has the kernel.

    Raises:
        ConfigError: an unknown optimizer, or an option the optimizer does not take.
    """
    optimizer_cls = OPTIMIZER_REGISTRY.choose("optimizer.type", optimizer_type)
    accepted = inspect.signature(optimizer_cls).parameters
    for group, options in group_options.items():
        for option in options or ():
            if option not in accepted:  # torch would keep it in the group and silently ignore it
                raise ConfigError(f"optimizer.param_groups.{group}.{option}", f"{optimizer_type} has no option "
                                  f"{option!r}", "remove it or choose an optimizer type that takes it")
    groups = param_groups(model, group_options.get("base") or {}, group_options.get("dz"), group_options.get("bit"))
    try:
        return optimizer_cls(groups, **fused_option(optimizer_cls, model))
    except (TypeError, ValueError) as error:
        raise ConfigError("optimizer.param_groups", str(error), f"use options that {optimizer_type} takes") from None


# A dz group whose decay alone takes logit_dz below this share of its start within the first epoch collapses the
# dead zone over the whole range (every weight pruned) before the task loss can hold it.
COLLAPSED_SHARE = 0.01
# Steps assumed for the first epoch when its length is not known yet (--dry-run loads no data).
ASSUMED_EPOCH_STEPS = 100


def dead_zone_collapse_steps(optimizer_type: str, options: dict[str, Any] | None) -> tuple[float, int] | None:
    """(shrink per step, steps until ``logit_dz`` decays to COLLAPSED_SHARE of its start) from the ``dz`` group's
    weight decay alone: lr x weight_decay a step for sgd (over 1 - momentum with momentum) and adamw. None for other
    optimizers (adam's coupled decay is rescaled by its normaliser) or a group without decay."""
    if not options or optimizer_type not in ("sgd", "adamw"):
        return None
    shrink = options.get("lr", 0.0) * options.get("weight_decay", 0.0)
    if optimizer_type == "sgd":
        shrink /= 1 - (options.get("momentum") or 0.0)
    if shrink <= 0:
        return None
    steps = 1 if shrink >= 1 else math.ceil(math.log(COLLAPSED_SHARE) / math.log(1 - shrink))
    return shrink, steps


def warn_if_dead_zone_collapses(optimizer_type: str, options: dict[str, Any] | None,
                                epoch_steps: int | None) -> str | None:
    """Log (and return) a warning when the dz group's decay would drive ``logit_dz`` to about 0 within the first
    epoch of ``epoch_steps`` steps (ASSUMED_EPOCH_STEPS when unknown)."""
    collapse = dead_zone_collapse_steps(optimizer_type, options)
    limit = epoch_steps or ASSUMED_EPOCH_STEPS
    if collapse is None or collapse[1] > limit:
        return None
    shrink, steps = collapse
    epoch = f"the first epoch's {epoch_steps} steps" if epoch_steps else f"{ASSUMED_EPOCH_STEPS} steps"
    message = (f"optimizer group 'dz': lr x weight_decay{' / (1 - momentum)' if optimizer_type == 'sgd' else ''} "
               f"shrinks logit_dz by {shrink:.1%} a step, to 1 % of its start after {steps} steps, within {epoch}: "
               f"the dead zone would cover every weight. The usual dz weight_decay values (1-10) assume adamw's "
               f"decoupled decay at lr ~1e-3; lower the dz group's lr or weight_decay")
    log.warning(message)
    return message
