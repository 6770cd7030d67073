"""The fused dead-zone quantizer against the plain straight-through implementation of the equations.

The reference below is the textbook STE graph (``x + (f(x) - x).detach()`` for round, clip and
ReLU), differentiated by autograd. The fused ``DeadZoneQuantize`` must give bit-identical
quantized weights and weight gradients, and the same logit gradients up to summation order.
"""
import itertools

import numpy as np
import pytest
import torch
from torch.nn.utils import parametrize

import src.quantizer as quantizer_module
from src.percentile import robust_absmax
from src.quantizer import DeadZoneLDZCompander, levels
from src.utils_quantization import attach_weight_quantizers


def straight_through(x: torch.Tensor, forward_value: torch.Tensor) -> torch.Tensor:
    return x + (forward_value - x).detach()


def reference_forward(quantizer: DeadZoneLDZCompander, weight: torch.Tensor) -> torch.Tensor:
    """The equations as autograd sees them when written plainly (the pre-fusion implementation)."""
    bits, deadzone, step = quantizer.step_params(robust_absmax(weight))
    offset = deadzone / 2 - step / 2
    shifted = weight.abs() - offset
    codes = torch.sign(weight) * straight_through(shifted, torch.relu(shifted)) / step
    codes = straight_through(codes, torch.round(codes))
    max_code = levels(bits)
    codes = straight_through(codes, torch.clamp(codes, -max_code, max_code))
    return torch.sign(codes).detach() * offset + step * codes


def run(forward, quantizer, weight, upstream):
    """Output and gradients (weight, logit_dz, logit_bit) of ``sum(forward(weight) * upstream)``."""
    quantizer.zero_grad(set_to_none=True)
    latent = weight.clone().requires_grad_()
    output = forward(quantizer, latent)
    (output * upstream).sum().backward()
    grads = [None if p.grad is None else p.grad.clone() for p in (quantizer.logit_dz, quantizer.logit_bit)]
    return output.detach(), latent.grad, *grads


def fused_forward(quantizer, weight):
    return quantizer(weight)


def weights(kind: str, generator: torch.Generator) -> torch.Tensor:
    if kind == "conv":
        return torch.randn(32, 16, 3, 3, generator=generator) * 0.05
    if kind == "conv_channels_last":
        return (torch.randn(16, 8, 3, 3, generator=generator) * 0.1).to(memory_format=torch.channels_last)
    if kind == "linear":
        return torch.randn(64, 48, generator=generator)
    if kind == "heavy_tails":
        return torch.randn(5000, generator=generator) ** 3
    if kind == "exact_zeros":
        w = torch.randn(40, 40, generator=generator)
        w[torch.rand(40, 40, generator=generator) < 0.3] = 0.0
        return w
    if kind == "tiny":
        return torch.randn(3, generator=generator)
    if kind == "large":
        return torch.randn(70_000, generator=generator) * 1e-3  # above the percentile's direct-partition size
    raise ValueError(kind)


KINDS = ["conv", "conv_channels_last", "linear", "heavy_tails", "exact_zeros", "tiny", "large"]
SETTINGS = list(itertools.product(
    [-2.0, 0.05, 0.8, 3.0],                            # init_deadzone_logit (negative and tiny dead zones too)
    [0.0, -1.5, 3.0],                                  # init_bit_logit
    [(4, 8, True, True), (3, 6, False, True), (8, 8, True, False), (2, 4, False, False)],
))


def assert_logit_grad_matches(fused, reference, exact):
    """Same gradient up to float32 summation order, and at least as accurate as the plain graph's.

    The plain graph sums g*c and g*x separately and subtracts (cancellation costs it up to ~1e-4
    relative); the fused backward sums g*(c - x) directly. ``exact`` is the plain graph in float64.
    """
    if reference is None:
        assert fused is None or fused == 0
        return
    exact = exact.float()
    torch.testing.assert_close(fused, reference, rtol=1e-3, atol=1e-6)
    assert (fused - exact).abs() <= 2 * (reference - exact).abs() + 2e-5 * exact.abs() + 1e-7


