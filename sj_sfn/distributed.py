"""Calibration and evaluation over several processes (``torchrun``, ``torch.distributed``).

Thresholds are means of per-batch quantiles (``θ = (1/B) Σ_b q_p(x_b)``), so a run over ``W``
processes gives the *same* thresholds as one process only if every process sees whole batches
of the single-process batch sequence: :class:`ShardedBatchSampler` hands batch ``b`` to rank
``b mod W`` (a sample-level ``DistributedSampler`` would change which images share a batch, and
pads with repeats). :func:`sj_sfn.calibration.calibrate` all-reduces the observers' sums when a
process group is initialised; metrics are sums of counts, all-reduced by :mod:`sj_sfn.evaluation`.
This module imports nothing from the rest of the package.

    torchrun --nproc_per_node 8 classification/convert.py vit_base_patch16_224 --checkpoint ... --data /imagenet
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, Sampler

_T = TypeVar("_T")

__all__ = [
    "is_distributed",
    "rank",
    "world_size",
    "is_main",
    "init_from_env",
    "ShardedBatchSampler",
    "shard_loader",
    "all_reduce_sum",
    "all_reduce_max",
    "broadcast_object",
]


def is_distributed() -> bool:
    """A ``torch.distributed`` process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0 (or no process group): the process that writes files and prints."""
    return rank() == 0


def init_from_env(backend: str | None = None) -> bool:
    """Join the process group that ``torchrun`` describes (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``...).

    Returns ``True`` when a group with more than one process was (or already is) initialised.
    The backend defaults to ``nccl`` with CUDA and ``gloo`` without; with CUDA each process uses
    device ``LOCAL_RANK``.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return dist.get_world_size() > 1


class ShardedBatchSampler(Sampler[list[int]]):
    """Batch ``b`` of ``batch_sampler`` goes to rank ``b mod world``: whole batches, no padding.

    The union over ranks is exactly the single-process batch sequence, so per-batch statistics
    summed over ranks equal the single-process sums.
    """

    def __init__(self, batch_sampler: Iterable[list[int]], rank: int | None = None, world: int | None = None):
        self.batch_sampler = batch_sampler
        self.rank = globals()["rank"]() if rank is None else int(rank)
        self.world = world_size() if world is None else int(world)
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is not in [0, {self.world})")

    def __iter__(self) -> Iterator[list[int]]:
        for b, batch in enumerate(self.batch_sampler):
            if b % self.world == self.rank:
                yield list(batch)

    def __len__(self) -> int:
        n = len(self.batch_sampler)  # type: ignore[arg-type]
        return max(0, (n - self.rank + self.world - 1) // self.world)


def shard_loader(loader: DataLoader, rank: int | None = None, world: int | None = None) -> DataLoader:
    """A loader over this rank's batches of ``loader`` (same dataset, batches, collate and worker options).

    Without a process group (and no explicit ``world``) the loader is returned unchanged.
    """
    world = world_size() if world is None else world
    if world <= 1:
        return loader
    if not isinstance(loader, DataLoader):
        raise TypeError(f"shard_loader needs a torch DataLoader, got {type(loader).__name__}")
    bs = loader.batch_sampler
    if bs is None:
        raise ValueError("shard_loader needs a batched DataLoader (batch_size set)")
    if not isinstance(bs, BatchSampler) and not hasattr(bs, "__len__"):
        raise TypeError("the loader's batch sampler must have a length")
    workers = {}
    if loader.num_workers > 0:  # DataLoader refuses these options without worker processes
        workers = dict(prefetch_factor=loader.prefetch_factor, persistent_workers=loader.persistent_workers)
        if hasattr(loader, "in_order"):  # torch >= 2.6
            workers["in_order"] = loader.in_order
    return DataLoader(
        loader.dataset, batch_sampler=ShardedBatchSampler(bs, rank, world), num_workers=loader.num_workers,
        collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, pin_memory_device=loader.pin_memory_device,
        timeout=loader.timeout, worker_init_fn=loader.worker_init_fn, multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator, **workers,
    )


def all_reduce_sum(values: list[float], device: torch.device | str | None = None) -> list[float]:
    """Sum a few numbers over all processes (float64); unchanged without a process group."""
    return _all_reduce(values, "SUM", device)


def all_reduce_max(values: list[float], device: torch.device | str | None = None) -> list[float]:
    """Element-wise maximum of a few numbers over all processes; unchanged without a process group."""
    return _all_reduce(values, "MAX", device)


def _all_reduce(values: list[float], op: str, device: torch.device | str | None) -> list[float]:
    if not is_distributed():
        return list(values)
    dev = device if device is not None else ("cuda" if dist.get_backend() == "nccl" else "cpu")
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return t.cpu().tolist()


def broadcast_object(obj: _T, src: int = 0) -> _T:
    """Rank ``src``'s ``obj`` on every rank (any picklable value); ``obj`` itself without a process group."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
