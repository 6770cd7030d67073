"""End-of-run report files, per-epoch compression metrics, and the report command on checkpoints."""
import contextlib
import io
import json
from pathlib import Path

import matplotlib.image
import pytest
import torch

from codeq.app import cli
from conftest import quick_config, write_config

SUMMARY_HEADER = "| Method | Weights | Pruning | Acc (%) | Rel. BOPs (%) |"


def train_once(tmp_path: Path, **overrides) -> tuple[Path, str]:
    """A 1-epoch digits run at 16 px; returns its run directory and what it printed."""
    config = quick_config(tmp_path, **overrides)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert cli.main(["train", "--config", str(write_config(tmp_path, config))]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    return run_dir, stdout.getvalue()


@pytest.fixture(scope="module")
def codeq_run(tmp_path_factory):
    return train_once(tmp_path_factory.mktemp("codeq"))


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory):
    return train_once(tmp_path_factory.mktemp("baseline"), model="mlp", quantizer=None)


def test_run_ends_with_the_summary_table_then_the_run_line(codeq_run):
    run_dir, stdout = codeq_run
    lines = stdout.strip().splitlines()
    assert lines[-1].startswith(f"run directory: {run_dir} | best val_acc ") and "sparsity" in lines[-1]
    table = lines.index(SUMMARY_HEADER)
    assert lines[table + 2].startswith("| CoDeQ | 4-bit | ")
    assert table < len(lines) - 1


def test_run_writes_report_json_markdown_and_a_readable_plot(codeq_run):
    run_dir, _ = codeq_run
    report = json.loads((run_dir / "report.json").read_text())
    (epoch,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert report["val_acc"] == epoch["val_acc"] and report["epoch"] == 1
    assert report["rel_bops"] == pytest.approx(epoch["rel_bops"])
    assert report["sparsity"] == pytest.approx(epoch["sparsity"])
    assert 0 < report["rel_bops"] < 4 / 32 < report["rel_bops_structured"] * 1.01
    assert report["macs"] == sum(layer["macs"] for layer in report["layers"]) > 0
    size = report["size"]
    assert 1 < size["ratio"] == pytest.approx(size["fp32_bytes"] / size["compressed_bytes"])
    assert [layer["name"] for layer in report["layers"]][:2] == ["conv1", "layer1.0.conv1"]
    markdown = (run_dir / "report.md").read_text()
    assert SUMMARY_HEADER in markdown and "| layer3.2.conv2 | Conv2d | 4 |" in markdown
    image = matplotlib.image.imread(run_dir / "layers.png")
    assert image.shape[0] > 300 and image.shape[1] > 600 and image[..., :3].std() > 0.05


def test_every_epoch_logs_mean_and_per_layer_compression(codeq_run):
    run_dir, _ = codeq_run
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert record["mean_bits"] == 4.0 and 0 < record["sparsity"] < 1 and 0 < record["rel_bops"] < 1
    assert record["layer_bits/layer2.0.conv1"] == 4.0
    assert 0 <= record["layer_sparsity/fc"] < 1
    # Fig. 4's dead-zone curves: the epoch's mean |logit_dz| and d / 2R = 1 - tanh|logit_dz|, from the same weights
    state = torch.load(run_dir / "last.pt", weights_only=True)["model"]
    logits = torch.stack([value.abs() for key, value in state.items() if key.endswith("logit_dz")])
    assert len(logits) == 20 and logits.max() < 3.0  # ResNet-20's 19 convs and fc; the dead zones widened
    assert record["mean_logit_dz"] == pytest.approx(logits.mean().item(), rel=1e-6)
    assert record["mean_deadzone_share"] == pytest.approx((1 - torch.tanh(logits)).mean().item(), rel=1e-6)


def test_report_command_recomputes_the_run_report_from_a_checkpoint(codeq_run, tmp_path, capsys):
    run_dir, _ = codeq_run
    assert cli.main(["report", str(run_dir / "last.pt"), "--out", str(tmp_path)]) == 0
    assert SUMMARY_HEADER in capsys.readouterr().out
    again, saved = (json.loads((folder / "report.json").read_text()) for folder in (tmp_path, run_dir))
    assert again == saved
    assert (tmp_path / "layers.png").stat().st_size > 10_000
    assert cli.main(["report", str(run_dir / "best.pt")]) == 0
    assert "| CoDeQ | 4-bit |" in capsys.readouterr().out


def test_baseline_report_and_side_by_side_comparison(codeq_run, baseline_run, capsys):
    baseline_dir, stdout = baseline_run
    assert "| FP32 baseline | 32-bit | – |" in stdout and stdout.strip().splitlines()[-1].startswith("run directory:")
    assert json.loads((baseline_dir / "report.json").read_text())["rel_bops"] == pytest.approx(1.0)
    (baseline_dir / "report.json").rename(baseline_dir / "saved_report.json")  # the FP32 Rel. BOPs from its last.pt
    try:
        assert cli.main(["report", "--compare", str(codeq_run[0]), str(baseline_dir)]) == 0
    finally:
        (baseline_dir / "saved_report.json").rename(baseline_dir / "report.json")
    rows = capsys.readouterr().out.strip().splitlines()
    final = json.loads((codeq_run[0] / "metrics.jsonl").read_text().splitlines()[-1])
    assert rows[0] == "| Method | Weights | Pruning | Acc (%) | Rel. BOPs (%) | n |"
    assert rows[2] == (f"| CoDeQ | 4-bit | Unstruc. | {100 * final['val_acc']:.2f} | {100 * final['rel_bops']:.2f} "
                       f"| 1 |")
    assert rows[3].startswith("| FP32 baseline | 32-bit | None |") and rows[3].endswith("| 100.00 | 1 |")


def test_report_command_rejects_bad_paths_in_one_line(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "missing.pt")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("report error:") and "missing.pt" in error and "\n" not in error
    assert cli.main(["report", "--compare", str(tmp_path / "nowhere")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert cli.main(["report"]) == 2
    assert capsys.readouterr().err == "report error: pass either a checkpoint PATH or --compare RUN_DIR...\n"
