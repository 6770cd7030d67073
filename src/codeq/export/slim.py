"""Slimming: the compressed model without its removable null channels, computing the same outputs.

A null output channel is a row of a Conv2d/Linear weight that is all zeros after quantization. Its output is a
constant (the bias, 0 without one), and so is what per-channel operations (BatchNorm, ReLU, GELU, pooling) make of
it downstream. Slimming removes the row, the channel from the per-channel operations in between, and the matching
input column of every Conv2d/Linear that reads it. That is exact when each reader either gets exactly 0 there or
can absorb the constant into its bias: a Linear, or a convolution without zero padding (at a padded border the
constant would be cut off, so a nonzero constant into a padded convolution keeps its channel). A channel that
nothing reads (every weight that reads it is zero, as group lasso's zero columns make) goes too, with its row.

The dependency structure is the one the report's structured column measures (``codeq.compression``): the model is
traced with ``torch.fx`` and each channel is followed through the graph; at a residual addition a channel goes
only when it goes in both operands, and channels copied by a zero padding along the channel axis (the CIFAR
ResNets' option-A shortcut) go only together with their source. Whether a channel is constant or unread is read
from the structural probe (zero pattern only: ``structural_probe``, ``dead_channels``) and a constant's value from
the model itself. An operation this module does not know keeps every channel of its inputs, as do LayerNorm and
attention, which mix channels.
"""
from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from codeq.compression import (
    CONSTANT_TOLERANCE,
    count_macs,
    dead_channel_mask,
    probe_batch,
    probe_cotangent,
    structural_probe,
)
from codeq.errors import ExportError, first_line
from codeq.export.grids import RELATIVE_TOLERANCE, LayerGrid, check_inputs, layer_grids, plain_model, weight_key

NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
# Operations that act on every channel alone (and keep the channel axis where it was).
CHANNELWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.LeakyReLU,
                       nn.Dropout, nn.Identity, nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveMaxPool2d)
CHANNELWISE_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.gelu, F.silu, torch.sigmoid, F.sigmoid, torch.tanh,
                         F.dropout, F.adaptive_avg_pool2d, F.avg_pool2d, F.max_pool2d, F.adaptive_max_pool2d}
CHANNELWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous"}
ADDITIONS = {operator.add, torch.add, operator.iadd}
FLATTENS = {torch.flatten}

Slot = tuple[str, int]  # (fx node name, channel)

KEEP_INPUT = "network input"
KEEP_OUTPUT = "network output"
KEEP_PADDED = "a nonzero constant feeds a zero-padded convolution"
KEEP_SHARED = "its module is called more than once"
KEEP_GROUPED = "grouped convolution"
KEEP_LIVE = "it meets a live channel (at a residual addition or a channel padding)"


def channel_axis(value: object) -> int | None:
    """The channel axis of a traced value: 1 for [N, C, H, W], the last for [N, C] and [N, tokens, C]; None for
    anything else (non-tensors, scalars, vectors)."""
    if not isinstance(value, Tensor) or not value.is_floating_point() or value.dim() < 2:
        return None
    return 1 if value.dim() == 4 else value.dim() - 1


def channel_rows(value: Tensor) -> Tensor:
    """``value`` [samples, ...] as [samples * positions, channels]."""
    return value.movedim(channel_axis(value), -1).reshape(-1, value.shape[channel_axis(value)])


class Recorder(fx.Interpreter):
    """Runs a traced module and keeps every node's output (with its gradient once one is computed)."""

    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        self.values: dict[str, object] = {}

    def run_node(self, node: fx.Node) -> object:
        self.values[node.name] = result = super().run_node(node)
        if isinstance(result, Tensor) and result.requires_grad:
            result.retain_grad()
        return result


def recorded(module: fx.GraphModule, inputs: Tensor) -> dict[str, object]:
    recorder = Recorder(module)
    with torch.no_grad():
        recorder.run(inputs)
    return recorder.values


