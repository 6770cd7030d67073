"""The GPU paths on a CUDA device: the percentile's topk method, the quantizer, and a compiled
bf16 channels-last QAT run with its data held and augmented on the GPU, end to end.

Skipped where no CUDA device exists (CI); the same code paths run on the CPU in the other test
files, and tests/test_device_data.py runs its loader tests on CUDA too when there is one.
"""
import json
import math

import pytest
import torch

from codeq.quantizers import DeadZoneLDZCompander
from codeq.quantizers.percentile import robust_absmax, robust_absmaxes
from conftest import quick_config, write_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@pytest.mark.parametrize("size", [1, 2, 3, 1000, 36_864, 1_000_003, 2**24 + 5])
def test_gpu_percentile_is_the_exact_cpu_percentile(size):
    weight = torch.randn(size, generator=torch.Generator().manual_seed(size))
    assert torch.equal(robust_absmax(weight.to(CUDA)).cpu(), robust_absmax(weight))
    assert robust_absmax(weight.to(CUDA)).device == weight.to(CUDA).device


def test_gpu_percentile_propagates_nan_and_handles_ties():
    weight = torch.randn(5000)
    weight[17] = math.nan
    assert math.isnan(robust_absmax(weight.to(CUDA)))
    ties = torch.tensor([0.5, -0.5] * 2000 + [3.0] * 10)
    assert torch.equal(robust_absmax(ties.to(CUDA)).cpu(), torch.quantile(ties.abs(), 0.99))


def test_gpu_percentiles_selected_together_are_the_cpu_percentiles():
    sizes = [432] + [2304] * 6 + [4608] + [9216] * 5 + [18432] + [36864] * 5 + [640] + [9216, 36864, 2**21 + 3]
    generator = torch.Generator().manual_seed(20)
    weights = [torch.randn(size, generator=generator) for size in sizes]
    weights[3][5] = math.nan
    weights.append(torch.randn(64, 32, 3, 3, generator=generator).to(memory_format=torch.channels_last))
    weights.append(torch.randn(1000, generator=generator).to(torch.bfloat16))
    together = robust_absmaxes([weight.to(CUDA) for weight in weights])
    for result, weight in zip(together, weights, strict=True):
        assert result.device.type == "cuda" and result.dtype == weight.dtype
        expected = robust_absmax(weight)
        assert math.isnan(result) if math.isnan(expected) else torch.equal(result.cpu(), expected)


@pytest.mark.parametrize("shape", [(64, 32, 3, 3), (256, 64), (70_000,)])
def test_quantizer_on_gpu_matches_the_cpu(shape):
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(shape, generator=generator) * 0.05
    upstream = torch.randn(shape, generator=generator)
    results = []
    for device in ("cpu", CUDA):
        quantizer = DeadZoneLDZCompander(4, 8, 1.5, 0.8).to(device)
        latent = weight.to(device).requires_grad_()
        output = quantizer(latent)
        (output * upstream.to(device)).sum().backward()
        results.append([output.detach().cpu(), latent.grad.cpu(), quantizer.logit_dz.grad.cpu(),
                        quantizer.logit_bit.grad.cpu()])
    (cpu_output, cpu_grad, cpu_dz, cpu_bit), (gpu_output, gpu_grad, gpu_dz, gpu_bit) = results
    # nvcc may contract the output's multiply-add into one FMA: equal up to one rounding, not bit for bit.
    torch.testing.assert_close(gpu_output, cpu_output, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(gpu_grad, cpu_grad, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(gpu_dz, cpu_dz, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gpu_bit, cpu_bit, rtol=1e-4, atol=1e-6)


def test_compiled_bf16_channels_last_qat_run_on_gpu(tmp_path):
    from codeq.app.cli import main

    config = quick_config(tmp_path, amp="bf16", channels_last=True, data_on_device=True, use_compile=True,
                          img_size=32, epochs=2, device="cuda")
    assert main(["train", "--config", str(write_config(tmp_path, config))]) == 0
    lines = next((tmp_path / "runs").rglob("metrics.jsonl")).read_text().splitlines()
    assert len(lines) == 2
    final = json.loads(lines[-1])
    assert final["val_acc"] > 0.3 and 0.0 < final["sparsity"] < 1.0, final


@pytest.mark.parametrize("learnable_bit", [False, True])
def test_compiled_quantizer_gradients_on_gpu_match_eager(learnable_bit):
    # The CUDA backend of torch.compile once miscompiled the fused forward (weight gradients off by up to 4).
    torch.manual_seed(0)
    weight = torch.randn(32, 16, 3, 3, device=CUDA) * 0.05
    upstream = torch.randn_like(weight)
    results = []
    for compiled in (False, True):
        quantizer = DeadZoneLDZCompander(4, 8, 0.35, 3.0, learnable_bit, True).to(CUDA)
        latent = weight.clone().requires_grad_()
        output = (torch.compile(quantizer) if compiled else quantizer)(latent)
        (output * upstream).sum().backward()
        results.append([output.detach(), latent.grad, quantizer.logit_dz.grad, quantizer.logit_bit.grad])
    for eager, compiled in zip(*results, strict=True):
        if eager is None:
            assert compiled is None
        else:
            torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
