"""ONNX export: integer-code initializers, onnxruntime against the fake-quantized model, size, and the command line."""
import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from codeq.app import cli
from codeq.attach import attach_weight_quantizers, quantized_layers
from codeq.compression import model_size, structural_probe
from codeq.errors import ExportError
from codeq.export import onnx as onnx_export
from codeq.export.grids import CHECK_BATCH, check_inputs, layer_grids, plain_model
from codeq.export.onnx import encode_weights, export_onnx, run_session, serialized, session, to_onnx
from codeq.export.packed import decode_weight
from codeq.models import create_model
from codeq.quantizers import DeadZoneLDZCompander
from conftest import quick_config, write_config

# (image size, layers left FP32) per model: norms stay float, as in the shipped configs.
MODELS = {"resnet20": (16, ["bn"]), "vit": (32, ["norm"]), "mlp": (8, [])}
MIXED = "mixed"
# Learned bit-widths given layer by layer, in this cycle: even the 3-layer MLP gets INT4 and INT8 layers.
MIXED_CYCLE = (2, 8, 5, 3, 6, 4, 7)


def bits_logit(bits: int) -> float:
    """The logit_bit whose bit-width round(tanh|l| * 6 + 2) is ``bits`` (8: tanh 0.995 rounds to 8)."""
    return math.atanh(min((bits - 2) / 6, 0.995))


def quantized(name: str, bits: int | str, seed: int = 0) -> torch.nn.Module:
    """``name`` with CoDeQ on every non-norm layer at ``bits`` (or learned bit-widths, MIXED_CYCLE), dead
    zones spread out, in eval mode."""
    torch.manual_seed(seed)
    size, exclude = MODELS[name]
    model = create_model(name, 10, size)
    kwargs = {"fixed_bit_val": 4, "learnable_bit": True} if bits == MIXED else {"fixed_bit_val": bits,
                                                                                 "learnable_bit": False}
    attach_weight_quantizers(model, exclude, DeadZoneLDZCompander, kwargs)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for index, (_, _, parametrization) in enumerate(quantized_layers(model)):
            parametrization.quantizer.logit_dz.fill_(float(torch.rand((), generator=generator)) * 2.5 + 0.2)
            parametrization.quantizer.logit_bit.fill_(bits_logit(MIXED_CYCLE[index % len(MIXED_CYCLE)]))
    return model.eval()


@pytest.fixture(scope="module")
def graphs() -> dict[str, onnx.ModelProto]:
    """``to_onnx`` of each architecture, made by its first test and reused by the others (``export_onnx(graph=)``):
    torch.onnx takes ~10 s for the ViT."""
    return {}


