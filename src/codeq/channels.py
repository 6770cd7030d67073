"""Which channels of a compressed model can go exactly: the one definition behind the report's structured Rel. BOPs
(``codeq.compression.structured_macs``) and ``--slim`` (``codeq.export.slim``), so the two always agree.

A **null** output channel of a Conv2d/Linear is a row of its weight that is all zero after quantization (its output
is a constant: the bias, 0 without one) or one that nothing reads (every weight that reads it downstream is zero, as
group lasso's zero columns make). Per-channel operations (BatchNorm, ReLU, GELU, pooling) keep a constant channel
constant. A channel can go when removing it changes no output: every reader either gets exactly 0 there or absorbs
the constant into its bias (a Linear, or a convolution without zero padding: at a padded border the constant would
be cut off, so a nonzero constant into a padded convolution keeps its channel).

The model is traced with ``torch.fx`` and each channel is followed through the graph: slots (node, channel) that must
go together are joined, and a set goes only when all of its slots are null and none must stay. At a residual addition
a channel goes with both operands, except that a channel nothing reads after the sum may leave the sum while an
operand read elsewhere keeps it (the slimmed sum selects that operand's remaining channels). A flatten of
[N, C, H, W] carries channel c into its H*W features. Channels copied by a zero padding along the channel axis (the
CIFAR ResNets' option-A shortcut) go only with their source. Whether a channel is constant or unread is read from the
structural probe (``structural_probe``: the zero pattern with positive random values, so nothing cancels), a
constant's value from the model itself. An operation this module does not know keeps every channel of its inputs, as
do LayerNorm and attention, which mix channels. A model torch.fx cannot trace keeps every channel.
"""
from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from codeq.convert import convert, inference_state, plain_copy
from codeq.errors import ExportError, first_line

