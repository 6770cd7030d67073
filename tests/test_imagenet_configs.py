"""The ImageNet configs: each passes --dry-run with its pretrained weights in a local cache the test writes, and runs
an epoch on a generated JPEG image folder (the data set and sizes overridden, as a laptop would)."""
import json

import pytest

from codeq.app import cli

LAYERS = {"resnet18": 21, "resnet50": 54}  # every conv (downsample.0 included) and fc


@pytest.mark.parametrize("model", list(LAYERS))
def test_imagenet_config_dry_runs_and_trains_an_epoch(tmp_path, capsys, use_weights_home, image_tree, model):
    config = f"configs/deadzone_{model}_imagenet.yaml"
    save = [f"--set=save_dir={tmp_path}", "--set=wandb_project=null", "--device", "cpu"]
    assert cli.main(["train", "--config", config, "--dry-run", *save]) == 0
    out = capsys.readouterr().out
    assert f"model:      {model} (" in out and "img_size 224, imagenet (1000 classes), 30 epochs of batch 256" in out
    assert f"quantized:  {LAYERS[model]} layers: conv1, layer1.0.conv1," in out
    assert "scheduler:  cosine over 30 epochs after 1 warm-up epochs" in out
    small = [f"--set={key}={value}" for key, value in (("dataset", "imagefolder"), ("data_dir", image_tree),
                                                       ("img_size", 32), ("batch_size", 24), ("epochs", 1),
                                                       ("workers", 0))]
    assert cli.main(["train", "--config", config, *save, *small]) == 0
    [run_dir] = [path for path in tmp_path.iterdir() if path.is_dir()]
    [record] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert record["epoch"] == 1 and record["mean_bits"] == 8 and record["lr"] == pytest.approx(1e-5)
