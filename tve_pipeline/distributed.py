"""Data-parallel pre-training: several processes, one global batch, one model.

A pre-training run with ``W`` processes (``torchrun --nproc-per-node W``) trains the
model a single process trains: every rank draws the *same* global batches (the seed order
comes from the same generator), takes its contiguous slice of each one
(:meth:`World.chunk`: ``tensor_split``, so no seed is dropped, repeated or padded, and the
slices in rank order are the global batch), and computes its slice's share of the global
batch's loss. DistributedDataParallel averages the gradients over the ranks, so each rank
back-propagates ``W x`` its share: the average is then the gradient of the global loss.

What a slice's share is decides whether the split is exact. TVE's loss is a weighted mean
over the batch (``sum w err / sum w``), so a slice's share is ``sum w err`` over its rows
divided by the *global* ``sum w`` (``training._loss_share`` reads the weights of the whole global
batch, which every rank knows); the sum of the shares is the single-process loss. MAE's
per-cell means and CTR's in-batch negatives are not sums over seeds: under several
processes they are each rank's own, weighted by its seed count (the usual data-parallel
approximation, not the single-process loss).

Random draws are per rank. Each rank samples and corrupts its own slice with generators of
its own (``step_generator(seed, step, world.stream("sample"))``), and dropout draws from
each rank's own global generator; with one process every stream is what it always was.
So two processes match one exactly (up to float rounding) where a seed's loss depends on
nothing random: deterministic sampling (``last``), no corruption, no dropout; that is what
``tests/test_ddp.py`` checks. Sampling the whole global batch on every rank and slicing it
would also reproduce ``uniform`` draws, at W times the host work per step.

Backends: NCCL on CUDA (rank ``r`` on ``cuda:LOCAL_RANK``), gloo on the CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place among the training processes: ``rank`` of ``size``; ``group``
    when it has joined a process group (training then goes through DDP, even alone)."""

    rank: int = 0
    size: int = 1
    group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes checkpoints and reports."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def chunk(self, index: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global batch (all of it with one process)."""
        if self.size == 1:
            return index
        return index.tensor_split(self.size)[self.rank]

    def stream(self, name: str) -> str:
        """The name of a random stream on this rank: ``name`` itself with one process."""
        return name if self.size == 1 else f"{name}:{self.rank}/{self.size}"

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over the ranks (itself with one process)."""
        if self.size == 1:
            return value
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order (a list of one with one process)."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


SINGLE = World()


def backend_for(device: torch.device | str) -> str:
    """``nccl`` for CUDA, ``gloo`` for the CPU."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def start(
    device: str, *, init_method: str | None = None, rank: int | None = None, size: int | None = None
) -> tuple[World, torch.device]:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``
    and its rendezvous) or the one given; returns this rank's world and device.

    ``device`` is ``"cpu"`` or ``"cuda"``: on CUDA each rank takes ``cuda:LOCAL_RANK``.
    """
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    size = int(os.environ.get("WORLD_SIZE", 1)) if size is None else size
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"rank {rank} needs cuda:{local_rank}, but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")
    if size > 1 or init_method is not None:
        kwargs = {"init_method": init_method, "rank": rank, "world_size": size}
        if torch_device.type == "cuda":
            kwargs["device_id"] = torch_device
        dist.init_process_group(backend_for(torch_device), **kwargs)
        return World(rank, size, group=True), torch_device
    return World(rank, size), torch_device


def stop() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
