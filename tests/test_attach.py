"""Attaching quantizers as parametrizations, exclusion, toggling."""
import logging

import pytest
import torch
from test_quantizer_fast_path import assert_close_gradients
from torch import nn
from torch.nn.utils import parametrize

from codeq.attach import (
    FakeQuantParametrization,
    attach_weight_quantizers,
    latent_weight,
    quantized_layers,
    quantizer_of,
    toggle_quantization,
    weights_quantized_once,
)
from codeq.models import create_model
from codeq.quantizers import DeadZoneLDZCompander, UniformSymmetric, percentile


def weight_owners(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m._parameters.get("weight"), nn.Parameter)]


def test_resnet20_every_weight_owner_is_quantized_unless_excluded():
    model = create_model("resnet20", 10, 32)
    owners = weight_owners(model)
    attached = attach_weight_quantizers(model, ["bn", "fc"], DeadZoneLDZCompander, {"fixed_bit_val": 4})
    expected = [n for n in owners if "bn" not in n and "fc" not in n]
    assert attached == expected
    assert len(attached) == 19  # 1 stem conv + 9 blocks x 2 convs
    assert all(isinstance(dict(model.named_modules())[n], nn.Conv2d) for n in attached)
    assert not parametrize.is_parametrized(model.fc, "weight")
    assert not parametrize.is_parametrized(model.bn1, "weight")


def test_empty_exclude_quantizes_norm_layers_too():
    model = create_model("resnet20", 10, 32)
    attached = attach_weight_quantizers(model, [], UniformSymmetric, {"bitwidth": 8})
    assert attached == weight_owners(create_model("resnet20", 10, 32))
    assert any("bn" in name for name in attached)


def test_one_quantizer_instance_per_layer_with_its_own_parameters():
    model = create_model("resnet20", 10, 32)
    attach_weight_quantizers(model, ["bn"], DeadZoneLDZCompander, {})
    quantizers = [p.quantizer for _, _, p in quantized_layers(model)]
    assert len({id(q) for q in quantizers}) == len(quantizers) == 20
    names = [n for n, _ in model.named_parameters() if "logit_dz" in n]
    assert len(names) == 20 and names[0] == "conv1.parametrizations.weight.0.quantizer.logit_dz"


def test_weight_is_quantized_and_toggle_restores_latent():
    torch.manual_seed(0)
    model = create_model("resnet20", 10, 32)
    attach_weight_quantizers(model, ["bn"], DeadZoneLDZCompander, {"init_deadzone_logit": 0.5})
    conv = model.layer2[0].conv1
    latent = latent_weight(conv)
    quantizer = conv.parametrizations.weight[0].quantizer
    assert torch.equal(conv.weight, quantizer(latent))
    assert (conv.weight == 0).float().mean() > 0.2  # dead zone active
    toggle_quantization(model, False)
    assert torch.equal(conv.weight, latent)
    toggle_quantization(model, True)
    assert torch.equal(conv.weight, quantizer(latent))


def test_forward_and_backward_through_quantized_model():
    model = create_model("resnet20", 10, 16)
    attach_weight_quantizers(model, ["bn"], DeadZoneLDZCompander, {})
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name


@pytest.mark.parametrize("grouped", [False, True], ids=["cpu", "grouped-percentiles"])
def test_weights_quantized_once_runs_each_quantizer_once_with_the_same_gradients(grouped, monkeypatch):
    """Up front (the dead-zone quantizers together, ``quantize_together``) as at each layer's turn (each quantizer's
    forward): the same loss bit for bit, the same gradients up to float rounding, one quantization per layer."""
    if grouped:  # the percentiles selected together, as on a GPU
        monkeypatch.setattr(percentile, "selects_alone", lambda weight: False)
    torch.manual_seed(0)
    model = create_model("resnet20", 10, 16)
    attach_weight_quantizers(model, ["bn"], DeadZoneLDZCompander, {"init_bit_logit": 0.35})
    calls = []
    for _, _, parametrization in quantized_layers(model):
        parametrization.register_forward_hook(lambda module, args, output: calls.append(module))
    inputs = torch.randn(2, 3, 16, 16)
    gradients, losses = [], []
    for once in (False, True):
        model.zero_grad(set_to_none=True)
        calls.clear()
        with weights_quantized_once(model) if once else torch.enable_grad():
            loss = model(inputs).square().sum()
            _ = model.conv1.weight  # a second access inside the block is served from the cache
        loss.backward()
        assert not any(parametrization.absmax_given or parametrization.output is not None
                       for _, _, parametrization in quantized_layers(model))
        gradients.append({name: param.grad.clone() for name, param in model.named_parameters()})
        losses.append(loss.detach())
        layers = len(list(quantized_layers(model)))  # 19 convolutions and fc
        assert len(calls) == (layers if once else layers + 1) and len(set(map(id, calls))) == layers == 20
    assert torch.equal(losses[0], losses[1])
    per_access, up_front = gradients
    assert_close_gradients(up_front, per_access)
    assert torch.count_nonzero(up_front["conv1.parametrizations.weight.0.quantizer.logit_dz"])


