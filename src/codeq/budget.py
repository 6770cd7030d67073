"""Compression budgets: a target sparsity, Rel. BOPs or model size reached in one run, by adjusting the compression
pressure while the model trains (docs/budget.md has the method, its equations and sources, and measurements).

CoDeQ steers compression with its pressure on the quantizers' logits: the weight decay of the ``dz`` optimizer group
or the paper's λ_dz Σθ_dz² loss term (arXiv 2512.12981, Eq. 16), and with learnable bit-widths their ``bit``
counterparts (Eq. 19). A ``BudgetController`` scales all of them by one factor ``exp(u)`` and moves ``u`` with a
proportional-integral update on the log of the compression error, looking a little ahead and halving its gains at
each overshoot, while the target itself ramps from the model's starting value to the budget along gradual magnitude
pruning's cubic schedule (Zhu & Gupta 2017).
"""
from __future__ import annotations

import math
from collections.abc import Callable, MutableSequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from codeq.attach import quantized_layers
from codeq.compression import BopsSettings, count_macs, layer_stats, model_size, quantized_weight_bytes, summary
from codeq.regularizers import LossTerm, bit_l2, dz_l2, quantizer_logits

METRICS = ("sparsity", "rel_bops", "size_bytes")
# How close the final model must land: sparsity absolutely, Rel. BOPs and size relative to the target.
TOLERANCE = {"sparsity": 0.01, "rel_bops": 0.05, "size_bytes": 0.05}
RELATIVE_TOLERANCE = ("rel_bops", "size_bytes")
# Defaults: the share of training the target ramps over, the control updates per run, the proportional-integral
# gains and the range of the pressure factor (docs/budget.md: chosen on digits with ResNet-20 and an MLP, fixed and
# learnable bit-widths, AdamW and SGD, decay and loss-term pressure).
RAMP = 0.5
UPDATES = 1000
PROPORTIONAL_GAIN = 5.0
INTEGRAL_GAIN = 300.0
MAX_FACTOR = 1000.0
HORIZON = 0.05
DEAD_BAND = 0.02
GAIN_CUT = 0.5
GAIN_RECOVERY = 1.05
# A pressure is never raised so far that it alone shrinks a logit by more than this share in one step: AdamW's
# decoupled decay (and SGD's) multiplies a logit by (1 - lr x weight_decay), which flips its sign beyond 1.
MAX_SHRINK = 0.05
# Costs (1 - sparsity, Rel. BOPs, bytes) are compared in log space; this keeps the log of a cost of 0 finite.
COST_FLOOR = 1e-6
# A logit where tanh is 1 in float32: no dead zone, the widest bit-width.
OPEN_LOGIT = 20.0


class BudgetError(ValueError):
    """A target that cannot be controlled: ``problem`` says why, ``fix`` what to change."""

    def __init__(self, problem: str, fix: str) -> None:
        self.problem, self.fix = problem, fix
        super().__init__(f"{problem}; {fix}")


def cost(metric: str, value: float) -> float:
    """What the pressure pushes down: the density ``1 - sparsity``, the Rel. BOPs, the bytes."""
    return 1.0 - value if metric == "sparsity" else value


def within_tolerance(metric: str, value: float, target: float) -> bool:
    """Whether ``value`` meets ``target``: sparsity within ±0.01, Rel. BOPs and size within ±5 % of the target."""
    allowed = TOLERANCE[metric] * (target if metric in RELATIVE_TOLERANCE else 1.0)
    return abs(value - target) <= allowed + 1e-12


def tolerance_text(metric: str, target: float) -> str:
    """The allowed range of a final value, e.g. ``0.89..0.91``."""
    allowed = TOLERANCE[metric] * (target if metric in RELATIVE_TOLERANCE else 1.0)
    return f"{value_text(metric, target - allowed)}..{value_text(metric, target + allowed)}"


def value_text(metric: str, value: float) -> str:
    return f"{value:,.0f} B" if metric == "size_bytes" else f"{value:.4f}"


