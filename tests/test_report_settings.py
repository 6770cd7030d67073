"""The ``report`` config section (BOPs at other activation and FP32-weight bit-widths) and the reference
implementation's top-level keys, accepted as aliases of it."""
import json
import logging

import pytest
import torch
import yaml

from codeq.app import cli
from codeq.app.config import config_to_dict, validate_config
from codeq.app.experiment import build_model
from codeq.app.report import build_report, render_markdown
from codeq.compression import CompressionMonitor
from conftest import quick_config, write_config

REFERENCE_KEYS = {"default_activation_bitrate": 8, "default_weight_bitrate": 8, "eval_bobs": True}


def resolved(tmp_path, **report_section) -> dict:
    return config_to_dict(validate_config(quick_config(tmp_path, report=report_section)))


def test_every_report_states_its_settings_and_8_bit_activations_quarter_rel_bops(tmp_path):
    config = resolved(tmp_path)
    model, _ = build_model(validate_config(config), 10)  # every conv and the fc at 4 bits
    monitor = CompressionMonitor(model.eval(), torch.zeros(3, 16, 16))
    default = build_report(monitor, config, {})
    eight = build_report(monitor, resolved(tmp_path, activation_bits=8, fp_weight_bits=8), {})
    assert (default["activation_bits"], default["fp_weight_bits"]) == (32, 32)
    assert (eight["activation_bits"], eight["fp_weight_bits"]) == (8, 8)
    # every Conv2d/Linear is quantized, so the FP32-weight setting changes nothing and activations scale BOPs
    assert eight["rel_bops"] == pytest.approx(default["rel_bops"] / 4)
    assert eight["rel_bops_structured"] == pytest.approx(default["rel_bops_structured"] / 4)
    assert 0 < eight["rel_bops"] < eight["rel_bops_structured"] <= 4 * 8 / 1024
    assert "- BOPs count 32-bit activations and 32-bit weights in layers left in FP32; " in render_markdown(default)
    assert "- BOPs count 8-bit activations and 8-bit weights in layers left in FP32; " in render_markdown(eight)


def test_the_reference_implementations_keys_run_unchanged_with_a_notice(tmp_path, capsys, caplog):
    config = quick_config(tmp_path, **REFERENCE_KEYS)
    with caplog.at_level(logging.INFO, logger="codeq.app.config"):
        assert cli.main(["train", "--config", str(write_config(tmp_path, config)), "--dry-run"]) == 0
    notices = [record.getMessage() for record in caplog.records if record.name == "codeq.app.config"]
    assert notices == [
        "config: default_activation_bitrate (the reference implementation's key) is read as report.activation_bits: 8",
        "config: default_weight_bitrate (the reference implementation's key) is read as report.fp_weight_bits: 8",
        "config: eval_bobs is the reference implementation's key; Rel. BOPs are logged every epoch anyway, so it "
        "has no effect"]
    resolved = config_to_dict(validate_config(config))
    assert resolved["report"] == {"activation_bits": 8, "fp_weight_bits": 8}
    assert not resolved.keys() & REFERENCE_KEYS.keys()


def test_an_alias_that_contradicts_the_report_section_is_a_one_line_config_error(tmp_path, capsys):
    config = quick_config(tmp_path, default_activation_bitrate=8, report={"activation_bits": 4})
    path = write_config(tmp_path, config)
    assert cli.main(["train", "--config", str(path), "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"config error: {path}: default_activation_bitrate: says 8 but report.activation_bits says 4; keep one of "
        "the two")
    assert yaml.safe_load(path.read_text())["default_activation_bitrate"] == 8


def test_the_epoch_metrics_count_bops_with_the_report_settings(tmp_path):
    config = quick_config(tmp_path, model="mlp", report={"activation_bits": 8, "fp_weight_bits": 16})
    assert cli.main(["train", "--config", str(write_config(tmp_path, config))]) == 0
    run_dir = tmp_path / "runs" / "mlp_deadzone4b_e1_lr0.003"
    [record] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    report = json.loads((run_dir / "report.json").read_text())
    assert record["rel_bops"] == pytest.approx(report["rel_bops"], rel=1e-9)
    assert record["rel_bops"] < 8 / 32 * 4 / 32 * 1.0001  # 4-bit weights times 8-bit activations at most