def initializers(path) -> dict[str, onnx.TensorProto]:
    return {tensor.name: tensor for tensor in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("bits", [2, 4, 8, MIXED])
@pytest.mark.parametrize("name", list(MODELS))
def test_onnxruntime_computes_what_the_fake_quantized_model_does(tmp_path, graphs, name, bits):
    model = quantized(name, bits)
    size = MODELS[name][0]
    example = torch.zeros(3, size, size)
    if name not in graphs:
        graphs[name] = to_onnx(plain_model(model), example)
    out = tmp_path / f"{name}.onnx"
    result = export_onnx(model, example, out, graph=graphs[name])
    grids, _ = layer_grids(model)
    stored = initializers(out)
    for key, grid in grids.items():
        assert key not in stored  # the float weight is gone: only its codes are in the file
        codes = stored[f"{key}.codes"]
        assert codes.data_type == (TensorProto.INT4 if grid.bits <= 4 else TensorProto.INT8)
        assert np.array_equal(numpy_helper.to_array(codes).astype(np.int64), grid.codes.numpy())
    if bits == MIXED:
        assert [grid.bits for grid in grids.values()] == [MIXED_CYCLE[i % 7] for i in range(len(grids))]
        assert set(result.encodings.values()) == {"INT4", "INT8"}
    else:
        assert {grid.bits for grid in grids.values()} == {bits}
    assert set(result.encodings) == set(grids) and len(grids) == sum(1 for _ in quantized_layers(model)) - (
        len(result.float_weights))
    runner = session(out.read_bytes())
    for batch in (1, 5):  # the batch dimension is dynamic
        inputs = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = model(inputs)
        outputs = run_session(runner, inputs)
        assert outputs.shape == expected.shape
        assert float((outputs - expected).abs().max() / expected.abs().max()) <= 1e-5
        assert torch.equal(outputs.argmax(1), expected.argmax(1))
    if bits == 4:
        assert out.stat().st_size <= 0.2 * result.fp32_onnx_bytes
        assert out.stat().st_size <= 0.2 * model_size(model).fp32_bytes


def test_the_graph_decodes_every_weight_bit_for_bit():
    model = quantized("resnet20", MIXED)
    grids, _ = layer_grids(model)
    plain = plain_model(model)
    proto = to_onnx(plain, torch.zeros(3, 16, 16))
    encode_weights(proto, grids, plain.state_dict())
    proto.graph.output.extend(helper.make_tensor_value_info(key, TensorProto.FLOAT, list(grid.codes.shape))
                              for key, grid in grids.items())
    runner = session(serialized(proto))
    names = [output.name for output in runner.get_outputs()][1:]
    decoded = runner.run(names, {"input": np.zeros((1, 3, 16, 16), np.float32)})
    offsets = 0
    for key, weight in zip(names, decoded):
        grid = grids[key]
        assert np.array_equal(weight, decode_weight(grid.codes, grid.step, grid.offset).numpy()), key
        offsets += float(grids[key].offset) != 0
    assert offsets == len(grids)  # every layer exercises the sign(c) * offset term


def test_fp32_layers_and_norms_stay_float(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet20", 10, 16)
    attach_weight_quantizers(model, ["fc"], DeadZoneLDZCompander, {"fixed_bit_val": 4, "learnable_bit": False})
    out = tmp_path / "model.onnx"
    result = export_onnx(model.eval(), torch.zeros(3, 16, 16), out)
    stored = initializers(out)
    assert stored["fc.weight"].data_type == TensorProto.FLOAT and "fc.weight.codes" not in stored
    norms = {key for key in result.float_weights if ".bn" in key or key.startswith("bn")}
    assert len(norms) == 19 and all(stored[key].data_type == TensorProto.FLOAT for key in norms)
    assert len(result.encodings) == 19  # the convolutions
    assert "19 quantized weights stored as float: norm layers, their quantized values" in result.lines()


class Halving(torch.nn.Module):
    """A quantizer without ``grid()``: its output is no integer grid that the export knows."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight / 2

    def stats(self, weight: torch.Tensor) -> dict[str, float]:
        return {"bits": 32.0, "deadzone": 0.0, "step": 0.0}


def test_a_quantizer_without_a_grid_is_stored_as_float_and_said_so(tmp_path):
    torch.manual_seed(0)
    model = create_model("mlp", 10, 8)
    attach_weight_quantizers(model, ["3", "5"], Halving, {})
    attach_weight_quantizers(model, ["1"], DeadZoneLDZCompander, {"fixed_bit_val": 4, "learnable_bit": False})
    out = tmp_path / "model.onnx"
    result = export_onnx(model.eval(), torch.zeros(3, 8, 8), out)
    reason = "no integer codes for them (quantizer Halving has no grid(weight) method, so it cannot be exported)"
    assert result.float_weights == {"1.weight": reason}
    assert f"1 quantized weight stored as float: {reason}" in result.lines()
    stored = initializers(out)
    assert stored["1.weight"].data_type == TensorProto.FLOAT
    assert np.array_equal(numpy_helper.to_array(stored["1.weight"]), model[1].weight.detach().numpy())
    assert {stored[f"{key}.codes"].data_type for key in ("3.weight", "5.weight")} == {TensorProto.INT4}


def test_a_copy_without_quantizers_leaves_the_model_whole():
    model = quantized("mlp", 4)
    inputs = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = model(inputs)
        structural_probe(model)
        plain = plain_model(model)
        assert torch.equal(model(inputs), before)  # the model still has its weights and its quantizers
        assert torch.equal(plain(inputs), before)
    assert sum(1 for _ in quantized_layers(model)) == 3 and not any(quantized_layers(plain))


def test_export_command_checks_on_validation_data_and_writes_nothing_on_failure(tmp_path, capsys, monkeypatch):
    config = quick_config(tmp_path, model="mlp")
    assert cli.main(["train", "--config", str(write_config(tmp_path, config))]) == 0
    checkpoint = next((tmp_path / "runs").glob("*/last.pt"))
    capsys.readouterr()
    out = tmp_path / "exported" / "model.onnx"
    assert cli.main(["export", str(checkpoint), str(out), "--check", "--slim"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"wrote {out}: {out.stat().st_size:,} B; FP32 ONNX ")
    assert lines[1].startswith("weights as integer codes: ")
    assert any(line.startswith("slim: removed ") for line in lines)
    accuracy = lines[-1]
    assert accuracy.startswith("validation accuracy on 360 samples: PyTorch (fake-quantized) ")
    torch_share, onnx_share = (float(part.split()[-2]) for part in accuracy.split(", "))
    assert torch_share == onnx_share > 10

    for argv, message in ([str(checkpoint), str(tmp_path / "model.pt")], "unknown format '.pt'"), (
            [str(checkpoint), str(tmp_path / "model.codeq"), "--slim"], "--slim and --check apply to ONNX"):
        assert cli.main(["export", *argv]) == 2
        error = capsys.readouterr().err
        assert error.startswith("export error: ") and message in error and error.count("\n") == 1

    out.write_bytes(b"previous")
    real_run = onnx_export.run_session
    monkeypatch.setattr(onnx_export, "run_session", lambda runner, inputs: real_run(runner, inputs) + 1.0)
    assert cli.main(["export", str(checkpoint), str(out)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("export error: onnxruntime's outputs differ from the fake-quantized model's")
    assert error.count("\n") == 1 and "nothing written" in error
    assert out.read_bytes() == b"previous" and sorted(out.parent.iterdir()) == [out]


class TokenClassifier(torch.nn.Module):
    """Token ids [N, length] (int) -> logits [N, 3]: an embedding, a Linear per token, a Linear over all of them;
    with ``as_dict`` the logits come in a dict, as a Hugging Face model's ModelOutput does."""

    def __init__(self, vocab: int = 12, length: int = 6, as_dict: bool = False) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 8)
        self.mix = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8 * length, 3)
        self.as_dict = as_dict

    def forward(self, ids: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        logits = self.head(torch.relu(self.mix(self.embed(ids))).flatten(1))
        return {"logits": logits} if self.as_dict else logits


def token_classifier(as_dict: bool = False) -> TokenClassifier:
    torch.manual_seed(0)
    model = TokenClassifier(as_dict=as_dict)
    attach_weight_quantizers(model, ["type:Embedding"], DeadZoneLDZCompander, {"fixed_bit_val": 4,
                                                                                 "learnable_bit": False})
    return model.eval()


def test_token_ids_are_checked_with_ids_of_their_range_and_dtype():
    example = torch.tensor([3, 9, 4, 4, 7, 5], dtype=torch.int32)
    inputs = check_inputs(example)
    assert inputs.shape == (CHECK_BATCH, 6) and inputs.dtype == torch.int32
    assert int(inputs.min()) == 3 and int(inputs.max()) == 9  # every id of the range, none outside it
    assert torch.equal(inputs, check_inputs(example))  # seeded
    assert check_inputs(torch.zeros(3, 8, 8)).dtype == torch.float32


def test_a_model_of_token_ids_exports_with_integer_input_and_dynamic_batch(tmp_path):
    model = token_classifier()
    out = tmp_path / "tokens.onnx"
    result = export_onnx(model, torch.tensor([0, 11, 5, 2, 7, 1]), out)
    assert set(result.encodings) == {"mix.weight", "head.weight"} and result.agreement.samples == CHECK_BATCH
    runner = session(out.read_bytes())
    graph_input = runner.get_inputs()[0]
    assert graph_input.type == "tensor(int64)" and isinstance(graph_input.shape[0], str) and graph_input.shape[1] == 6
    for batch in (1, 5):
        ids = torch.randint(0, 12, (batch, 6), generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = model(ids)
        assert float((run_session(runner, ids) - expected).abs().max() / expected.abs().max()) <= 1e-5


def test_a_model_that_returns_no_single_tensor_is_refused_by_name(tmp_path):
    out = tmp_path / "dict.onnx"
    with pytest.raises(ExportError, match=r"TokenClassifier returns a dict, not one tensor: export a module that "
                                          r"returns the logits tensor"):
        export_onnx(token_classifier(as_dict=True), torch.arange(6), out)
    assert not out.exists()