def recorded_with_gradients(probe: fx.GraphModule, example: Tensor) -> dict[str, object]:
    """Every node's output of the structural probe on ``probe_batch``, each float tensor with its gradient for
    ``probe_cotangent``: the same numbers as ``codeq.compression.dead_channels``."""
    recorder = Recorder(probe)
    with torch.enable_grad():
        output = recorder.run(probe_batch(example))
        output.backward(probe_cotangent(output))
    return recorder.values


class Channels:
    """Union-find over channel slots: slots in one set are removed together or kept together."""

    def __init__(self) -> None:
        self.parent: dict[Slot, Slot] = {}
        self.reasons: dict[Slot, str] = {}

    def find(self, slot: Slot) -> Slot:
        root = self.parent.setdefault(slot, slot)
        while root != self.parent[root]:
            root = self.parent[root]
        while slot != root:  # path compression
            self.parent[slot], slot = root, self.parent[slot]
        return root

    def union(self, first: Slot, second: Slot) -> None:
        self.parent[self.find(first)] = self.find(second)

    def keep(self, slot: Slot, reason: str) -> None:
        self.reasons.setdefault(slot, reason)


@dataclass
class SlimResult:
    """The slimmed plain model, the grids of its quantized weights and what slimming did.

    ``null_channels``: zero rows of the model's Conv2d/Linear weights; ``removed`` of them went, ``kept`` counts the
    others by reason; ``unread``: nonzero rows that went because nothing reads their channel (zero columns
    downstream). ``parameters`` and ``macs`` (per sample): (before, after).
    """

    model: fx.GraphModule
    grids: dict[str, LayerGrid]
    null_channels: int
    removed: int
    unread: int
    kept: dict[str, int]
    parameters: tuple[int, int]
    macs: tuple[int, int]
    relative_error: float

    def lines(self) -> list[str]:
        before, after = self.parameters
        macs_before, macs_after = self.macs
        lines = [f"slim: removed {self.removed} of {self.null_channels} null output channels and {self.unread} "
                 f"that nothing reads; parameters {before:,} -> {after:,}, MACs per sample {macs_before:,} -> "
                 f"{macs_after:,}"]
        lines += [f"slim: kept {count} null channel{'s' if count > 1 else ''}: {reason}"
                  for reason, count in self.kept.items()]
        return lines


def module_calls(graph: fx.Graph) -> Counter:
    return Counter(node.target for node in graph.nodes if node.op == "call_module")


def is_channelwise(node: fx.Node, module: nn.Module | None) -> bool:
    if node.op == "call_module":
        return isinstance(module, CHANNELWISE_MODULES)
    if node.op == "call_function":
        return node.target in CHANNELWISE_FUNCTIONS
    return node.op == "call_method" and node.target in CHANNELWISE_METHODS


def foldable(module: nn.Module) -> bool:
    """Whether a constant input channel of ``module`` adds the same amount at every output position."""
    if isinstance(module, nn.Linear):
        return True
    padding = module.padding
    return padding != "same" and all(side == 0 for side in (padding if isinstance(padding, tuple) else (padding,)))


def channel_padding(node: fx.Node, values: dict[str, object]) -> tuple[int, int] | None:
    """(front, back) channels that an ``F.pad`` node adds with zeros to an [N, C, H, W] input, None for another pad
    (other modes or values; only spatial padding also gives None)."""
    source = values[node.args[0].name]
    pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    fill = node.args[3] if len(node.args) > 3 else node.kwargs.get("value")
    if not (isinstance(source, Tensor) and source.dim() == 4 and isinstance(pad, (tuple, list)) and len(pad) == 6
            and mode == "constant" and not fill and all(isinstance(side, int) for side in pad)):
        return None
    return pad[4], pad[5]


