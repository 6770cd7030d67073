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

    onnxruntime runs the file on a seeded random batch of ``example_input``'s shape; its outputs must match the
    fake-quantized model's (relative max error <= 1e-5, same argmax), else nothing is written. Opset 21, dynamic
    batch, input ``input``, output ``logits``. Needs the extra ``onnx`` (``pip install 'codeq-train[onnx]'``).

    Args:
        model: the model after ``prepare`` and training (moved to the CPU copy internally; not changed).
        example_input: one input ``[C, H, W]`` or a batch ``[N, C, H, W]`` (float32); only its shape matters.
        path: the ``.onnx`` file to write (atomically: whole or not at all).
        slim: also remove whole null output channels where that is exact (fewer MACs, same outputs).

    Returns:
        An ``OnnxExport``: ``file_bytes``, ``fp32_onnx_bytes``, the encodings per weight, the agreement measured;
        ``.lines()`` describes it.

    Raises:
        ImportError: the extra ``onnx`` is not installed.
        ExportError: the model cannot be exported, or onnxruntime disagrees with it (nothing is written).

    Examples:
        >>> codeq.export_onnx(model, torch.zeros(3, 32, 32), "model.onnx").file_bytes
        188134
    """
    try:
        from codeq.export.onnx import export_onnx as write_onnx
    except ModuleNotFoundError as error:
        raise ImportError(f"export_onnx needs {error.name}: pip install 'codeq-train[onnx]'") from None
    return write_onnx(model, example_input, Path(path), slim=slim)
