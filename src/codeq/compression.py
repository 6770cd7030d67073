"""Compression read-outs of a model: per-layer bit-width, dead zone, step, sparsity, MACs, BOPs and size.

Every definition (which layers count, BOPs, the structured column, size accounting) is written out
in docs/compression.md; this module is its implementation.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from codeq.attach import latent_weight, quantized_layers, quantizer_of
from codeq.channels import MAC_LAYERS, channel_graph, single_sample
from codeq.convert import compressed_weight, inference_state
from codeq.errors import ExportError, first_line
from codeq.quantizers.base import layer_readout

FP32_BITS = 32
# Activations are not quantized: by default every MAC multiplies by a 32-bit activation (paper, Eqs. 20-22).
ACTIVATION_BITS = 32
# Per quantized layer the step s and the offset delta, as float32.
SCALE_BYTES = 8


@dataclass(frozen=True)
class BopsSettings:
    """The bit-widths BOPs count: activations, and the weights of layers left in FP32 (config section ``report``).
    The dense reference of Rel. BOPs stays 32-bit weights times 32-bit activations."""

    activation_bits: int = ACTIVATION_BITS
    fp_weight_bits: int = FP32_BITS

    @classmethod
    def of(cls, config: dict) -> BopsSettings:
        """The settings of a resolved config dict (defaults where it has no ``report`` section: older runs)."""
        return cls(**(config.get("report") or {}))


# What the paper counts: 32-bit activations, FP32 layers at 32 bits.
W32A32 = BopsSettings()


@dataclass
class LayerStats:
    """One counted layer. ``bits`` is 32 and ``deadzone``/``step`` are None for layers left in FP32, whose BOPs
    count ``fp_weight_bits`` instead; every layer's BOPs count ``activation_bits`` per activation."""

    name: str
    kind: str
    quantized: bool
    bits: float
    deadzone: float | None
    step: float | None
    numel: int
    nonzero: int
    macs: int = 0
    structured_macs: int | None = None
    activation_bits: int = ACTIVATION_BITS
    fp_weight_bits: int = FP32_BITS

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    @property
    def density(self) -> float:
        return self.nonzero / max(self.numel, 1)

    @property
    def counted_bits(self) -> float:
        """The weight bit-width BOPs count: the learned one, or ``fp_weight_bits`` for a layer left in FP32."""
        return self.bits if self.quantized else self.fp_weight_bits

    @property
    def bops(self) -> float:
        return self.density * self.macs * self.counted_bits * self.activation_bits

    @property
    def dense_bops(self) -> int:
        return self.macs * FP32_BITS * ACTIVATION_BITS

    @property
    def structured_bops(self) -> float | None:
        if self.structured_macs is None:
            return None
        return self.structured_macs * self.counted_bits * self.activation_bits


def layer_kind(module: nn.Module) -> str:
    """The module's class name, without the wrapper class that parametrization injects."""
    cls = type(module).__bases__[0] if parametrize.is_parametrized(module) else type(module)
    return cls.__name__