def keeps_channel_axis(node: fx.Node, values: dict[str, object]) -> bool:
    """Whether an indexing node (``x[...]``) leaves the channel axis of its input whole and where it was."""
    source, index = values[node.args[0].name], node.args[1]
    index = index if isinstance(index, tuple) else (index,)
    if any(part is Ellipsis or part is None or isinstance(part, (Tensor, fx.Node)) for part in index):
        return False
    axis = channel_axis(source)
    result = values[node.name]
    if axis is None or channel_axis(result) is None or result.shape[channel_axis(result)] != source.shape[axis]:
        return False
    if axis == source.dim() - 1:  # channels last: untouched while the index stops before them
        return len(index) < source.dim()
    return all(isinstance(part, slice) for part in index[:1]) and (
        len(index) <= axis or index[axis] == slice(None))


class ChannelGraph:
    """Which channels of a traced plain model can go, and the slimmed model.

    ``probe`` and ``real`` are the recorded node outputs of the structural probe and of the model on a few inputs.
    """

    def __init__(self, traced: fx.GraphModule, probe: dict[str, object], real: dict[str, object]) -> None:
        self.traced, self.probe, self.real = traced, probe, real
        self.channels = Channels()
        self.constant: dict[str, Tensor] = {}  # node -> bool per channel: constant in the probe and the model
        self.dead: dict[str, Tensor] = {}  # node -> bool per channel: the output does not depend on it
        self.value: dict[str, Tensor] = {}  # node -> the model's value per channel (float32)
        self.zero_rows: dict[str, Tensor] = {}  # Conv2d/Linear node -> bool per output channel
        self.calls = module_calls(traced.graph)
        for node in traced.graph.nodes:
            if channel_axis(real.get(node.name)) is not None:
                self.measure(node.name)
        for node in traced.graph.nodes:
            self.connect(node)

    def measure(self, name: str) -> None:
        probe, real = channel_rows(self.probe[name].detach()), channel_rows(self.real[name])
        spread = (probe.amax(0) - probe.amin(0)) <= CONSTANT_TOLERANCE * probe.abs().max()
        self.constant[name] = spread & (real.amax(0) == real.amin(0))
        probe_value = self.probe[name]
        # A tensor without a gradient path (a constant) is not known to be unread.
        self.dead[name] = (dead_channel_mask(probe_value, channel_axis(probe_value)) if probe_value.requires_grad
                           else torch.zeros(probe_value.shape[channel_axis(probe_value)], dtype=torch.bool))
        self.value[name] = real[0]

    def slots(self, name: str) -> range:
        return range(self.value[name].numel()) if name in self.value else range(0)

    def keep_all(self, node: fx.Node, reason: str) -> None:
        for source in node.all_input_nodes:
            for channel in self.slots(source.name):
                self.channels.keep((source.name, channel), reason)

    def same_channels(self, first: str, second: str) -> bool:
        return first in self.value and second in self.value and self.value[first].numel() == self.value[second].numel()

    def union_all(self, first: str, second: str) -> None:
        for channel in self.slots(first):
            self.channels.union((first, channel), (second, channel))

    def connect(self, node: fx.Node) -> None:
        """The constraints one node puts on the channels of its inputs and its output."""
        module = self.traced.get_submodule(node.target) if node.op == "call_module" else None
        sources = node.all_input_nodes
        if node.op == "placeholder":
            for channel in self.slots(node.name):
                self.channels.keep((node.name, channel), KEEP_INPUT)
        elif node.op == "output":
            self.keep_all(node, KEEP_OUTPUT)
        elif isinstance(module, (nn.Conv2d, nn.Linear)) and node.name in self.value:
            self.connect_weighted(node, module)
        elif isinstance(module, NORMS) and len(sources) == 1 and self.same_channels(sources[0].name, node.name):
            if self.calls[node.target] > 1:
                self.keep_all(node, KEEP_SHARED)
            self.union_all(sources[0].name, node.name)
        elif is_channelwise(node, module) and sources and self.same_channels(sources[0].name, node.name):
            self.union_all(sources[0].name, node.name)
        elif node.op in ("call_function", "call_method") and node.target in ADDITIONS | {"add"}:
            self.connect_addition(node, sources)
        elif node.op == "call_function" and node.target is F.pad and channel_padding(node, self.real):
            front, _ = channel_padding(node, self.real)
            for channel in self.slots(sources[0].name):
                self.channels.union((sources[0].name, channel), (node.name, channel + front))
        elif (node.op == "call_function" and node.target is operator.getitem and self.same_channels(
                node.args[0].name if isinstance(node.args[0], fx.Node) else "", node.name)
              and keeps_channel_axis(node, self.real)):
            self.union_all(node.args[0].name, node.name)
        elif self.is_pointwise_flatten(node, module, sources):
            self.union_all(sources[0].name, node.name)
        elif sources:
            self.keep_all(node, f"read by {self.describe(node, module)}, which mixes channels or is not supported")

    def connect_weighted(self, node: fx.Node, module: nn.Conv2d | nn.Linear) -> None:
        source = node.all_input_nodes[0]
        weight = module.weight.detach()
        self.zero_rows[node.name] = ~weight.flatten(1).ne(0).any(1)
        if getattr(module, "groups", 1) != 1 or self.calls[node.target] > 1 or source.name not in self.value:
            reason = KEEP_SHARED if self.calls[node.target] > 1 else KEEP_GROUPED
            self.keep_all(node, reason)
            for channel in self.slots(node.name):
                self.channels.keep((node.name, channel), reason)
            return
        exact_fold = foldable(module)
        for channel in self.slots(source.name):
            # A dead channel needs no fold: every row that reads it is dead too, and goes.
            if (self.constant[source.name][channel] and not self.dead[source.name][channel]
                    and self.value[source.name][channel] != 0 and not exact_fold):
                self.channels.keep((source.name, channel), KEEP_PADDED)

    def connect_addition(self, node: fx.Node, sources: list[fx.Node]) -> None:
        if all(self.same_channels(source.name, node.name) and self.real[source.name].shape == self.real[node.name].shape
               for source in sources):
            for source in sources:
                self.union_all(source.name, node.name)
        elif len(sources) == 1 and self.same_channels(sources[0].name, node.name):  # plus a number
            self.union_all(sources[0].name, node.name)
        else:
            self.keep_all(node, "read by a broadcasting addition")

    def is_pointwise_flatten(self, node: fx.Node, module: nn.Module | None, sources: list[fx.Node]) -> bool:
        """A flatten of [N, C, 1, 1] into [N, C]: the channels stay channels."""
        flattening = (isinstance(module, nn.Flatten) or (node.op == "call_function" and node.target in FLATTENS)
                      or (node.op == "call_method" and node.target == "flatten"))
        if not (flattening and len(sources) == 1 and self.same_channels(sources[0].name, node.name)):
            return False
        source, result = self.real[sources[0].name], self.real[node.name]
        return source.dim() == 4 and source.shape[2:].numel() == 1 and result.dim() == 2

    @staticmethod
    def describe(node: fx.Node, module: nn.Module | None) -> str:
        if module is not None:
            return type(module).__name__
        return getattr(node.target, "__name__", str(node.target))

    def null(self, slot: Slot) -> bool:
        """A slot that may go as far as it alone goes: constant or dead, and at a Conv2d/Linear output a zero row or
        dead (a nonzero row with constant inputs stays: the report counts it live)."""
        name, channel = slot
        if name not in self.constant:
            return False
        dead = bool(self.dead[name][channel])
        if name in self.zero_rows and not (self.zero_rows[name][channel] or dead):
            return False
        return dead or bool(self.constant[name][channel])

    def removable(self) -> Callable[[Slot], bool]:
        """Whether a slot goes: every slot of its set is null and no slot of it must stay."""
        blocked: dict[Slot, str] = {}
        for slot in list(self.channels.parent) + list(self.channels.reasons):
            root = self.channels.find(slot)
            if slot in self.channels.reasons:
                blocked.setdefault(root, self.channels.reasons[slot])
            elif not self.null(slot):
                blocked.setdefault(root, KEEP_LIVE)
        self.blocked = blocked
        return lambda slot: self.null(slot) and self.channels.find(slot) not in blocked

    def kept_channels(self, name: str, removable: Callable[[Slot], bool]) -> Tensor:
        return torch.tensor([channel for channel in self.slots(name) if not removable((name, channel))],
                            dtype=torch.long)


