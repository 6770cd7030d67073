"""A run's compression budget, the config's ``target`` section: the ``codeq.budget.BudgetController`` built from
it, the check before training, what the dry run, the progress line and the end of the run say about it."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from codeq.app.checkpoint import LAST_CHECKPOINT
from codeq.app.report import example_input
from codeq.budget import BudgetController, BudgetError, tolerance_text, value_text
from codeq.errors import ConfigError, RunFailure

# A final validation accuracy at most this many times chance (1 / classes) counts as collapsed.
CHANCE_FACTOR = 1.5


def build_budget(setup: Any, total_steps: int, example: Tensor | None = None,
                 sync: Callable[[float], float] | None = None) -> BudgetController | None:
    """The controller of ``setup``'s config ``target`` over ``total_steps`` optimizer steps, pressing on its
    optimizer groups and loss terms (None without a target). ``example``: one input, for the MACs of ``rel_bops``.

    Raises:
        ConfigError: a target the run cannot steer or compute (no quantizer, no dead-zone pressure, no MACs for
            ``rel_bops``), or one beyond what the quantizers can give.
    """
    target = setup.config.target
    if target is None:
        return None
    report = setup.config.report
    try:
        return BudgetController(
            setup.model, total_steps, setup.optimizer, setup.loss_terms, **{target.metric: target.value},
            example_input=example_input(setup.resolved) if example is None else example, ramp=target.ramp,
            interval=target.interval, proportional_gain=target.proportional_gain,
            integral_gain=target.integral_gain, max_factor=target.max_factor, horizon=target.horizon,
            activation_bits=report.activation_bits, fp_weight_bits=report.fp_weight_bits, sync=sync)
    except BudgetError as error:
        raise ConfigError(f"target.{target.metric}", error.problem, error.fix) from None


def describe_budget(budget: BudgetController | None) -> list[str]:
    """The dry run's lines about the target: what, how it ramps, the pressures and the reachable range."""
    if budget is None:
        return []
    metric = budget.metric
    pressures = ", ".join(f"{name} {value:g}" for name, value in budget.pressure_values().items())
    return [f"target:     {metric} {value_text(metric, budget.final)} (final model within "
            f"{tolerance_text(metric, budget.final)}), ramped from {value_text(metric, budget.start)} over the first "
            f"{budget.ramp:.0%} of the steps (cubic), then held",
            f"  pressure: {pressures}, scaled together within /{budget.max_factor:g}..x{budget.max_factor:g}; with "
            f"every pressed logit at 0 the model has {metric} {value_text(metric, budget.limit)}"]


def budget_text(record: dict[str, float], budget: BudgetController | None) -> str:
    """The progress line's part: `` target sparsity 0.8500 dz.weight_decay 4.21``."""
    if budget is None:
        return ""
    metric = budget.metric
    pressures = "".join(f" {name} {value:.4g}" for name, value in budget.pressure_values().items())
    achieved = "" if metric == "sparsity" else f" {metric} {value_text(metric, record[metric])}"
    return f"{achieved} target {metric} {value_text(metric, record[f'target/{metric}'])}{pressures}"


def check_outcome(budget: BudgetController | None, val_acc: float | None, num_classes: int, run_dir: Path,
                  epoch: int) -> None:
    """The end of a targeted run: raises RunFailure (one line: what happened, the run directory and its last
    checkpoint) when the final model misses the budget or reached it only with validation accuracy ``val_acc`` (of
    the last epoch; None: none ran) at chance."""
    if budget is None:
        return
    where = f"run directory {run_dir}, last checkpoint {run_dir / LAST_CHECKPOINT} (epoch {epoch})"
    missed = budget.verdict()
    if missed is not None:
        raise RunFailure(f"{missed}; {where}")
    chance = 1 / num_classes
    if val_acc is not None and val_acc <= CHANCE_FACTOR * chance:
        raise RunFailure(f"target {budget.metric} {value_text(budget.metric, budget.final)} was reached only by "
                         f"collapsing accuracy: the final val_acc {val_acc:.4f} is at chance ({chance:.4f} for "
                         f"{num_classes} classes); {where}; lower the target or train longer")
