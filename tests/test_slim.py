"""Slimming: known null channels go exactly where they can (across residual additions too) and stay where not."""
import torch

from codeq.attach import attach_weight_quantizers, latent_weight
from codeq.channels import KEEP_LIVE, KEEP_PADDED
from codeq.compression import count_macs, structured_macs
from codeq.export.onnx import export_onnx, run_session, session
from codeq.export.slim import slim_model
from codeq.models import create_model
from codeq.quantizers import DeadZoneLDZCompander

EXAMPLE = torch.zeros(3, 16, 16)


def null_rows(model: torch.nn.Module, layer: str, rows: list[int]) -> None:
    """Rows of ``layer``'s latent weight scaled far into the dead zone: they quantize to zero."""
    with torch.no_grad():
        latent_weight(model.get_submodule(layer))[rows] *= 1e-6


def resnet(removable_only: bool) -> torch.nn.Module:
    """ResNet-20 at 4 bits (BatchNorm FP32, fresh statistics: BN(0) is its bias) with known null channels.

    - layer1.0.conv1 rows 0 and 4: BN bias -1, ReLU makes them 0; they go (conv2 reads exact zeros).
    - stage 3's residual stream channels 2 and 5: null in all three blocks' conv2 and zero-padded by the
      shortcut of layer3.0; BN bias -1, so the sum stays 0 through every addition; they go everywhere.
    - layer2.1.conv2 column 6 (not a row): nothing reads channel 6 of layer2.1.conv1, whose row goes.
    Unless ``removable_only``:
    - layer1.0.conv1 row 3 with BN bias +1: a constant 1 into the padded conv2 stays (not exact).
    - stage 3 channel 7 null in layer3.1.conv2 only: the addition meets a live channel, it stays.
    """
    torch.manual_seed(0)
    model = create_model("resnet20", 10, 16)
    attach_weight_quantizers(model, ["bn"], DeadZoneLDZCompander, {"fixed_bit_val": 4, "learnable_bit": False})
    null_rows(model, "layer1.0.conv1", [0, 4] if removable_only else [0, 3, 4])
    with torch.no_grad():
        model.layer1[0].bn1.bias[[0, 4]] = -1.0
        model.layer1[0].bn1.bias[3] = 1.0
        for index, block in enumerate(model.layer3):
            null_rows(model, f"layer3.{index}.conv2", [2, 5])
            block.bn2.bias[[2, 5]] = -1.0
        latent_weight(model.layer2[1].conv2)[:, 6] *= 1e-6
        if not removable_only:
            null_rows(model, "layer3.1.conv2", [7])
    return model.eval()


def relative_error(outputs: torch.Tensor, expected: torch.Tensor) -> float:
    return float((outputs - expected).abs().max() / expected.abs().max())


def test_removable_null_channels_go_and_macs_match_the_reports_structured_count():
    model = resnet(removable_only=True)
    result = slim_model(model, EXAMPLE)
    slim = result.model
    assert (result.null_channels, result.removed, result.unread, result.kept) == (9, 9, 1, {})
    layer = slim.get_submodule  # the traced model's containers are plain modules: no indexing
    assert (layer("layer1.0.conv1").out_channels, layer("layer1.0.bn1").num_features,
            layer("layer1.0.conv2").in_channels) == (14, 14, 14)
    for block in range(3):
        assert layer(f"layer3.{block}.conv2").out_channels == layer(f"layer3.{block}.bn2").num_features == 62
    assert layer("layer3.1.conv1").in_channels == layer("layer3.2.conv1").in_channels == slim.fc.in_features == 62
    # layer3.0's shortcut pads 16 zero channels on each side of stage 2's 32; channels 2 and 5 were two of them
    pads = [node.args[1] for node in slim.graph.nodes if node.op == "call_function" and "pad" in node.name]
    assert pads == [(0, 0, 0, 0, 8, 8), (0, 0, 0, 0, 14, 16)]
    inputs = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, outputs = model(inputs), slim(inputs)
    assert relative_error(outputs, expected) <= 1e-5 and torch.equal(outputs.argmax(1), expected.argmax(1))
    before, after = result.parameters
    stage1 = 2 * 16 * 9 + 2 * 2 + 16 * 2 * 9  # conv1 rows, bn1 weight and bias, conv2 columns
    stage2 = 32 * 9 + 2 + 32 * 9  # layer2.1: the unread conv1 row, bn1, the zero conv2 column
    stage3 = 3 * (2 * 64 * 9 + 2 * 2) + 2 * 64 * 2 * 9 + 10 * 2  # conv2 rows, bn2, conv1 columns of blocks 1-2, fc
    assert before - after == stage1 + stage2 + stage3 == 6950
    assert (layer("layer2.1.conv1").out_channels, layer("layer2.1.conv2").in_channels) == (31, 31)
    macs = count_macs(model, EXAMPLE)
    assert result.macs == (sum(macs.values()), sum(structured_macs(model, EXAMPLE, macs).values()))
    assert result.macs[1] < result.macs[0]


