import os
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# W&B stays off in tests unless a test turns it on itself.
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def torch_threads_restored():
    """A test that changes torch's thread count (as a DDP worker runs, one thread) leaves the next one as it was:
    later in-process runs would otherwise train single-threaded, and differently."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def root() -> Path:
    return ROOT


@pytest.fixture
def percentile_selections(monkeypatch) -> list[list]:
    """The weights of each ``robust_absmaxes`` call ``percentiles_selected_together`` makes, one list a call."""
    from codeq import attach as utils_quantization

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


def write_image_tree(root: Path, classes: int = 3, per_class: tuple[int, int] = (8, 8), size: int = 40,
                     seed: int = 0) -> Path:
    """A small data set of real JPEG files in the ImageFolder layout: ``root/{train,val}/class<k>/<i>.jpg``.

    Each class is a noisy image of its own colour with a bright square at its own place, so a model learns it in a few
    steps; ``per_class`` is the number of (train, val) images of each class.
    """
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = rng.integers(40, 216, size=(classes, 3))
    for split, count in zip(("train", "val"), per_class):
        for label in range(classes):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = colours[label] + rng.normal(0, 25, size=(size, size + 4, 3))
                corner = (label * size // classes) % (size - 8)
                pixels[corner:corner + 8, corner:corner + 8] = 255
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{index}.jpg", quality=90)
    return root


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory) -> Path:
    """One generated JPEG tree (3 classes, 8 training and 8 validation images each) shared by the session's tests."""
    return write_image_tree(tmp_path_factory.mktemp("images"))


def image_config(tmp_path: Path, data_dir: Path, **overrides) -> dict:
    """A 1-epoch CPU config training torchvision's ResNet-18 on an image folder at 32 px."""
    config = {"model": "resnet18", "dataset": "imagefolder", "data_dir": str(data_dir), "epochs": 1, "batch_size": 12,
              "img_size": 32, "workers": 0, "save_dir": str(tmp_path / "runs"), "log_interval": 1,
              "optimizer": {"type": "adamw", "param_groups": {"base": {"lr": 0.003}}}}
    config.update(overrides)
    return config


# torchvision's ImageNet weight files the ImageNet configs read: `pretrained: true` (torchvision's default weights)
# and the paper configs' ResNet-50 IMAGENET1K_V1 file, named by init_from under ~/.cache/torch.
IMAGENET_WEIGHT_FILES = {"resnet18": ["resnet18-f37072fd.pth"], "resnet50": ["resnet50-11ad3fa6.pth",
                                                                              "resnet50-0676ba61.pth"]}


@pytest.fixture(scope="session")
def imagenet_weights_home(tmp_path_factory) -> Path:
    """A home directory whose ``~/.cache/torch/hub/checkpoints`` holds stand-ins for torchvision's ImageNet weights of
    ResNet-18 and ResNet-50; point HOME at it and TORCH_HOME at its ``.cache/torch`` (``use_weights_home``)."""
    import torch

    from codeq.models import create_model

    home = tmp_path_factory.mktemp("home")
    checkpoints = home / ".cache" / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for model, (first, *others) in IMAGENET_WEIGHT_FILES.items():
        torch.manual_seed(0)
        torch.save(create_model(model, 1000, 224).state_dict(), checkpoints / first)
        for other in others:
            (checkpoints / other).hardlink_to(checkpoints / first)
    return home


@pytest.fixture
def use_weights_home(imagenet_weights_home, monkeypatch) -> Path:
    """HOME and TORCH_HOME set to ``imagenet_weights_home`` for one test."""
    monkeypatch.setenv("HOME", str(imagenet_weights_home))
    monkeypatch.setenv("TORCH_HOME", str(imagenet_weights_home / ".cache" / "torch"))
    return imagenet_weights_home


@pytest.fixture
def registries_as_shipped():
    """What a test's plugins register is gone after it (and their modules, so the next test imports them anew):
    other test files expect the shipped choices only."""
    import sys

    from codeq.app.config import REGISTRIES

    saved = [(registry, dict(registry)) for registry in REGISTRIES.values()]
    yield
    for registry, entries in saved:
        dict.clear(registry)
        dict.update(registry, entries)
    for name in [name for name in sys.modules if name.startswith("codeq_plugin_")]:
        del sys.modules[name]