@pytest.mark.parametrize("kind", KINDS)
def test_fused_matches_plain_equations(kind):
    generator = torch.Generator().manual_seed(KINDS.index(kind))
    for logit_dz, logit_bit, (bits, max_bits, learn_bit, learn_dz) in SETTINGS[:: 4 if kind == "large" else 1]:
        quantizer = DeadZoneLDZCompander(bits, max_bits, logit_bit, logit_dz, learn_bit, learn_dz)
        weight = weights(kind, generator)
        upstream = torch.randn(weight.shape, generator=generator)
        out, grad_w, grad_dz, grad_bit = run(fused_forward, quantizer, weight, upstream)
        ref_out, ref_grad_w, ref_grad_dz, ref_grad_bit = run(reference_forward, quantizer, weight, upstream)
        _, _, exact_dz, exact_bit = run(reference_forward, quantizer.double(), weight.double(), upstream.double())
        quantizer.float()
        assert torch.equal(out, ref_out), (kind, logit_dz, logit_bit, bits)
        assert torch.equal(grad_w, ref_grad_w)
        assert_logit_grad_matches(grad_dz, ref_grad_dz, exact_dz)
        assert_logit_grad_matches(grad_bit, ref_grad_bit, exact_bit)


def bits_of(tensor: torch.Tensor) -> torch.Tensor:
    """The bit patterns (torch.equal takes -0.0 for 0.0)."""
    return tensor.view(torch.int64 if tensor.dtype == torch.float64 else torch.int32)


@pytest.mark.parametrize("layout", ["float64", "float64_float32_logits", "transposed", "sliced", "negative_offset"])
def test_cpu_kernels_match_plain_equations_for_other_dtypes_and_layouts(layout, monkeypatch):
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(64, 48, generator=generator, dtype=torch.float64 if "float64" in layout else torch.float32)
    weight = {"transposed": weight.t(), "sliced": weight[:, ::3]}.get(layout, weight)
    upstream = torch.randn(weight.shape, generator=generator, dtype=weight.dtype)
    # 3 bits and a dead zone narrower than a step put the offset below zero, where codes of -0.0 give outputs
    # of -0.0 (105 of them here).
    logits = (0.1, -2.0) if layout == "negative_offset" else (0.5, 1.0)
    logit_dtype = torch.float32 if layout == "float64_float32_logits" else weight.dtype
    quantizer = DeadZoneLDZCompander(4, 8, *logits).to(logit_dtype)
    out, grad_w, grad_dz, grad_bit = run(fused_forward, quantizer, weight, upstream)
    ref_out, ref_grad_w, ref_grad_dz, ref_grad_bit = run(reference_forward, quantizer, weight, upstream)
    _, _, exact_dz, exact_bit = run(reference_forward, quantizer.double(), weight.double(), upstream.double())
    quantizer.to(logit_dtype)
    assert grad_dz.dtype == ref_grad_dz.dtype == logit_dtype
    assert torch.equal(out, ref_out) and torch.equal(grad_w, ref_grad_w)
    if layout == "transposed":  # the output keeps the weight's layout
        assert out.stride() == weight.stride()
    assert_logit_grad_matches(grad_dz, ref_grad_dz, exact_dz)
    assert_logit_grad_matches(grad_bit, ref_grad_bit, exact_bit)
    # The torch ops (GPU, torch.compile) give the same bits, signed zeros included, unlike the reference graph,
    # whose x + (f(x) - x) turns -0.0 into 0.0.
    monkeypatch.setattr(quantizer_module, "CPU_KERNEL_DTYPES", ())
    torch_out, torch_grad_w, _, _ = run(fused_forward, quantizer, weight, upstream)
    assert torch.equal(bits_of(out), bits_of(torch_out)) and torch.equal(bits_of(grad_w), bits_of(torch_grad_w))


