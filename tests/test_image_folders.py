"""Image folders on generated trees of real JPEG files: layout, transforms, clear one-line errors; CIFAR-100's
python batches; the loader settings and the progress line's images per second."""
import logging
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image

from codeq.app import cli
from codeq.data import image_folders
from codeq.data.base import load_dataset
from codeq.data.datasets import CIFAR100, cifar100
from codeq.data.image_folders import IMAGENET_MEAN, IMAGENET_STD
from codeq.data.loaders import build_loaders
from codeq.data.on_device import device_loaders
from codeq.errors import DataError
from conftest import image_config, write_config, write_image_tree


def test_an_image_folder_reads_classes_from_train_and_transforms_like_imagenet(image_tree):
    pair = load_dataset("imagefolder", str(image_tree), 32)
    assert pair.num_classes == 3 and len(pair.train) == 24 and len(pair.val) == 24
    path, label = pair.val.samples[9]
    assert path == str(image_tree / "val" / "class1" / "1.jpg") and label == 1
    image, label = pair.val[9]
    with Image.open(path) as source:  # 40x44 px: Resize(round(32 / 0.875) = 37) on the short side, centre 32x32
        resized = source.convert("RGB").resize((40, 37), Image.BILINEAR)
    expected = torch.from_numpy(np.asarray(resized.crop((4, 2, 36, 34)), dtype=np.float32) / 255).permute(2, 0, 1)
    expected = (expected - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    assert image.shape == (3, 32, 32) and label == 1
    assert (image - expected).abs().max() < 0.05  # PIL's antialiased resize against a plain bilinear one
    torch.manual_seed(0)
    views = torch.stack([pair.train[0][0] for _ in range(6)])
    assert views.shape == (6, 3, 32, 32) and not all(torch.equal(views[0], view) for view in views[1:])


def test_val_may_lack_classes_but_keeps_train_indices(tmp_path, caplog):
    root = write_image_tree(tmp_path, per_class=(2, 2))
    for path in (root / "val" / "class0").iterdir():
        path.unlink()
    (root / "val" / "class0").rmdir()
    with caplog.at_level(logging.WARNING):
        pair = load_dataset("imagefolder", str(root), 16)
    assert sorted({label for _, label in pair.val.samples}) == [1, 2]
    assert "has images of 2 of the 3 classes" in caplog.text


def remove(folder):
    for path in sorted(folder.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    folder.rmdir()


def no_val(root):
    remove(root / "val")


def empty_class(root):
    for path in (root / "train" / "class1").iterdir():
        path.unlink()


def val_class_train_lacks(root):
    (root / "val" / "class7").mkdir()
    (root / "val" / "class7" / "a.jpg").write_bytes((root / "val" / "class0" / "0.jpg").read_bytes())


def not_an_image(root):
    (root / "train" / "class2" / "broken.jpg").write_bytes(b"not a jpeg")


@pytest.mark.parametrize("damage,message", [
    (no_val, "no val/ folder at {root}/val"),
    (empty_class, "class folder {root}/train/class1 holds no images"),
    (val_class_train_lacks, "{root}/val has class folders that train/ lacks: class7"),
    (not_an_image, "cannot read image {root}/train/class2/broken.jpg (UnidentifiedImageError"),
])
def test_layout_problems_are_one_line_naming_the_folder_or_file(tmp_path, capsys, damage, message):
    root = write_image_tree(tmp_path / "data", per_class=(2, 2))
    damage(root)
    config_path = write_config(tmp_path, image_config(tmp_path, root))
    assert cli.main(["train", "--config", str(config_path)]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert message.format(root=root) in line, line
    assert not (tmp_path / "runs").exists()


def test_loose_validation_images_ask_for_class_folders(tmp_path):
    root = write_image_tree(tmp_path, per_class=(2, 2))
    for path in sorted((root / "val").rglob("*.jpg")):
        path.rename(root / "val" / f"{path.parent.name}_{path.name}")
    for folder in [path for path in (root / "val").iterdir() if path.is_dir()]:
        folder.rmdir()
    with pytest.raises(ValueError, match=r"val holds 6 files but no class folders; sort its images into one folder"):
        load_dataset("imagefolder", str(root), 16)


def test_an_unreadable_image_of_a_large_split_is_named_when_read_also_from_a_worker(tmp_path, monkeypatch, capsys):
    root = write_image_tree(tmp_path / "data", per_class=(4, 2))
    broken = root / "train" / "class1" / "2.jpg"
    broken.write_bytes(broken.read_bytes()[:40])  # a truncated JPEG: its header is intact, its pixels are not
    monkeypatch.setattr(image_folders, "HEADER_CHECK_LIMIT", 0)
    pair = load_dataset("imagefolder", str(root), 16)  # not opened up front
    with pytest.raises(DataError, match=f"cannot read image {broken} "):
        pair.train[pair.train.samples.index((str(broken), 1))]
    config_path = write_config(tmp_path, image_config(tmp_path, root, workers=1, batch_size=12, img_size=16))
    assert cli.main(["train", "--config", str(config_path)]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()  # torch's worker traceback is not shown
    assert line.startswith(f"error: cannot read image {broken} (OSError: ") and line.endswith("delete or replace it")


def test_imagenet_needs_1000_class_folders(tmp_path):
    root = write_image_tree(tmp_path / "small", per_class=(1, 1))
    with pytest.raises(ValueError, match="train/ under .* has 3 class folders, not 1000"):
        load_dataset("imagenet", str(root), 16)
    synsets = [f"n{10000000 + 7919 * index:08d}" for index in range(1000)]
    tiny = Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8))
    for split in ("train", "val"):
        for synset in synsets:
            (tmp_path / "imagenet" / split / synset).mkdir(parents=True)
            tiny.save(tmp_path / "imagenet" / split / synset / f"{synset}_1.JPEG")
    pair = load_dataset("imagenet", str(tmp_path / "imagenet"), 16)
    assert pair.num_classes == 1000 and len(pair.val) == 1000
    assert [label for _, label in pair.val.samples] == sorted(range(1000), key=lambda i: synsets[i])


def test_cifar100_reads_its_python_files_with_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    written = {}
    for name, count in (("train", 10), ("test", 4)):
        data = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, size=count).tolist()
        with open(folder / name, "wb") as file:
            pickle.dump({"filenames": [f"{i}.png" for i in range(count)], "batch_label": name, "data": data,
                         "fine_labels": fine, "coarse_labels": [label // 5 for label in fine]}, file, protocol=2)
        written[name] = (data, fine)
    pair = cifar100(str(tmp_path), img_size=32, download=False)
    assert pair.num_classes == 100 and len(pair.train) == 10 and len(pair.val) == 4
    assert [pair.val[i][1] for i in range(4)] == written["test"][1]
    raw = torch.tensor(written["test"][0][3], dtype=torch.float32).reshape(3, 32, 32) / 255
    mean, std = torch.tensor(CIFAR100.mean)[:, None, None], torch.tensor(CIFAR100.std)[:, None, None]
    assert torch.allclose(pair.val[3][0], (raw - mean) / std, atol=1e-5)
    _, on_device = device_loaders("cifar100", pair, 32, 4, torch.device("cpu"), seed=0)  # data_on_device: true
    [(images, labels)] = list(on_device)
    assert labels.tolist() == written["test"][1]
    assert torch.allclose(images, torch.stack([pair.val[i][0] for i in range(4)]), atol=1e-5)


def test_loader_settings_reach_the_loaders(image_tree):
    pair = load_dataset("imagefolder", str(image_tree), 16)
    train, val = build_loaders(pair, 8, 2, torch.Generator().manual_seed(0), pin_memory=False,
                               persistent_workers=False, prefetch_factor=3)
    assert (train.num_workers, train.persistent_workers, train.prefetch_factor) == (2, False, 3)
    assert (val.num_workers, val.persistent_workers, val.prefetch_factor) == (2, False, 3)
    train, _ = build_loaders(pair, 8, 0, torch.Generator().manual_seed(0), prefetch_factor=3)
    assert train.prefetch_factor is None  # torch refuses a prefetch factor without workers


def test_a_run_passes_the_loader_keys_and_logs_images_per_second(tmp_path, image_tree, monkeypatch, caplog):
    from codeq.app import trainer

    seen = {}

    def recording(*args, **kwargs):
        seen.update(kwargs)
        return build_loaders(*args, **kwargs)

    monkeypatch.setattr(trainer, "build_loaders", recording)
    config = image_config(tmp_path, image_tree, model="mlp", workers=1, persistent_workers=False, prefetch_factor=3,
                          pin_memory=False)
    with caplog.at_level(logging.INFO):
        assert cli.main(["train", "--config", str(write_config(tmp_path, config))]) == 0
    assert {key: seen[key] for key in ("persistent_workers", "prefetch_factor", "pin_memory")} == {
        "persistent_workers": False, "prefetch_factor": 3, "pin_memory": False}
    lines = [record.getMessage() for record in caplog.records if "epoch 1 train step" in record.getMessage()]
    assert len(lines) == 2  # 24 images in batches of 12
    assert all(re.search(r"\(\d+\.\d it/s, \d+ img/s, \d+% waiting for data\)$", line) for line in lines), lines
