"""Slimming: the compressed model without the null channels that can go exactly, computing the same outputs.

Which channels go is ``codeq.channels``'s analysis, the same the report's structured Rel. BOPs count, so the two
agree channel for channel. Slimming removes each such row of a Conv2d/Linear weight, the channel from the per-channel
operations in between (BatchNorm), the matching input column of every Conv2d/Linear that reads it (a constant it
carried folded into that layer's bias), the channels a zero padding along the channel axis adds for it, and, at a
residual addition whose sum loses a channel an operand keeps for its other readers, selects that operand's remaining
channels (``index_select``, ONNX ``Gather``). Every null channel it keeps is named with the reason.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from codeq.channels import KEEP_LIVE, NORMS, ChannelGraph, channel_axis, channel_graph, channel_padding, check_inputs
from codeq.compression import count_macs
from codeq.errors import ExportError
from codeq.export.grids import RELATIVE_TOLERANCE, LayerGrid, layer_grids, weight_key


@dataclass
class SlimResult:
    """The slimmed plain model, the grids of its quantized weights and what slimming did.

    ``null_channels``: null output channels of the model's Conv2d/Linear layers, rows that are all zero or that
    nothing reads; ``removed`` of them went, ``unread`` of those because nothing reads them; ``kept`` names the
    others (``layer[channel]``) by the reason they stay. ``parameters`` and ``macs`` (per sample): (before, after).
    """

    model: fx.GraphModule
    grids: dict[str, LayerGrid]
    null_channels: int
    removed: int
    unread: int
    kept: dict[str, list[str]]
    parameters: tuple[int, int]
    macs: tuple[int, int]
    relative_error: float

    def lines(self) -> list[str]:
        before, after = self.parameters
        macs_before, macs_after = self.macs
        lines = [f"slim: removed {self.removed} of {self.null_channels} null output channels ({self.unread} of them "
                 f"because nothing reads them); parameters {before:,} -> {after:,}, MACs per sample {macs_before:,} "
                 f"-> {macs_after:,}"]
        lines += [f"slim: kept {len(names)} null channel{'s' if len(names) > 1 else ''}, {reason}: {listing(names)}"
                  for reason, names in self.kept.items()]
        return lines


def listing(names: list[str]) -> str:
    """``["a[1]", "a[4]", "b[0]"]`` as ``a [1, 4]; b [0]``."""
    by_layer: dict[str, list[str]] = defaultdict(list)
    for name in names:
        layer, _, channel = name.rpartition("[")
        by_layer[layer].append(channel.rstrip("]"))
    return "; ".join(f"{layer} [{', '.join(channels)}]" for layer, channels in by_layer.items())


def replace_module(traced: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent, _, leaf = target.rpartition(".")
    setattr(traced.get_submodule(parent) if parent else traced, leaf, module)


@torch.no_grad()
def shrunk_weighted(module: nn.Conv2d | nn.Linear, rows: Tensor, columns: Tensor, dropped: Tensor,
                    values: Tensor) -> nn.Module:
    """``module`` with output channels ``rows`` and input channels ``columns`` only; the dropped input channels'
    constant ``values`` folded into the bias (exact for Linear and unpadded convolutions, and for zeros)."""
    weight = module.weight.detach()
    bias = (module.bias.detach()[rows].double() if module.bias is not None
            else torch.zeros(len(rows), dtype=torch.float64))
    # A constant input adds value * (sum of its kernel) to every output position.
    kernel = weight[0, 0].numel() if weight.dim() > 2 else 1
    shift = weight[rows][:, dropped].double().reshape(len(rows), len(dropped), kernel).sum(2) @ values.double()
    needs_bias = module.bias is not None or bool(shift.ne(0).any())
    if isinstance(module, nn.Linear):
        slim = nn.Linear(len(columns), len(rows), bias=needs_bias)
    else:
        slim = nn.Conv2d(len(columns), len(rows), module.kernel_size, module.stride, module.padding, module.dilation,
                         bias=needs_bias, padding_mode=module.padding_mode)
    slim.weight.copy_(weight[rows][:, columns])
    if needs_bias:
        slim.bias.copy_((bias + shift).to(weight.dtype))
    return slim.to(weight.dtype).eval()


@torch.no_grad()
def shrunk_norm(module: nn.BatchNorm1d | nn.BatchNorm2d, channels: Tensor) -> nn.Module:
    slim = type(module)(len(channels), module.eps, module.momentum, module.affine, module.track_running_stats)
    for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
        if tensor.dim() == 1:
            getattr(slim, name).copy_(tensor[channels])
        else:
            getattr(slim, name).copy_(tensor)
    return slim.eval()


@torch.no_grad()
def slim_model(model: nn.Module, example: Tensor, grids: dict[str, LayerGrid] | None = None) -> SlimResult:
    """The plain (quantizer-free) copy of ``model`` (quantizers attached, CPU) without its removable null channels.

    ``example`` is one input [C, H, W] or a batch; ``grids`` are ``layer_grids(model)[0]`` when the caller has
    them. The slimmed model is checked against the fake-quantized one on a random batch.
    Raises ExportError when the model cannot be traced or the slimmed model's outputs differ.
    """
    grids = layer_grids(model)[0] if grids is None else grids
    graph = channel_graph(model, example)
    traced = graph.traced
    parameters_before = sum(parameter.numel() for parameter in traced.parameters())
    macs_before = sum(count_macs(traced, example).values())
    null_channels = removed = unread = 0
    kept: dict[str, list[str]] = defaultdict(list)
    slim_grids = dict(grids)
    for node, module in list(graph.weighted()):
        source = node.all_input_nodes[0].name
        rows, columns = graph.kept_channels(node.name), graph.kept_channels(source)
        dropped = torch.tensor([channel for channel in graph.slots(source) if graph.goes((source, channel))],
                               dtype=torch.long)
        for channel in graph.slots(node.name):
            zero, dead = bool(graph.zero_rows[node.name][channel]), bool(graph.dead[node.name][channel])
            if not (zero or dead):
                continue
            null_channels += 1
            if graph.goes((node.name, channel)):
                removed += 1
                unread += not zero
            else:
                kept[graph.blocked.get(graph.channels.find((node.name, channel)), KEEP_LIVE)].append(
                    f"{node.target}[{channel}]")
        # Only constants fold; a dead channel's readers are dead rows, which go.
        folded = torch.where(graph.constant[source][dropped], graph.value[source][dropped], 0.0)
        replace_module(traced, node.target, shrunk_weighted(module, rows, columns, dropped, folded))
        key = weight_key(node.target)
        if key in slim_grids:
            slim_grids[key] = slim_grids[key].select(rows, columns)
    for node in list(traced.graph.nodes):
        if node.op == "call_module" and isinstance(traced.get_submodule(node.target), NORMS):
            replace_module(traced, node.target, shrunk_norm(traced.get_submodule(node.target),
                                                            graph.kept_channels(node.name)))
        elif node.op == "call_function" and node.target is F.pad and channel_padding(node, graph.real):
            front, back = channel_padding(node, graph.real)
            kept_channels = set(graph.kept_channels(node.name).tolist())
            width = graph.value[node.name].numel()
            new_front = sum(channel in kept_channels for channel in range(front))
            new_back = sum(channel in kept_channels for channel in range(width - back, width))
            node.args = (node.args[0], (*node.args[1][:4], new_front, new_back), *node.args[2:])
        elif graph.is_residual(node):
            select_operands(traced, graph, node)
    traced.recompile()
    inputs = check_inputs(example)
    expected, outputs = model.eval()(inputs), traced(inputs)
    error = float((outputs - expected).abs().max() / expected.abs().max().clamp_min(torch.finfo(expected.dtype).tiny))
    if error > RELATIVE_TOLERANCE:
        raise ExportError(f"--slim: the slimmed model's outputs differ from the model's (relative max error "
                          f"{error:.2e}); export without --slim")
    return SlimResult(traced, slim_grids, null_channels, removed, unread, dict(kept),
                      (parameters_before, sum(parameter.numel() for parameter in traced.parameters())),
                      (macs_before, sum(count_macs(traced, example).values())), error)


def select_operands(traced: fx.GraphModule, graph: ChannelGraph, node: fx.Node) -> None:
    """Before residual addition ``node``: each operand that keeps channels the sum loses (nothing reads them after
    it, the operand's other readers do) gives the sum only the channels it keeps."""
    kept = graph.kept_channels(node.name)
    for operand in node.all_input_nodes:
        mine = graph.kept_channels(operand.name)
        if torch.equal(mine, kept):
            continue
        # The sum's channels are a subset of each operand's: where the sum keeps one, every operand does.
        positions = torch.searchsorted(mine, kept)
        buffer = f"_slim_select_{node.name}_{operand.name}"
        traced.register_buffer(buffer, positions)
        with traced.graph.inserting_before(node):
            index = traced.graph.get_attr(buffer)
            axis = channel_axis(graph.real[operand.name])
            selected = traced.graph.call_function(torch.index_select, (operand, axis, index))
        node.replace_input_with(operand, selected)