MAC_LAYERS = (nn.Conv2d, nn.Linear)
# A probe channel counts as constant (or its gradient as zero) when its spread across samples is below this share of
# the tensor's largest magnitude; float64 rounding stays many orders below it, live channels far above.
CONSTANT_TOLERANCE = 1e-9
PROBE_SAMPLES = 3
# The seeded standard-normal inputs a model and its slimmed or exported copy are compared on.
CHECK_BATCH = 8
CHECK_SEED = 0

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
        outputs = [tensor for tensor in output_tensors(recorder.run(probe_batch(example))) if tensor.requires_grad]
        if outputs:
            torch.autograd.backward(outputs, [probe_cotangent(output) for output in outputs])
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
    """Which channels of a traced plain model can go (``goes``), and why each null one that cannot stays
    (``blocked``, by the root of its set).

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
        self.goes = self.removable()

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
        elif isinstance(module, MAC_LAYERS) and node.name in self.value:
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
        elif self.flattened_positions(node, module, sources):
            # Flattening [N, C, H, W] to [N, C*H*W]: channel c becomes the features c*H*W ... (c+1)*H*W - 1.
            positions = self.flattened_positions(node, module, sources)
            for channel in self.slots(sources[0].name):
                for position in range(positions):
                    self.channels.union((sources[0].name, channel), (node.name, channel * positions + position))
        else:
            # Neither its inputs' channels nor its own can be followed: slimming cannot shrink what it makes.
            what = self.describe(node, module)
            self.keep_all(node, f"read by {what}, which mixes channels or is not supported")
            for channel in self.slots(node.name):
                self.channels.keep((node.name, channel), f"made by {what}, which slimming cannot shrink")

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
        if self.is_residual(node):
            for source in sources:
                for channel in self.slots(node.name):
                    # A channel nothing reads after the sum leaves it alone while an operand read elsewhere keeps
                    # it: the slimmed sum selects that operand's remaining channels.
                    if not self.dead[node.name][channel] or self.dead[source.name][channel]:
                        self.channels.union((source.name, channel), (node.name, channel))
        elif len(sources) == 1 and self.same_channels(sources[0].name, node.name):  # plus a number
            self.union_all(sources[0].name, node.name)
        else:
            self.keep_all(node, "read by a broadcasting addition")
            for channel in self.slots(node.name):
                self.channels.keep((node.name, channel), "made by a broadcasting addition")

    def is_residual(self, node: fx.Node) -> bool:
        """An addition of tensors of one shape, channel for channel (a residual connection)."""
        return (node.op in ("call_function", "call_method") and node.target in ADDITIONS | {"add"}
                and all(self.same_channels(source.name, node.name)
                        and self.real[source.name].shape == self.real[node.name].shape
                        for source in node.all_input_nodes))

    def flattened_positions(self, node: fx.Node, module: nn.Module | None, sources: list[fx.Node]) -> int:
        """H*W when ``node`` flattens an [N, C, H, W] tensor into [N, C*H*W] (channel-major features); else 0."""
        flattening = (isinstance(module, nn.Flatten) or (node.op == "call_function" and node.target in FLATTENS)
                      or (node.op == "call_method" and node.target == "flatten"))
        if not (flattening and len(sources) == 1 and sources[0].name in self.value and node.name in self.value):
            return 0
        source, result = self.real[sources[0].name], self.real[node.name]
        if source.dim() != 4 or result.dim() != 2 or result.shape[1] != source[0].numel():
            return 0
        return source.shape[2:].numel()

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

    def kept_channels(self, name: str) -> Tensor:
        """The channels of node ``name`` that stay (int64 indices, ascending)."""
        return torch.tensor([channel for channel in self.slots(name) if not self.goes((name, channel))],
                            dtype=torch.long)

    def weighted(self) -> Iterator[tuple[fx.Node, nn.Conv2d | nn.Linear]]:
        """The Conv2d/Linear calls of the traced model, in graph order."""
        for node in self.traced.graph.nodes:
            if node.op == "call_module" and isinstance(self.traced.get_submodule(node.target), MAC_LAYERS):
                yield node, self.traced.get_submodule(node.target)

    def kept_macs(self, macs: dict[str, int]) -> dict[str, int]:
        """``macs`` (dense MACs per Conv2d/Linear, by module name) counted for the rows and columns that stay."""
        kept = {}
        for node, module in self.weighted():
            if node.name not in self.value or node.target not in macs:
                continue
            if getattr(module, "groups", 1) != 1:  # grouped convolutions keep every channel
                kept[node.target] = macs[node.target]
                continue
            out_channels, in_channels = module.weight.shape[:2]
            rows, columns = len(self.kept_channels(node.name)), len(self.kept_channels(node.all_input_nodes[0].name))
            # MACs of one (input channel, output channel) pair: kernel size times output positions.
            kept[node.target] = rows * columns * (macs[node.target] // (in_channels * out_channels))
        return kept


def single_sample(example: Tensor) -> Tensor:
    """``example`` as a batch of one. A 4-D tensor is an image batch ``[N, C, H, W]`` whose first item is used; any
    other is one item without its batch dimension (an image ``[C, H, W]``, token ids ``[seq_len]``)."""
    return example[:1] if example.dim() == 4 else example.unsqueeze(0)


def random_ids(example: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """``count`` items of integer ``example``'s item shape and dtype (token ids, class indices), each entry drawn
    from the range of ``example``'s values: values the model takes, whatever its vocabulary."""
    low, high = int(example.min()), int(example.max())
    shape = (count, *single_sample(example).shape[1:])
    return torch.randint(low, high + 1, shape, generator=generator, dtype=example.dtype)


def structural_probe(model: nn.Module, seed: int = 0) -> nn.Module:
    """A float64 CPU copy of ``model`` with its compressed zero pattern and positive random values elsewhere.

    Zeros of every parameter stay zero; every other entry becomes a positive random value, each row of
    a weight (dim >= 2) normalised by its number of non-zeros so magnitudes neither explode nor vanish.
    BatchNorm statistics become mean 0, variance 1. With positive values nothing cancels and no ReLU
    shuts, so a channel is constant across inputs only when the zero pattern makes it so.
    """
    state = inference_state(model)
    probe = plain_copy(model)
    probe.load_state_dict(state)
    probe = probe.to("cpu", torch.float64).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in probe.parameters():
            values = (torch.rand(parameter.shape, generator=generator, dtype=torch.float64) + 0.5) * (parameter != 0)
            if parameter.dim() >= 2:
                live = values.flatten(1).count_nonzero(1).clamp_min(1)
                values /= live.view(-1, *[1] * (parameter.dim() - 1))
            parameter.copy_(values)
        for module in probe.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
    return probe


