"""use_compile with parametrized quantizers: torch.compile traces the fused quantizer, which reads
percentiles selected before the graph runs; the compiled model trains to the same weights as the
eager one."""
import json

import pytest
import torch

from codeq.attach import attach_weight_quantizers, percentiles_selected_together, quantized_layers
from codeq.quantizers import DeadZoneLDZCompander
from codeq.training.loop import train, validate


def quantized_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    attach_weight_quantizers(model, [], DeadZoneLDZCompander, {"fixed_bit_val": 4, "init_deadzone_logit": 0.5,
                                                               "init_bit_logit": 0.35})
    return model


def test_compiled_quantized_model_trains_like_eager(percentile_selections):
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 6, generator=generator), torch.randint(0, 3, (4,), generator=generator))
               for _ in range(2)]
    results = []
    for compiled in (False, True):
        model = quantized_mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        forward_model = torch.compile(model) if compiled else model
        metrics = train(batches, forward_model, torch.nn.CrossEntropyLoss(), optimizer, 1, "cpu")
        validation = validate(batches, forward_model, torch.nn.CrossEntropyLoss(), "cpu")
        metrics |= {f"val_{k}": v for k, v in validation.items()}
        results.append((metrics, [p.detach().clone() for p in model.parameters()]))
        assert len(percentile_selections) == 3, compiled  # every layer's percentile at once, each step and pass
        percentile_selections.clear()
    (eager_metrics, eager_params), (compiled_metrics, compiled_params) = results
    assert compiled_metrics == pytest.approx(eager_metrics, rel=1e-5)
    initial = dict(quantized_mlp().named_parameters())
    names = [name for name, _ in quantized_mlp().named_parameters()]
    for name, eager, compiled in zip(names, eager_params, compiled_params, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
        if "logit" in name or "original" in name:  # the quantizer passed gradients to all three
            assert not torch.equal(compiled, initial[name].detach())


def test_compiled_graph_reads_each_steps_percentiles_instead_of_selecting_them():
    """No topk in the graph, one graph for every step, and each step quantizes with the current weights'
    percentiles: a graph that had kept the first step's as constants would drift from eager as the weights grow.
    The percentiles reach the graph through one buffer per layer, written in place."""
    model = quantized_mlp()
    graphs = []

    def keep_graph(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    compiled = torch.compile(model, backend=keep_graph)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    inputs = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([0, 1, 2] * 2 + [0, 1])
    first_weight = model[0].parametrizations.weight.original.detach().clone()
    addresses = []
    for _ in range(4):
        with percentiles_selected_together(model):
            logits = compiled(inputs)
        addresses.append(tuple(parametrization.absmax.data_ptr() for _, _, parametrization in quantized_layers(model)))
        torch.testing.assert_close(logits, model(inputs), rtol=1e-6, atol=1e-6)
        optimizer.zero_grad()
        (torch.nn.functional.cross_entropy(logits, targets) * 50).backward()
        optimizer.step()
    assert model[0].parametrizations.weight.original.abs().max() > 10 * first_weight.abs().max()
    assert len(graphs) == 1 and "topk" not in graphs[0].code
    inputs = [node.name for node in graphs[0].graph.nodes if node.op == "placeholder"]
    assert sum("absmax" in name for name in inputs) == 2, inputs
    # The percentiles stay at one address (CUDA graphs re-record for a new one), and are the model's by no state_dict.
    assert len(set(addresses)) == 1 and not any("absmax" in key for key in model.state_dict())


def test_compiled_qat_run_end_to_end(tmp_path):
    """run_training with the GPU target's options (use_compile, bf16 autocast, channels-last, data held
    and augmented on the device) on the CPU: trains, validates, reports compression and checkpoints."""
    from codeq.app.cli import main
    from conftest import quick_config, write_config

    config = quick_config(tmp_path, model="mlp", use_compile=True, amp="bf16", channels_last=True,
                          data_on_device=True, epochs=2)
    assert main(["train", "--config", str(write_config(tmp_path, config))]) == 0
    run_dir = next((tmp_path / "runs").iterdir())
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    assert lines[-1]["val_acc"] > 0.8 and 0.0 < lines[-1]["sparsity"] < 1.0, lines[-1]
    checkpoint = torch.load(run_dir / "last.pt", weights_only=False)
    assert not any(key.startswith("_orig_mod") for key in checkpoint["model"])  # the plain model's names