def counted_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every quantized module and every Conv2d/Linear, in module order."""
    return [(name, module) for name, module in model.named_modules()
            if quantizer_of(module) is not None or isinstance(module, MAC_LAYERS)]


@torch.no_grad()
def layer_stats(model: nn.Module, macs: dict[str, int] | None = None, structured_macs: dict[str, int] | None = None,
                settings: BopsSettings = W32A32) -> list[LayerStats]:
    """One entry per counted module, measured on its current compressed weight; BOPs counted with ``settings``."""
    macs, structured_macs = macs or {}, structured_macs or {}
    stats = []
    for name, module in counted_modules(model):
        quantizer = quantizer_of(module)
        weight = compressed_weight(module)
        if quantizer is not None:
            readout = layer_readout(quantizer, latent_weight(module), weight)
            bits, deadzone, step = readout["bits"], readout["deadzone"], readout["step"]
        else:
            bits, deadzone, step = float(FP32_BITS), None, None
        stats.append(LayerStats(name, layer_kind(module), quantizer is not None, bits, deadzone, step,
                                weight.numel(), int(torch.count_nonzero(weight)), macs.get(name, 0),
                                structured_macs.get(name), settings.activation_bits, settings.fp_weight_bits))
    return stats


def summary(stats: list[LayerStats]) -> dict[str, float]:
    """Sparsity and bit-width over the quantized layers; Rel. BOPs over every MAC layer once MACs are known."""
    result: dict[str, float] = {}
    quantized = [s for s in stats if s.quantized]
    if quantized:
        total = sum(s.numel for s in quantized)
        result["sparsity"] = 1.0 - sum(s.nonzero for s in quantized) / total
        result["mean_layer_sparsity"] = sum(s.sparsity for s in quantized) / len(quantized)
        result["mean_bits"] = sum(s.bits for s in quantized) / len(quantized)
    dense_bops = sum(s.dense_bops for s in stats)
    if dense_bops:
        result["rel_bops"] = sum(s.bops for s in stats) / dense_bops
        if all(s.structured_bops is not None for s in stats if s.macs):
            result["rel_bops_structured"] = sum(s.structured_bops or 0.0 for s in stats) / dense_bops
    return result


@torch.no_grad()
def dead_zone_summary(model: nn.Module) -> dict[str, float]:
    """The two dead-zone curves of the paper's Fig. 4, over the quantizers with a dead-zone logit ``logit_dz``
    (CoDeQ's): ``mean_logit_dz``, the mean |θ_dz|, and ``mean_deadzone_share``, the mean dead-zone width as a share
    of the robust range, d / 2R = 1 - tanh|θ_dz| (Eq. 15; 0: no dead zone, 1: every weight pruned). Empty when no
    quantizer has the logit."""
    logits = [quantizer.logit_dz.detach().abs().float().cpu() for _, module in counted_modules(model)
              if isinstance(getattr(quantizer := quantizer_of(module), "logit_dz", None), Tensor)]
    if not logits:
        return {}
    stacked = torch.stack([logit.reshape(()) for logit in logits])
    return {"mean_logit_dz": stacked.mean().item(), "mean_deadzone_share": (1 - torch.tanh(stacked)).mean().item()}


def as_rows(stats: list[LayerStats]) -> list[dict]:
    return [{**asdict(s), "sparsity": s.sparsity, "bops": s.bops, "dense_bops": s.dense_bops,
             "structured_bops": s.structured_bops} for s in stats]


# What an example input is, as errors about one say it.
EXAMPLE_INPUT = ("one input without its batch dimension (an image [C, H, W], token ids [seq_len]) or an image batch "
                 "[N, C, H, W]")


def dense_macs(module: nn.Module, inputs: Tensor, output: Tensor) -> int:
    """Multiply-accumulates of one call on a batch of one, with every weight non-zero."""
    if isinstance(module, nn.Conv2d):
        kernel = module.kernel_size[0] * module.kernel_size[1]
        return module.in_channels // module.groups * module.out_channels * kernel * output.shape[-2] * output.shape[-1]
    positions = inputs.numel() // module.in_features
    return module.in_features * module.out_features * positions


@torch.no_grad()
def count_macs(model: nn.Module, example: Tensor) -> dict[str, int]:
    """Dense MACs per Conv2d/Linear for one input sample, measured with forward hooks.

    The model runs once in eval mode (no BatchNorm statistics change) and returns to its mode after.
    """
    macs: dict[str, int] = {}

    def recorder(name: str):
        def record(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            macs[name] = macs.get(name, 0) + dense_macs(module, inputs[0], output)
        return record

    handles = [module.register_forward_hook(recorder(name))
               for name, module in model.named_modules() if isinstance(module, MAC_LAYERS)]
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        model(single_sample(example).to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return macs


def structured_macs(model: nn.Module, example: Tensor, macs: dict[str, int]) -> dict[str, int]:
    """MACs per Conv2d/Linear left once the null channels that can go exactly are removed: the channels ``--slim``
    removes (``codeq.channels``, the one definition of both). A model torch.fx cannot trace (a Hugging Face model,
    say) keeps every channel: its count is ``macs``."""
    try:
        graph = channel_graph(model, example)
    except ExportError:
        return dict(macs)
    return graph.kept_macs(macs)


@dataclass
class ModelSize:
    fp32_bytes: int
    compressed_bytes: int

    @property
    def ratio(self) -> float:
        return self.fp32_bytes / max(self.compressed_bytes, 1)


def sparse_layout_is_smaller(numel: int, nonzero: int, bits: int) -> bool:
    """Whether a bitmap plus the non-zero codes beats every code packed densely."""
    return packed_code_bytes(numel, nonzero, bits, sparse=True) < packed_code_bytes(numel, nonzero, bits, sparse=False)


def packed_code_bytes(numel: int, nonzero: int, bits: int, sparse: bool) -> int:
    """Bytes of a layer's codes at ``bits`` each: dense (all ``numel``) or sparse (bitmap + ``nonzero`` codes)."""
    if sparse:
        return math.ceil(nonzero * bits / 8) + math.ceil(numel / 8)
    return math.ceil(numel * bits / 8)


def quantized_layer_bytes(numel: int, nonzero: int, bits: int) -> int:
    """Stored size of one quantized weight: the smaller layout of its codes plus its step and offset."""
    sparse = sparse_layout_is_smaller(numel, nonzero, bits)
    return packed_code_bytes(numel, nonzero, bits, sparse) + SCALE_BYTES


def quantized_weight_bytes(stats: list[LayerStats]) -> int:
    """Stored bytes of the quantized weights among ``stats`` (``quantized_layer_bytes`` of each), the part of
    ``model_size``'s compressed bytes that training changes."""
    return sum(quantized_layer_bytes(s.numel, s.nonzero, round(s.bits)) for s in stats if s.quantized)


@torch.no_grad()
def model_size(model: nn.Module) -> ModelSize:
    """FP32 bytes of the deployable model against its compressed bytes (see docs/compression.md)."""
    state = inference_state(model)
    quantized = {f"{name}.weight" if name else "weight": module for name, module, _ in quantized_layers(model)}
    fp32 = compressed = 0
    for key, tensor in state.items():
        fp32 += tensor.numel() * (4 if tensor.is_floating_point() else tensor.element_size())
        if key in quantized:
            module = quantized[key]
            bits = round(layer_readout(quantizer_of(module), latent_weight(module), tensor)["bits"])
            compressed += quantized_layer_bytes(tensor.numel(), int(torch.count_nonzero(tensor)), bits)
        else:
            compressed += tensor.numel() * tensor.element_size()
    return ModelSize(fp32, compressed)


class CompressionMonitor:
    """Compression read-outs during a run: MACs are measured once, densities and bit-widths per call."""

    def __init__(self, model: nn.Module, example: Tensor) -> None:
        self.model = model
        self.example = single_sample(example)[0].detach().cpu()  # one item: single_sample gives it its batch
        self.macs = count_macs(model, self.example)

    def stats(self, structured: bool = False, settings: BopsSettings = W32A32) -> list[LayerStats]:
        extra = structured_macs(self.model, self.example, self.macs) if structured else None
        return layer_stats(self.model, self.macs, extra, settings)

    def epoch_metrics(self, settings: BopsSettings = W32A32) -> dict[str, float]:
        """Flat metrics for one epoch's record: summary (BOPs counted with ``settings``), the dead-zone means
        (``dead_zone_summary``), ``layer_bits/<name>`` and ``layer_sparsity/<name>``.

        Empty for a model without quantizers: its compression does not change during training.
        """
        stats = self.stats(settings=settings)
        quantized = [s for s in stats if s.quantized]
        if not quantized:
            return {}
        return {**summary(stats), **dead_zone_summary(self.model),
                **{f"layer_bits/{s.name}": s.bits for s in quantized},
                **{f"layer_sparsity/{s.name}": s.sparsity for s in quantized}}


def monitor_report(monitor: CompressionMonitor, settings: BopsSettings = W32A32) -> dict[str, Any]:
    """``compression_report`` of the model ``monitor`` watches, MACs measured already."""
    stats = monitor.stats(structured=True, settings=settings)
    totals = summary(stats)
    size = model_size(monitor.model)
    return {
        "sparsity": totals.get("sparsity", 0.0), "mean_layer_sparsity": totals.get("mean_layer_sparsity", 0.0),
        "mean_bits": totals.get("mean_bits", float(FP32_BITS)),
        "rel_bops": totals.get("rel_bops"), "rel_bops_structured": totals.get("rel_bops_structured"),
        "activation_bits": settings.activation_bits, "fp_weight_bits": settings.fp_weight_bits,
        "macs": sum(s.macs for s in stats), "bops": sum(s.bops for s in stats),
        "dense_bops": sum(s.dense_bops for s in stats), "structured_bops": sum(s.structured_bops or 0 for s in stats),
        "size_bytes": size.compressed_bytes, "fp32_bytes": size.fp32_bytes, "size_ratio": size.ratio,
        "layers": as_rows(stats),
    }


def compression_report(model: nn.Module, example_input: Tensor, activation_bits: int = ACTIVATION_BITS,
                       fp_weight_bits: int = FP32_BITS) -> dict[str, Any]:
    """How compressed ``model`` is now: sparsity, bit-widths, Rel. BOPs and size, overall and per layer.

    Definitions (docs/compression.md): BOPs of a Conv2d/Linear are density x MACs x weight bits x activation bits
    (Wenshøj et al., arXiv 2512.12981, Eqs. 20-22), MACs measured for one input sample (a Linear counts once per
    input vector: per token of a sequence; attention's activation-by-activation products are not counted); Rel.
    BOPs divides their sum by the dense model's at 32-bit weights and 32-bit activations. The model runs in eval
    mode on ``example_input`` as a batch of one (its values do not matter, its shape does) and returns to its mode;
    ``rel_bops_structured`` also runs a float64 copy on random inputs of that shape (for integer inputs, ids in the
    range of ``example_input``'s values). The model takes one tensor; its output may be a tensor, or tensors in a
    tuple or dict (a Hugging Face ``ModelOutput``).

    Args:
        model: a model after ``prepare`` (or a plain one: 32 bits everywhere, no sparsity counted).
        example_input: one input without its batch dimension (an image ``[C, H, W]`` float, token ids
            ``[seq_len]`` int64), or an image batch ``[N, C, H, W]`` whose first item is used; on any device. Any
            tensor that is not 4-D is taken as one item: pass ``input_ids[0]``, not a batch of sequences.
        activation_bits: the activation bit-width BOPs count (1..32; 32: activations not quantized).
        fp_weight_bits: the weight bit-width BOPs count for layers left in FP32 (1..32).

    Returns:
        A dict: ``sparsity`` (float in [0, 1], the share of quantized weights that are exactly zero),
        ``mean_layer_sparsity``, ``mean_bits`` (mean bit-width over quantized layers), ``rel_bops`` (a fraction,
        None for a model without Conv2d/Linear), ``rel_bops_structured`` (counting whole null channels only),
        ``macs``, ``bops``, ``dense_bops``, ``size_bytes`` (compressed: packed codes, sparse index, scales, other
        tensors as stored), ``fp32_bytes``, ``size_ratio``, and ``layers``: one dict per counted layer (``name``,
        ``kind``, ``quantized``, ``bits``, ``deadzone``, ``step``, ``numel``, ``nonzero``, ``sparsity``, ``macs``,
        ``bops``, ...).

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``example_input`` not a tensor.
        ValueError: a bit-width setting outside 1..32, or the model fails on ``example_input`` as a batch of one.

    Examples:
        >>> report = codeq.compression_report(model, torch.zeros(3, 32, 32))
        >>> print(f"{report['sparsity']:.1%} zeros, Rel. BOPs {report['rel_bops']:.2%}")
        >>> codeq.compression_report(bert, input_ids[0])["macs"]  # int64 [seq_len]: one sequence
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"compression_report(model=...) takes an nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, Tensor):
        raise TypeError(f"compression_report(example_input=...) takes a tensor, got {type(example_input).__name__}")
    for name, value in (("activation_bits", activation_bits), ("fp_weight_bits", fp_weight_bits)):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= FP32_BITS:
            raise ValueError(f"compression_report({name}={value!r}): a bit-width is an integer in 1..{FP32_BITS}")
    try:
        monitor = CompressionMonitor(model, example_input)
    except Exception as error:  # noqa: BLE001 - whatever the model raises, the likely cause is the example's shape
        raise ValueError(f"compression_report(example_input=...): the model fails on it as a batch of one "
                         f"{list(single_sample(example_input).shape)} ({first_line(error, with_type=True, limit=200)})"
                         f"; pass {EXAMPLE_INPUT}") from error
    return monitor_report(monitor, BopsSettings(activation_bits, fp_weight_bits))
