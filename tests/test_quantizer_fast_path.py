"""The dead-zone quantizer's fast path (``quantize_together``, taken by ``weights_quantized_once`` in every eager
training step) against its reference, ``DeadZoneLDZCompander.forward``: the same values bit for bit, the same
gradients to the latent weights and both logits up to float rounding."""
import copy

import pytest
import torch
from torch import nn

from codeq.attach import attach_weight_quantizers, latent_weight, quantized_layers, weights_quantized_once
from codeq.models import create_model
from codeq.quantizers import DeadZoneLDZCompander
from codeq.quantizers.percentile import robust_absmax


def spread_logits(model: nn.Module, seed: int = 0) -> None:
    """Different dead zones and bit-widths per layer, as training leaves them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, parametrization in quantized_layers(model):
            parametrization.quantizer.logit_dz.copy_(torch.rand((), generator=generator) * 2.5 + 0.05)
            parametrization.quantizer.logit_bit.copy_(torch.rand((), generator=generator) * 1.5 + 0.05)


def assert_close_gradients(fast: dict, reference: dict) -> None:
    """Latent weights' gradients agree to float32 rounding; the logits' (sums over a layer's weights, in another
    order) to 1e-4 of their size."""
    assert fast.keys() == reference.keys()
    for name, grad in reference.items():
        tolerance = 1e-4 if "logit" in name else 1e-6
        assert (fast[name] - grad).abs().max() <= tolerance * grad.abs().max(), name


def reference_and_fast(model: nn.Module, upstream_seed: int = 1):
    """(weights, gradients) of the reference (each quantizer's forward, layer by layer) and of the fast path, for
    the same model and upstream gradient."""
    results = []
    for fast in (False, True):
        copied = copy.deepcopy(model)
        modules = [module for _, module, _ in quantized_layers(copied)]
        if fast:
            with weights_quantized_once(copied):
                weights = [module.weight for module in modules]
        else:
            weights = [module.parametrizations.weight[0].quantizer(latent_weight(module)) for module in modules]
        generator = torch.Generator().manual_seed(upstream_seed)
        upstream = [torch.randn(weight.shape, generator=generator).to(weight.dtype) for weight in weights]
        torch.autograd.backward(weights, upstream)
        grads = {name: parameter.grad for name, parameter in copied.named_parameters() if parameter.grad is not None}
        results.append(([weight.detach() for weight in weights], grads))
    return results


@pytest.mark.parametrize("kwargs", [
    {"fixed_bit_val": 4, "learnable_bit": False},
    {"max_bits": 8, "learnable_bit": True},
    {"max_bits": 6, "learnable_bit": True, "learnable_deadzone": False},
])
def test_fast_path_matches_the_reference(kwargs):
    torch.manual_seed(0)
    model = create_model("resnet20", 10, 32)
    attach_weight_quantizers(model, ["bn"], DeadZoneLDZCompander, kwargs)
    spread_logits(model)
    (reference, reference_grads), (fast, fast_grads) = reference_and_fast(model)
    assert all(torch.equal(a, b) for a, b in zip(reference, fast))
    assert sum(int((weight == 0).sum()) for weight in fast) > 1000  # the dead zones are at work
    assert any(name.endswith("logit_dz") for name in fast_grads) == kwargs.get("learnable_deadzone", True)
    assert any(name.endswith("logit_bit") for name in fast_grads) == kwargs["learnable_bit"]
    assert_close_gradients(fast_grads, reference_grads)


def test_fast_path_handles_mixed_settings_dtypes_and_exact_zeros():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 16), nn.Linear(16, 8).double(), nn.Linear(8, 4))
    attach_weight_quantizers(model, ["3"], DeadZoneLDZCompander, {"learnable_bit": True})
    model[3] = nn.Linear(8, 4)
    attach_weight_quantizers(model, [], DeadZoneLDZCompander, {"fixed_bit_val": 3, "learnable_bit": False})
    with torch.no_grad():
        latent_weight(model[0])[0, :5] = 0.0  # exact zeros get no gradient, as abs' gradient at 0 is 0
    spread_logits(model, seed=3)
    (reference, reference_grads), (fast, fast_grads) = reference_and_fast(model)
    assert [weight.dtype for weight in fast] == [torch.float32, torch.float32, torch.float64, torch.float32]
    assert all(torch.equal(a, b) for a, b in zip(reference, fast))
    assert torch.all(fast_grads["0.parametrizations.weight.original"][0, :5] == 0)
    assert_close_gradients(fast_grads, reference_grads)


def test_half_precision_weights_are_quantized_in_float32_by_both():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64)).half()
    attach_weight_quantizers(model, [], DeadZoneLDZCompander, {"learnable_bit": True})
    (reference, _), (fast, fast_grads) = reference_and_fast(model)
    assert fast[0].dtype == torch.float16 and torch.equal(reference[0], fast[0])
    assert fast_grads["0.parametrizations.weight.original"].dtype == torch.float16


def test_a_subclass_that_changes_forward_keeps_its_own_forward():
    class Coarser(DeadZoneLDZCompander):
        def forward(self, weight, absmax=None):
            return super().forward(weight, absmax) * 0.5

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    attach_weight_quantizers(model, [], Coarser, {})
    quantizer = model[0].parametrizations.weight[0].quantizer
    with weights_quantized_once(model):
        served = model[0].weight
    latent = latent_weight(model[0])
    assert torch.equal(served, quantizer(latent, robust_absmax(latent)))
    assert torch.equal(served, DeadZoneLDZCompander.forward(quantizer, latent) * 0.5)


def test_channels_last_weights_keep_their_layout():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3)).to(memory_format=torch.channels_last)
    attach_weight_quantizers(model, [], DeadZoneLDZCompander, {})
    (reference, _), (fast, _) = reference_and_fast(model)
    assert fast[0].is_contiguous(memory_format=torch.channels_last) and torch.equal(reference[0], fast[0])