def weighted_nodes(traced: fx.GraphModule) -> Iterator[tuple[fx.Node, nn.Module]]:
    for node in traced.graph.nodes:
        if node.op == "call_module" and isinstance(traced.get_submodule(node.target), (nn.Conv2d, nn.Linear)):
            yield node, traced.get_submodule(node.target)


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


def trace(plain: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(plain)
    except Exception as error:  # noqa: BLE001 - tracing fails in many ways; each means the same for the user
        raise ExportError(f"--slim: torch.fx cannot trace {type(plain).__name__} "
                          f"({first_line(error, with_type=True, limit=160)}); export without --slim") from None


@torch.no_grad()
def slim_model(model: nn.Module, example: Tensor, grids: dict[str, LayerGrid] | None = None) -> SlimResult:
    """The plain (quantizer-free) copy of ``model`` (quantizers attached, CPU) without its removable null channels.

    ``example`` is one input [C, H, W] or a batch; ``grids`` are ``layer_grids(model)[0]`` when the caller has
    them. The slimmed model is checked against the fake-quantized one on a random batch.
    Raises ExportError when the model cannot be traced or the slimmed model's outputs differ.
    """
    grids = layer_grids(model)[0] if grids is None else grids
    traced, probe_module = trace(plain_model(model)), trace(structural_probe(model))
    if [node.name for node in traced.graph.nodes] != [node.name for node in probe_module.graph.nodes]:
        raise ExportError("--slim: the model traces differently from its own copy; export without --slim")
    graph = ChannelGraph(traced, recorded_with_gradients(probe_module, example),
                         recorded(traced, check_inputs(example, 3)))
    removable = graph.removable()
    parameters_before = sum(parameter.numel() for parameter in traced.parameters())
    macs_before = sum(count_macs(traced, example).values())
    null_channels = removed = unread = 0
    kept: Counter = Counter()
    slim_grids = dict(grids)
    for node, module in list(weighted_nodes(traced)):
        source = node.all_input_nodes[0].name
        rows, columns = graph.kept_channels(node.name, removable), graph.kept_channels(source, removable)
        dropped = torch.tensor([channel for channel in graph.slots(source) if removable((source, channel))],
                               dtype=torch.long)
        zero_rows = graph.zero_rows[node.name]
        null_channels += int(zero_rows.sum())
        for channel in graph.slots(node.name):
            if not removable((node.name, channel)):
                if zero_rows[channel]:
                    kept[graph.blocked.get(graph.channels.find((node.name, channel)), KEEP_LIVE)] += 1
            elif zero_rows[channel]:
                removed += 1
            else:
                unread += 1
        # Only constants fold; a dead channel's readers are dead rows, which go.
        folded = torch.where(graph.constant[source][dropped], graph.value[source][dropped], 0.0)
        replace_module(traced, node.target, shrunk_weighted(module, rows, columns, dropped, folded))
        key = weight_key(node.target)
        if key in slim_grids:
            slim_grids[key] = slim_grids[key].select(rows, columns)
    for node in traced.graph.nodes:
        if node.op == "call_module" and isinstance(traced.get_submodule(node.target), NORMS):
            replace_module(traced, node.target, shrunk_norm(traced.get_submodule(node.target),
                                                            graph.kept_channels(node.name, removable)))
        elif node.op == "call_function" and node.target is F.pad and channel_padding(node, graph.real):
            front, back = channel_padding(node, graph.real)
            kept_channels = set(graph.kept_channels(node.name, removable).tolist())
            width = graph.value[node.name].numel()
            new_front = sum(channel in kept_channels for channel in range(front))
            new_back = sum(channel in kept_channels for channel in range(width - back, width))
            node.args = (node.args[0], (*node.args[1][:4], new_front, new_back), *node.args[2:])
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
