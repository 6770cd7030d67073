"""configs/paper/: one config per row of the paper's Tables 2-5 (arXiv 2512.12981v1), each with the paper's settings
(Sec. 6.1) and objective (Eqs. 16 and 19), a header naming its row and numbers, and a clean --dry-run; the sweeps that
run each table's seeds."""
import json
import re
from pathlib import Path

import pytest

from codeq.app import cli
from codeq.app.config import load_config
from codeq.app.sweep import expand
from conftest import ROOT

# Per model and data set, from the paper's Sec. 6.1: table, epochs, batch, λ_dz, λ_bit, learning rate of the logits.
SETTINGS = {
    "resnet20_cifar10": (2, 300, 512, 0.01, 0.01, 1e-3),
    "resnet18_imagenet": (3, 120, 512, 0.02, 0.1, 1e-4),
    "resnet50_imagenet": (4, 120, 256, 0.02, 0.05, 1e-4),
    "tinyvit_cifar10": (5, 200, 128, 0.5, 0.75, 1e-3),
}
# Per row, the numbers of the paper's tables: Acc (%), and Rel. BOPs (%) for the CoDeQ rows.
RESULTS = {
    "resnet20_cifar10_fp32": ["91.70"], "resnet20_cifar10_4bit": ["91.88 ± 0.15", "2.95 ± 0.12"],
    "resnet20_cifar10_mp": ["91.86 ± 0.10", "2.61 ± 0.08"],
    "resnet18_imagenet_fp32": ["70.30"], "resnet18_imagenet_4bit": ["69.83 ± 0.14", "4.75 ± 0.19"],
    "resnet18_imagenet_mp": ["69.81 ± 0.09", "4.42 ± 0.05"],
    "resnet50_imagenet_fp32": ["76.30"], "resnet50_imagenet_mp": ["75.29", "2.62"],
    "tinyvit_cifar10_fp32": ["87.99 ± 0.09"], "tinyvit_cifar10_4bit": ["87.86 ± 0.19", "2.15 ± 0.04"],
    "tinyvit_cifar10_mp": ["87.85 ± 0.21", "1.66 ± 0.01"],
}
ROW_NAMES = {"fp32": "Baseline | 32bit | None", "4bit": "CoDeQ (Ours) | 4bit | Unstruc.",
             "mp": "CoDeQ (Ours) | MP | Unstruc."}
PAPER = ROOT / "configs" / "paper"


def test_every_row_of_the_papers_tables_has_a_config_and_nothing_else_is_there():
    assert sorted(path.stem for path in PAPER.glob("*")) == sorted(RESULTS)


def header(path) -> str:
    lines = path.read_text().splitlines()
    return " ".join(line.lstrip("# ") for line in lines[:next(i for i, line in enumerate(lines) if
                                                               not line.startswith("#"))])


@pytest.mark.parametrize("row", list(RESULTS))
def test_a_paper_config_has_the_papers_settings_and_objective_and_says_so(row, use_weights_home):
    setting, variant = row.rsplit("_", 1)
    table, epochs, batch, lambda_dz, lambda_bit, logit_lr = SETTINGS[setting]
    text = header(PAPER / f"{row}.yaml")
    assert f"Table {table}, row \"{ROW_NAMES[variant]}\"" in text
    assert all(number in text for number in RESULTS[row]), text
    assert "The paper's settings" in text and "Ours" in text and "Sec. 6.1" in text
    config = load_config(PAPER / f"{row}.yaml")
    assert (config.epochs, config.batch_size, config.lr_scheduler.type) == (epochs, batch, "cosine")
    groups = config.optimizer.param_groups
    terms = {term.name: term.weight for term in config.loss_terms}
    if variant == "fp32":
        assert config.quantizer is None and terms == {} and groups.dz is None and groups.bit is None
        return
    kwargs = config.quantizer.kwargs
    assert config.quantizer.name == "deadzone" and kwargs["init_deadzone_logit"] == 3.0
    assert kwargs["learnable_deadzone"] and kwargs["learnable_bit"] == (variant == "mp")
    if variant == "mp":
        assert kwargs["max_bits"] == 8 and kwargs["init_bit_logit"] == 3.0
        assert terms == {"dz_l2": lambda_dz, "bit_l2": lambda_bit}
        assert (groups.bit.lr, groups.bit.weight_decay) == (logit_lr, 0.0)
    else:
        assert kwargs["fixed_bit_val"] == 4 and terms == {"dz_l2": lambda_dz}
    assert (groups.dz.lr, groups.dz.weight_decay) == (logit_lr, 0.0)  # the pressure is the loss term, not decay
    if setting == "tinyvit_cifar10":
        assert config.model == "timm.tiny_vit_5m_224" and not config.pretrained
        assert (config.optimizer.type, groups.base.lr) == ("adamw", 3e-4)


