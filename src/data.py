"""Data sets: CIFAR-10 (torchvision, downloaded on first use) and scikit-learn's digits (shipped).

Every builder returns a ``DatasetPair`` of train and validation ``Dataset`` objects whose
items are ``(image [3, img_size, img_size] float tensor, label int)``.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sized
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclass
class DatasetPair:
    train: Dataset
    val: Dataset


@dataclass
class DatasetSpec:
    """A data set builder ``build(data_dir, img_size) -> DatasetPair`` and its number of classes."""

    build: Callable[..., DatasetPair]
    num_classes: int


def cifar10(data_dir: str, img_size: int, download: bool = True) -> DatasetPair:
    from torchvision import datasets, transforms

    resize = [transforms.Resize(img_size, antialias=True)] if img_size != 32 else []
    normalize = [transforms.ToTensor(), transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
    train_tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), *resize, *normalize])
    val_tf = transforms.Compose([*resize, *normalize])
    root = Path(data_dir)
    try:
        train = datasets.CIFAR10(root, train=True, transform=train_tf, download=download)
        val = datasets.CIFAR10(root, train=False, transform=val_tf, download=download)
    except RuntimeError as error:  # torchvision's "Dataset not found or corrupted"
        raise FileNotFoundError(
            f"CIFAR-10 not found or corrupt under {root.resolve()}: {error} "
            f"(set data_dir to the folder holding cifar-10-batches-py, or allow the download)"
        ) from error
    return DatasetPair(train, val)


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
    )


DATASET_REGISTRY: dict[str, DatasetSpec] = {"cifar10": DatasetSpec(cifar10, 10), "digits": DatasetSpec(digits, 10)}


class StridedBatchSampler:
    """Process ``rank``'s share of the batches an ordered single-process loader makes: batches
    ``rank, rank + world_size, ...``. Each batch holds the same samples as in a single-process run
    and none is padded or repeated, so the summed losses and counts equal the single-process ones."""

    def __init__(self, dataset: Sized, batch_size: int, rank: int, world_size: int) -> None:
        self.size, self.batch_size, self.rank, self.world_size = len(dataset), batch_size, rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(self.rank * self.batch_size, self.size, self.world_size * self.batch_size):
            yield list(range(start, min(start + self.batch_size, self.size)))

    def __len__(self) -> int:
        return len(range(self.rank, -(-self.size // self.batch_size), self.world_size))


def build_loaders(
    dataset: DatasetPair, batch_size: int, workers: int, generator: torch.Generator, pin_memory: bool = False,
    rank: int = 0, world_size: int = 1,
) -> tuple[DataLoader, DataLoader]:
    """Shuffled training loader (drawing from ``generator``) and an ordered validation loader.

    With ``world_size`` > 1 each process gets its part: a DistributedSampler seeded from
    ``generator`` (call ``set_epoch`` every epoch) and a StridedBatchSampler for validation.
    """
    common = dict(num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0)
    if world_size == 1:
        train = DataLoader(dataset.train, batch_size, shuffle=True, drop_last=False, generator=generator, **common)
        val = DataLoader(dataset.val, batch_size, shuffle=False, **common)
        return train, val
    sampler = DistributedSampler(dataset.train, world_size, rank, shuffle=True, seed=generator.initial_seed())
    train = DataLoader(dataset.train, batch_size, sampler=sampler, **common)
    val = DataLoader(dataset.val, batch_sampler=StridedBatchSampler(dataset.val, batch_size, rank, world_size), **common)
    return train, val
