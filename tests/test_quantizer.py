"""The quantizers against the CoDeQ equations, written out here independently of src/."""
import itertools
import math

import pytest
import torch

from codeq.quantizers import DeadZoneLDZCompander, UniformSymmetric
from codeq.quantizers.percentile import robust_absmax

MIN_BITS = 2


def reference_bits(logit_bit: float, max_bits: int, fixed: int, learnable: bool) -> int:
    if not learnable:
        return fixed
    return round(math.tanh(abs(logit_bit)) * (max_bits - MIN_BITS) + MIN_BITS)


def reference_deadzone(w: torch.Tensor, logit_dz: float, bits: int) -> tuple[torch.Tensor, float, float]:
    """The paper's equations in float64: returns (w_hat, d, s)."""
    w = w.double()
    r = torch.quantile(w.abs().flatten(), 0.99).item()
    q = 2 ** (bits - 1) - 1
    d = 2 * r * (1 - math.tanh(abs(logit_dz)))
    s = (r - d / 2) / (q - 0.5) + 1e-8
    delta = d / 2 - s / 2
    codes = torch.clamp(torch.round(torch.sign(w) * torch.relu(w.abs() - delta) / s), -q, q)
    return torch.sign(codes) * delta + s * codes, d, s


SETTINGS = list(itertools.product(
    [-2.0, 0.05, 0.7, 1.5, 3.0],  # logit_dz
    [0.0, 0.3, -1.0, 3.0],        # logit_bit
    [(4, 8, True), (3, 6, False), (8, 8, False), (2, 4, True)],  # fixed_bit_val, max_bits, learnable_bit
))


@pytest.mark.parametrize("logit_dz,logit_bit,bit_setting", SETTINGS)
def test_deadzone_matches_equations(logit_dz, logit_bit, bit_setting):
    fixed, max_bits, learnable = bit_setting
    torch.manual_seed(hash((logit_dz, logit_bit, bit_setting)) % 2**31)
    w = torch.randn(64, 32, 3, 3) * torch.rand(()) * 0.5
    quantizer = DeadZoneLDZCompander(fixed, max_bits, learnable_bit=learnable)
    with torch.no_grad():  # a learnable logit may not start at 0 (no gradient there), but the equations hold at 0
        quantizer.logit_bit.fill_(logit_bit)
        quantizer.logit_dz.fill_(logit_dz)
    bits = reference_bits(logit_bit, max_bits, fixed, learnable)
    expected, d, s = reference_deadzone(w, logit_dz, bits)
    out = quantizer(w).detach().double()
    assert quantizer.bit_width().item() == bits
    # Elements within float32 rounding of a decision boundary may legitimately fall either side.
    away_from_boundary = ((w.double().abs() - (d / 2 - s / 2)) / s % 1 - 0.5).abs() > 1e-4
    assert torch.allclose(out[away_from_boundary], expected[away_from_boundary], rtol=1e-5, atol=1e-6 * s)
    stats = quantizer.stats(w)
    assert stats["bits"] == bits
    assert stats["deadzone"] == pytest.approx(d, rel=1e-5)
    assert stats["step"] == pytest.approx(s, rel=1e-5)


@pytest.mark.parametrize("logit_dz", [0.1, 0.5, 1.0, 2.0])
def test_deadzone_zeroes_exactly_the_small_weights(logit_dz):
    torch.manual_seed(0)
    w = torch.randn(10_000)
    quantizer = DeadZoneLDZCompander(4, 8, 3.0, logit_dz, learnable_bit=False)
    half_width = quantizer.stats(w)["deadzone"] / 2
    out = quantizer(w).detach()
    margin = 1e-5 * half_width
    inside, outside = w.abs() < half_width - margin, w.abs() > half_width + margin
    assert inside.any() and outside.any()
    assert (out[inside] == 0).all()
    assert (out[outside] != 0).all()
    assert (torch.sign(out[outside]) == torch.sign(w[outside])).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_deadzone_has_at_most_2q_plus_1_levels(bits):
    torch.manual_seed(bits)
    w = torch.randn(50_000) ** 3  # heavy tails: many weights beyond the robust range get clipped
    out = DeadZoneLDZCompander(bits, 8, 0.0, 0.8, learnable_bit=False)(w)
    q = 2 ** (bits - 1) - 1
    assert len(torch.unique(out)) <= 2 * q + 1
    assert len(torch.unique(out)) == 2 * q + 1  # all codes are used on this much data


def test_gradients_reach_weights_and_both_logits():
    torch.manual_seed(0)
    w = (torch.randn(256, 64) * 0.1).requires_grad_()
    quantizer = DeadZoneLDZCompander(4, 8, 0.5, 1.0)
    upstream = torch.randn(256, 64)
    (quantizer(w) * upstream).sum().backward()
    # Straight-through on round, clip and ReLU: every latent weight, pruned or clipped, sees the upstream gradient.
    assert torch.allclose(w.grad, upstream, rtol=1e-5, atol=0)
    assert quantizer.logit_dz.grad is not None and quantizer.logit_dz.grad.abs() > 0
    assert quantizer.logit_bit.grad is not None and quantizer.logit_bit.grad.abs() > 0


@pytest.mark.parametrize("learnable_bit,learnable_deadzone",
                         [(True, True), (False, True), (True, False), (False, False)])
def test_learnable_flags_set_requires_grad(learnable_bit, learnable_deadzone):
    quantizer = DeadZoneLDZCompander(learnable_bit=learnable_bit, learnable_deadzone=learnable_deadzone)
    assert quantizer.logit_bit.requires_grad is learnable_bit
    assert quantizer.logit_dz.requires_grad is learnable_deadzone
    assert quantizer.min_bits == 2


def test_fixed_bits_ignore_the_bit_logit():
    w = torch.randn(1000)
    a = DeadZoneLDZCompander(5, 8, 0.0, 1.0, learnable_bit=False)(w)
    b = DeadZoneLDZCompander(5, 8, 3.0, 1.0, learnable_bit=False)(w)
    assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs", [{"max_bits": 9}, {"fixed_bit_val": 1}, {"fixed_bit_val": 6, "max_bits": 4}])
def test_deadzone_rejects_bad_bits(kwargs):
    with pytest.raises(ValueError, match="bits"):
        DeadZoneLDZCompander(**kwargs)


@pytest.mark.parametrize("bitwidth", [2, 4, 8])
def test_uniform_symmetric_matches_equations(bitwidth):
    torch.manual_seed(bitwidth)
    w = torch.randn(128, 64).requires_grad_()
    q = 2 ** (bitwidth - 1) - 1
    out = UniformSymmetric(bitwidth)(w)
    s = w.detach().abs().max() / q
    expected = s * torch.clamp(torch.round(w.detach() / s), -q, q)
    assert torch.allclose(out.detach(), expected, atol=1e-6)
    assert len(torch.unique(out.detach())) <= 2 * q + 1
    assert out.detach().abs().max() == pytest.approx(w.detach().abs().max().item(), rel=1e-6)
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_uniform_on_all_zero_weights_stays_zero():
    out = UniformSymmetric(4)(torch.zeros(10))
    assert torch.equal(out, torch.zeros(10))


@pytest.mark.parametrize("size", [1, 2, 7, 100, 12_345])
def test_robust_absmax_is_torch_quantile(size):
    torch.manual_seed(size)
    w = torch.randn(size)
    expected = torch.quantile(w.abs(), 0.99, interpolation="linear")
    assert robust_absmax(w).item() == pytest.approx(expected.item(), rel=1e-6, abs=0)
