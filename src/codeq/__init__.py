"""CoDeQ-train: quantization-aware training with CoDeQ, the dead-zone quantizer that prunes and quantizes a network
in one differentiable operator (Wenshøj et al., arXiv 2512.12981).

Use it from any training loop::

    import codeq

    codeq.prepare(model, "deadzone", {"fixed_bit_val": 4, "learnable_bit": False}, exclude_layers=["type:BatchNorm2d"])
    optimizer = torch.optim.AdamW(codeq.param_groups(model, base={"lr": 1e-3}, dz={"lr": 1e-3, "weight_decay": 5.0}))
    for inputs, targets in loader:
        with codeq.quantized_step(model):
            loss = criterion(model(inputs), targets)
        optimizer.zero_grad(); loss.backward(); optimizer.step()
    codeq.recalibrate_bn(model, loader, batches=5)             # BatchNorm statistics of the quantized weights
    print(codeq.compression_report(model, inputs[0])["sparsity"])
    plain = codeq.convert(model)                               # quantizers removed, quantized weights in place
    codeq.export_onnx(model, inputs[0], "model.onnx")          # extra `onnx`

To end at a budget (a sparsity, Rel. BOPs or size) rather than at a fixed pressure, let a ``codeq.BudgetController``
adjust the pressure: call its ``step()`` after each ``optimizer.step()``.

Importing ``codeq`` loads torch and nothing of the application (config, YAML, W&B, command line) or of the optional
extras (onnx, timm, numba), and changes no global state. The YAML tool is ``codeq train|evaluate|report|export|sweep``
(``codeq.app``).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from torch import Tensor, nn

from codeq.attach import prepare, quantized_step, toggle_quantization
from codeq.bn import recalibrate_bn
from codeq.budget import BudgetController
from codeq.compression import compression_report
from codeq.convert import convert
from codeq.models import MODEL_REGISTRY, create_model
from codeq.optim import param_groups
from codeq.quantizers import QUANTIZER_REGISTRY, DeadZoneLDZCompander, UniformSymmetric
from codeq.regularizers import LOSS_REGISTRY, LossTerm, bit_l2, dz_l2, group_lasso

if TYPE_CHECKING:
    from codeq.export.onnx import OnnxExport

__version__ = "0.3.0"

__all__ = [
    "LOSS_REGISTRY", "MODEL_REGISTRY", "QUANTIZER_REGISTRY", "BudgetController", "DeadZoneLDZCompander", "LossTerm",
    "UniformSymmetric",
    "bit_l2", "compression_report", "convert", "create_model", "dz_l2", "export_onnx", "group_lasso",
    "param_groups", "prepare", "quantized_step", "recalibrate_bn", "toggle_quantization",
]


def export_onnx(model: nn.Module, example_input: Tensor, path: str | Path, slim: bool = False) -> OnnxExport:
    """Write ``model`` (quantizers attached) to ``path`` as standard ONNX whose quantized Conv2d/Linear weights are
    INT4 (bit-width <= 4) or INT8 integer codes decoded inside the graph; checked before it is written.

    The model must take one tensor and return one tensor (the logits): wrap a model that takes keyword arguments or
    returns a ``ModelOutput`` or tuple (a Hugging Face model) in a module whose ``forward(input_ids)`` returns
    ``model(input_ids=input_ids).logits``. onnxruntime runs the file on a seeded random batch of 8 items of
    ``example_input``'s shape (standard-normal floats, or for integer inputs ids drawn from the range of
    ``example_input``'s values); its outputs must match the fake-quantized model's (relative max error <= 1e-5,
    same argmax), else nothing is written. Opset 21, input ``input`` ``[batch, ...]`` (float32, or the example's
    integer dtype) with a dynamic batch dimension, output ``logits``. Needs the extra ``onnx``
    (``pip install 'codeq-train[onnx]'``).

    Args:
        model: the model after ``prepare`` and training (a CPU copy is exported; ``model`` is not changed).
        example_input: one input without its batch dimension (an image ``[C, H, W]`` float, token ids ``[seq_len]``
            int64) or an image batch ``[N, C, H, W]``, whose first item is used; its shape and dtype (and, for
            integer inputs, the range of its values) matter, not its values.
        path: the ``.onnx`` file to write (atomically: whole or not at all).
        slim: also remove whole null output channels where that is exact (fewer MACs, same outputs; models
            ``torch.fx`` can trace).

    Returns:
        An ``OnnxExport``: ``file_bytes``, ``fp32_onnx_bytes``, the encodings per weight, the agreement measured;
        ``.lines()`` describes it.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``example_input`` not a tensor.
        ValueError: ``path`` is a directory.
        ImportError: the extra ``onnx`` is not installed.
        ExportError: the model fails on the example's shape, does not return one tensor, cannot be exported, or
            onnxruntime disagrees with it (nothing is written).

    Examples:
        >>> codeq.export_onnx(model, torch.zeros(3, 32, 32), "model.onnx").file_bytes
        188134
        >>> class Logits(nn.Module):  # a Hugging Face classifier: token ids in, logits out
        ...     def __init__(self, model): super().__init__(); self.model = model
        ...     def forward(self, input_ids): return self.model(input_ids=input_ids).logits
        >>> codeq.export_onnx(Logits(bert), input_ids[0], "bert.onnx")  # input_ids[0]: int64 [seq_len]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx(model=...) takes an nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, Tensor):
        raise TypeError(f"export_onnx(example_input=...) takes a tensor, got {type(example_input).__name__}")
    if Path(path).is_dir():
        raise ValueError(f"export_onnx(path={str(path)!r}) is a directory: give the .onnx file to write")
    try:
        from codeq.export.onnx import export_onnx as write_onnx
    except ModuleNotFoundError as error:
        raise ImportError(f"export_onnx needs {error.name}: pip install 'codeq-train[onnx]'") from None
    return write_onnx(model, example_input, Path(path), slim=slim)