def cubic_ramp(start: float, final: float, progress: float, ramp: float) -> float:
    """The target in force after ``progress`` (0..1) of training: Zhu & Gupta's gradual pruning schedule
    (arXiv 1710.01878, Eq. 1), ``final + (start - final) (1 - progress / ramp)^3`` until ``progress`` reaches
    ``ramp``, then ``final``. Fast while the model has much to give, slow as the budget nears."""
    if ramp <= 0 or progress >= ramp:
        return final
    return final + (start - final) * (1.0 - max(progress, 0.0) / ramp) ** 3


@dataclass
class Pressure:
    """One compression knob the controller scales: its ``name`` (``dz.weight_decay``, ``dz_l2.lambda``), the logits
    it presses (``logit_dz`` or ``logit_bit``), how to read and set it, and ``shrink``: the share of a logit one step
    of a unit of this pressure removes (None where the optimizer normalises the step, which bounds it)."""

    name: str
    logits: str
    get: Callable[[], float]
    set: Callable[[float], None]
    shrink: Callable[[], float | None]

    def ceiling(self) -> float:
        """The largest value this pressure may take (MAX_SHRINK a step), infinite when unbounded."""
        per_unit = self.shrink()
        return MAX_SHRINK / per_unit if per_unit else math.inf


def step_share(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> float | None:
    """The share of a parameter that one optimizer step of a unit of decay removes: ``lr`` for AdamW's decoupled
    decay, ``lr / (1 - momentum)`` for SGD; None for optimizers that normalise the step (Adam's coupled decay)."""
    if isinstance(optimizer, torch.optim.AdamW):
        return group["lr"]
    if isinstance(optimizer, torch.optim.SGD):
        return group["lr"] / (1.0 - (group.get("momentum") or 0.0))
    return None


def group_pressure(optimizer: torch.optim.Optimizer, name: str, logits: str) -> Pressure | None:
    """The weight decay of ``optimizer``'s group ``name`` (as ``codeq.param_groups`` names them) as a pressure on
    ``logits``; None when there is no such group or its decay is 0. The group is looked up at every use:
    ``optimizer.load_state_dict`` replaces the group dicts."""
    def group() -> dict[str, Any]:
        return next(group for group in optimizer.param_groups if group.get("name") == name)

    if not any(group.get("name") == name and group.get("weight_decay") for group in optimizer.param_groups):
        return None

    def assign(value: float) -> None:
        group()["weight_decay"] = value

    return Pressure(f"{name}.weight_decay", logits, lambda: group()["weight_decay"], assign,
                    lambda: step_share(optimizer, group()))


def loss_term_pressure(loss_terms: MutableSequence[LossTerm], index: int, logits: str,
                       optimizer: torch.optim.Optimizer | None, parameter: Tensor) -> Pressure:
    """The weight of ``loss_terms[index]`` (a ``LossTerm``, replaced in the list when set) as a pressure on
    ``logits``, named ``<fn>.lambda`` (``<fn>.<index>.lambda`` when the function is there twice). Under SGD the
    term's gradient 2λθ shrinks a logit by 2 lr λ a step (the lr of ``parameter``'s group); normalising
    optimizers bound the step themselves."""
    fn = loss_terms[index][0]
    name = getattr(fn, "__name__", "loss")
    if sum(term[0] is fn for term in loss_terms) > 1:
        name += f".{index}"

    def assign(value: float) -> None:
        loss_terms[index] = LossTerm(*loss_terms[index])._replace(weight=value)

    def shrink() -> float | None:
        if optimizer is None or not isinstance(optimizer, torch.optim.SGD):
            return None
        group = next(group for group in optimizer.param_groups if any(p is parameter for p in group["params"]))
        return 2.0 * step_share(optimizer, group)

    return Pressure(f"{name}.lambda", logits, lambda: float(loss_terms[index][1]), assign, shrink)


def find_pressures(model: nn.Module, metric: str, optimizer: torch.optim.Optimizer | None = None,
                   loss_terms: MutableSequence[LossTerm] | None = None) -> list[Pressure]:
    """Every positive compression pressure on ``model``: the ``dz`` group's weight decay and ``dz_l2`` terms; for
    ``rel_bops`` and ``size_bytes`` with learnable bit-widths also the ``bit`` group's decay and ``bit_l2`` terms.

    Raises:
        BudgetError: the model has no quantizer with a learnable dead zone, or no dead-zone pressure is positive.
    """
    if not any(True for _ in quantized_layers(model)):
        raise BudgetError("the model has no quantized layer, so nothing can be compressed to a target",
                          "attach a quantizer (codeq.prepare, or a config's quantizer section)")
    presses = {"logit_dz": quantizer_logits(model, "logit_dz")}
    if not presses["logit_dz"]:
        raise BudgetError("no quantizer has a learnable dead zone (logit_dz) for the pressure to widen",
                          "use the deadzone quantizer with learnable_deadzone: true")
    if metric != "sparsity":
        presses["logit_bit"] = quantizer_logits(model, "logit_bit")
    pressures = []
    for logits, group, term_fn in (("logit_dz", "dz", dz_l2), ("logit_bit", "bit", bit_l2)):
        if not presses.get(logits):
            continue
        if optimizer is not None:
            pressure = group_pressure(optimizer, group, logits)
            pressures += [pressure] if pressure is not None else []
        for index, term in enumerate(loss_terms or ()):
            if term[0] is term_fn and term[1] > 0:
                pressures.append(loss_term_pressure(loss_terms, index, logits, optimizer, presses[logits][0]))
    if not any(pressure.logits == "logit_dz" for pressure in pressures):
        raise BudgetError("there is no dead-zone pressure to adjust: no optimizer group 'dz' with a weight_decay "
                          "above 0 and no dz_l2 loss term with a weight above 0",
                          "give the 'dz' group a starting weight_decay (e.g. 1.0) or add a dz_l2 loss term with a "
                          "positive lambda")
    return pressures


def single_target(sparsity: float | None, rel_bops: float | None, size_bytes: float | None) -> tuple[str, float]:
    """(metric, value) of exactly one given target, checked.

    Raises:
        BudgetError: none or several given, or a value out of range.
    """
    given = {name: value for name, value in zip(METRICS, (sparsity, rel_bops, size_bytes)) if value is not None}
    if len(given) != 1:
        raise BudgetError(f"a budget is exactly one of {', '.join(METRICS)}, got {', '.join(given) or 'none'}",
                          "give one target")
    [(metric, value)] = given.items()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BudgetError(f"{metric} must be a number, got {value!r}", f"give {metric} as a number")
    if metric == "sparsity" and not 0 < value < 1:
        raise BudgetError(f"sparsity {value} is not a fraction between 0 and 1", "give e.g. 0.9 for 90 % zeros")
    if metric == "rel_bops" and not 0 < value <= 1:
        raise BudgetError(f"rel_bops {value} is not a fraction in (0, 1]", "give e.g. 0.03 for 3 % of the dense BOPs")
    if metric == "size_bytes" and value <= 0:
        raise BudgetError(f"size_bytes {value} is not positive", "give the compressed size in bytes")
    return metric, float(value)


class BudgetController:
    """Adjusts the compression pressure while a model trains so that it ends at a target sparsity, Rel. BOPs or
    compressed size (docs/budget.md).

    Call ``step()`` once after every optimizer step (or once per epoch, with ``total_steps`` counted in epochs).
    Every ``interval`` calls it measures the model as ``codeq.compression_report`` counts it and scales every
    pressure to ``p_start · exp(u)``. With c the cost the pressure lowers (1 - sparsity, Rel. BOPs or bytes), t the
    share of ``total_steps`` done and H the ``horizon``:

        c*(t) = c_f + (c_0 - c_f) (1 - t / ramp)^3 until ``ramp``, then c_f        (Zhu & Gupta 2017, Eq. 1)
        g_n   = g_{n-1} + Δt_n / (H/2 + Δt_n) · ((ln c_n - ln c_{n-1}) / Δt_n - g_{n-1})   (the trend of ln c)
        e_n   = ln c_n + H g_n - ln c*(t_n + H)                        (where the model and the ramp will be)
        u_n   = clip(u_{n-1} + γ_n (K_P (e_n - e_{n-1}) + K_I e_n Δt_n),  -ln F,  min(ln F, ln(ceiling / p_start)))

    ``Δt_n`` is the share of ``total_steps`` since the last update, so the gains mean the same for any run length;
    the log makes an update the same relative change for a weight decay of 5 or a λ of 0.02, on any model; F is
    ``max_factor``, and a decay's ceiling keeps what one step removes from a logit below MAX_SHRINK. Looking H
    ahead eases the pressure before the model overshoots: a dead zone widened too far narrows again only slowly.
    γ starts at 1, halves whenever e takes a clear sign (beyond DEAD_BAND) opposite to its last clear one (an
    overshoot: the sign rule of Rprop, Riedmiller & Braun 1993) and recovers by 5 % an update otherwise, so that
    fast plants (SGD with momentum) stop oscillating while slow ones keep the gains they need.

    Args:
        model: the model after ``codeq.prepare`` (learnable dead zones).
        total_steps: how many times ``step()`` will be called in the run (optimizer steps, or epochs).
        optimizer: its groups named ``dz`` / ``bit`` (``codeq.param_groups``) with a weight decay above 0 are
            pressures.
        loss_terms: a list of ``LossTerm`` (the list your loop adds to the loss): ``dz_l2`` / ``bit_l2`` entries
            with a weight above 0 are pressures; the controller replaces their entries with new weights.
        sparsity, rel_bops, size_bytes: the budget, exactly one: the share of quantized weights that are zero
            (0..1), the Rel. BOPs (a fraction, paper Eqs. 20-22), or the compressed size in bytes.
        example_input: one input ``[C, H, W]`` (or a batch), needed for ``rel_bops`` (MACs are counted once).
        ramp: the share of ``total_steps`` over which the target moves from the starting value to the budget.
        interval: calls between updates; None: ``total_steps / UPDATES`` (1000), at least 1.
        proportional_gain, integral_gain: K_P and K_I above.
        horizon: H above, a share of ``total_steps`` (0: no look-ahead).
        max_factor: the pressure stays within ``p_start / max_factor .. p_start · max_factor``.
        activation_bits, fp_weight_bits: how Rel. BOPs are counted (as in ``compression_report``).
        sync: maps a measured value to the one every process uses (under DDP: rank 0's, broadcast), so that all
            processes take the same decision.

    Raises:
        BudgetError: no target or several, a value or setting out of range, no quantizer or dead-zone pressure,
            ``rel_bops`` without ``example_input`` or for a model without counted MACs, or a budget beyond what
            the widest dead zones (and the narrowest bit-widths, when pressed) give.

    Examples:
        >>> budget = codeq.BudgetController(model, total_steps=epochs * len(loader), optimizer=optimizer,
        ...                                 sparsity=0.9)
        >>> for inputs, targets in loader:
        ...     with codeq.quantized_step(model):
        ...         loss = criterion(model(inputs), targets)
        ...     optimizer.zero_grad(); loss.backward(); optimizer.step()
        ...     budget.step()
        >>> budget.achieved, budget.pressure_values()
        (0.9031, {'dz.weight_decay': 0.29})
    """

    def __init__(self, model: nn.Module, total_steps: int, optimizer: torch.optim.Optimizer | None = None,
                 loss_terms: MutableSequence[LossTerm] | None = None, *, sparsity: float | None = None,
                 rel_bops: float | None = None, size_bytes: float | None = None,
                 example_input: Tensor | None = None, ramp: float = RAMP, interval: int | None = None,
                 proportional_gain: float = PROPORTIONAL_GAIN, integral_gain: float = INTEGRAL_GAIN,
                 horizon: float = HORIZON, max_factor: float = MAX_FACTOR, activation_bits: int = 32,
                 fp_weight_bits: int = 32, sync: Callable[[float], float] | None = None) -> None:
        self.metric, self.final = single_target(sparsity, rel_bops, size_bytes)
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise BudgetError(f"total_steps must be a positive integer, got {total_steps!r}",
                              "pass the number of step() calls the run makes")
        if not (0 <= ramp <= 1 and 0 <= horizon <= 1 and max_factor >= 1 and proportional_gain >= 0
                and integral_gain >= 0 and (interval is None or interval >= 1)):
            raise BudgetError(f"a setting is out of range (ramp {ramp}, horizon {horizon}: 0..1; max_factor "
                              f"{max_factor}: >= 1; gains {proportional_gain}, {integral_gain}: >= 0; interval "
                              f"{interval}: >= 1)", "use a value in its range")
        self.model, self.total_steps, self.ramp, self.horizon = model, total_steps, ramp, horizon
        self.interval = interval or max(1, round(total_steps / UPDATES))
        self.gains = (proportional_gain, integral_gain)
        self.max_factor, self.sync = max_factor, sync
        self.settings = BopsSettings(activation_bits, fp_weight_bits)
        self.pressures = find_pressures(model, self.metric, optimizer, loss_terms)
        self.start_pressures = {pressure.name: float(pressure.get()) for pressure in self.pressures}
        self.macs: dict[str, int] | None = None
        if self.metric == "rel_bops":
            if example_input is None:
                raise BudgetError("a rel_bops target needs the MACs of each layer", "pass example_input")
            try:
                self.macs = count_macs(model, example_input)
            except Exception as error:  # noqa: BLE001 - any failure of the model's forward means the same here
                raise BudgetError(f"the model's MACs cannot be counted on an input of shape "
                                  f"{tuple(example_input.shape)} ({type(error).__name__}: {error})",
                                  "target sparsity or size_bytes instead") from None
            if not sum(self.macs.values()):
                raise BudgetError("the model has no Conv2d or Linear layer whose MACs can be counted, so its Rel. "
                                  "BOPs are undefined", "target sparsity or size_bytes instead")
        self.other_bytes = 0
        if self.metric == "size_bytes":  # what the size adds to the quantized weights does not change in training
            self.other_bytes = model_size(model).compressed_bytes - quantized_weight_bytes(layer_stats(model))
        self.steps = self.last_update = 0
        self.log_factor = self.error = self.slope = 0.0
        self.gain_scale, self.sign = 1.0, 0
        self.start = self.achieved = self.measure()
        self.level = math.log(max(cost(self.metric, self.start), COST_FLOOR))
        self.saturated_since: int | None = None
        self.limit, self.least = self.value_at_logits(0.0), self.value_at_logits(OPEN_LOGIT)
        self.check_reach()

    @torch.no_grad()
    def measure(self) -> float:
        """The model's current value of the target's metric, counted as ``compression_report`` counts it."""
        stats = layer_stats(self.model, self.macs, settings=self.settings)
        if self.metric == "size_bytes":
            return float(quantized_weight_bytes(stats) + self.other_bytes)
        return float(summary(stats)[self.metric])

    @torch.no_grad()
    def value_at_logits(self, value: float) -> float:
        """The metric's value with every pressed logit set to ``value`` (then restored). At 0, the fixed point
        unbounded decay or L2 pressure drives a logit to, the most the pressure can give: the widest dead zone
        d = 2R (and, pressed, the narrowest bit-width); at OPEN_LOGIT no dead zone (and the widest bit-width)."""
        pressed = {pressure.logits for pressure in self.pressures}
        logits = [logit for name in sorted(pressed) for logit in quantizer_logits(self.model, name)]
        saved = [logit.detach().clone() for logit in logits]
        try:
            for logit in logits:
                logit.fill_(value)
            return self.measure()
        finally:
            for logit, kept in zip(logits, saved):
                logit.copy_(kept)

    def check_reach(self) -> None:
        """Raises BudgetError when the budget lies beyond what the quantizers can give: at least as compressed as
        with every pressed logit at 0 (reached, if at all, only under unbounded pressure), or less compressed than
        with no dead zone (beyond tolerance)."""
        metric, final = self.metric, self.final
        bits = any(pressure.logits == "logit_bit" for pressure in self.pressures)
        if cost(metric, final) <= cost(metric, self.limit):
            raise BudgetError(f"{metric} {value_text(metric, final)} is beyond reach: with every dead zone at its "
                              f"widest{' and every bit-width at its narrowest' if bits else ''} the model has "
                              f"{metric} {value_text(metric, self.limit)} (each layer keeps its weights beyond the "
                              f"robust range)", f"choose a target short of {value_text(metric, self.limit)}")
        if cost(metric, final) > cost(metric, self.least) and not within_tolerance(metric, self.least, final):
            raise BudgetError(f"{metric} {value_text(metric, final)} is less compression than the model has with no "
                              f"dead zone{' and the widest bit-widths' if bits else ''}: "
                              f"{value_text(metric, self.least)}", "choose a target the quantizer compresses to, "
                              "or more bits (fixed_bit_val, max_bits)")

    def target_at(self, steps: int) -> float:
        """The target in force after ``steps`` calls: the cubic ramp from the starting value to the budget."""
        return cubic_ramp(self.start, self.final, steps / self.total_steps, self.ramp)

    @property
    def target(self) -> float:
        """The target in force now."""
        return self.target_at(self.steps)

    @property
    def factor(self) -> float:
        """The factor every pressure is at against its start, ``exp(u)``."""
        return math.exp(self.log_factor)

    def pressure_values(self) -> dict[str, float]:
        """Each pressure's current value by name (``dz.weight_decay``, ``dz_l2.lambda``, ...)."""
        return {pressure.name: float(pressure.get()) for pressure in self.pressures}

    def bounds(self) -> tuple[float, float]:
        """The range of ``u`` now: ±ln(max_factor), and below every pressure's ceiling."""
        high = math.log(self.max_factor)
        for pressure in self.pressures:
            start = self.start_pressures[pressure.name]
            if start > 0 and math.isfinite(pressure.ceiling()):
                high = min(high, math.log(pressure.ceiling() / start))
        return -math.log(self.max_factor), max(high, -math.log(self.max_factor))

    def apply(self) -> None:
        """Set every pressure to its start times the current factor."""
        factor = self.factor
        for pressure in self.pressures:
            pressure.set(self.start_pressures[pressure.name] * factor)

    def step(self, value: float | None = None) -> bool:
        """One call per optimizer step (or per epoch); every ``interval`` calls the pressure is updated. ``value``:
        the measured value of the target's metric, when the caller has it (else the model is measured). Returns
        whether it updated."""
        self.steps += 1
        if self.steps % self.interval:
            return False
        measured = self.measure() if value is None else float(value)
        self.update(self.sync(measured) if self.sync is not None else measured)
        return True

    def update(self, measured: float) -> None:
        """The update of ``u`` for ``measured``: the model's cost extrapolated ``horizon`` ahead along its trend
        against the ramp's target that much later (see the class docstring)."""
        self.achieved = measured
        level = math.log(max(cost(self.metric, measured), COST_FLOOR))
        elapsed = (self.steps - self.last_update) / self.total_steps
        if self.horizon > 0:  # the trend of ln c, smoothed over half the horizon
            self.slope += elapsed / (self.horizon / 2 + elapsed) * ((level - self.level) / elapsed - self.slope)
        self.level = level
        ahead = cubic_ramp(self.start, self.final, self.steps / self.total_steps + self.horizon, self.ramp)
        error = level + self.horizon * self.slope - math.log(max(cost(self.metric, ahead), COST_FLOOR))
        if abs(error) > DEAD_BAND:  # a clear sign: opposite to the last clear one, the model overshot
            sign = 1 if error > 0 else -1
            overshot = sign == -self.sign
            self.gain_scale = GAIN_CUT * self.gain_scale if overshot else min(1.0, GAIN_RECOVERY * self.gain_scale)
            self.sign = sign
        proportional, integral = (self.gain_scale * gain for gain in self.gains)
        wanted = self.log_factor + proportional * (error - self.error) + integral * error * elapsed
        low, high = self.bounds()
        self.log_factor = min(max(wanted, low), high)
        self.error, self.last_update = error, self.steps
        saturated = (wanted >= high and error > 0) or (wanted <= low and error < 0)
        if not saturated:
            self.saturated_since = None
        elif self.saturated_since is None:
            self.saturated_since = self.steps
        self.apply()

    def record(self) -> dict[str, float]:
        """Metrics for a log row: the value measured now under the metric's name, the target in force
        (``target/<metric>``) and each pressure (``pressure/<name>``)."""
        return {self.metric: self.measure(), f"target/{self.metric}": self.target,
                **{f"pressure/{name}": value for name, value in self.pressure_values().items()}}

    def verdict(self, value: float | None = None) -> str | None:
        """None when ``value`` (default: measured now) meets the budget; else one sentence: what was reached, why not
        the budget (the pressure at a bound, since when) and what to change."""
        value = self.measure() if value is None else value
        if within_tolerance(self.metric, value, self.final):
            return None
        text = (f"target {self.metric} {value_text(self.metric, self.final)} missed: the model ends at "
                f"{value_text(self.metric, value)} (allowed {tolerance_text(self.metric, self.final)})")
        if self.saturated_since is None:
            return f"{text}; train longer"
        pressures = ", ".join(f"{name} {value:.4g}" for name, value in self.pressure_values().items())
        since = f"({pressures}, x{self.factor:.3g} the start) from step {self.saturated_since} of {self.total_steps} on"
        if self.error > 0:
            return (f"{text}; the pressure was at its ceiling {since}, and the dead zones did not widen in time (at "
                    f"their widest: {self.metric} {value_text(self.metric, self.limit)}); train longer, give the "
                    f"pressed logits a higher lr or lower the target")
        return (f"{text}; the pressure was at its floor {since}: the dead zones widen without it; give the pressed "
                f"logits a lower lr or raise the target")

    def state_dict(self) -> dict[str, Any]:
        """Everything ``load_state_dict`` needs to continue exactly (plain Python values)."""
        return {"steps": self.steps, "last_update": self.last_update, "log_factor": self.log_factor,
                "error": self.error, "slope": self.slope, "level": self.level, "gain_scale": self.gain_scale,
                "sign": self.sign, "start": self.start, "achieved": self.achieved,
                "saturated_since": self.saturated_since, "start_pressures": dict(self.start_pressures),
                "metric": self.metric, "final": self.final}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()``'s output: counters, factor, ramp start; the pressures are set again.

        Raises:
            BudgetError: the state is of another target or other pressures.
        """
        if (state["metric"], state["final"]) != (self.metric, self.final) or \
                set(state["start_pressures"]) != set(self.start_pressures):
            raise BudgetError(f"the saved budget state is for {state['metric']} {state['final']} with pressures "
                              f"{', '.join(state['start_pressures'])}, not {self.metric} {self.final} with "
                              f"{', '.join(self.start_pressures)}", "load it into a controller of the same target")
        self.steps, self.last_update = int(state["steps"]), int(state["last_update"])
        self.log_factor, self.error = float(state["log_factor"]), float(state["error"])
        self.slope, self.level = float(state["slope"]), float(state["level"])
        self.gain_scale, self.sign = float(state["gain_scale"]), int(state["sign"])
        self.start, self.achieved = float(state["start"]), float(state["achieved"])
        self.saturated_since = state["saturated_since"]
        self.start_pressures = {name: float(value) for name, value in state["start_pressures"].items()}
        self.apply()
