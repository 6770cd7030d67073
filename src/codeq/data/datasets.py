"""CIFAR-10 and CIFAR-100 (torchvision's download, read with an array-only unpickler) and scikit-learn's shipped
digits."""
from __future__ import annotations

import importlib
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from codeq.data.base import DATASET_REGISTRY, DatasetPair

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class CifarLayout(NamedTuple):
    """How one CIFAR data set lies on disk (torchvision's "python version" download) and is normalised."""

    title: str
    folder: str
    train_files: list[str]
    test_files: list[str]
    label_key: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_classes: int
    downloader: str  # the torchvision.datasets class that downloads it


CIFAR10 = CifarLayout("CIFAR-10", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                      "labels", CIFAR10_MEAN, CIFAR10_STD, 10, "CIFAR10")
CIFAR100 = CifarLayout("CIFAR-100", "cifar-100-python", ["train"], ["test"], "fine_labels", (0.5071, 0.4865, 0.4409),
                       (0.2673, 0.2564, 0.2762), 100, "CIFAR100")
# The CIFAR "python version" files are pickles; only these globals (numpy array rebuilding) may be loaded.
SAFE_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays; refuses any other global (no code execution)."""

    def find_class(self, module: str, name: str):
        if (module, name) not in SAFE_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return getattr(importlib.import_module(module), name)


def read_cifar_batch(path: Path, layout: CifarLayout = CIFAR10) -> tuple[np.ndarray, list[int]]:
    """Images [N, 32, 32, 3] uint8 and labels of one CIFAR python batch file."""
    try:
        with path.open("rb") as file:
            batch = ArrayOnlyUnpickler(file, encoding="latin1").load()
        images = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = [int(label) for label in batch[layout.label_key]]
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path} is not a readable {layout.title} batch ({error}); delete it to download it "
                         f"again") from None
    if len(labels) != len(images):
        raise ValueError(f"{path} has {len(images)} images but {len(labels)} labels; delete it to download it again")
    return images, labels


class CifarBatches(Dataset):
    """CIFAR images held in memory as uint8, transformed on access."""

    def __init__(self, folder: Path, files: list[str], transform: Callable, layout: CifarLayout = CIFAR10) -> None:
        batches = [read_cifar_batch(folder / name, layout) for name in files]
        self.images = np.concatenate([images for images, _ in batches])
        self.labels = [label for _, labels in batches for label in labels]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


def cifar(layout: CifarLayout, data_dir: str, img_size: int, download: bool = True) -> DatasetPair:
    """The CIFAR data set ``layout`` from ``data_dir/<layout.folder>``, downloaded there by torchvision when absent."""
    from torchvision import datasets, transforms

    root = Path(data_dir)
    folder = root / layout.folder
    if not folder.is_dir():
        if not download:
            raise FileNotFoundError(f"{layout.title} not found: {folder} does not exist; set data_dir or allow the "
                                    f"download")
        try:
            getattr(datasets, layout.downloader)(root, train=True, download=True)  # fetches, checks the MD5, extracts
        except Exception as error:  # noqa: BLE001 - network errors come in many types
            raise FileNotFoundError(f"{layout.title} is not under {root.resolve()} and could not be downloaded "
                                    f"({error}); copy {layout.folder} there or check the network") from None
    missing = [name for name in layout.train_files + layout.test_files if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{layout.title} under {folder} lacks {', '.join(missing)}; delete the folder to "
                                f"download it again")
    resize = [transforms.Resize(img_size, antialias=True)] if img_size != 32 else []
    normalize = [transforms.ToTensor(), transforms.Normalize(layout.mean, layout.std)]
    augment = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
    return DatasetPair(
        CifarBatches(folder, layout.train_files, transforms.Compose([*augment, *resize, *normalize]), layout),
        CifarBatches(folder, layout.test_files, transforms.Compose([*resize, *normalize]), layout),
        layout.num_classes,
    )


@DATASET_REGISTRY.register("cifar10", num_classes=10)
def cifar10(data_dir: str, img_size: int, download: bool = True) -> DatasetPair:
    """CIFAR-10 from ``data_dir/cifar-10-batches-py``, downloaded there by torchvision when absent."""
    return cifar(CIFAR10, data_dir, img_size, download)


@DATASET_REGISTRY.register("cifar100", num_classes=100)
def cifar100(data_dir: str, img_size: int, download: bool = True) -> DatasetPair:
    """CIFAR-100 (its 100 fine labels) from ``data_dir/cifar-100-python``, downloaded there by torchvision when
    absent."""
    return cifar(CIFAR100, data_dir, img_size, download)


@DATASET_REGISTRY.register("digits", num_classes=10)
def digits(data_dir: str, img_size: int, download: bool = True) -> DatasetPair:
    """scikit-learn's 1,797 8x8 handwritten digits, upscaled to img_size, as 3 channels.

    The split is stratified and fixed (20 % validation, seed 0) so runs are comparable.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False)
    images = images.expand(-1, 3, -1, -1)
    labels = torch.tensor(bunch.target, dtype=torch.long)
    train_idx, val_idx = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=0.2, stratify=bunch.target, random_state=0
    )
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = ((images - mean) / std).contiguous()
    return DatasetPair(
        TensorDataset(images[train_idx], labels[train_idx]),
        TensorDataset(images[val_idx], labels[val_idx]),
        10,
    )

