"""The examples users copy from: each trains briefly through `codeq` alone; sparsity rises, and the converted model
and the ONNX file compute what the quantized model computes."""
import importlib.util
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import codeq

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(autouse=True)
def one_thread():
    """Each example on one thread: the same numbers whatever the machine, and no threads spinning against other
    processes for a shared core (a 250-step BERT took 100 s with 2 threads on 2 busy cores, 5 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def onnx_outputs(path: Path, inputs: torch.Tensor) -> torch.Tensor:
    runner = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(runner.run(None, {runner.get_inputs()[0].name: inputs.numpy()})[0])


def check_deployed(model: torch.nn.Module, plain: torch.nn.Module, inputs: torch.Tensor, out: Path,
                   logits=lambda model, inputs: model(inputs)) -> None:
    """convert's ``plain`` model computes exactly what the quantized ``model`` computes (eval mode) and holds no
    quantizer parameter; onnxruntime, run on the file ``out``, agrees within 1e-5 of the largest output."""
    assert not any("logit" in name for name, _ in plain.named_parameters())
    model.eval()
    with torch.no_grad():
        expected = logits(model, inputs)
        assert torch.equal(logits(plain.eval(), inputs), expected)
        assert np.allclose(onnx_outputs(out, inputs), expected, rtol=0, atol=1e-5 * expected.abs().max())


def test_own_loop(tmp_path):
    out = tmp_path / "own.onnx"
    result = load_example("own_loop").main(epochs=3, out=str(out))
    model, plain, images = result["model"], result["plain"], result["images"]
    assert result["report"]["sparsity"] > result["before"]["sparsity"] + 0.2
    assert result["accuracy"] > 0.8  # BatchNorm re-estimated with the quantized weights
    check_deployed(model, plain, images[:64], out)
    assert result["report"]["size_bytes"] < result["report"]["fp32_bytes"] / 8
    assert codeq.compression_report(plain, images[0])["sparsity"] == 0.0  # no quantizers left to count


def test_budget_loop():
    result = load_example("budget_loop").main(epochs=10, sparsity=0.9)
    budget = result["budget"]
    assert budget.steps == result["steps"] and budget.verdict() is None
    report = codeq.compression_report(result["model"], result["images"][0])
    assert abs(report["sparsity"] - 0.9) <= 0.01 and budget.achieved == pytest.approx(report["sparsity"], abs=0.005)
    assert result["accuracy"] > 0.9


def test_hf_trainer(tmp_path):
    out = tmp_path / "hf.onnx"
    result = load_example("hf_trainer").main(steps=250, out=str(out))
    model, plain, tokens = result["model"], result["plain"], result["tokens"][:64]
    assert result["report"]["sparsity"] > result["before"]["sparsity"] + 0.3
    assert result["accuracy"] > 0.95  # on held-out sequences
    assert result["report"]["macs"] == 2 * 25 * (4 * 64 * 64 + 2 * 64 * 128) + 64 * 64 + 64 * 2  # per sequence
    layers = result["report"]["layers"]
    assert len(layers) == 14 and all(row["quantized"] and row["bits"] == 4 for row in layers)  # every Linear
    assert type(plain) is type(model)
    check_deployed(model, plain, tokens, out, logits=lambda model, ids: model(input_ids=ids).logits)
    assert result["export"].encodings and set(result["export"].encodings.values()) == {"INT4"}


def test_lightning_module(tmp_path):
    out = tmp_path / "lightning.onnx"
    result = load_example("lightning_module").main(epochs=3, out=str(out))
    network, plain, images = result["module"].model, result["plain"], result["images"]
    report, metrics = result["report"], result["metrics"]
    assert report["sparsity"] > result["before"]["sparsity"] + 0.2
    assert metrics["val_acc"] > 0.9 and metrics["sparsity"] == pytest.approx(report["sparsity"])
    # The callback re-estimated the statistics on 5 batches before the last validation, after the last step.
    assert [int(bn.num_batches_tracked) for bn in (network[1], network[4])] == [5, 5]
    check_deployed(network, plain, images[:64], out)
