"""torchvision and timm models: training on a generated JPEG image folder, unknown names with close matches, the
input-size check, and pretrained weights read from a local cache that the tests write (nothing is downloaded)."""
import json
import logging

import pytest
import torch

from codeq.app import cli
from codeq.errors import ConfigError
from codeq.models import create_model
from conftest import image_config, write_config


@pytest.mark.parametrize("model,classifier", [("resnet18", "fc"), ("timm.test_resnet", "fc")])
def test_an_image_folder_trains_a_torchvision_and_a_timm_model(tmp_path, image_tree, model, classifier):
    quantizer = {"name": "deadzone", "kwargs": {"fixed_bit_val": 4, "learnable_bit": False},
                 "exclude_layers": ["bn", "downsample"]}
    config = image_config(tmp_path, image_tree, model=model, quantizer=quantizer)
    assert cli.main(["train", "--config", str(write_config(tmp_path, config))]) == 0
    [run_dir] = (tmp_path / "runs").iterdir()
    assert run_dir.name == f"{model}_deadzone4b_e1_lr0.003"
    [record] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert record["epoch"] == 1 and 0 <= record["val_acc"] <= 1 and record["mean_bits"] == 4
    checkpoint = torch.load(run_dir / "last.pt", weights_only=True)
    assert checkpoint["num_classes"] == 3
    assert checkpoint["model"][f"{classifier}.parametrizations.weight.original"].shape[0] == 3


@pytest.mark.parametrize("name,expected", [
    ("torchvision.resnt18", "unknown torchvision classification model 'resnt18'; did you mean torchvision.resnet18"),
    ("timm.resnet18x", "unknown timm model 'resnet18x'; did you mean timm.resnet18,"),
    ("resnt18", "unknown model 'resnt18'; did you mean 'resnet18'?"),
])
def test_unknown_names_list_close_matches_from_the_library(tmp_path, capsys, name, expected):
    config = image_config(tmp_path, tmp_path, model=name, dataset="digits")
    assert cli.main(["train", "--config", str(write_config(tmp_path, config)), "--dry-run"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert f"model: {expected}" in line


def test_an_input_size_the_model_cannot_take_is_a_config_error(tmp_path, capsys):
    config = image_config(tmp_path, tmp_path, model="torchvision.inception_v3", dataset="digits")
    assert cli.main(["train", "--config", str(write_config(tmp_path, config)), "--dry-run"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "img_size: torchvision.inception_v3 cannot take 32x32 inputs (" in line


def test_auxiliary_heads_are_removed_so_training_sees_one_output():
    model = create_model("torchvision.googlenet", 3, 64).train()
    assert model.aux1 is None and model.aux2 is None
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def test_torchvision_weights_come_from_the_cache_and_a_new_head_is_named(torch_home, caplog):
    torch.manual_seed(1)
    published = create_model("resnet18", 1000, 32).state_dict()
    torch_home.mkdir(parents=True)
    torch.save(published, torch_home / "resnet18-f37072fd.pth")
    same = create_model("resnet18", 1000, 32, pretrained=True).state_dict()
    assert all(torch.equal(same[key], published[key]) for key in published)
    with caplog.at_level(logging.WARNING):
        model = create_model("resnet18", 3, 32, pretrained=True)
    assert "torchvision's resnet18 weights are for another number of classes; fc starts from a fresh" in caplog.text
    state = model.state_dict()
    assert state["fc.weight"].shape == (3, 512)
    assert all(torch.equal(state[key], published[key]) for key in published if not key.startswith("fc."))


def test_missing_weights_are_one_line_saying_which_file_goes_where(tmp_path, torch_home, capsys):
    config = image_config(tmp_path, tmp_path, model="torchvision.resnet50", pretrained=True, dataset="digits")
    assert cli.main(["train", "--config", str(write_config(tmp_path, config)), "--dry-run"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert ("pretrained: torchvision's resnet50 weights (ResNet50_Weights.IMAGENET1K_V2) are not in the local cache "
            f"and are never downloaded here; place resnet50-11ad3fa6.pth (from https://download.pytorch.org/models/"
            f"resnet50-11ad3fa6.pth) in {torch_home}") in line


def test_timm_weights_come_from_the_hugging_face_cache(tmp_path, monkeypatch, caplog):
    from huggingface_hub import constants
    from safetensors.torch import save_file

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(ConfigError, match=r"pretrained: timm's test_resnet weights are not in the local cache .*"
                       r"download model.safetensors of https://huggingface.co/timm/test_resnet.r160_in1k into the "
                       f"Hugging Face cache {tmp_path / 'hf'}"):
        create_model("timm.test_resnet", 3, 32, pretrained=True)
    torch.manual_seed(2)
    published = create_model("timm.test_resnet", 1000, 32).state_dict()
    repo = tmp_path / "hf" / "models--timm--test_resnet.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    save_file(published, repo / "snapshots" / "0123abcd" / "model.safetensors")
    with caplog.at_level(logging.WARNING):
        state = create_model("timm.test_resnet", 3, 32, pretrained=True).state_dict()
    assert "timm's test_resnet weights are for 1000 classes; fc starts from a fresh initialisation for 3" in caplog.text
    assert state["fc.weight"].shape[0] == 3
    assert all(torch.equal(state[key], published[key]) for key in published if not key.startswith("fc."))


def test_pretrained_needs_a_model_with_published_weights(tmp_path, capsys):
    config = image_config(tmp_path, tmp_path, model="resnet20", pretrained=True, dataset="digits")
    assert cli.main(["train", "--config", str(write_config(tmp_path, config)), "--dry-run"]) == 2
    assert "pretrained: model 'resnet20' has no published weights" in capsys.readouterr().err
