import os
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# W&B stays off in tests unless a test turns it on itself.
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture
def root() -> Path:
    return ROOT


@pytest.fixture
def percentile_selections(monkeypatch) -> list[list]:
    """The weights of each ``robust_absmaxes`` call ``percentiles_selected_together`` makes, one list a call."""
    from src import utils_quantization

    calls = []
    real = utils_quantization.robust_absmaxes

    def recording(weights):
        calls.append(list(weights))
        return real(weights)

    monkeypatch.setattr(utils_quantization, "robust_absmaxes", recording)
    return calls


def quick_config(tmp_path: Path, **overrides) -> dict:
    """A 1-epoch digits config that trains in a few seconds on a CPU."""
    config = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    config.update(epochs=1, img_size=16, batch_size=128, save_dir=str(tmp_path / "runs"), workers=0)
    config.update(overrides)
    return config


def write_config(tmp_path: Path, config: dict, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
