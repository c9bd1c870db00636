"""Multi-process data parallelism for the trainer, on ``torch.distributed`` (DDP).

Every rank holds the whole data set and draws the same global batch order from the same seeded
generator; rank ``r`` of ``W`` trains on rows ``r::W`` of each global batch. Validation predictions are
made on strided shards and gathered, so every rank computes the same metrics over the full set (and so
takes the same early-stopping decision). With one process every function here is the identity.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import Tensor, nn


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0 logs, prints and writes checkpoints."""
    return rank() == 0


def init_from_env() -> torch.device:
    """Join the process group that ``torchrun`` describes in the environment; returns this rank's device.

    nccl with one GPU per rank (``LOCAL_RANK``) when CUDA is available, gloo on the CPU otherwise.
    Without ``torchrun`` (no ``WORLD_SIZE``, or 1) nothing is initialized.
    """
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    return device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def launched() -> bool:
    """Whether ``torchrun`` started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def exit_rank(code: int) -> NoReturn:
    """End this rank's process now, output flushed, without the interpreter's teardown.

    ``DistributedDataParallel`` keeps its gloo process group alive after ``destroy_process_group`` (the
    reducer holds it until exit), and a gloo worker thread may still be releasing a finished collective's
    tensors, which needs the GIL. If that happens while the interpreter finalizes, the thread is ended
    inside a destructor and the rank dies with ``terminate called without an active exception`` (SIGABRT)
    after a successful run; seen once in ~30 runs under load. ``os._exit`` skips finalization, so nothing
    is left to race: everything the run writes is closed before this point.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:  # none without a console
            stream.flush()
    os._exit(code)


def wrap(model: nn.Module) -> nn.Module:
    """``model`` wrapped in DDP when several ranks run (it broadcasts rank 0's weights), else ``model``."""
    if world_size() == 1:
        return model
    device = next(model.parameters()).device
    return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def shard(rows: Tensor) -> Tensor:
    """This rank's rows of a global batch (or of any row set): ``rows[rank::world]``."""
    return rows[rank() :: world_size()]


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum of ``t`` over ranks (in place; ``t`` itself with one process)."""
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_shards(part: Tensor, n: int) -> Tensor:
    """Undo :func:`shard`: the ``[n, ...]`` rows whose ``rank::world`` slice each rank holds as ``part``."""
    world = world_size()
    if world == 1:
        return part
    # all_gather needs equal sizes: pad every part to the largest shard, then interleave back.
    longest = -(-n // world)
    padded = part.new_zeros((longest, *part.shape[1:]))
    padded[: len(part)] = part
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    full = part.new_empty((n, *part.shape[1:]))
    for r, p in enumerate(parts):
        full[r::world] = p[: len(range(r, n, world))]
    return full
