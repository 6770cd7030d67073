"""Group lasso on hand-made weights."""
import math

import pytest
import torch
from torch import nn

from codeq.attach import attach_weight_quantizers
from codeq.quantizers import DeadZoneLDZCompander
from codeq.regularizers import LOSS_REGISTRY, bit_l2, dz_l2, group_lasso


def test_linear_column_norms():
    layer = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 0.0, 1.0], [4.0, 0.0, -1.0]]))
    model = nn.Sequential(layer)
    assert group_lasso(model, lambda_linear=0.5, lambda_conv=10.0).item() == pytest.approx(0.5 * (5 + 0 + math.sqrt(2)))


def test_conv_columns_span_in_channels_and_kernel():
    conv = nn.Conv2d(2, 2, 2, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 0, 0] = 3.0
        conv.weight[1, 0, 0, 0] = 4.0   # same column as above: norm 5
        conv.weight[1, 1, 1, 1] = -2.0  # its own column: norm 2
    linear = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 1.0]]))
    model = nn.Sequential(conv, nn.Flatten(), linear)
    assert group_lasso(model, lambda_linear=0.0, lambda_conv=0.1).item() == pytest.approx(0.7)
    assert group_lasso(model, lambda_linear=1.0, lambda_conv=0.1).item() == pytest.approx(2.7)


def test_gradient_is_finite_at_zero_columns():
    layer = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        layer.weight[:, 1] = 0.0
        layer.weight[:, 3] = 0.0
    group_lasso(nn.Sequential(layer), lambda_linear=1.0, lambda_conv=0.0).backward()
    assert torch.isfinite(layer.weight.grad).all()
    assert torch.equal(layer.weight.grad[:, 1], torch.zeros(3))
    column = layer.weight.detach()[:, 0]
    assert torch.allclose(layer.weight.grad[:, 0], column / column.norm())


def test_acts_on_latent_weights_when_quantized():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    model = nn.Sequential(layer)
    expected = torch.linalg.vector_norm(layer.weight.detach(), dim=0).sum().item()
    attach_weight_quantizers(model, [], DeadZoneLDZCompander, {"init_deadzone_logit": 0.3})
    assert not torch.equal(layer.weight, layer.parametrizations.weight.original)
    value = group_lasso(model, lambda_linear=1.0, lambda_conv=0.0)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    value.backward()
    assert layer.parametrizations.weight.original.grad is not None
    assert layer.parametrizations.weight[0].quantizer.logit_dz.grad is None


def test_registry():
    assert LOSS_REGISTRY == {"group_lasso": group_lasso, "dz_l2": dz_l2, "bit_l2": bit_l2}
