"""use_compile with parametrized quantizers: torch.compile traces the fused quantizer and the
percentile's topk path; the compiled model trains to the same weights as the eager one."""
import pytest
import torch

from src.quantizer import DeadZoneLDZCompander
from src.train import train, validate
from src.utils_quantization import attach_weight_quantizers


def quantized_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    attach_weight_quantizers(model, [], DeadZoneLDZCompander, {"fixed_bit_val": 4, "init_deadzone_logit": 0.5,
                                                               "init_bit_logit": 0.35})
    return model


def test_compiled_quantized_model_trains_like_eager():
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 6, generator=generator), torch.randint(0, 3, (4,), generator=generator))
               for _ in range(2)]
    results = []
    for compiled in (False, True):
        model = quantized_mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        forward_model = torch.compile(model) if compiled else model
        metrics = train(batches, forward_model, torch.nn.CrossEntropyLoss(), optimizer, 1, "cpu")
        metrics |= {f"val_{k}": v for k, v in validate(batches, forward_model, torch.nn.CrossEntropyLoss(), "cpu").items()}
        results.append((metrics, [p.detach().clone() for p in model.parameters()]))
    (eager_metrics, eager_params), (compiled_metrics, compiled_params) = results
    assert compiled_metrics == pytest.approx(eager_metrics, rel=1e-5)
    initial = dict(quantized_mlp().named_parameters())
    names = [name for name, _ in quantized_mlp().named_parameters()]
    for name, eager, compiled in zip(names, eager_params, compiled_params, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
        if "logit" in name or "original" in name:  # the quantizer passed gradients to all three
            assert not torch.equal(compiled, initial[name].detach())