@pytest.mark.parametrize("row", list(RESULTS))
def test_a_paper_config_passes_its_dry_run(row, tmp_path, capsys, use_weights_home):
    setting = row.rsplit("_", 1)[0]
    _, epochs, batch, lambda_dz, _, _ = SETTINGS[setting]
    arguments = ["train", "--config", str(PAPER / f"{row}.yaml"), "--dry-run", "--device", "cpu",
                 f"--set=save_dir={tmp_path}"]
    assert cli.main(arguments) == 0
    out = capsys.readouterr().out
    assert f"{epochs} epochs of batch {batch}" in out and "scheduler:  cosine over" in out
    if row.endswith("fp32"):
        assert "quantizer:  none (FP32 baseline)" in out and "loss terms: none" in out
    else:
        assert f"loss terms: {lambda_dz:g} * dz_l2()" in out
        quantized = int(re.search(r"quantized:  (\d+) layers", out).group(1))
        assert quantized == {"resnet20_cifar10": 20, "resnet18_imagenet": 21, "resnet50_imagenet": 54,
                             "tinyvit_cifar10": 68}[setting]
    if "imagenet" in row:
        assert "img_size 224, imagenet (1000 classes)" in out


@pytest.mark.parametrize("row", ["resnet18_imagenet_mp", "resnet50_imagenet_mp"])
def test_an_imagenet_paper_config_trains_an_epoch_on_an_image_folder(row, tmp_path, use_weights_home, image_tree,
                                                                      caplog):
    small = [f"--set={key}={value}" for key, value in (("dataset", "imagefolder"), ("data_dir", image_tree),
                                                       ("img_size", 32), ("batch_size", 24), ("epochs", 1),
                                                       ("workers", 0), ("save_dir", tmp_path),
                                                       ("wandb_project", "null"))]
    with caplog.at_level("INFO"):
        assert cli.main(["train", "--config", str(PAPER / f"{row}.yaml"), "--device", "cpu", *small]) == 0
    if row.startswith("resnet50"):  # IMAGENET1K_V1 through init_from, not torchvision's default V2
        assert f"init_from: loaded 318 tensors from {use_weights_home}/.cache/torch/hub/checkpoints/" \
               "resnet50-0676ba61.pth" in caplog.text
    [run_dir] = [path for path in tmp_path.iterdir() if path.is_dir()]
    [record] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert record["loss_dz_l2"] > 0 and record["loss_bit_l2"] > 0 and 2 <= record["mean_bits"] <= 8


def test_the_table_sweeps_run_every_row_with_the_papers_number_of_runs(use_weights_home):
    for table, setting in ((2, "resnet20_cifar10"), (3, "resnet18_imagenet"), (4, "resnet50_imagenet"),
                           (5, "tinyvit_cifar10")):
        tasks = expand(ROOT / "sweeps" / f"paper_table{table}.yaml")
        rows = sorted(row for row in RESULTS if row.startswith(setting))
        seeds = [0] if table == 4 else [0, 1, 2]  # Table 4: "Results are reported based on one run"
        assert sorted((Path(task.config).stem, task.validated.seed) for task in tasks) == \
            sorted((row, seed) for row in rows for seed in seeds)
        assert all(task.run_dir.name.startswith(f"table{table}_") for task in tasks)


def test_every_shipped_sweep_expands():
    for sweep in sorted((ROOT / "sweeps").glob("*.yaml")):
        assert expand(sweep), sweep