def test_weights_quantized_once_gives_the_percentile_only_to_quantizers_that_take_it(percentile_selections):
    model = nn.Sequential(nn.Linear(30, 20), nn.Linear(20, 10), nn.Linear(10, 5))
    attach_weight_quantizers(model, ["1", "2"], DeadZoneLDZCompander, {})
    # Another parametrization ahead of the quantizer: it sees that one's output, not the latent weight.
    parametrize.register_parametrization(model[1], "weight", nn.Identity())
    parametrize.register_parametrization(model[1], "weight", FakeQuantParametrization(DeadZoneLDZCompander()))
    attach_weight_quantizers(model, [], UniformSymmetric, {"bitwidth": 4})  # only the last layer is left
    assert [type(quantizer_of(layer)) for layer in model] == [DeadZoneLDZCompander] * 2 + [UniformSymmetric]
    expected = [layer.weight.detach().clone() for layer in model]
    with weights_quantized_once(model):
        assert all(torch.equal(layer.weight, weight) for layer, weight in zip(model, expected, strict=True))
    assert [[weight.shape for weight in call] for call in percentile_selections] == [[(20, 30)]]
    toggle_quantization(model, False)
    with weights_quantized_once(model):
        assert torch.equal(model[0].weight, latent_weight(model[0]))
    assert len(percentile_selections) == 1  # a disabled quantizer asks for no percentile


def test_vit_attachment_and_exclusion():
    model = create_model("vit", 10, 32)
    attached = attach_weight_quantizers(model, ["norm", "head"], DeadZoneLDZCompander, {})
    assert "patch_embed.proj" in attached
    assert "blocks.0.attn.qkv" in attached and "blocks.11.mlp.fc2" in attached
    assert not any("norm" in n or n == "head" for n in attached)
    assert len(attached) == 1 + 12 * 4  # patch embedding + (qkv, proj, fc1, fc2) per block
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_attachment_is_logged_not_printed(caplog, capsys):
    model = create_model("mlp", 10, 8)
    with caplog.at_level(logging.INFO, logger="codeq.attach"):
        attach_weight_quantizers(model, ["5"], UniformSymmetric, {"bitwidth": 4})
    assert "quantized 2 layers with UniformSymmetric: 1, 3" in caplog.text
    assert "left 1 layers in FP32 (exclude_layers): 5" in caplog.text
    assert capsys.readouterr().out == ""


def test_attaching_twice_does_not_stack_quantizers():
    model = create_model("mlp", 10, 8)
    assert len(attach_weight_quantizers(model, [], UniformSymmetric, {})) == 3
    assert attach_weight_quantizers(model, [], UniformSymmetric, {}) == []
    assert all(len(m.parametrizations.weight) == 1 for _, m, _ in quantized_layers(model))


def test_quantizer_parameters_follow_a_model_moved_before_attaching():
    # On a GPU the logits must sit with the weights; "meta" stands in for a second device on a CPU-only host.
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Conv2d(2, 2, 3)).to("meta")
    attach_weight_quantizers(model, [], DeadZoneLDZCompander, {})
    for layer in model:
        assert {p.device.type for p in quantizer_of(layer).parameters()} == {"meta"}