def probe_batch(example: Tensor) -> Tensor:
    """PROBE_SAMPLES seeded random inputs of ``example``'s item shape: positive float64 values, or for an integer
    ``example`` ids in the range of its values (``random_ids``); a float batch requires its gradient."""
    generator = torch.Generator().manual_seed(1)
    if not example.is_floating_point():
        return random_ids(example, PROBE_SAMPLES, generator)
    sample = single_sample(example)
    inputs = torch.rand((PROBE_SAMPLES, *sample.shape[1:]), generator=generator, dtype=torch.float64) + 0.5
    return inputs.requires_grad_()


def output_tensors(output: object) -> list[Tensor]:
    """The tensors of a model's output: the output itself, or those in a tuple, list or dict (a Hugging Face
    ``ModelOutput`` is one), nested or not."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [tensor for item in output for tensor in output_tensors(item)]
    return []


def probe_cotangent(output: Tensor) -> Tensor:
    """The seeded random positive gradient the probe's output is given, so that no gradient cancels."""
    return torch.rand(output.shape, generator=torch.Generator().manual_seed(2), dtype=output.dtype) + 0.5


def dead_channel_mask(tensor: Tensor, dim: int) -> Tensor:
    """Channels (along ``dim``) of a probe tensor whose gradient is zero for every sample at every position: the
    output does not depend on them (all of them when no gradient reached the tensor)."""
    grad = tensor.grad if tensor.grad is not None else torch.zeros_like(tensor)
    values = grad.movedim(dim, -1).reshape(-1, grad.shape[dim])
    return values.abs().amax(0) <= CONSTANT_TOLERANCE * grad.abs().max()


def check_inputs(example: Tensor, count: int = CHECK_BATCH) -> Tensor:
    """A seeded batch of ``count`` inputs of ``example``'s item shape (``single_sample``): standard-normal float32
    values, or for an integer ``example`` (token ids) ids of its dtype in the range of its values."""
    generator = torch.Generator().manual_seed(CHECK_SEED)
    if not example.is_floating_point():
        return random_ids(example, count, generator)
    return torch.randn((count, *single_sample(example).shape[1:]), generator=generator)


def trace(plain: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(plain)
    except Exception as error:  # noqa: BLE001 - tracing fails in many ways; each means the same for the user
        raise ExportError(f"--slim: torch.fx cannot trace {type(plain).__name__} "
                          f"({first_line(error, with_type=True, limit=160)}); export without --slim") from None


def channel_graph(model: nn.Module, example: Tensor) -> ChannelGraph:
    """The channel analysis of ``model`` (quantizers attached or not; any device): its plain copy traced, with the
    structural probe's values and gradients and the model's own values on a few inputs of ``example``'s shape.

    Raises:
        ExportError: torch.fx cannot trace the model.
    """
    traced, probe_module = trace(convert(model).cpu().eval()), trace(structural_probe(model))
    if [node.name for node in traced.graph.nodes] != [node.name for node in probe_module.graph.nodes]:
        raise ExportError("--slim: the model traces differently from its own copy; export without --slim")
    try:
        return ChannelGraph(traced, recorded_with_gradients(probe_module, example),
                            recorded(traced, check_inputs(example, PROBE_SAMPLES)))
    except Exception as error:  # noqa: BLE001 - a traced graph can fail in many ways; each means the same here
        raise ExportError(f"--slim: cannot follow the channels of {type(model).__name__} "
                          f"({first_line(error, with_type=True, limit=160)}); export without --slim") from None
