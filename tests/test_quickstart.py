"""The promise of `make quickstart`: CoDeQ prunes most of ResNet-20 at 4 bits and keeps its accuracy."""
import json

import yaml

from codeq.app import cli
from conftest import ROOT, write_config


def test_quickstart_reaches_accuracy_and_sparsity(tmp_path, capsys):
    config = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    config["save_dir"] = str(tmp_path)
    assert cli.main(["train", "--config", str(write_config(tmp_path, config))]) == 0
    [run_dir] = [p for p in tmp_path.iterdir() if p.is_dir()]
    final = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["epoch"] == 10
    assert final["val_acc"] >= 0.97
    assert final["sparsity"] >= 0.80
    assert final["mean_bits"] == 4.0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith(f"run directory: {run_dir} | best val_acc")
    assert "sparsity" in out[-1]
