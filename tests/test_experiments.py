"""The train-FP32-then-compress workflow on a generated JPEG image folder: init_from (a run, a QAT checkpoint, plain
state_dict files, a head of another size), and codeq evaluate reproducing runs' accuracies from checkpoints, copies
and exports."""
import json
import logging
import shutil
import subprocess
import sys

import pytest
import torch

from codeq.app import cli, evaluate
from codeq.app.config import load_config
from codeq.app.experiment import build_model
from codeq.attach import toggle_quantization
from codeq.data.base import load_dataset
from codeq.data.loaders import build_loaders
from codeq.models import create_model
from codeq.training.loop import validate
from conftest import ROOT, image_config, write_config, write_image_tree

# timm's 0.37 M-parameter test_resnet keeps these tests quick; its BatchNorms are bn*, the stem's conv1.1 and conv1.4
# and downsample.2, which stay FP32.
MODEL = "timm.test_resnet"
QAT_8_BIT = {"name": "deadzone", "kwargs": {"fixed_bit_val": 8, "learnable_bit": False},
             "exclude_layers": ["bn", r"re:.*(conv1\.[14]|downsample\.2)$"]}


def last_record(run_dir):
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


def train(tmp_path, config, *extra):
    assert cli.main(["train", "--config", str(write_config(tmp_path, config)), *extra]) == 0
    return next(path for path in (tmp_path / "runs").iterdir() if path.is_dir())


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory, image_tree):
    folder = tmp_path_factory.mktemp("fp32")
    # Small batches: enough steps for BatchNorm's running statistics to settle, so that evaluation mode works.
    return train(folder, image_config(folder, image_tree, model=MODEL, epochs=2, batch_size=4, optimizer={
        "type": "adamw", "param_groups": {"base": {"lr": 0.003}}}))


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory, image_tree, fp32_run):
    folder = tmp_path_factory.mktemp("qat")
    return train(folder, image_config(folder, image_tree, model=MODEL, init_from=str(fp32_run), quantizer=QAT_8_BIT,
                                      optimizer={
        "type": "adamw", "param_groups": {"base": {"lr": 0.001}, "dz": {"lr": 0.001}}}))


def validation(model, data_dir):
    _, loader = build_loaders(load_dataset("imagefolder", str(data_dir), 32), 12, 0, torch.Generator())
    return validate(loader, model, torch.nn.CrossEntropyLoss(), "cpu")


@pytest.mark.parametrize("quantizer", [QAT_8_BIT, {**QAT_8_BIT, "name": "uniform", "kwargs": {"bitwidth": 8}}])
def test_init_from_an_fp32_run_starts_8_bit_qat_at_its_accuracy(tmp_path, image_tree, fp32_run, quantizer):
    record = last_record(fp32_run)
    assert record["val_acc"] > 0.5  # a model that tells the 3 classes apart, not a constant guess
    config = load_config(write_config(tmp_path, image_config(tmp_path, image_tree, model=MODEL,
                                                             init_from=str(fp32_run), quantizer=quantizer)))
    model, quantized = build_model(config, 3)
    assert len(quantized) == 16 and "conv1.3" in quantized and "conv1.4" not in quantized  # every conv and fc
    start = validation(model, image_tree)
    assert start["acc"] == record["val_acc"]
    if quantizer["name"] == "uniform":  # CoDeQ clips the 1 % largest weights to its robust range, uniform does not
        assert start["loss"] == pytest.approx(record["val_loss"], rel=0.02)
    toggle_quantization(model, False)  # the latent weights are the FP32 run's, exactly
    assert validation(model, image_tree)["loss"] == pytest.approx(record["val_loss"], rel=1e-6)