def test_null_channels_stay_where_removing_them_is_not_exact(tmp_path):
    model = resnet(removable_only=False)
    result = slim_model(model, EXAMPLE)
    assert (result.null_channels, result.removed, result.unread) == (11, 9, 1)
    assert result.kept == {KEEP_PADDED: ["layer1.0.conv1[3]"], KEEP_LIVE: ["layer3.1.conv2[7]"]}
    assert result.lines()[1:] == [f"slim: kept 1 null channel, {KEEP_PADDED}: layer1.0.conv1 [3]",
                                  f"slim: kept 1 null channel, {KEEP_LIVE}: layer3.1.conv2 [7]"]
    assert result.model.get_submodule("layer1.0.conv1").out_channels == 14  # rows 0 and 4 went, row 3 stayed
    assert result.model.get_submodule("layer3.1.conv2").out_channels == 62  # row 7 stayed, its stream channel lives
    macs = count_macs(model, EXAMPLE)
    assert result.macs[1] == sum(structured_macs(model, EXAMPLE, macs).values())  # the report credits neither

    out = tmp_path / "slim.onnx"
    exported = export_onnx(model, EXAMPLE, out, slim=True)
    assert exported.slim.lines() == result.lines() and exported.slim.macs == result.macs
    inputs = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        expected = model(inputs)
    outputs = run_session(session(out.read_bytes()), inputs)
    assert relative_error(outputs, expected) <= 1e-5 and torch.equal(outputs.argmax(1), expected.argmax(1))


def test_a_nonzero_constant_folds_into_a_linear_layers_bias():
    torch.manual_seed(0)
    model = create_model("mlp", 10, 8)
    attach_weight_quantizers(model, [], DeadZoneLDZCompander, {"fixed_bit_val": 4, "learnable_bit": False})
    null_rows(model, "1", [5, 6])
    with torch.no_grad():
        model[1].bias[5], model[1].bias[6] = 0.3, -0.3  # ReLU: 0.3 stays a constant, -0.3 becomes 0
    model.eval()
    result = slim_model(model, torch.zeros(3, 8, 8))
    assert (result.null_channels, result.removed, result.kept) == (2, 2, {})
    first, second = result.model.get_submodule("1"), result.model.get_submodule("3")
    assert (first.out_features, second.in_features) == (254, 254)
    with torch.no_grad():
        quantized_second = model[3].weight
        folded = model[3].bias + 0.3 * quantized_second[:, 5]
        assert torch.allclose(second.bias, folded, rtol=0, atol=1e-6)
        assert not torch.allclose(second.bias, model[3].bias, rtol=0, atol=1e-3)
        inputs = torch.randn(5, 3, 8, 8)
        assert relative_error(result.model(inputs), model(inputs)) <= 1e-5


def test_rows_nothing_reads_go_from_a_residual_sum_whose_stream_lives_on(tmp_path):
    """The quickstart's case: the classifier reads nothing of stream channels 3 and 9, so layer3.2.conv2's rows 3 and 9
    (nonzero) feed nothing, while the stream's channels 3 and 9 still feed layer3.2.conv1. The rows go, the sum
    selects the stream's other channels, and the report's structured count is slim's."""
    torch.manual_seed(0)
    model = create_model("resnet20", 10, 16)
    attach_weight_quantizers(model, ["bn"], DeadZoneLDZCompander, {"fixed_bit_val": 4, "learnable_bit": False})
    with torch.no_grad():
        latent_weight(model.fc)[:, [3, 9]] *= 1e-6
    model.eval()
    result = slim_model(model, EXAMPLE)
    assert (result.null_channels, result.removed, result.unread, result.kept) == (2, 2, 2, {})
    slim = result.model
    assert slim.get_submodule("layer3.2.conv2").out_channels == slim.fc.in_features == 62
    assert slim.get_submodule("layer3.2.conv1").in_channels == 64  # the stream keeps them for this reader
    [select] = [node for node in slim.graph.nodes if node.target is torch.index_select]
    assert getattr(slim, select.args[2].target).tolist() == [c for c in range(64) if c not in (3, 9)]
    macs = count_macs(model, EXAMPLE)
    structured = structured_macs(model, EXAMPLE, macs)
    assert result.macs == (sum(macs.values()), sum(structured.values()))
    assert structured["layer3.2.conv2"] == 62 * 64 * 9 * 4 * 4 and structured["fc"] == 62 * 10
    inputs = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(inputs)
        assert relative_error(slim(inputs), expected) <= 1e-5
    exported = export_onnx(model, EXAMPLE, tmp_path / "slim.onnx", slim=True)
    outputs = run_session(session(exported.path.read_bytes()), inputs)
    assert relative_error(outputs, expected) <= 1e-5 and torch.equal(outputs.argmax(1), expected.argmax(1))
