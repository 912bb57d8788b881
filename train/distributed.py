"""Multi-GPU training with PyTorch's own stack: ``torchrun`` starts one process per GPU, each joins
the process group here, reads its own shards (``shards[rank::world_size]``, ``train.streaming``) and
trains the same method wrapped in ``DistributedDataParallel``, which averages the gradients.

    torchrun --nproc-per-node 8 -m distillkit train slidr --shards shards/slidr --device cuda --out runs/x

Only rank 0 writes the run log, the curves and checkpoints; every rank resumes from the same
checkpoint. Without ``torchrun`` (``WORLD_SIZE`` unset or 1) nothing here changes a run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


class ProcessCountMismatch(ValueError):
    """A checkpoint resumed with another number of processes than wrote it."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes.

    Attributes:
        rank: global rank (0 writes logs and checkpoints).
        world_size: number of processes.
        local_rank: rank on this node, the index of its GPU.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def ranks() -> Ranks:
    """The initialised process group's ranks, else a single process."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return Ranks()


def join(device: str) -> Ranks:
    """Join ``torchrun``'s process group when it started several processes (``WORLD_SIZE`` > 1):
    NCCL on CUDA, each process on GPU ``LOCAL_RANK``; gloo on the CPU. A no-op for one process.

    Args:
        device: the run's ``--device`` (``"cpu"`` or ``"cuda"``).

    Raises:
        RuntimeError: ``--device cuda`` with fewer visible GPUs than processes on this node.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return ranks()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.device(device).type == "cuda":
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local} but this node sees {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(local)  # "cuda" below means this process's GPU
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend)
    return ranks()


def leave() -> None:
    """Leave the process group (after the last collective), if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class _LossForward(nn.Module):
    """``forward(batch) = method.loss(batch)``, so DDP's reducer sees every step's forward."""

    def __init__(self, method: nn.Module) -> None:
        super().__init__()
        self.method = method

    def forward(self, batch: object) -> torch.Tensor:
        return self.method.loss(batch)  # type: ignore[operator]


def wrap(method: nn.Module, device: torch.device) -> nn.Module:
    """The module whose ``forward(batch)`` gives the loss: ``method.loss`` itself for one process,
    under ``DistributedDataParallel`` for several (parameters and buffers broadcast from rank 0 now,
    gradients averaged in every backward).

    Args:
        method: the method, already on ``device``.
        device: this process's device.
    """
    if ranks().world_size == 1:
        return _LossForward(method)
    from torch.nn.parallel import DistributedDataParallel

    # A method may leave parameters unused (a head whose loss weight is 0), always the same ones for a given
    # configuration: a static graph handles that without walking the autograd graph at every step.
    return DistributedDataParallel(_LossForward(method), device_ids=[device.index] if device.type == "cuda" else None,
                                   static_graph=True)


def from_rank0(value: T) -> T:
    """Rank 0's ``value`` on every rank (a collective; ``value`` itself for one process), for decisions every
    rank must take alike, such as whether and where a run resumes.

    Args:
        value: any picklable object.
    """
    if ranks().world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``x`` (no gradient), concatenated in rank order; ``x`` itself for one
    process. Ranks may hold different numbers of rows (a short last batch).

    Args:
        x: (N_r, ...) this rank's rows.
    """
    r = ranks()
    if r.world_size == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(r.world_size)]
    dist.all_gather(sizes, n)
    longest = int(max(int(s) for s in sizes))
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    out = [torch.zeros_like(padded) for _ in range(r.world_size)]
    dist.all_gather(out, padded.contiguous())
    return torch.cat([o[: int(s)] for o, s in zip(out, sizes, strict=True)])


def check_in_sync(method: nn.Module) -> None:
    """Raise if the ranks' parameters differ (an EMA teacher or a state DDP does not average that
    drifted): one float64 checksum per parameter, compared with rank 0's.

    Raises:
        RuntimeError: naming the first parameter that differs and the rank.
    """
    r = ranks()
    if r.world_size == 1:
        return
    names = [n for n, _ in method.named_parameters()]
    sums = torch.stack([p.detach().double().sum() for _, p in method.named_parameters()])
    gathered = [torch.zeros_like(sums) for _ in range(r.world_size)]
    dist.all_gather(gathered, sums)
    for rank, other in enumerate(gathered[1:], start=1):
        bad = ~((other == gathered[0]) | (other.isnan() & gathered[0].isnan()))
        bad = bad.nonzero()
        if len(bad):
            raise RuntimeError(f"rank {rank}'s parameter {names[int(bad[0])]} differs from rank 0's: "
                               "the ranks trained different models")