def test_init_from_starts_optimizer_schedule_and_epochs_fresh(qat_run, fp32_run):
    assert [record["epoch"] for record in map(json.loads, (qat_run / "metrics.jsonl").read_text().splitlines())] == [1]
    assert last_record(qat_run)["lr"] == pytest.approx(0.001)
    checkpoint = torch.load(qat_run / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["config"]["init_from"] == str(fp32_run.resolve())


def test_a_qat_checkpoint_gives_its_latent_weights_and_fresh_quantizers(tmp_path, image_tree, qat_run):
    quantizer = {**QAT_8_BIT, "kwargs": {"fixed_bit_val": 4, "learnable_bit": False, "init_deadzone_logit": 2.0}}
    config = load_config(write_config(tmp_path, image_config(tmp_path, image_tree, model=MODEL,
                                                             init_from=str(qat_run / "last.pt"), quantizer=quantizer)))
    model, _ = build_model(config, 3)
    saved = torch.load(qat_run / "last.pt", weights_only=True)["model"]
    mine = model.state_dict()
    for key in ("conv1.0", "layer2.0.downsample.1", "fc"):
        assert torch.equal(mine[f"{key}.parametrizations.weight.original"],
                           saved[f"{key}.parametrizations.weight.original"])
    assert torch.equal(mine["bn1.running_mean"], saved["bn1.running_mean"])
    assert mine["conv1.0.parametrizations.weight.0.quantizer.logit_dz"].item() == 2.0
    assert saved["conv1.0.parametrizations.weight.0.quantizer.logit_dz"].item() != 2.0


def state_file(tmp_path, form, state):
    if form == "safetensors":
        from safetensors.torch import save_file

        save_file(state, tmp_path / "weights.safetensors")
        return tmp_path / "weights.safetensors"
    content = {"state_dict": state, "epoch": 90} if form == "nested" else {"model": state} if form == "model" else \
        {f"module.{key}": tensor for key, tensor in state.items()} if form == "ddp" else state
    torch.save(content, tmp_path / "weights.pth")
    return tmp_path / "weights.pth"


@pytest.mark.parametrize("form", ["plain", "nested", "model", "ddp", "safetensors"])
def test_a_plain_state_dict_file_loads(tmp_path, image_tree, form):
    torch.manual_seed(3)
    state = create_model("resnet18", 3, 32).state_dict()
    path = state_file(tmp_path, form, state)
    config = load_config(write_config(tmp_path, image_config(tmp_path, image_tree, init_from=str(path))))
    model, _ = build_model(config, 3)
    assert all(torch.equal(model.state_dict()[key], tensor) for key, tensor in state.items())


def test_a_head_of_another_size_is_skipped_with_a_notice(tmp_path, image_tree, caplog):
    torch.manual_seed(4)
    imagenet = create_model("resnet18", 1000, 32).state_dict()
    torch.save(imagenet, tmp_path / "imagenet.pth")
    config = load_config(write_config(tmp_path, image_config(tmp_path, image_tree, init_from=str(tmp_path /
                                                                                            "imagenet.pth"))))
    torch.manual_seed(5)
    fresh, _ = build_model(config.model_copy(update={"init_from": None}), 3)
    torch.manual_seed(5)
    with caplog.at_level(logging.WARNING):
        model, _ = build_model(config, 3)
    assert ("init_from: skipped fc.weight, fc.bias (shapes differ: [1000, 512] -> [3, 512], [1000] -> [3]); they "
            "keep their fresh initialisation") in caplog.text
    state = model.state_dict()
    assert torch.equal(state["fc.weight"], fresh.state_dict()["fc.weight"])
    assert all(torch.equal(state[key], imagenet[key]) for key in imagenet if not key.startswith("fc."))


@pytest.mark.parametrize("make,problem", [
    (lambda path: torch.save(create_model("torchvision.resnet34", 3, 32).state_dict(), path),
     "holds weights of another model (unexpected: layer1.2.conv1.weight, layer1.2.bn1.weight,"),
    (lambda path: torch.save({"weights": [1, 2, 3]}, path), "holds no state_dict (a mapping of names to tensors"),
    (lambda path: path.write_bytes(b"garbage"),
     "is not a torch.save or safetensors file this tool reads (UnpicklingError)"),
    (lambda path: None, "does not exist; pass a checkpoint, a run directory or a state_dict file"),
])
def test_weights_that_do_not_fit_are_one_config_error(tmp_path, capsys, make, problem):
    path = tmp_path / "weights.pth"
    make(path)
    config = image_config(tmp_path, tmp_path, dataset="digits", init_from=str(path))
    assert cli.main(["train", "--config", str(write_config(tmp_path, config)), "--dry-run"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"config error: {tmp_path / 'config.yaml'}: init_from: {path} ") and problem in line, line


@pytest.mark.parametrize("run", ["fp32_run", "qat_run"])
def test_evaluate_reproduces_a_runs_val_accuracy(request, run):
    run_dir = request.getfixturevalue(run)
    result = evaluate.evaluate(run_dir, device="cpu")
    record = last_record(run_dir)
    assert result.images == 24 and result.acc == record["val_acc"]
    assert result.loss == pytest.approx(record["val_loss"], rel=1e-5)


def test_the_command_prints_accuracy_and_compression(qat_run):
    done = subprocess.run([sys.executable, "-m", "codeq", "evaluate", str(qat_run), "--device", "cpu"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    record, lines = last_record(qat_run), done.stdout.splitlines()
    assert lines[0].startswith(f"validation: loss {record['val_loss']:.4f}, accuracy {record['val_acc']:.2%} "
                               f"(24 images of imagefolder from ")
    # The run re-estimated its BatchNorm statistics before validating: evaluate keeps them and says so.
    used = torch.load(qat_run / "last.pt", weights_only=True)["bn_recalibrated"]  # 5, or all the run's batches
    assert 1 <= used <= 5
    assert lines[1] == f"BatchNorm statistics: re-estimated on {used} training batches when the checkpoint was written"
    assert lines[4].startswith(f"| CoDeQ | 8-bit | {100 * record['sparsity']:.1f} % | {100 * record['val_acc']:.2f} |")


def test_a_copied_best_pt_reports_its_accuracy(tmp_path, capsys, qat_run):
    shutil.copy(qat_run / "best.pt", tmp_path / "best.pt")
    assert cli.main(["evaluate", str(tmp_path / "best.pt"), "--device", "cpu"]) == 0
    best = torch.load(tmp_path / "best.pt", weights_only=True)["best_val_acc"]
    [row] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| CoDeQ |")]
    assert row.split(" | ")[3] == f"{100 * best:.2f}"


def test_an_export_evaluates_to_its_checkpoints_accuracy(tmp_path, capsys, qat_run):

    assert cli.main(["export", str(qat_run / "last.pt"), str(tmp_path / "model.codeq")]) == 0
    result = evaluate.evaluate(tmp_path / "model.codeq", device="cpu")
    assert result.acc == last_record(qat_run)["val_acc"]
    summary = result.evaluated.summarise(result.acc)
    assert f"| CoDeQ | 8-bit | {100 * last_record(qat_run)['sparsity']:.1f} % |" in summary
    assert f"- Size: {(tmp_path / 'model.codeq').stat().st_size:,} B export file" in summary


def test_another_data_dir_or_data_set(tmp_path, capsys, fp32_run):
    other = write_image_tree(tmp_path / "other", per_class=(1, 3), seed=1)
    result = evaluate.evaluate(fp32_run, data_dir=str(other), device="cpu", batch_size=4)
    assert result.images == 9 and result.config.data_dir == str(other)
    assert cli.main(["evaluate", str(fp32_run), "--dataset", "digits", "--device", "cpu"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("config error: --dataset: digits from ") and line.endswith(
        "has 10 classes, the model 3; evaluate on data of the classes the model was trained on")


def test_bad_input_is_one_line(tmp_path, capsys, fp32_run):
    assert cli.main(["evaluate", str(tmp_path / "nothing.pt")]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"evaluate error: {tmp_path / 'nothing.pt'} is neither a checkpoint of this tool nor an "
                           "export")
    assert cli.main(["evaluate", str(fp32_run), "--data-dir", str(tmp_path / "absent"), "--device", "cpu"]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line == (f"error: cannot load data set 'imagefolder' from '{tmp_path / 'absent'}': no train/ folder at "
                    f"{tmp_path / 'absent' / 'train'} (an image folder holds train/ and val/, each with one folder per "
                    f"class); point data_dir at the data set")
