"""ONNX export of a compressed model: integer codes at their bit-width, turned back into weights inside the graph.

    codeq export CHECKPOINT OUT.onnx [--slim] [--check]     (or codeq.export_onnx from Python)

The plain (quantizer-free) model is exported with ``torch.onnx.export`` (the torch.export-based exporter, opset
21, batch dimension dynamic). Then every quantized Conv2d/Linear weight initializer is replaced by its integer
codes c in [-Q, Q] (Q = 2^(b-1) - 1) as an INT4 initializer for b <= 4 and INT8 for 5 <= b <= 8, its step s and
offset delta (float32 scalars), and five standard nodes that rebuild it under its old name:

    scaled = DequantizeLinear(codes, s)                 s * c
    unit   = DequantizeLinear(codes, 1)                 c
    weight = Add(Mul(Sign(unit), delta), scaled)        sign(c) * delta + s * c

(only ``scaled`` where delta = 0, the uniform quantizer). CoDeQ's grid is not affine (a gap around zero), so it
is the sum of two dequantized terms; the float32 operations are the quantizer's own, so the weights onnxruntime
computes are bit for bit the fake-quantized model's. Norm weights, FP32 layers and every other tensor stay float.
The file is written only after onnxruntime's outputs on a batch agree with the fake-quantized PyTorch model's.
"""
from __future__ import annotations

import io
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper
from torch import Tensor, nn

from codeq.compression import EXAMPLE_INPUT, model_size
from codeq.errors import ExportError, first_line
from codeq.export.grids import (
    CHECK_BATCH,
    RELATIVE_TOLERANCE,
    LayerGrid,
    check_inputs,
    exported_inputs,
    layer_grids,
    plain_model,
)
from codeq.export.slim import SlimResult, slim_model
from codeq.io import atomic_write

