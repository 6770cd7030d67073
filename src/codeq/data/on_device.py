"""The whole data set held on the device, batched and augmented there (config ``data_on_device``).

A 2-core host decoding PNG-free CIFAR arrays and running RandomCrop/Flip per image cannot keep a
GPU busy; a few batched tensor ops on the GPU can. ``DeviceLoader`` yields the batches a
DataLoader over the same data would (same sampler, so the same order, resumable mid-epoch), with
CIFAR's augmentation done per batch: zero padding of 4 pixels, a random 32x32 crop and a random
horizontal flip per image, then resize and normalisation, as the torchvision pipeline does
(bilinear antialiased resize on tensors instead of PIL's, when img_size is not 32).

The augmentation's randomness is a pure function of (seed, epoch, batch number), so a run resumed
mid-epoch draws the same crops and flips as an uninterrupted one.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sized
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import BatchSampler, Dataset, SequentialSampler

from codeq.data.datasets import CIFAR10, CIFAR100, CifarLayout
from codeq.data.base import DatasetPair
from codeq.data.loaders import ResumableSampler, StridedBatchSampler

CROP_PADDING = 4


@dataclass
class DeviceImages:
    """Images [N, C, H, W] on the device and what a batch of them needs before the model sees it."""

    images: Tensor
    labels: Tensor
    # (raw batch, generator) -> model input; the generator draws the augmentation, None: no augmentation.
    prepare: Callable[[Tensor, torch.Generator | None], Tensor]


class PreparedImages(Dataset):
    """Single items of a DeviceImages as a model takes them, un-augmented (for example inputs)."""

    def __init__(self, data: DeviceImages) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.data.prepare(self.data.images[index: index + 1], None)[0], self.data.labels[index]


def random_crop(batch: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Each image shifted by its own random offset in [-padding, padding]^2, exposed area zero."""
    count, _, height, width = batch.shape
    padded = F.pad(batch, (padding, padding, padding, padding))
    offsets = torch.randint(0, 2 * padding + 1, (2, count, 1), device=batch.device, generator=generator)
    rows = offsets[0] + torch.arange(height, device=batch.device)  # [count, height]
    cols = offsets[1] + torch.arange(width, device=batch.device)  # [count, width]
    images = torch.arange(count, device=batch.device)[:, None, None]
    # Advanced indexing on (image, row, col) of the NHWC view gathers every crop in one op.
    return padded.permute(0, 2, 3, 1)[images, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def random_flip(batch: Tensor, generator: torch.Generator) -> Tensor:
    """Each image mirrored left-right with probability 1/2."""
    flip = torch.rand(batch.shape[0], device=batch.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], batch.flip(3), batch)


def cifar_on_device(dataset: Dataset, img_size: int, device: torch.device, augment: bool,
                    layout: CifarLayout = CIFAR10) -> DeviceImages:
    """CIFAR's uint8 images on the device; batches are augmented (train), resized and normalised (with ``layout``'s
    mean and standard deviation) there."""
    images = torch.from_numpy(dataset.images).to(device).permute(0, 3, 1, 2)  # NHWC in memory: channels-last
    labels = torch.as_tensor(dataset.labels, dtype=torch.long, device=device)
    mean = torch.tensor(layout.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(layout.std, device=device).view(1, 3, 1, 1)

    def prepare(batch: Tensor, generator: torch.Generator | None) -> Tensor:
        batch = batch.float().div_(255)
        if augment and generator is not None:
            batch = random_flip(random_crop(batch, CROP_PADDING, generator), generator)
        if img_size != batch.shape[-1]:
            batch = F.interpolate(batch, size=(img_size, img_size), mode="bilinear", antialias=True,
                                  align_corners=False)
        return (batch - mean) / std

    return DeviceImages(images, labels, prepare)


def tensors_on_device(dataset: Dataset, img_size: int, device: torch.device, augment: bool) -> DeviceImages:
    """A TensorDataset (digits: already resized and normalised, never augmented) moved to the device."""
    images, labels = dataset.tensors
    return DeviceImages(images.to(device), labels.to(device), lambda batch, generator: batch)


# How each data set of DATASET_REGISTRY goes onto the device.
DEVICE_DATA: dict[str, Callable[..., DeviceImages]] = {
    "cifar10": cifar_on_device, "cifar100": partial(cifar_on_device, layout=CIFAR100), "digits": tensors_on_device}


class DeviceLoader:
    """Batches of ``data`` drawn by ``batch_sampler`` (lists of indices), prepared on the device.

    ``sampler`` is what the training loop reshuffles (``set_epoch``); ``seed`` makes the
    augmentation of batch b of epoch e the same in every run with that seed.
    """

    def __init__(self, data: DeviceImages, batch_sampler: Sized, sampler: object, seed: int) -> None:
        self.data, self.batch_sampler, self.sampler, self.seed = data, batch_sampler, sampler, seed
        self.dataset = PreparedImages(data)
        self.generator = torch.Generator(device=data.images.device)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def with_batches(self, batches: Sized) -> DeviceLoader:
        """A loader of the same data and augmentation that yields ``batches`` (lists of indices) instead."""
        return DeviceLoader(self.data, batches, None, self.seed)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        epoch = getattr(self.sampler, "epoch", 0)
        first = getattr(self.sampler, "start", 0) // max(getattr(self.batch_sampler, "batch_size", 1), 1)
        batches = list(self.batch_sampler)
        # One host-to-device copy per epoch: a copy per batch would stall the GPU on every batch.
        order = torch.as_tensor([i for batch in batches for i in batch], dtype=torch.long).to(
            self.data.images.device, non_blocking=True)
        start = 0
        for number, batch in enumerate(batches, start=first):
            index = order[start: start + len(batch)]
            start += len(batch)
            self.generator.manual_seed(((self.seed * 1_000_003 + epoch) * 1_000_003 + number) % 2**63)
            yield self.data.prepare(self.data.images[index], self.generator), self.data.labels[index]


def device_loaders(
    name: str, dataset: DatasetPair, img_size: int, batch_size: int, device: torch.device, seed: int,
    rank: int = 0, world_size: int = 1,
) -> tuple[DeviceLoader, DeviceLoader]:
    """Training and validation loaders over data set ``name`` held on ``device``; same order and
    sharding as ``build_loaders`` (a ResumableSampler for training, strided batches for validation)."""
    to_device = DEVICE_DATA[name]
    train_data = to_device(dataset.train, img_size, device, augment=True)
    val_data = to_device(dataset.val, img_size, device, augment=False)
    sampler = ResumableSampler(dataset.train, world_size, rank, seed=seed)
    train = DeviceLoader(train_data, BatchSampler(sampler, batch_size, drop_last=False), sampler, seed)
    if world_size == 1:
        val_batches = BatchSampler(SequentialSampler(dataset.val), batch_size, drop_last=False)
    else:
        val_batches = StridedBatchSampler(dataset.val, batch_size, rank, world_size)
    return train, DeviceLoader(val_data, val_batches, None, seed)
