"""Quantized weights as integer codes on their grid, the form the ONNX export and slimming work on."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from codeq.attach import quantized_layers
from codeq.compression import MAC_LAYERS, random_ids, single_sample
from codeq.convert import convert, plain_copy
from codeq.errors import ExportError
from codeq.export.packed import layer_codes

CHECK_BATCH = 8
CHECK_SEED = 0
# onnxruntime (or a slimmed model) against the fake-quantized model: max |difference| / max |its output| over a batch.
RELATIVE_TOLERANCE = 1e-5


@dataclass(frozen=True)
class LayerGrid:
    """A quantized weight as integer codes (int64, the weight's shape) on the grid sign(c) * offset + step * c;
    ``step`` and ``offset`` are 0-dim tensors of the weight's dtype."""

    codes: Tensor
    step: Tensor
    offset: Tensor
    bits: int

    def select(self, rows: Tensor, columns: Tensor) -> LayerGrid:
        """The grid of the weight's sub-tensor ``weight[rows][:, columns]`` (index tensors)."""
        return LayerGrid(self.codes[rows][:, columns], self.step, self.offset, self.bits)


def weight_key(module_name: str) -> str:
    return f"{module_name}.weight" if module_name else "weight"


def plain_model(model: nn.Module, quantized: bool = True) -> nn.Module:
    """A CPU copy of ``model`` in eval mode without quantizers, holding its compressed weights (``quantized``) or its
    latent FP32 ones. ``model`` itself is not changed."""
    return (convert(model) if quantized else plain_copy(model)).cpu().eval()


def layer_grids(model: nn.Module) -> tuple[dict[str, LayerGrid], dict[str, str]]:
    """The grids of ``model``'s quantized Conv2d/Linear weights by state key, and why any other quantized weight
    is stored as float (norm layers; a quantizer without an exact grid; weights not float32)."""
    grids, floats = {}, {}
    for name, module, _ in quantized_layers(model):
        key = weight_key(name)
        if not isinstance(module, MAC_LAYERS):
            floats[key] = "norm layers, their quantized values"
            continue
        try:
            codes, step, offset, bits = layer_codes(module)
        except ExportError as error:
            floats[key] = f"no integer codes for them ({error})"
            continue
        if step.dtype != torch.float32:
            floats[key] = f"{step.dtype} weights, kept in their dtype"
            continue
        grids[key] = LayerGrid(codes, step, offset, bits)
    return grids, floats


def check_inputs(example: Tensor, count: int = CHECK_BATCH) -> Tensor:
    """A seeded batch of ``count`` inputs of ``example``'s item shape (``single_sample``): standard-normal float32
    values, or for an integer ``example`` (token ids) ids of its dtype in the range of its values."""
    generator = torch.Generator().manual_seed(CHECK_SEED)
    if not example.is_floating_point():
        return random_ids(example, count, generator)
    return torch.randn((count, *single_sample(example).shape[1:]), generator=generator)


def exported_inputs(inputs: Tensor) -> Tensor:
    """``inputs`` as the exported graph takes them: float ones as float32 (the graph's dtype), integer ones as they
    are (the graph keeps the example's integer dtype)."""
    return inputs.float() if inputs.is_floating_point() else inputs
