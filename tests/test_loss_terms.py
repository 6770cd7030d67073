"""What a loss term returns is checked at the first step: a wrong type ends the run with one line, a constant (a number,
or a tensor no gradient connects to a parameter) trains on with one warning that names the term and the usual
cause, and a term that reads the latent weights is silent."""
import logging

import pytest
import torch
from torch import nn

from codeq.app import cli
from codeq.attach import latent_weight
from codeq.regularizers import LOSS_REGISTRY, warn_constant_term
from conftest import quick_config, write_config

CAUSE = "read a layer's trainable weight with codeq.attach.latent_weight(module)"


def named_weights(model: nn.Module, scale: float = 1e-4) -> torch.Tensor | float:
    """The trap: after prepare no parameter's name ends in 'weight' for a quantized layer, so this sums nothing."""
    chosen = [p for name, p in model.named_parameters() if name.endswith("weight")]
    return scale * sum(p.square().sum() for p in chosen)


def latent_weights(model: nn.Module, scale: float = 1e-4) -> torch.Tensor:
    """The right way: every Conv2d's and Linear's latent weight, quantized or not."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return scale * sum(latent_weight(m).square().sum() for m in layers)


def constant_tensor(model: nn.Module) -> torch.Tensor:
    return torch.zeros(())


def text(model: nn.Module) -> str:
    return "0.0"


def vector(model: nn.Module) -> torch.Tensor:
    return torch.stack([p.sum() for p in list(model.parameters())[:3]])


@pytest.fixture(autouse=True)
def terms():
    for fn in (named_weights, latent_weights, constant_tensor, text, vector):
        LOSS_REGISTRY[fn.__name__] = fn
    warn_constant_term.cache_clear()
    yield
    for fn in (named_weights, latent_weights, constant_tensor, text, vector):
        del LOSS_REGISTRY[fn.__name__]


def train(tmp_path, capsys, term: str, epochs: int = 1) -> tuple[int, list[str]]:
    config = quick_config(tmp_path, model="mlp", epochs=epochs, loss_terms=[{"name": term, "lambda": 1.0}])
    config["quantizer"]["exclude_layers"] = []
    code = cli.main(["train", "--config", str(write_config(tmp_path, config))])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("term,what", [("named_weights", "the number 0.0"),
                                       ("constant_tensor", "a tensor without a gradient path (0)")])
def test_a_constant_term_warns_once_and_trains(tmp_path, capsys, caplog, term, what):
    with caplog.at_level(logging.WARNING):
        code, _ = train(tmp_path, capsys, term, epochs=2)
    assert code == 0
    [warning] = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert warning.startswith(f"loss term {term!r} returned {what}: no gradient reaches any parameter, so it "
                              f"regularises nothing") and "parametrizations.weight.original" in warning
    assert warning.endswith(CAUSE)
    records = (tmp_path / "runs" / "mlp_deadzone4b_e2_lr0.003" / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 2 and f'"loss_{term}": 0.0' in records[0]


def test_a_term_on_the_latent_weights_regularises_without_a_warning(tmp_path, capsys, caplog):
    with caplog.at_level(logging.WARNING):
        code, _ = train(tmp_path, capsys, "latent_weights")
    assert code == 0 and not [r for r in caplog.records if r.levelno >= logging.WARNING]
    record = (tmp_path / "runs" / "mlp_deadzone4b_e1_lr0.003" / "metrics.jsonl").read_text()
    assert '"loss_latent_weights": 0.0,' not in record and '"loss_latent_weights": ' in record


@pytest.mark.parametrize("term,problem", [
    ("text", "loss term 'text' returned str '0.0'; a loss term returns a 0-dim tensor computed from the model's "
             "parameters"),
    ("vector", "loss term 'vector' returned a tensor of shape [3]; a loss term returns a 0-dim tensor (reduce it, "
               "e.g. with .sum() or .mean())")])
def test_a_term_of_the_wrong_type_ends_the_run_with_one_line(tmp_path, capsys, term, problem):
    code, lines = train(tmp_path, capsys, term)
    assert code == 1 and lines[-1] == f"error: {problem}"
    assert not any("Traceback" in line for line in lines)
