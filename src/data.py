"""Data sets: their registry, CIFAR-10 and CIFAR-100 (torchvision, downloaded on first use), scikit-learn's digits
(shipped), and image folders (``imagefolder``, ``imagenet``: src/image_folders.py, registered when this module is
imported).

A data set is ``fn(data_dir: str, img_size: int) -> (train_dataset, val_dataset, num_classes)``
whose items are ``(image: float tensor [3, img_size, img_size], label: int)``. A builder may
declare ``num_classes`` up front (``DATASET_REGISTRY.register("name", num_classes=10)``), which
lets ``--dry-run`` build the model without reading any data.
"""
from __future__ import annotations

import atexit
import importlib
import inspect
import itertools
import multiprocessing
import pickle
import signal
from collections.abc import Callable, Iterator, Sized
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from src.errors import RegistrationError
from src.registry import Registry

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class DatasetPair(NamedTuple):
    """What a data set builder returns: training and validation sets and the number of classes."""

    train: Dataset
    val: Dataset
    num_classes: int


def check_dataset(name: str, builder: Any) -> None:
    parameters = list(inspect.signature(builder).parameters) if callable(builder) else []
    if parameters[:2] != ["data_dir", "img_size"]:
        raise RegistrationError("data set", name, "does not take (data_dir, img_size)",
                                "a data set is fn(data_dir: str, img_size: int) -> (train, val, num_classes)")


DATASET_REGISTRY: Registry[Callable[..., DatasetPair]] = Registry("data set", check=check_dataset)


def declared_classes(name: str) -> int | None:
    """The number of classes data set ``name`` declares without loading, or None."""
    return getattr(DATASET_REGISTRY[name], "num_classes", None)


def load_dataset(name: str, data_dir: str, img_size: int) -> DatasetPair:
    """Data set ``name`` built from ``data_dir`` at ``img_size``.

    Raises:
        ValueError: the builder returned something other than (train, val, num_classes), or a number of classes
            other than the one it declares.
        OSError, RuntimeError: the builder's own errors for missing or unreadable files.
    """
    result = DATASET_REGISTRY[name](data_dir, img_size)
    if not (isinstance(result, tuple) and len(result) == 3 and isinstance(result[2], int)):
        raise ValueError(f"data set {name!r} returned {type(result).__name__}, not (train, val, num_classes)")
    pair = DatasetPair(*result)
    declared = declared_classes(name)
    if declared is not None and declared != pair.num_classes:
        raise ValueError(f"data set {name!r} declares {declared} classes but returned {pair.num_classes}")
    return pair


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


class ResumableSampler(DistributedSampler):
    """A DistributedSampler (each epoch's order is a pure function of seed and epoch, so a resumed
    run draws the same order as an uninterrupted one) whose epoch can start part-way:
    ``set_epoch(epoch, start)`` leaves out the first ``start`` samples of this process's share,
    those an interrupted epoch already trained on. With one process it shuffles the whole set."""

    def __init__(self, dataset: Dataset, world_size: int, rank: int, seed: int) -> None:
        super().__init__(dataset, world_size, rank, shuffle=True, seed=seed)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return max(super().__len__() - self.start, 0)


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


def ignore_stop_signals(worker_id: int) -> None:
    """Loader workers ignore the stop signals. Slurm's scancel, time limit and preemption signal every process of
    the job, and Ctrl-C the whole foreground process group: a worker dying of it would end the run with a
    DataLoader error instead of the main process's checkpoint. The main process shuts its workers down itself
    (``kill_loader_workers`` at exit)."""
    for number in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(number, signal.SIG_IGN)


@atexit.register
def kill_loader_workers() -> None:
    """At interpreter exit, SIGKILL the daemonic child processes (loader workers) still running. multiprocessing's
    own exit handler would SIGTERM them and wait for them, forever, since they ignore SIGTERM; registered after
    it (torch imports multiprocessing first), this handler runs before it."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join()


def build_loaders(
    dataset: DatasetPair, batch_size: int, workers: int, generator: torch.Generator, pin_memory: bool = False,
    rank: int = 0, world_size: int = 1, persistent_workers: bool = True, prefetch_factor: int = 2,
) -> tuple[DataLoader, DataLoader]:
    """Shuffled training loader and an ordered validation loader.

    The training order comes from a ResumableSampler seeded from ``generator`` (call ``set_epoch``
    every epoch); ``generator`` also seeds the loader's workers. With ``world_size`` > 1 each
    process gets its part, and a StridedBatchSampler splits validation. ``persistent_workers`` and
    ``prefetch_factor`` (batches each worker loads ahead) apply only with ``workers`` > 0.
    """
    common: dict[str, Any] = dict(num_workers=workers, pin_memory=pin_memory)
    if workers > 0:
        common.update(persistent_workers=persistent_workers, prefetch_factor=prefetch_factor,
                      worker_init_fn=ignore_stop_signals)
    sampler = ResumableSampler(dataset.train, world_size, rank, seed=generator.initial_seed())
    train = DataLoader(dataset.train, batch_size, sampler=sampler, generator=generator, **common)
    if world_size == 1:
        return train, DataLoader(dataset.val, batch_size, shuffle=False, **common)
    batches = StridedBatchSampler(dataset.val, batch_size, rank, world_size)
    val = DataLoader(dataset.val, batch_sampler=batches, **common)
    return train, val


# Registers imagefolder and imagenet; last, because it builds on the definitions above.
import src.image_folders  # noqa: E402,F401