@pytest.mark.parametrize("absmax_dtype,logit_dtype", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                                       (torch.float64, torch.float32), (torch.float32, torch.float64)])
def test_host_scalars_give_step_params_bit_for_bit(absmax_dtype, logit_dtype):
    """The CPU kernels' grid comes from numpy scalars: the same float operations as the 0-dim tensor graph."""
    generator = torch.Generator().manual_seed(11)
    for _ in range(400):
        absmax = torch.rand((), generator=generator, dtype=torch.float64).to(absmax_dtype) * 10 ** float(
            torch.randint(-6, 3, (), generator=generator))
        logit_dz, logit_bit = (torch.randn(2, generator=generator) * 3).tolist()
        max_bits = int(torch.randint(2, 9, (), generator=generator))
        fixed = int(torch.randint(2, max_bits + 1, (), generator=generator))
        learn_bit = bool(torch.randint(0, 2, (), generator=generator))
        quantizer = DeadZoneLDZCompander(fixed, max_bits, logit_bit, logit_dz, learn_bit).to(logit_dtype)
        with torch.no_grad():
            tensors = quantizer.step_params(absmax)
        host = quantizer.host_scalars(absmax)
        for tensor, scalar in zip(tensors, quantizer.step_params(host["absmax"], host), strict=True):
            assert tensor.dtype == torch.from_numpy(np.asarray(scalar)).dtype
            assert tensor.item() == float(scalar), (tensor.item(), float(scalar), absmax, logit_dz, logit_bit)


def test_cpu_eager_quantizer_runs_the_compiled_kernels(monkeypatch):
    quantize, gradients = quantizer_module.compiled_kernels()
    calls = []

    def counted(name, kernel):
        def call(*args):
            calls.append(name)
            return kernel(*args)
        return call

    monkeypatch.setattr(quantizer_module, "compiled_kernels",
                        lambda: (counted("forward", quantize), counted("backward", gradients)))
    generator = torch.Generator().manual_seed(3)
    weight, upstream = torch.randn(32, 16, 3, 3, generator=generator), torch.randn(32, 16, 3, 3, generator=generator)
    run(fused_forward, DeadZoneLDZCompander(), weight, upstream)
    assert calls == ["forward", "backward"]
    run(fused_forward, DeadZoneLDZCompander().half(), weight.half(), upstream.half())  # torch ops in half precision
    assert calls == ["forward", "backward"]


def test_logit_gradients_are_not_trivially_zero():
    generator = torch.Generator().manual_seed(0)
    quantizer = DeadZoneLDZCompander(4, 8, 0.5, 1.0)
    weight, upstream = torch.randn(256, 64, generator=generator), torch.randn(256, 64, generator=generator)
    _, _, grad_dz, grad_bit = run(fused_forward, quantizer, weight, upstream)
    assert grad_dz.abs() > 1e-3 and grad_bit.abs() > 1e-3


def test_channels_last_output_keeps_the_layout():
    weight = torch.randn(8, 4, 3, 3).to(memory_format=torch.channels_last)
    out = DeadZoneLDZCompander()(weight)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_bf16_autocast_leaves_the_quantizer_in_float32():
    weight = torch.randn(32, 16, 3, 3)
    quantizer = DeadZoneLDZCompander()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = quantizer(weight)
    assert out.dtype == torch.float32
    assert torch.equal(out, reference_forward(quantizer, weight))


class ForwardCounter:
    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        module.register_forward_hook(self.hook)

    def hook(self, *_):
        self.calls += 1


def test_validate_quantizes_each_weight_once_per_pass():
    from src.train import validate

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    attach_weight_quantizers(model, [], DeadZoneLDZCompander, {})
    counters = [ForwardCounter(p.quantizer) for m in model if parametrize.is_parametrized(m, "weight")
                for p in m.parametrizations.weight]
    batches = [(torch.randn(5, 12), torch.randint(0, 3, (5,))) for _ in range(7)]
    validate(batches, model, torch.nn.CrossEntropyLoss(), "cpu")
    assert [c.calls for c in counters] == [1, 1]
    # Outside the cached pass, every forward recomputes the quantized weight (training needs that).
    model(batches[0][0])
    model(batches[0][0])
    assert [c.calls for c in counters] == [3, 3]
