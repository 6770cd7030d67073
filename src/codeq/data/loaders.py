"""Data loaders for training runs: resumable shuffling, per-process shares, and workers that outlive no run."""
from __future__ import annotations

import atexit
import functools
import itertools
import multiprocessing
import signal
from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from codeq.data.base import DatasetPair


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


def kill_loader_workers() -> None:
    """SIGKILL the daemonic child processes (loader workers) still running. Registered to run at interpreter exit
    by ``build_loaders`` once it starts workers: multiprocessing's own exit handler would SIGTERM them and wait for
    them, forever, since they ignore SIGTERM; registered after it (torch imports multiprocessing first), this
    handler runs before it."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join()


@functools.cache
def kill_workers_at_exit() -> None:
    """Register ``kill_loader_workers`` at exit, once per process (importing this module registers nothing)."""
    atexit.register(kill_loader_workers)


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
        kill_workers_at_exit()
        common.update(persistent_workers=persistent_workers, prefetch_factor=prefetch_factor,
                      worker_init_fn=ignore_stop_signals)
    sampler = ResumableSampler(dataset.train, world_size, rank, seed=generator.initial_seed())
    train = DataLoader(dataset.train, batch_size, sampler=sampler, generator=generator, **common)
    if world_size == 1:
        return train, DataLoader(dataset.val, batch_size, shuffle=False, **common)
    batches = StridedBatchSampler(dataset.val, batch_size, rank, world_size)
    val = DataLoader(dataset.val, batch_sampler=batches, **common)
    return train, val


def statistics_batches(loader: Any, count: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
                       world_size: int = 1) -> Any:
    """``count`` batches of the training data ``loader`` serves (a DataLoader or a DeviceLoader), as it prepares
    them, for re-estimating BatchNorm statistics (``codeq.training.loop.recalibrate``).

    Their samples are this process's share of a permutation drawn by a generator of their own, seeded from ``seed``
    and ``epoch``: the training order is untouched, and a resumed run draws the same batches as an uninterrupted
    one. A DataLoader's copy takes its workers (at most one per batch, not persistent), collation and pinning; its
    workers are seeded from that generator too.
    """
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
    order = torch.randperm(len(loader.dataset), generator=generator)[rank::world_size][: count * batch_size].tolist()
    batches = [order[start: start + batch_size] for start in range(0, len(order), batch_size)]
    if not isinstance(loader, DataLoader):
        return loader.with_batches(batches)
    return DataLoader(loader.dataset, batch_sampler=batches, num_workers=min(loader.num_workers, len(batches)),
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                      worker_init_fn=loader.worker_init_fn, generator=generator)
