"""Weight fake-quantizers: the CoDeQ dead-zone compander and a plain uniform baseline.

A quantizer is an ``nn.Module`` mapping a latent weight tensor to its fake-quantized
value (same shape, same dtype). Gradients pass straight through every rounding and
clipping step so the latent weights keep learning; CoDeQ's two scalars ``logit_dz``
and ``logit_bit`` learn through the dead-zone width and the step size.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from src.kernels import compile_into, flat_array
from src.percentile import robust_absmax


def round_ste(x: Tensor) -> Tensor:
    """round() forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def clamp_ste(x: Tensor, bound: Tensor | float) -> Tensor:
    """clamp(-bound, bound) forward, identity backward."""
    return x + (torch.clamp(x, -bound, bound) - x).detach()


def levels(bits: Tensor | int) -> Tensor | int:
    """Largest integer code Q of a symmetric signed quantizer with ``bits`` bits."""
    return 2 ** (bits - 1) - 1


def dead_zone_offset(deadzone: Tensor, step: Tensor) -> Tensor:
    """delta = d/2 - s/2: |w| - delta in units of s rounds to the code (half a step below the first level)."""
    return deadzone / 2 - step / 2


class DeadZoneQuantize(torch.autograd.Function):
    """The whole dead-zone compander as one autograd node: ``apply(w, absmax, logit_dz, logit_bit, quantizer)``.

    Forward computes bits, d, s and delta with ``quantizer.step_params`` (the same ops as the plain
    graph, without recording them; on the CPU kernels' path on numpy scalars), then codes
    c = clip(round(sign(w) relu(|w| - delta) / s), -Q, Q) and output sign(c) delta + s c, by the
    same floating-point operations as the straight-through graph (``x + (f(x) - x).detach()``
    equals ``f(x)`` exactly for round, clip and relu here), so the output is bit-identical to it. Backward returns what autograd derives through that graph with
    round, clip and relu passed straight through:

    * weight: ``((g * s) / s) * sign(w) * sign(w)``, the graph's own rounding steps, bit-identical;
    * delta and s: sum g (sign(c) - sign(w)) and sum g (c - x), x the unrounded code, then the chain
      rule through delta = d/2 - s/2, s = (R - d/2)/(Q - 1/2) + 1e-8, d = 2R(1 - tanh|logit_dz|),
      Q = 2^(b-1) - 1 and b = round_ste(tanh|logit_bit| (max_bits - 2) + 2), in double precision
      (the clip bound Q passes no gradient, as in the graph).

    The plain graph records ~45 autograd nodes per layer, two dozen of them on scalars, and on
    small layers per-op overhead is most of the cost. This is one node. On GPUs, under
    ``torch.compile`` and for half-precision weights it runs 14 elementwise torch ops forward and
    6 backward and keeps three weight-sized tensors for backward. On CPU in eager mode, for float32
    and float64 weights, two compiled numba kernels (``quantize_dead_zone``, ``dead_zone_gradients``)
    do the elementwise work in one pass each, with the torch ops' floating-point operations in the
    same order, so their results are the same bits: backward recomputes the codes from the saved
    latent weight, which costs less than writing and reading three tensors, and sums the two
    logit-gradient terms in double precision (the torch ops sum in the weight's dtype).
    """

    @staticmethod
    def forward(ctx, weight: Tensor, absmax: Tensor, logit_dz: Tensor, logit_bit: Tensor,
                quantizer: DeadZoneLDZCompander) -> Tensor:
        ctx.span = quantizer.max_bits - quantizer.min_bits
        ctx.on_cpu_kernels = weight.is_cpu and weight.dtype in CPU_KERNEL_DTYPES and not torch.compiler.is_compiling()
        if ctx.on_cpu_kernels:
            output = torch.empty_like(weight)  # the weight's layout, channels-last included
            if output.stride() != weight.stride():  # not dense (a slice): empty_like made it contiguous
                weight = weight.contiguous()
            weight_array = flat_array(weight)
            # The scalars as numpy scalars of the tensors' dtypes: the same float operations as on 0-dim tensors,
            # without a dozen 0-dim torch ops (~60 us a layer; a ResNet-20 layer's forward went from ~108 to
            # ~46 us, its forward and backward from ~243 to ~144 us). Only tanh stays torch's.
            scalars = quantizer.host_scalars(absmax)
            bits, deadzone, step = quantizer.step_params(scalars["absmax"], scalars)
            max_code = levels(bits)
            # The grid in the weight's dtype, the precision the torch ops compute the codes in.
            ctx.grid = tuple(weight_array.dtype.type(value) for value in (dead_zone_offset(deadzone, step), step,
                                                                          max_code))
            compiled_kernels()[0](weight_array, flat_array(output), *ctx.grid)
            ctx.host_scalars = (scalars["absmax"], deadzone, max_code, scalars["logit_dz"], scalars["logit_bit"])
            ctx.logit_dtype = logit_dz.dtype
            ctx.save_for_backward(weight)
            return output
        bits, deadzone, step = quantizer.step_params(absmax)
        offset = dead_zone_offset(deadzone, step)
        max_code = levels(bits)
        sign = torch.sign(weight)
        # No in-place ops here: torch.compile's CUDA backend (torch 2.11, seen on an H200) miscompiled the
        # earlier in-place version, whose weight gradients came out wrong while the CPU backend's were right.
        scaled = torch.relu(weight.abs() - offset) * sign / step
        codes = torch.clamp(torch.round(scaled), -max_code, max_code)
        code_sign = torch.sign(codes)
        output = code_sign * offset + codes * step
        ctx.save_for_backward(sign, codes - scaled, code_sign - sign, absmax, deadzone, step, max_code,
                              logit_dz, logit_bit)
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.on_cpu_kernels:
            return DeadZoneQuantize.backward_on_cpu_kernels(ctx, grad)
        sign, rounding_error, sign_change, absmax, deadzone, step, max_code, logit_dz, logit_bit = ctx.saved_tensors
        needs_weight, _, needs_dz, needs_bit, _ = ctx.needs_input_grad
        grad_weight = grad_dz = grad_bit = None
        if needs_weight:
            grad_weight = (grad * step).div_(step).mul_(sign).mul_(sign)
        if needs_dz or needs_bit:
            scalars = ((grad * sign_change).sum(), (grad * rounding_error).sum(), absmax, deadzone, max_code,
                       logit_dz, logit_bit)
            if grad.device.type == "cpu" and not torch.compiler.is_compiling():
                grad_dz, grad_bit = logit_gradients_on_host(scalars, ctx.span, logit_dz.dtype, needs_dz, needs_bit)
            else:  # tensors, so that a GPU never waits on the host
                grads = logit_gradients(*(value.double() for value in scalars), ctx.span, torch.tanh, torch.sign)
                grad_dz, grad_bit = (value.to(logit_dz.dtype) if needed else None
                                     for value, needed in zip(grads, (needs_dz, needs_bit)))
        return grad_weight, None, grad_dz, grad_bit, None

    @staticmethod
    def backward_on_cpu_kernels(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        """``backward`` for the forward that ran ``quantize_dead_zone``: one ``dead_zone_gradients`` pass."""
        weight, = ctx.saved_tensors
        needs_weight, _, needs_dz, needs_bit, _ = ctx.needs_input_grad
        if grad.stride() != weight.stride():  # e.g. the expanded gradient of a sum(): the kernel pairs memory orders
            grad = torch.empty_like(weight).copy_(grad)
        grad_weight = torch.empty_like(weight)
        sums = compiled_kernels()[1](flat_array(weight), flat_array(grad), flat_array(grad_weight), *ctx.grid)
        grad_dz = grad_bit = None
        if needs_dz or needs_bit:
            grad_dz, grad_bit = logit_gradients_on_host((*sums, *ctx.host_scalars), ctx.span, ctx.logit_dtype,
                                                        needs_dz, needs_bit)
        return grad_weight if needs_weight else None, None, grad_dz, grad_bit, None


def host_scalar(value: Tensor) -> np.floating:
    """A 0-dim CPU tensor as the numpy scalar of its dtype (item() first: numpy's conversion of a tensor costs
    twice as much)."""
    return numpy_scalar_type(value.dtype)(value.item())


@functools.cache
def numpy_scalar_type(dtype: torch.dtype) -> type[np.floating]:
    return torch.empty(0, dtype=dtype).numpy().dtype.type


def logit_gradients_on_host(scalars: tuple, span: int, dtype: torch.dtype, needs_dz: bool,
                            needs_bit: bool) -> tuple[Tensor | None, Tensor | None]:
    """``logit_gradients`` of CPU scalars in Python floats (a dozen scalar tensor ops would cost more than a small
    layer's elementwise work), as tensors of ``dtype``; None for a logit that needs no gradient."""
    grads = logit_gradients(*(float(value) for value in scalars), span, math.tanh, sign_of)
    return tuple(torch.tensor(value, dtype=dtype) if needed else None
                 for value, needed in zip(grads, (needs_dz, needs_bit)))


def sign_of(value: float) -> float:
    return float((value > 0) - (value < 0))


# Weight dtypes that the CPU kernels handle; others (half precision) run the torch ops.
CPU_KERNEL_DTYPES = (torch.float32, torch.float64)
# dead_zone_gradients keeps this many partial sums. On an AVX-512 EPYC, LLVM vectorised the loop with 16 (~0.7 ns
# an element) but left it scalar with 8 (~14 ns, as slow as one running sum); 32 was no faster than 16.
SUM_LANES = 16


@functools.cache
def compiled_kernels() -> tuple[Callable[..., None], Callable[..., tuple[float, float]]]:
    """(``quantize_dead_zone``, ``dead_zone_gradients``) compiled, or loaded from numba's cache, on first use.

    numba is imported (``src.kernels``) on the first CPU call: GPU runs never need it.
    """
    module = globals()
    compile_into(module, (quantize_element, gradient_element, quantize_dead_zone, dead_zone_gradients))
    return module["quantize_dead_zone"], module["dead_zone_gradients"]


# The four functions below are plain Python that numba compiles (``compiled_kernels``). Arrays are 1-D views
# (``flat_array``) and scalars have the weight's dtype: float32 arithmetic stays float32, each operation rounded
# as torch's is. numba compiles without fast-math, so LLVM neither reorders these operations nor contracts a
# multiply and an add into an FMA.
def quantize_element(weight: np.floating, offset: np.floating, step: np.floating, max_code: np.floating,
                     zero: np.floating, one: np.floating) -> tuple[np.floating, np.floating, np.floating, np.floating]:
    """(sign(w), unrounded code x, code c, sign(c)) of one weight, by DeadZoneQuantize's torch ops in their order;
    ``zero`` and ``one`` have the weight's dtype (literals would widen float32 arithmetic to float64)."""
    # torch.sign is (x > 0) - (x < 0): 0 for -0 and NaN; relu and clamp pass NaN through, as these compares do.
    sign = one if weight > zero else -one if weight < zero else zero
    shifted = abs(weight) - offset
    scaled = (zero if shifted < zero else shifted) * sign / step
    codes = np.rint(scaled)  # to nearest, ties to even, as torch.round
    codes = -max_code if codes < -max_code else max_code if codes > max_code else codes
    code_sign = one if codes > zero else -one if codes < zero else zero
    return sign, scaled, codes, code_sign


def quantize_dead_zone(weight: np.ndarray, output: np.ndarray, offset: np.floating, step: np.floating,
                       max_code: np.floating) -> None:
    """Writes sign(c) delta + s c for each weight to ``output``: DeadZoneQuantize's forward in one pass."""
    zero, one = weight.dtype.type(0), weight.dtype.type(1)
    for i in range(weight.size):
        _, _, codes, code_sign = quantize_element(weight[i], offset, step, max_code, zero, one)
        output[i] = code_sign * offset + codes * step


def dead_zone_gradients(weight: np.ndarray, grad: np.ndarray, grad_weight: np.ndarray, offset: np.floating,
                        step: np.floating, max_code: np.floating) -> tuple[float, float]:
    """(sum g (sign(c) - sign(w)), sum g (c - x)), summed in double precision, and the weight gradient
    ((g s) / s) sign(w) sign(w) written to ``grad_weight``: DeadZoneQuantize's backward in one pass."""
    zero, one = weight.dtype.type(0), weight.dtype.type(1)
    # A sum per lane of a block: one running sum would chain every add to the previous one, which keeps LLVM
    # from vectorising the loop (~20x slower); the fixed trip count of the inner loop lets it vectorise.
    sign_change_sums, rounding_error_sums = np.zeros(SUM_LANES), np.zeros(SUM_LANES)
    whole = weight.size - weight.size % SUM_LANES
    for start in range(0, whole, SUM_LANES):
        for lane in range(SUM_LANES):
            i = start + lane
            grad_weight[i], sign_change, rounding_error = gradient_element(weight[i], grad[i], offset, step,
                                                                           max_code, zero, one)
            sign_change_sums[lane] += sign_change
            rounding_error_sums[lane] += rounding_error
    for i in range(whole, weight.size):
        grad_weight[i], sign_change, rounding_error = gradient_element(weight[i], grad[i], offset, step, max_code,
                                                                       zero, one)
        sign_change_sums[i - whole] += sign_change
        rounding_error_sums[i - whole] += rounding_error
    return sign_change_sums.sum(), rounding_error_sums.sum()


def gradient_element(weight: np.floating, upstream: np.floating, offset: np.floating, step: np.floating,
                     max_code: np.floating, zero: np.floating, one: np.floating) -> tuple[np.floating, float, float]:
    """(weight gradient, g (sign(c) - sign(w)), g (c - x)) of one weight, the last two in double precision."""
    sign, scaled, codes, code_sign = quantize_element(weight, offset, step, max_code, zero, one)
    return (upstream * step / step * sign * sign, float(upstream) * float(code_sign - sign),
            float(upstream) * float(codes - scaled))


def logit_gradients(grad_offset, grad_step, absmax, deadzone, max_code, logit_dz, logit_bit, span: int,
                    tanh: Callable, sign: Callable) -> tuple:
    """d loss / d (logit_dz, logit_bit) from d loss / d (delta, s) at fixed d and at fixed delta.

    Chain rule through delta = d/2 - s/2, s = (R - d/2)/(Q - 1/2) + 1e-8, d = 2R(1 - tanh|logit_dz|),
    Q = 2^(b-1) - 1 (dQ/db = ln 2 (Q + 1)) and b = round_ste(tanh|logit_bit| span + 2). Written
    once for Python floats and for tensors (``tanh`` and ``sign`` of the matching kind).
    """
    grad_step = grad_step - grad_offset / 2  # delta depends on s too
    grad_deadzone = grad_offset / 2 - grad_step / (2 * (max_code - 0.5))
    tanh_dz, tanh_bit = tanh(abs(logit_dz)), tanh(abs(logit_bit))
    grad_dz = grad_deadzone * -2 * absmax * (1 - tanh_dz * tanh_dz) * sign(logit_dz)
    grad_levels = -grad_step * (absmax - deadzone / 2) / (max_code - 0.5) ** 2
    grad_bit = grad_levels * math.log(2) * (max_code + 1) * span * (1 - tanh_bit * tanh_bit) * sign(logit_bit)
    return grad_dz, grad_bit


class DeadZoneLDZCompander(nn.Module):
    """CoDeQ's learnable dead-zone quantizer (Wenshøj et al., arXiv 2512.12981).

    With R the 99th percentile of |w|, b bits and Q = 2^(b-1) - 1 levels per sign:
    dead-zone width d = 2R(1 - tanh|logit_dz|), step s = (R - d/2)/(Q - 1/2) + 1e-8,
    offset delta = d/2 - s/2, codes w_bar = clip(round(sign(w) relu(|w| - delta)/s), -Q, Q)
    and output sign(w_bar) delta + s w_bar. Weights with |w| <= d/2 become exactly zero.
    """

    min_bits = 2
    bits_kwarg = "fixed_bit_val"
    # forward takes the weight's robust_absmax as a second argument (see percentiles_selected_together).
    takes_robust_absmax = True

    def __init__(
        self,
        fixed_bit_val: int = 4,
        max_bits: int = 8,
        init_bit_logit: float = 3.0,
        init_deadzone_logit: float = 3.0,
        learnable_bit: bool = True,
        learnable_deadzone: bool = True,
    ) -> None:
        super().__init__()
        if not self.min_bits <= max_bits <= 8:
            raise ValueError(f"max_bits must be in {self.min_bits}..8, got {max_bits}")
        if not self.min_bits <= fixed_bit_val <= max_bits:
            raise ValueError(f"fixed_bit_val must be in {self.min_bits}..max_bits={max_bits}, got {fixed_bit_val}")
        self.fixed_bit_val = int(fixed_bit_val)
        self.max_bits = int(max_bits)
        self.learnable_bit = bool(learnable_bit)
        self.learnable_deadzone = bool(learnable_deadzone)
        self.logit_dz = nn.Parameter(torch.tensor(float(init_deadzone_logit)), requires_grad=self.learnable_deadzone)
        self.logit_bit = nn.Parameter(torch.tensor(float(init_bit_logit)), requires_grad=self.learnable_bit)

    def bit_width(self, host: dict[str, np.floating] | None = None) -> Tensor | np.floating:
        """Current bit-width b (a float tensor holding an integer; differentiable via STE when learnable).
        With ``host`` (``host_scalars``), a numpy scalar computed by the same float operations."""
        if not self.learnable_bit:
            if host is not None:
                return type(host["logit_bit"])(self.fixed_bit_val)
            return self.logit_bit.detach().new_full((), float(self.fixed_bit_val))  # a device fill, no host copy
        span = self.max_bits - self.min_bits
        if host is not None:
            return np.rint(host["tanh_bit"] * span + self.min_bits)  # to nearest, ties to even, as torch.round
        return round_ste(torch.tanh(self.logit_bit.abs()) * span + self.min_bits)

    def step_params(self, absmax: Tensor | np.floating,
                    host: dict[str, np.floating] | None = None) -> tuple[Tensor | np.floating, ...]:
        """(bits, dead-zone width d, step s) for a tensor whose robust absmax is ``absmax``. With ``host``
        (``host_scalars``), numpy scalars computed by the same float operations in the same dtypes."""
        bits = self.bit_width(host)
        tanh_dz = torch.tanh(self.logit_dz.abs()) if host is None else host["tanh_dz"]
        deadzone = 2 * absmax * (1 - tanh_dz)
        step = (absmax - deadzone / 2) / (levels(bits) - 0.5) + 1e-8
        return bits, deadzone, step

    def host_scalars(self, absmax: Tensor) -> dict[str, np.floating]:
        """The inputs of ``step_params`` as numpy scalars of their tensors' dtypes (numpy 2 promotes them, and
        Python numbers with them, as torch does 0-dim tensors), tanh by torch's own kernel; for CPU tensors."""
        logits = {"dz": self.logit_dz.detach(), "bit": self.logit_bit.detach()}
        scalars = {"absmax": host_scalar(absmax)}
        for name, logit in logits.items():
            scalars[f"logit_{name}"] = host_scalar(logit)
            if name == "dz" or self.learnable_bit:  # a fixed bit-width needs no tanh
                scalars[f"tanh_{name}"] = host_scalar(torch.tanh(logit.abs()))
        return scalars

    def grid(self, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(bits, step s, offset delta): ``weight`` quantizes to sign(c) delta + s c, c in [-Q, Q]."""
        bits, deadzone, step = self.step_params(robust_absmax(weight))
        return bits, step, dead_zone_offset(deadzone, step)

    def forward(self, weight: Tensor, absmax: Tensor | None = None) -> Tensor:
        """``weight`` fake-quantized; ``absmax`` is its robust_absmax where the caller has it already
        (``percentiles_selected_together`` selects every layer's at once)."""
        absmax = robust_absmax(weight) if absmax is None else absmax
        return DeadZoneQuantize.apply(weight, absmax, self.logit_dz, self.logit_bit, self)

    @torch.no_grad()
    def stats(self, weight: Tensor) -> dict[str, float]:
        """Read-outs for reporting: bit-width, dead-zone width and step size for ``weight``."""
        bits, deadzone, step = self.step_params(robust_absmax(weight))
        return {"bits": float(bits), "deadzone": float(deadzone), "step": float(step)}

    def extra_repr(self) -> str:
        return (f"max_bits={self.max_bits}, learnable_bit={self.learnable_bit}, "
                f"learnable_deadzone={self.learnable_deadzone}")


class UniformSymmetric(nn.Module):
    """Symmetric uniform quantizer with absmax scale s = max|w|/Q and straight-through rounding."""

    bits_kwarg = "bitwidth"

    def __init__(self, bitwidth: int = 8) -> None:
        super().__init__()
        if not 2 <= bitwidth <= 8:
            raise ValueError(f"bitwidth must be in 2..8, got {bitwidth}")
        self.bitwidth = int(bitwidth)

    def scale(self, weight: Tensor) -> Tensor:
        # The clamp keeps an all-zero tensor at zero instead of 0/0.
        return (weight.detach().abs().max() / levels(self.bitwidth)).clamp_min(torch.finfo(weight.dtype).tiny)

    def grid(self, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(bits, step s, offset 0): ``weight`` quantizes to s c, c in [-Q, Q]."""
        step = self.scale(weight)
        return step.new_full((), float(self.bitwidth)), step, torch.zeros_like(step)

    def forward(self, weight: Tensor) -> Tensor:
        step = self.scale(weight)
        return step * clamp_ste(round_ste(weight / step), levels(self.bitwidth))

    @torch.no_grad()
    def stats(self, weight: Tensor) -> dict[str, float]:
        return {"bits": float(self.bitwidth), "deadzone": 0.0, "step": float(self.scale(weight))}

    def extra_repr(self) -> str:
        return f"bitwidth={self.bitwidth}"
