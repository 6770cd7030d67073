"""Data-parallel training across processes and nodes, launched by ``torchrun``.

torchrun gives every worker RANK, WORLD_SIZE and LOCAL_RANK. Without them no process group
exists and every helper here acts on a world of one process (identity reductions, rank 0,
the model unwrapped), so single-process runs take exactly the path they always took.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from codeq.errors import ConfigError

log = logging.getLogger(__name__)

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def launched_as_other_rank() -> bool:
    """A torchrun process other than rank 0, known from its environment before the process group exists."""
    return launched_by_torchrun() and int(os.environ["RANK"]) != 0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Only this process logs, writes the run directory and checkpoints, and talks to W&B."""
    return rank() == 0


def setup(device: torch.device) -> torch.device:
    """Join torchrun's process group (``nccl`` on CUDA, ``gloo`` on CPU); returns this process's device.

    Each CUDA worker takes the GPU numbered by its LOCAL_RANK, whatever index the config named.
    """
    if not launched_by_torchrun() or is_distributed():
        return device
    local_rank, local_world = int(os.environ["LOCAL_RANK"]), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if device.type == "cuda":
        if local_world > torch.cuda.device_count():
            raise ConfigError("device", f"torchrun starts {local_world} processes per node but this node has "
                              f"{torch.cuda.device_count()} GPUs", "set --nproc_per_node to the number of GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    elif device.type == "cpu":
        dist.init_process_group("gloo")
    else:
        raise ConfigError("device", f"{device.type} cannot train in several processes",
                          "use cpu or cuda under torchrun")
    if is_main_process():
        log.info("distributed: %d processes (%s), %d per node", world_size(), dist.get_backend(), local_world)
    return device


def teardown(finished: bool) -> None:
    """Leave the process group. Processes that ``finished`` first meet at a barrier: gloo can abort one
    (SIGABRT, "terminate called without an active exception") that shuts its group down while a peer is
    still busy, e.g. rank 0 writing the run report. After an error a peer may never arrive: no barrier."""
    if not is_distributed():
        return
    if finished:
        dist.barrier()
    dist.destroy_process_group()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel when distributed: gradients of every trainable parameter,
    the quantizers' ``logit_dz`` / ``logit_bit`` included, are averaged, so all replicas stay identical."""
    if not is_distributed():
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def sync_buffers(model: nn.Module) -> None:
    """Give every process rank 0's buffers (BatchNorm running statistics). DDP copies them only at the
    start of a training forward, so after an epoch each replica holds those of its own last batch."""
    if is_distributed():
        for buffer in unwrap(model).buffers():
            dist.broadcast(buffer, src=0)


def average_batch_norm_statistics(model: nn.Module) -> None:
    """Replace every BatchNorm layer's running mean and variance by their mean over all processes, the same on every
    one: after each process re-estimated them on its own batches, the result is the cumulative average over all of
    those batches (each process used as many)."""
    if not is_distributed():
        return
    buffers = [buffer for module in unwrap(model).modules()
               if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
               for buffer in (module.running_mean, module.running_var)]
    if not buffers:
        return
    total = all_reduce_sum(torch.cat([buffer.flatten() for buffer in buffers])) / world_size()
    for buffer, value in zip(buffers, total.split([buffer.numel() for buffer in buffers])):
        buffer.copy_(value.view_as(buffer))


def all_reduce_sum(values: Tensor) -> Tensor:
    """The element-wise sum of ``values`` over all processes (``values`` itself when single-process)."""
    if is_distributed():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_value(value: float, device: torch.device) -> float:
    """Rank 0's ``value`` on every process (``value`` itself when single-process), so that all take one decision."""
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return float(tensor.item())


def any_process(flag: bool, device: torch.device) -> bool:
    """True on every process when ``flag`` is true on any one, so all stop at the same step."""
    if not is_distributed():
        return flag
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def set_epoch(loader: object, epoch: int) -> None:
    """Reshuffle a DistributedSampler for ``epoch`` (each epoch's order derives from the seed and the epoch)."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)