OPSET = 21  # INT4 tensors and DequantizeLinear on them exist from opset 21 (IR version 10) on
INT4_MAX_BITS = 4
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def to_onnx(model: nn.Module, example: Tensor) -> onnx.ModelProto:
    """The ONNX graph (opset ``OPSET``) of a plain float32 model, input ``input`` [batch, ...] (float32, or the
    integer ``example``'s dtype) with a dynamic batch, output ``logits``; parameters are initializers under their
    state-dict names.

    Raises ExportError when the model does not return one tensor or torch.onnx cannot export it.
    """
    # Two items: torch.export would specialise a batch of one to the constant 1.
    inputs = check_inputs(example, 2)
    try:
        output = model.eval()(inputs)
    except Exception as error:  # noqa: BLE001 - whatever the model raises, the likely cause is the example's shape
        raise ExportError(f"{type(model).__name__} fails on a batch of example inputs {list(inputs.shape)} ("
                          f"{first_line(error, with_type=True, limit=200)}); the example is {EXAMPLE_INPUT}") from error
    if not isinstance(output, Tensor):
        raise ExportError(f"{type(model).__name__} returns a {type(output).__name__}, not one tensor: export a module "
                          "that returns the logits tensor (e.g. one whose forward returns model(inputs).logits)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # optimize=False: the optimizer would fold BatchNorm into the convolutions and transpose Linear weights
            # into new constants, and the quantized weights would be lost among them; onnxruntime optimises at load.
            program = torch.onnx.export(model.eval(), (inputs,), dynamo=True, opset_version=OPSET, optimize=False,
                                        verbose=False, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        dynamic_shapes=({0: torch.export.Dim("batch")},))
    except Exception as error:  # noqa: BLE001 - the exporter raises many kinds; each is the same user-facing failure
        raise ExportError(f"torch.onnx.export failed for {type(model).__name__} "
                          f"({first_line(error, with_type=True, limit=200)})") from None
    return without_debug_info(program.model_proto)


def without_debug_info(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` without the exporter's debug records (stack traces with local paths, FX nodes, the exported
    program's signature), which would take more room than a 4-bit ResNet-20's weights (in place)."""
    del proto.graph.metadata_props[:]
    proto.graph.doc_string = ""
    for entry in [*proto.graph.node, *proto.graph.value_info, *proto.graph.input, *proto.graph.output,
                  *proto.graph.initializer]:
        del entry.metadata_props[:]
        entry.doc_string = ""
    return proto


def with_values(graph: onnx.ModelProto, plain: nn.Module) -> onnx.ModelProto:
    """A copy of ``graph`` (``to_onnx`` of a model of the same architecture) holding ``plain``'s tensors: every
    initializer named by a state-dict key gets that tensor's values. Raises ExportError on a shape or dtype change."""
    proto = onnx.ModelProto()
    proto.CopyFrom(graph)
    state = plain.state_dict()
    for index, tensor in enumerate(proto.graph.initializer):
        if tensor.name not in state:
            continue
        value = state[tensor.name].detach().cpu().numpy()
        if list(tensor.dims) != list(value.shape) or helper.np_dtype_to_tensor_dtype(value.dtype) != tensor.data_type:
            raise ExportError(f"the graph given for reuse does not fit this model: {tensor.name} differs in shape or "
                              "dtype")
        proto.graph.initializer[index].CopyFrom(numpy_helper.from_array(value, tensor.name))
    return proto


def code_array(grid: LayerGrid) -> np.ndarray:
    """The codes as int4 (``bits`` <= 4) or int8 numpy values, the dtypes onnx stores as INT4 / INT8."""
    dtype = ml_dtypes.int4 if grid.bits <= INT4_MAX_BITS else np.int8
    return grid.codes.numpy().astype(np.int8).astype(dtype)


def encode_weights(proto: onnx.ModelProto, grids: dict[str, LayerGrid],
                   weights: dict[str, Tensor]) -> tuple[dict[str, str], dict[str, str]]:
    """Replace each initializer named by a key of ``grids`` by its codes and the nodes decoding them (in place).

    ``weights``: the exported model's state dict, whose quantized weights the grids decode to exactly
    (``layer_codes`` checks that). Returns (key -> "INT4"/"INT8" for the encoded weights, key -> reason for grids
    left as float). Raises ExportError when an initializer does not hold that weight: the graph is not the model's.
    """
    graph = proto.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    one = "codeq.one"
    nodes, added, encoded, floats = [], [], {}, {}
    for key, grid in grids.items():
        tensor = initializers.get(key)
        if tensor is None:
            floats[key] = "the exporter did not keep them as initializers"
            continue
        if not np.array_equal(numpy_helper.to_array(tensor), weights[key].detach().cpu().numpy()):
            raise ExportError(f"initializer {key} does not hold the quantized weight; the exported graph is not the "
                              "model's")
        graph.initializer.remove(tensor)
        codes = code_array(grid)
        encoded[key] = "INT4" if codes.dtype == ml_dtypes.int4 else "INT8"
        added += [numpy_helper.from_array(codes, f"{key}.codes"),
                  numpy_helper.from_array(grid.step.numpy(), f"{key}.step")]
        if float(grid.offset) == 0:
            nodes.append(helper.make_node("DequantizeLinear", [f"{key}.codes", f"{key}.step"], [key]))
            continue
        added.append(numpy_helper.from_array(grid.offset.numpy(), f"{key}.offset"))
        nodes += [helper.make_node("DequantizeLinear", [f"{key}.codes", f"{key}.step"], [f"{key}.scaled"]),
                  helper.make_node("DequantizeLinear", [f"{key}.codes", one], [f"{key}.unit"]),
                  helper.make_node("Sign", [f"{key}.unit"], [f"{key}.sign"]),
                  helper.make_node("Mul", [f"{key}.sign", f"{key}.offset"], [f"{key}.shift"]),
                  helper.make_node("Add", [f"{key}.shift", f"{key}.scaled"], [key])]
    if any(node.input[1] == one for node in nodes):
        added.append(numpy_helper.from_array(np.array(1.0, np.float32), one))
    graph.initializer.extend(added)
    # The decoding nodes read initializers only: placed first, the graph stays topologically sorted.
    everything = nodes + list(graph.node)
    del graph.node[:]
    graph.node.extend(everything)
    return encoded, floats


def session(model_bytes: bytes, threads: int | None = None, decode_at_load: bool = False) -> ort.InferenceSession:
    """An onnxruntime CPU session; ``threads`` sets the intra-op threads (None: onnxruntime's default).

    By default onnxruntime keeps DequantizeLinear nodes for its quantized kernels, so the weights are decoded at
    every run (on 2 cores, ~20x a 4-bit ResNet-20's FP32 latency at batch 1). ``decode_at_load`` sets
    ``session.disable_quant_qdq``: constant folding then decodes them once, when the session is created.
    """
    options = ort.SessionOptions()
    # Errors only: the graph optimiser warns about every constant it cannot fold (a BERT's attention-mask CastLike
    # nodes), which changes no output.
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if decode_at_load:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def run_session(runner: ort.InferenceSession, inputs: Tensor) -> Tensor:
    """onnxruntime's outputs for a batch (float inputs run as float32, integer ones in their dtype), as a tensor."""
    return torch.from_numpy(runner.run([OUTPUT_NAME], {INPUT_NAME: exported_inputs(inputs).numpy()})[0])


@dataclass
class Agreement:
    """How onnxruntime's outputs compare to the reference model's over one or more batches."""

    max_difference: float = 0.0
    max_reference: float = 0.0
    samples: int = 0
    argmax_mismatches: int = 0

    @property
    def relative_error(self) -> float:
        return self.max_difference / max(self.max_reference, torch.finfo(torch.float32).tiny)

    @property
    def ok(self) -> bool:
        return self.relative_error <= RELATIVE_TOLERANCE and self.argmax_mismatches == 0

    def add(self, reference: Tensor, outputs: Tensor) -> None:
        """Count one batch: [N, classes] reference and onnxruntime outputs.

        A differing argmax counts unless the reference's two largest outputs lie within the tolerance of each
        other: a near-tie, which float rounding may decide either way.
        """
        self.max_difference = max(self.max_difference, float((outputs - reference).abs().max()))
        self.max_reference = max(self.max_reference, float(reference.abs().max()))
        self.samples += reference.shape[0]
        differs = outputs.argmax(-1) != reference.argmax(-1)
        if reference.shape[-1] > 1:
            top = reference.topk(2, dim=-1).values
            differs &= (top[..., 0] - top[..., 1]) > RELATIVE_TOLERANCE * reference.abs().max()
        self.argmax_mismatches += int(differs.sum())

    def line(self) -> str:
        return (f"relative max error {self.relative_error:.2e} (limit {RELATIVE_TOLERANCE:g}), argmax differs on "
                f"{self.argmax_mismatches} of {self.samples}")


@dataclass
class Accuracy:
    """Validation accuracy of the fake-quantized PyTorch model and of the ONNX file, over the same samples."""

    samples: int = 0
    torch_correct: int = 0
    onnx_correct: int = 0

    def line(self) -> str:
        share = 100 / max(self.samples, 1)
        return (f"validation accuracy on {self.samples} samples: PyTorch (fake-quantized) "
                f"{self.torch_correct * share:.2f} %, onnxruntime {self.onnx_correct * share:.2f} %")


@dataclass
class OnnxExport:
    """What ``export_onnx`` wrote and measured."""

    path: Path
    file_bytes: int
    fp32_onnx_bytes: int
    estimate_bytes: int
    encodings: dict[str, str]
    float_weights: dict[str, str]
    agreement: Agreement
    accuracy: Accuracy | None = None
    slim: SlimResult | None = None

    def lines(self) -> list[str]:
        kinds = list(self.encodings.values())
        reasons: dict[str, int] = {}
        for reason in self.float_weights.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        lines = [f"wrote {self.path}: {self.file_bytes:,} B; FP32 ONNX {self.fp32_onnx_bytes:,} B "
                 f"({self.fp32_onnx_bytes / self.file_bytes:.2f}x larger); report's compressed estimate "
                 f"{self.estimate_bytes:,} B",
                 f"weights as integer codes: {kinds.count('INT4')} INT4, {kinds.count('INT8')} INT8"]
        lines += [f"{count} quantized weight{'s' if count > 1 else ''} stored as float: {reason}"
                  for reason, count in reasons.items()]
        lines += self.slim.lines() if self.slim is not None else []
        lines.append(f"checked against the fake-quantized model on {CHECK_BATCH} random inputs: "
                     f"{self.agreement.line()}")
        if self.accuracy is not None:
            lines.append(self.accuracy.line())
        return lines


def serialized(proto: onnx.ModelProto) -> bytes:
    buffer = io.BytesIO()
    onnx.save_model(proto, buffer)
    return buffer.getvalue()


@torch.no_grad()
def validate_export(runner: ort.InferenceSession, reference: nn.Module,
                    batches: Iterable[tuple[Tensor, Tensor]]) -> tuple[Agreement, Accuracy]:
    """Agreement and accuracies of the ONNX session against ``reference`` over (inputs, labels) batches."""
    agreement, accuracy = Agreement(), Accuracy()
    for inputs, labels in batches:
        expected = reference(exported_inputs(inputs)).float()
        outputs = run_session(runner, inputs)
        agreement.add(expected, outputs)
        accuracy.samples += labels.numel()
        accuracy.torch_correct += int((expected.argmax(-1) == labels).sum())
        accuracy.onnx_correct += int((outputs.argmax(-1) == labels).sum())
    return agreement, accuracy


@torch.no_grad()
def export_onnx(model: nn.Module, example: Tensor, out: Path, slim: bool = False,
                validation: Iterable[tuple[Tensor, Tensor]] | None = None,
                graph: onnx.ModelProto | None = None) -> OnnxExport:
    """Write ``model`` (quantizers attached, CPU) to ``out`` as ONNX with integer-code weights; with ``slim``,
    without its removable null channels (``codeq.export.slim``).

    ``example`` is one input without its batch dimension ([C, H, W], token ids [seq_len]) or an image batch
    [N, C, H, W] (``single_sample``); only its shape, dtype and, for integer inputs, range of values matter.
    ``graph``: ``to_onnx`` of a model of the same architecture, reused instead of exporting again (torch.onnx takes
    seconds, a ViT ~10 s). Before anything is written, onnxruntime runs the file on ``CHECK_BATCH`` random inputs
    and, with ``validation`` ((inputs, labels) batches), on those too; outputs must agree with the fake-quantized
    model (``Agreement.ok``). Raises ExportError otherwise, or when the model cannot be exported (it must take one
    tensor and return one tensor); ``out`` is then left as it was.
    """
    was_training = model.training
    model.eval()
    try:
        grids, floats = layer_grids(model)
        plain = plain_model(model)
        proto = to_onnx(plain, example) if graph is None else with_values(graph, plain)
        fp32_bytes = len(serialized(proto))  # the same graph with float32 weights
        slimmed, exported = None, plain
        if slim:
            slimmed = slim_model(model, example, grids)
            exported, grids = slimmed.model, slimmed.grids
            proto = to_onnx(exported, example)
        encodings, unencoded = encode_weights(proto, grids, exported.state_dict())
        data = serialized(proto)
        runner = session(data)
        agreement, _ = validate_export(runner, model, [(check_inputs(example), torch.zeros(CHECK_BATCH))])
        if not agreement.ok:
            raise ExportError(f"onnxruntime's outputs differ from the fake-quantized model's: {agreement.line()}; "
                              "nothing written")
        accuracy = None
        if validation is not None:
            checked, accuracy = validate_export(runner, model, validation)
            if not checked.ok:
                raise ExportError(f"on the validation set onnxruntime's outputs differ from the fake-quantized "
                                  f"model's: {checked.line()}; nothing written")
        atomic_write(out, data)
    finally:
        model.train(was_training)
    return OnnxExport(out, len(data), fp32_bytes, model_size(model).compressed_bytes, encodings,
                      {**floats, **unencoded}, agreement, accuracy, slimmed)
