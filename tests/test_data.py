"""Data loaders on real formats: generated CIFAR-10 python batches and scikit-learn's digits."""
import os
import pickle

import numpy as np
import pytest
import torch

from codeq.data.base import DATASET_REGISTRY
from codeq.data.datasets import CIFAR10_MEAN, CIFAR10_STD, cifar10, digits

PER_BATCH = 6


def write_cifar(root, seed=0):
    """A miniature CIFAR-10 in the real on-disk layout (pickled dicts of uint8 rows, like the originals)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(PER_BATCH, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=PER_BATCH).tolist()
        batch = {"batch_label": f"{name} of 6", "labels": labels, "data": data,
                 "filenames": [f"img_{i}.png" for i in range(PER_BATCH)]}
        with open(folder / name, "wb") as file:
            pickle.dump(batch, file, protocol=2)
        written[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as file:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072}, file)
    return written


def test_cifar10_reads_the_python_batches(tmp_path):
    written = write_cifar(tmp_path)
    pair = cifar10(str(tmp_path), img_size=32, download=False)
    assert len(pair.train) == 5 * PER_BATCH and len(pair.val) == PER_BATCH
    data, labels = written["test_batch"]
    image, label = pair.val[2]
    assert image.shape == (3, 32, 32) and label == labels[2]
    expected = torch.tensor(data[2], dtype=torch.float32).reshape(3, 32, 32) / 255
    expected = (expected - torch.tensor(CIFAR10_MEAN)[:, None, None]) / torch.tensor(CIFAR10_STD)[:, None, None]
    assert torch.allclose(image, expected, atol=1e-5)
    train_labels = [pair.train[i][1] for i in range(len(pair.train))]
    assert train_labels == [label for i in range(1, 6) for label in written[f"data_batch_{i}"][1]]


def test_cifar10_train_augmentation_and_resize(tmp_path):
    write_cifar(tmp_path)
    pair = cifar10(str(tmp_path), img_size=64, download=False)
    assert pair.val[0][0].shape == (3, 64, 64)
    torch.manual_seed(0)
    views = torch.stack([pair.train[0][0] for _ in range(8)])
    assert views.shape == (8, 3, 64, 64)
    assert not all(torch.equal(views[0], v) for v in views[1:])  # random crop / flip differ


def test_cifar10_refuses_pickled_code(tmp_path):
    write_cifar(tmp_path)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as file:
        pickle.dump({"data": Exploit(), "labels": []}, file)
    with pytest.raises(ValueError, match="not a readable CIFAR-10 batch.*refusing to load"):
        cifar10(str(tmp_path), img_size=32, download=False)
    assert not marker.exists()


def test_cifar10_missing_files_are_named(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="lacks data_batch_3"):
        cifar10(str(tmp_path), img_size=32, download=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cifar10(str(tmp_path / "elsewhere"), img_size=32, download=False)


def test_digits_split_and_shapes(tmp_path):
    pair = digits(str(tmp_path), img_size=24)
    assert len(pair.train) == 1437 and len(pair.val) == 360
    image, label = pair.train[0]
    assert image.shape == (3, 24, 24) and 0 <= int(label) < 10
    assert torch.equal(image[0], image[1])  # grey replicated to 3 channels
    val_labels = torch.stack([pair.val[i][1] for i in range(len(pair.val))])
    counts = torch.bincount(val_labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~36 per class
    again = digits(str(tmp_path), img_size=24)
    assert torch.equal(again.val[5][0], pair.val[5][0])  # fixed split


def test_registry_classes():
    from codeq.data.base import declared_classes

    assert {name: declared_classes(name) for name in DATASET_REGISTRY} == {
        "cifar10": 10, "cifar100": 100, "digits": 10, "imagefolder": None, "imagenet": 1000}
