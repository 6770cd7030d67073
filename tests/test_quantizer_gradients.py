"""The dead-zone quantizer's straight-through gradients against the chain rule written out by hand, its dtypes
and layouts, and how often training and validation run it."""
import math

import pytest
import torch
from torch.nn.utils import parametrize

from codeq.attach import attach_weight_quantizers
from codeq.quantizers import DeadZoneLDZCompander
from codeq.quantizers.percentile import robust_absmax
from codeq.quantizers.ste import levels


def hand_gradients(quantizer: DeadZoneLDZCompander, weight: torch.Tensor, upstream: torch.Tensor):
    """d sum(upstream * output) / d (weight, logit_dz, logit_bit) in float64, from the paper's equations with round,
    clip and relu passed straight through: d out/d delta = sign(c) - sign(w), d out/d s = c - x (x the unrounded
    code), then delta = d/2 - s/2, s = (R - d/2)/(Q - 1/2) + 1e-8, d = 2R(1 - tanh|l_dz|), Q = 2^(b-1) - 1,
    b = tanh|l_bit| (max_bits - 2) + 2."""
    w, g = weight.double(), upstream.double()
    absmax = robust_absmax(weight).double()
    t_dz, t_bit = math.tanh(abs(quantizer.logit_dz.item())), math.tanh(abs(quantizer.logit_bit.item()))
    span = quantizer.max_bits - quantizer.min_bits
    bits = round(t_bit * span + 2) if quantizer.learnable_bit else quantizer.fixed_bit_val
    q = levels(bits)
    deadzone = 2 * absmax * (1 - t_dz)
    step = (absmax - deadzone / 2) / (q - 0.5) + 1e-8
    offset = deadzone / 2 - step / 2
    x = torch.sign(w) * torch.relu(w.abs() - offset) / step
    c = torch.clamp(torch.round(x), -q, q)
    grad_offset = (g * (torch.sign(c) - torch.sign(w))).sum()
    grad_step = (g * (c - x)).sum() - grad_offset / 2
    grad_deadzone = grad_offset / 2 - grad_step / (2 * (q - 0.5))
    grad_dz = grad_deadzone * -2 * absmax * (1 - t_dz**2) * math.copysign(1, quantizer.logit_dz.item())
    grad_q = -grad_step * (absmax - deadzone / 2) / (q - 0.5) ** 2
    grad_bit = grad_q * math.log(2) * (q + 1) * span * (1 - t_bit**2) * math.copysign(1, quantizer.logit_bit.item())
    return g * torch.sign(w) ** 2, grad_dz, grad_bit


@pytest.mark.parametrize("logit_dz,logit_bit,learnable_bit", [(3.0, 3.0, True), (0.8, -1.5, True), (-2.0, 0.3, True),
                                                              (0.05, 3.0, False), (1.2, 1.0, True)])
def test_straight_through_gradients_follow_the_chain_rule(logit_dz, logit_bit, learnable_bit):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 32, 3, 3, generator=generator, dtype=torch.float64) * 0.1
    upstream = torch.randn(weight.shape, generator=generator, dtype=torch.float64)
    quantizer = DeadZoneLDZCompander(4, 8, learnable_bit=learnable_bit).double()
    with torch.no_grad():
        quantizer.logit_dz.fill_(logit_dz)
        quantizer.logit_bit.fill_(logit_bit)
    latent = weight.clone().requires_grad_()
    (quantizer(latent) * upstream).sum().backward()
    grad_weight, grad_dz, grad_bit = hand_gradients(quantizer, weight, upstream)
    torch.testing.assert_close(latent.grad, grad_weight)
    torch.testing.assert_close(quantizer.logit_dz.grad, grad_dz, rtol=1e-9, atol=1e-12)
    if learnable_bit:
        torch.testing.assert_close(quantizer.logit_bit.grad, grad_bit, rtol=1e-9, atol=1e-12)
        assert grad_bit.abs() > 1e-6
    else:
        assert quantizer.logit_bit.grad is None
    assert grad_dz.abs() > 1e-6


def test_half_precision_weights_are_quantized_in_float32():
    """fp16 weights with 99.5 % zeros gave a NaN logit_dz gradient, and tiny incoming gradients vanished in (g s)/s;
    the quantizer now computes in float32 and hands back the weight's dtype."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(200, 100, generator=generator)
    weight[torch.rand(200, 100, generator=generator) < 0.995] = 0.0
    quantizer = DeadZoneLDZCompander(4, 8, learnable_bit=False)
    latent = weight.half().requires_grad_()
    output = quantizer(latent)
    assert output.dtype == torch.float16
    (output.float() * 1e-6).sum().backward()
    assert torch.isfinite(quantizer.logit_dz.grad)
    assert latent.grad.dtype == torch.float16
    assert torch.equal(latent.grad != 0, latent.detach() != 0)  # every nonzero weight still gets its gradient
    torch.testing.assert_close(output.float(), quantizer(weight).half().float())


def test_channels_last_output_keeps_the_layout():
    weight = torch.randn(8, 4, 3, 3).to(memory_format=torch.channels_last)
    out = DeadZoneLDZCompander()(weight)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_bf16_autocast_leaves_the_quantizer_in_float32():
    weight = torch.randn(32, 16, 3, 3)
    quantizer = DeadZoneLDZCompander()
    expected = quantizer(weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = quantizer(weight)
    assert out.dtype == torch.float32
    assert torch.equal(out, expected)


class ForwardCounter:
    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        module.register_forward_hook(self.hook)

    def hook(self, *_):
        self.calls += 1


def test_validate_quantizes_each_weight_once_per_pass():
    from codeq.training.loop import validate

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    attach_weight_quantizers(model, [], DeadZoneLDZCompander, {})
    counters = [ForwardCounter(p) for m in model if parametrize.is_parametrized(m, "weight")
                for p in m.parametrizations.weight]
    batches = [(torch.randn(5, 12), torch.randint(0, 3, (5,))) for _ in range(7)]
    validate(batches, model, torch.nn.CrossEntropyLoss(), "cpu")
    assert [c.calls for c in counters] == [1, 1]
    # Outside the cached pass, every forward recomputes the quantized weight (training needs that).
    model(batches[0][0])
    model(batches[0][0])
    assert [c.calls for c in counters] == [3, 3]
