"""Extending without editing the project: the seed's contract verbatim, the registries' interface checks, and a
plugin file outside the repository that adds a quantizer, a model, a loss term and a data set, used end to end by
training, resume, report and export."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from codeq.app import cli
from codeq.errors import RegistrationError
from codeq.quantizers import QUANTIZER_REGISTRY
from conftest import ROOT, quick_config, write_config

pytestmark = pytest.mark.usefixtures("registries_as_shipped")


def test_the_seeds_imports_and_registry_work_verbatim():
    """From a checkout, as the seed's users write them: every name is codeq's own object, not a copy."""
    code = """
import codeq, codeq.attach, codeq.data, codeq.models, codeq.optim, codeq.regularizers, codeq.training.loop
import run_training
from src.quantizer import DeadZoneLDZCompander
from src.utils_quantization import UniformSymmetric, attach_weight_quantizers, round_ste, toggle_quantization
from src.structured_loss import LOSS_REGISTRY, group_lasso
from src.train import train, validate
from src.models import MODEL_REGISTRY
from src.data import DATASET_REGISTRY
from src.optim import OPTIMIZER_REGISTRY, SCHEDULER_REGISTRY
assert run_training.QUANTIZER_REGISTRY is codeq.QUANTIZER_REGISTRY
assert dict(run_training.QUANTIZER_REGISTRY) == {"uniform": UniformSymmetric, "deadzone": DeadZoneLDZCompander}
assert DeadZoneLDZCompander is codeq.DeadZoneLDZCompander and UniformSymmetric is codeq.UniformSymmetric
assert attach_weight_quantizers is codeq.attach.attach_weight_quantizers
assert toggle_quantization is codeq.toggle_quantization and round_ste is codeq.quantizers.ste.round_ste
assert LOSS_REGISTRY is codeq.LOSS_REGISTRY and group_lasso is codeq.group_lasso
assert train is codeq.training.loop.train and validate is codeq.training.loop.validate
assert MODEL_REGISTRY is codeq.MODEL_REGISTRY and DATASET_REGISTRY is codeq.data.DATASET_REGISTRY
assert OPTIMIZER_REGISTRY is codeq.optim.OPTIMIZER_REGISTRY and SCHEDULER_REGISTRY is codeq.optim.SCHEDULER_REGISTRY
"""
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_train_takes_the_seeds_loss_triples():
    from codeq.regularizers import group_lasso
    from codeq.training.loop import train

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    batches = [(torch.randn(8, 12), torch.randint(0, 3, (8,)))]
    reference = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    reference.load_state_dict(model.state_dict())
    kwargs = {"lambda_linear": 0.1, "lambda_conv": 0.0}
    metrics = train(batches, model, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.0), 1, "cpu",
                    loss_fns=[(group_lasso, 0.5, kwargs)])
    task = nn.CrossEntropyLoss()(reference(batches[0][0]), batches[0][1])
    term = 0.5 * group_lasso(reference, **kwargs)
    assert metrics["loss"] == pytest.approx((task + term).item(), rel=1e-6)
    assert metrics["task_loss"] == pytest.approx(task.item(), rel=1e-6)
    assert metrics["loss_group_lasso"] == pytest.approx(term.item(), rel=1e-6)


def test_codeq_does_not_import_the_entry_point_or_the_seed_paths():
    code = ("import sys, codeq.app.cli, codeq.app.trainer; "
            "assert 'run_training' not in sys.modules and not any(name.split('.')[0] == 'src' for name in sys.modules)")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


class NoForward(nn.Module):
    def __init__(self, bits: int = 4) -> None:
        super().__init__()


class PositionalOnly(nn.Module):
    def __init__(self, bits, /) -> None:
        super().__init__()

    def forward(self, weight):
        return weight


@pytest.mark.parametrize("cls,problem", [(NoForward, "NoForward defines no forward(weight)"),
                                         (PositionalOnly, "takes bits positionally only"),
                                         (int, "is not an nn.Module class")])
def test_a_quantizer_that_does_not_fit_is_refused_when_registered(cls, problem):
    with pytest.raises(RegistrationError) as error:
        QUANTIZER_REGISTRY.register("broken")(cls)
    assert problem in str(error.value) and "broken" not in QUANTIZER_REGISTRY
    with pytest.raises(RegistrationError):
        QUANTIZER_REGISTRY["broken"] = cls  # plain item assignment is checked too


@pytest.fixture
def plugin_file(tmp_path):
    """examples/my_parts.py copied outside the repository."""
    path = tmp_path / "elsewhere" / "my_parts.py"
    path.parent.mkdir()
    shutil.copy(ROOT / "examples" / "my_parts.py", path)
    return path


def plugin_config(tmp_path, plugin, **overrides):
    config = quick_config(tmp_path, plugins=[str(plugin)], model="tiny_cnn", dataset="blobs", img_size=8, epochs=2,
                          batch_size=64, loss_terms=[{"name": "l1", "lambda": 0.01, "kwargs": {"scale": 2.0}}],
                          quantizer={"name": "pow2", "kwargs": {"levels": 5}, "exclude_layers": ["1"]}, **overrides)
    config["optimizer"]["param_groups"].pop("dz")
    return config


def command(*args):
    """``codeq ARGS`` in a fresh process."""
    return subprocess.run([sys.executable, "-m", "codeq", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_a_plugin_outside_the_repository_trains_resumes_reports_and_exports(tmp_path, plugin_file):
    config_path = write_config(tmp_path, plugin_config(tmp_path, plugin_file))
    assert cli.main(["train", "--config", str(config_path)]) == 0
    run_dir = tmp_path / "runs" / "tiny_cnn_pow2_e2_lr0.003"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in records] == [1, 2]
    for record in records:  # the loss's parts are logged beside their sum
        assert record["loss"] == pytest.approx(record["task_loss"] + record["loss_l1"], rel=1e-6)
        assert record["loss_l1"] > 0
    import yaml

    assert yaml.safe_load((run_dir / "config.yaml").read_text())["plugins"] == [str(plugin_file.resolve())]

    # Each command below is a fresh process that knows the plugin only from the run's recorded config.
    report = command("report", str(run_dir), "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr
    rows = json.loads((tmp_path / "report" / "report.json").read_text())["layers"]
    [conv] = [row for row in rows if row["name"] == "0"]
    from codeq.app.report import model_from_checkpoint

    model, _, _ = model_from_checkpoint(run_dir / "last.pt")
    distinct = torch.unique(model[0].weight.detach()).numel()
    assert conv["quantized"] and conv["bits"] == math.ceil(math.log2(distinct))  # the generic read-out

    exported = command("export", str(run_dir / "last.pt"), str(tmp_path / "model.codeq"))
    assert exported.returncode == 0, exported.stderr
    from codeq.app.export import model_from_export

    plain = model_from_export(tmp_path / "model.codeq")
    inputs = torch.randn(5, 3, 8, 8)
    assert torch.equal(plain(inputs), model.eval()(inputs))

    longer = cli.main(["train", "--config", str(config_path), "--resume", "auto", "--set", "epochs=3"])
    assert longer == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in records] == [1, 2, 3]


def test_a_relative_plugin_path_is_recorded_absolute(tmp_path, plugin_file, monkeypatch, capsys):
    monkeypatch.chdir(plugin_file.parent)
    config_path = write_config(tmp_path, plugin_config(tmp_path, "my_parts.py"))
    assert cli.main(["train", "--config", str(config_path), "--dry-run"]) == 0
    assert f"plugins:    {plugin_file.resolve()}" in capsys.readouterr().out


@pytest.mark.parametrize("source,problem", [
    ("import no_such_module_anywhere\n", "ModuleNotFoundError: No module named 'no_such_module_anywhere'"),
    ("def broken(:\n", "SyntaxError"),
    ("from src.quantizer import QUANTIZER_REGISTRY\nQUANTIZER_REGISTRY['x'] = int\n", "is not an nn.Module class"),
])
def test_a_plugin_that_fails_to_import_is_one_config_error(tmp_path, capsys, source, problem):
    plugin = tmp_path / "bad_plugin.py"
    plugin.write_text(source)
    config_path = write_config(tmp_path, quick_config(tmp_path, plugins=[str(plugin)]))
    assert cli.main(["train", "--config", str(config_path)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"config error: {config_path}: plugins.0: importing plugin {plugin} failed: "), line
    assert problem in line
    assert not (tmp_path / "runs").exists()


def test_a_missing_plugin_file_is_named(tmp_path, capsys):
    config_path = write_config(tmp_path, quick_config(tmp_path, plugins=["nowhere/parts.py"]))
    assert cli.main(["train", "--config", str(config_path)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert f"plugins.0: plugin file {Path.cwd() / 'nowhere' / 'parts.py'} does not exist" in line
