r"""Multi-GPU training with PyTorch's own stack: ``torchrun`` starts one process per GPU, each joins
the process group here, reads its own shards (``shards[rank::world_size]``, ``train.streaming``) and
trains the same method wrapped in ``DistributedDataParallel``, which averages the gradients.

    torchrun --nproc-per-node 4 -m distillkit train slidr --shards shards/slidr --device cuda --size paper \
        --teacher-checkpoint moco_v2_800ep_pretrain.pth.tar --out runs/x

``batch_size`` is the global batch, as in SLidR's release (its datamodule divides the configured batch by the
number of GPUs): each of N processes takes ``rank_batch(batch_size)`` = batch_size / N samples per step.
``sync_batchnorm`` (``convert_sync_batchnorm``) makes BatchNorm layers use the statistics of the global batch.

Only rank 0 writes the run log, the curves and checkpoints; every rank resumes from the same
checkpoint. Without ``torchrun`` (``WORLD_SIZE`` unset or 1) nothing here changes a run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, TypeVar

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


class BatchSplitError(ValueError):
    """A global batch that does not divide across the processes."""


def rank_batch(global_batch: int, world_size: int | None = None) -> int:
    """This process's share of the global batch: ``global_batch / world_size``.

    Why refuse rather than round: a rounded share silently trains another global batch than the one the
    configuration (and the lr scaled from it) says.

    Args:
        global_batch: samples per optimiser step over all processes (the ``batch_size`` key).
        world_size: the number of processes (default: the process group's).

    Raises:
        BatchSplitError: ``global_batch`` is not a multiple of ``world_size``.
    """
    world = ranks().world_size if world_size is None else world_size
    if global_batch % world:
        raise BatchSplitError(f"batch_size {global_batch} is the global batch and must divide across the {world} "
                              f"processes: give a multiple of {world}")
    return global_batch // world


class _SumOverRanks(torch.autograd.Function):
    """``all_reduce(SUM)`` that autograd sees through: the gradient of every rank's copy of the sum flows back to
    every rank's input (the backward is a sum over ranks too)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch for CPU (gloo) process groups, where ``nn.SyncBatchNorm`` refuses to run.

    Same statistics and the same gradients as ``nn.SyncBatchNorm``: per-channel sum, sum of squares and count
    all-reduced with autograd (``_SumOverRanks``), so the backward pass carries
    every rank's dependence on the shared mean and variance; running statistics take the unbiased variance of
    the global batch. Any input rank >= 2 (channels in dim 1). Outside training, or in one process, it is
    plain ``BatchNorm``.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and ranks().world_size > 1):
            return super().forward(x)
        dims = [d for d in range(x.dim()) if d != 1]
        c = x.shape[1]
        count = x.new_full((1,), x.numel() // max(c, 1))
        # float64 sums: with many points per channel, E[x^2] - E[x]^2 in float32 loses the variance's digits
        stats = torch.cat([x.double().sum(dims), (x.double() ** 2).sum(dims), count.double()])
        stats = _SumOverRanks.apply(stats)
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean**2).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(m * mean.to(self.running_mean.dtype))
                unbiased = var * n / (n - 1).clamp_min(1)
                self.running_var.mul_(1 - m).add_(m * unbiased.to(self.running_var.dtype))
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x - mean.to(x.dtype).view(shape)) * torch.rsqrt(var.to(x.dtype).view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with every BatchNorm layer computing its statistics over the global batch: torch's
    ``nn.SyncBatchNorm`` on CUDA, ``GlobalBatchNorm`` on the CPU (same arithmetic). Weights, buffers and
    ``requires_grad`` carry over. A no-op for one process.

    Args:
        module: the method (its BatchNorm layers are replaced in place where possible).
        device: the training device.
    """
    if ranks().world_size == 1:
        return module
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _to_global_bn(module)


def _to_global_bn(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        new.training = module.training
        with torch.no_grad():
            if module.affine:
                new.weight, new.bias = module.weight, module.bias
            if module.track_running_stats:
                new.running_mean, new.running_var = module.running_mean, module.running_var
                new.num_batches_tracked = module.num_batches_tracked
        return new
    for name, child in module.named_children():
        module.add_module(name, _to_global_bn(child))
    return module


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
