"""The training loop shared by every trainer.

A *method* is an ``nn.Module`` with ``loss(batch) -> Tensor`` (a scalar); its trainable
parameters are those with ``requires_grad``. A method may define ``after_step(step, max_steps)``,
called under ``no_grad`` after every optimiser step (an EMA teacher's update, a queue); state it keeps
in parameters or buffers is checkpointed with the method. It may also define ``log_terms(step) -> dict``,
the parts its loss splits into over the logged window ending at ``step`` (e.g. UniSeg's teacher entropy and
KL): they go into ``log.jsonl`` as ``terms`` and onto the loss panel of ``curves.png``, because a loss
against a moving target can rise while the part the student controls falls, and the picture must say so.
The loop owns device placement (non-blocking copies of pinned batches), bf16 autocast (CUDA only; CPU runs
in float32), gradient clipping, SGD/AdamW,
a cosine LR schedule over ``max_steps`` with optional linear warmup, logging (loss, samples/s,
fraction of step time spent waiting for data, also kept in ``OUT/log.jsonl`` and drawn in
``OUT/curves.png``, see ``train.run_log``) and checkpoints.

Resume semantics (exact on CPU): checkpoints hold the method/optimizer/scheduler state dicts,
the step, the torch/numpy/python RNG states and, when ``make_batches()`` returns a loader that knows its
position (``train.streaming.StreamLoader``, what ``make_loader`` gives for a ``ShardStream``), the stream
position: per rank (``stream``, or ``stream_ranks`` under several processes) and per loader worker, the epoch
and the samples consumed in it. On resume the loop rebuilds the loader and hands it that position, so the
stream skips whole epochs and replays only the raw reads of the open one, decoding nothing already consumed:
resume time does not grow with the step (``bench/suite/resume.py``). A checkpoint without a position
(written before positions existed, or by a ``make_batches`` that is not such a loader) resumes the old way,
with a log line saying so: the loader is rebuilt and the ``step`` batches already consumed are *read,
decoded and collated again* but not trained on. Either way the batch sequence is the uninterrupted run's, for
any number of loader workers as long as it is the same as in the interrupted run. A position saved under another
layout (another ``num_workers``, as given: 0 and 1 differ; another seed or shard count) cannot be used: the loop
warns that the batch sequence will differ from an uninterrupted run's and fast-forwards instead (the checkpoint
cannot be edited to drop the position, its digest forbids it). The RNG states are restored after any fast-forward,
so that draws made while loading in-process are those of the saved state; the DataLoader gets a private generator
so creating its iterator draws nothing global.

Several processes (``torchrun``, ``train.distributed``): the method runs under
``DistributedDataParallel``; each rank reads its own shards and its own RNG stream (the seed plus the
rank), rank 0 alone writes the log, the curves and the checkpoint (which holds every rank's RNG
state, so a resumed run with the same number of processes continues each rank's stream), and at
every checkpoint the ranks' parameters are checked equal. samples/s counts every rank's samples.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distillkit.train import distributed
from distillkit.train.checkpoint import (
    current_method,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from distillkit.train.run_log import append_entry, plot_curves, truncate_after
from distillkit.train.streaming import to_device

log = logging.getLogger(__name__)


@dataclass
class LoopConfig:
    """Optimisation and bookkeeping settings; lr is the peak learning rate of the cosine schedule."""

    max_steps: int = 100
    device: str = "cpu"
    optimizer: str = "sgd"  # "sgd" | "adamw"
    lr: float = 0.5
    momentum: float = 0.9
    dampening: float = 0.1
    weight_decay: float = 1e-4
    # DINO's convention (DINO, ATST, the UniSeg trainer): biases and 1-d parameters (norms) are not decayed.
    # SLidR's released optimiser decays every parameter, hence True by default.
    decay_norm_and_bias: bool = True
    # Weight decay on a cosine from weight_decay to this at max_steps (DINO / ATST: 0.04 -> 0.4); None: constant.
    weight_decay_end: float | None = None
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    # Cosine over epochs (SLidR's CosineAnnealingLR(T_max=epochs) stepped once per epoch): the lr is
    # constant within an epoch. None: cosine over steps, updated every step.
    steps_per_epoch: int | None = None
    # "cosine" (SLidR, DINO-style methods) or "linear" decay to min_lr_ratio after the warmup (COMODO's
    # transformers.get_linear_schedule_with_warmup).
    schedule: str = "cosine"
    # Warm-up from lr 0 at the first step (``step / warmup``, transformers' get_linear_schedule_with_warmup, which
    # COMODO's release uses) instead of ``(step + 1) / warmup``, whose first step already trains.
    warmup_from_zero: bool = False
    grad_clip: float | None = 10.0
    log_every: int = 10
    ckpt_every: int = 0  # 0: only at the end
    out: Path | None = None
    resume: bool = False
    bf16: bool = True  # only honoured on CUDA
    run_config: dict[str, Any] | None = None  # the trainer's resolved configuration: checkpoint + log
    # Samples per optimiser step over all processes (the ``batch_size`` key), for the run's record of its scale;
    # None: not stated (the record then says only the world size).
    global_batch: int | None = None
    # BatchNorm statistics over the global batch under several processes (``distributed.convert_sync_batchnorm``).
    sync_batchnorm: bool = False


def make_optimizer(named: Iterable[tuple[str, nn.Parameter]], cfg: LoopConfig) -> torch.optim.Optimizer:
    """The optimiser over the trainable parameters of ``named`` (``module.named_parameters()``).

    With ``cfg.decay_norm_and_bias = False`` they form two groups, as DINO's ``get_params_groups``:
    the rest decayed by ``cfg.weight_decay``, biases and 1-d parameters not decayed.
    """
    trainable = [(n, p) for n, p in named if p.requires_grad]
    if cfg.decay_norm_and_bias:
        groups: list[dict[str, Any]] = [{"params": [p for _, p in trainable]}]
    else:
        plain = [p for n, p in trainable if n.endswith(".bias") or p.ndim <= 1]
        groups = [{"params": [p for n, p in trainable if not (n.endswith(".bias") or p.ndim <= 1)]},
                  {"params": plain, "weight_decay": 0.0, "no_decay": True}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, dampening=cfg.dampening, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r} (sgd | adamw)")


def weight_decay_at(step: int, cfg: LoopConfig) -> float:
    """The weight decay of optimiser step ``step`` (0-based): constant, or DINO's cosine to ``weight_decay_end``."""
    if cfg.weight_decay_end is None:
        return cfg.weight_decay
    t = min(1.0, step / max(1, cfg.max_steps - 1))
    return cfg.weight_decay_end + 0.5 * (cfg.weight_decay - cfg.weight_decay_end) * (1 + math.cos(math.pi * t))


def cosine_lambda(
    max_steps: int, warmup: int, min_ratio: float, steps_per_epoch: int | None = None, schedule: str = "cosine",
    warmup_from_zero: bool = False,
) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1 (``(step + 1) / warmup``, or ``step / warmup`` from 0 with
    ``warmup_from_zero``), then cosine (or, with ``schedule="linear"``, a straight line) to ``min_ratio`` at
    ``max_steps``.

    With ``steps_per_epoch`` the cosine advances once per epoch, as ``CosineAnnealingLR(T_max=epochs)``
    stepped at each epoch's end: epoch ``e`` of ``E`` trains at ``0.5 * (1 + cos(pi * e / E))``.
    """

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + (0 if warmup_from_zero else 1)) / warmup
        if steps_per_epoch:
            epochs = max(1, math.ceil(max_steps / steps_per_epoch))
            t = min(1.0, (step // steps_per_epoch) / epochs)
        else:
            t = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        if schedule == "linear":
            return min_ratio + (1 - min_ratio) * (1 - t)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    if schedule not in ("cosine", "linear"):
        raise ValueError(f"unknown lr schedule {schedule!r} (cosine | linear)")
    return f


def train_loop(
    method: nn.Module,
    make_batches: Callable[[], Iterable[Any]],
    cfg: LoopConfig,
    batch_size: Callable[[Any], int] | None = None,
) -> dict[str, Any]:
    """Train ``method`` for ``cfg.max_steps`` steps on batches from ``make_batches()``.

    ``make_batches`` returns a fresh iterable (e.g. a DataLoader over an infinite ShardStream);
    if it runs out, it is called again. ``batch_size(batch)`` counts samples for samples/s.
    Returns the final metrics (loss, samples_per_s, data_wait_fraction, step, timed_steps, checkpoint,
    curves: the picture of ``OUT/log.jsonl``).
    The first step of a run of more than one step is left out of samples_per_s and
    data_wait_fraction (``timed_steps`` says how many were counted): it pays for loader start-up and
    CUDA/cuDNN warm-up once, which would otherwise dominate a short benchmark run.
    """
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but CUDA is not available")
    method.to(device)
    ranks = distributed.ranks()
    if cfg.sync_batchnorm:  # before DDP wraps it and before the optimiser takes its parameters
        method = distributed.convert_sync_batchnorm(method, device)
    scale = run_scale(cfg.global_batch, ranks.world_size)
    if ranks.world_size > 1 and ranks.rank:
        # Parameters come from rank 0 (DDP broadcasts them); random draws in the steps must differ per rank.
        torch.manual_seed(torch.initial_seed() + ranks.rank)
    forward = distributed.wrap(method, device)
    opt = make_optimizer(method.named_parameters(), cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, cosine_lambda(cfg.max_steps, cfg.warmup_steps, cfg.min_lr_ratio, cfg.steps_per_epoch, cfg.schedule,
                           cfg.warmup_from_zero)
    )
    step = 0
    st: dict[str, Any] = {}
    position: dict[str, Any] | None = None
    ckpt_path = Path(cfg.out) / "latest.pt" if cfg.out else None
    # Rank 0's view decides for every rank: ranks that disagreed on resuming would run different step counts.
    found = distributed.from_rank0(latest_checkpoint(cfg.out) if cfg.resume and cfg.out else None)
    if found is not None:
        st = load_checkpoint(found, map_location=device)
        method.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        step = int(st["step"])
        saved_by = len(st.get("rng_ranks") or [None])
        if saved_by != ranks.world_size:
            raise distributed.ProcessCountMismatch(
                f"{found}: saved by {saved_by} process(es); resume it with as many, not {ranks.world_size} (each "
                "rank's data and random stream depend on it)")
        position = (st.get("stream_ranks") or [None] * ranks.world_size)[ranks.rank] if ranks.world_size > 1 \
            else st.get("stream")
        log.info("resumed from %s at step %d", found, step)
    writes = cfg.out is not None and ranks.main
    if writes:  # a fresh run starts a fresh log (even its step-0 line); a resumed one drops what it will train again
        truncate_after(Path(cfg.out), step if found is not None else -1)
        if step == 0 and cfg.run_config is not None:
            append_entry(Path(cfg.out), {"step": 0, "config": cfg.run_config, **scale})

    def save() -> None:
        distributed.check_in_sync(method)
        rngs = _gather_rng_states() if ranks.world_size > 1 else None
        state = stream_state(source)
        streams = _gather_objects(state) if ranks.world_size > 1 else None
        if ckpt_path is not None and ranks.main:
            save_checkpoint(
                ckpt_path,
                {
                    "model": method.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "step": step,
                    "rng": rng_state(),
                    "config": cfg.run_config,
                } | ({"rng_ranks": rngs} if rngs is not None else {})
                | ({"stream_ranks": streams} if streams is not None and None not in streams else {})
                | ({"stream": state} if state is not None and ranks.world_size == 1 else {}),
            )

    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and cfg.bf16 else nullcontext()
    )
    source = make_batches()
    fast_forward = step if step and not _resume_stream(source, position, found, step) else 0
    it = iter(source)

    def next_batch() -> Any:
        nonlocal it, source
        try:
            return next(it)
        except StopIteration:
            source = make_batches()
            it = iter(source)
        try:
            return next(it)
        except StopIteration:
            raise RuntimeError(
                "the data stream yields no batch: every sample was bad, or this rank has no shard "
                "(fewer shards than ranks)"
            ) from None

    for _ in range(fast_forward):  # a checkpoint without a position: fast-forward past consumed batches
        next_batch()
    if step:
        # After the fast-forward: in-process data loading (num_workers=0) may draw from the global
        # RNGs (webdataset does), and those draws are already contained in the saved state.
        per_rank = st.get("rng_ranks")
        set_rng_state(per_rank[ranks.rank] if ranks.world_size > 1 else st["rng"])

    after_step = getattr(method, "after_step", None)
    log_terms = getattr(method, "log_terms", None)
    method.train()
    win_loss, win_n, win_wait, win_time, win_samples = 0.0, 0, 0.0, 0.0, 0
    tot_wait, tot_time, tot_samples, timed = 0.0, 0.0, 0, 0
    first_step = step + 1 if cfg.max_steps - step > 1 else -1
    last_loss = float("nan")
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        batch = next_batch()
        batch = to_device(batch, device)
        t1 = time.perf_counter()
        with amp:
            loss = forward(batch)
        opt.zero_grad(set_to_none=True)
        loss.float().backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in method.parameters() if p.requires_grad], cfg.grad_clip)
        if cfg.weight_decay_end is not None:
            for group in opt.param_groups:
                if not group.get("no_decay"):
                    group["weight_decay"] = weight_decay_at(step, cfg)
        opt.step()
        sched.step()
        step += 1
        if after_step is not None:  # e.g. an EMA teacher update, which must follow the optimiser step
            with torch.no_grad():
                after_step(step, cfg.max_steps)
        last_loss = float(loss.detach())  # syncs the device, so step time below is honest
        t2 = time.perf_counter()
        n = (batch_size(batch) if batch_size else 1) * ranks.world_size
        win_loss += last_loss
        win_n += 1
        win_wait += t1 - t0
        win_time += t2 - t0
        win_samples += n
        if step != first_step:
            tot_wait += t1 - t0
            tot_time += t2 - t0
            tot_samples += n
            timed += 1
        if cfg.log_every and (step % cfg.log_every == 0 or step == cfg.max_steps):
            entry = {
                "step": step,
                "loss": win_loss / win_n,
                "lr": sched.get_last_lr()[0],
                "samples_per_s": win_samples / max(win_time, 1e-9),
                "data_wait_fraction": win_wait / max(win_time, 1e-9),
            }
            (log.info if ranks.main else log.debug)(
                "step %d loss %.4f lr %.3g samples/s %.2f data-wait %.0f%%",
                step,
                entry["loss"],
                entry["lr"],
                entry["samples_per_s"],
                100 * entry["data_wait_fraction"],
            )
            terms = log_terms(step) if log_terms is not None else None
            if terms:
                entry["terms"] = {k: float(v) for k, v in terms.items()}
            if writes:
                append_entry(Path(cfg.out), entry)
            win_loss, win_n, win_wait, win_time, win_samples = 0.0, 0, 0.0, 0.0, 0
        if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.max_steps:
            save()
    save()
    if writes:
        size = (cfg.run_config or {}).get("size")
        # The trainer's registered name (Trainer.train sets it); a method trained outside any trainer: its class.
        name = current_method() or type(method).__name__
        curves = plot_curves(Path(cfg.out), method=name, size=size if isinstance(size, str) else None,
                             max_steps=cfg.max_steps)
    else:
        curves = None
    return {
        "loss": last_loss,
        "step": step,
        "samples_per_s": tot_samples / max(tot_time, 1e-9),
        "data_wait_fraction": tot_wait / max(tot_time, 1e-9),
        "timed_steps": timed,
        **scale,
        "checkpoint": str(ckpt_path) if ckpt_path else None,
        "curves": str(curves) if curves else None,
    }


def run_scale(global_batch: int | None, world_size: int) -> dict[str, int]:
    """What a run's record says of its scale: ``world_size`` and, when known, the global batch and each
    process's share (a 2-process run's log must not read like a 1-process one).

    Args:
        global_batch: samples per optimiser step over all processes, or None.
        world_size: the number of training processes.
    """
    out = {"world_size": world_size}
    if global_batch is not None:
        out |= {"global_batch": global_batch, "rank_batch": global_batch // world_size}
    return out


def _gather_rng_states() -> list[Any]:
    """Every rank's RNG states, in rank order (a collective: every rank calls it)."""
    return _gather_objects(rng_state())


def _gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a collective: every rank calls it)."""
    import torch.distributed as dist

    out: list[Any] = [None] * distributed.ranks().world_size
    dist.all_gather_object(out, obj)
    return out


def _resume_stream(source: Any, position: dict[str, Any] | None, found: Path, step: int) -> bool:
    """Hand ``source`` (a fresh ``make_batches()``) the stream position saved in checkpoint ``found``; whether it
    took it. When it did not, the caller fast-forwards past the ``step`` batches consumed (read, decoded and
    collated again); the log says which of the three reasons applies.

    Args:
        source: the rebuilt loader.
        position: this rank's saved position, or None when the checkpoint holds none.
        found: the checkpoint (for the log).
        step: the batches consumed before it was saved.
    """
    cost = f"fast-forwarding the stream past the {step} batches consumed, which reads and decodes them again"
    if position is None:
        log.info("%s holds no data stream position (written before positions existed, or by a loader without "
                 "one): %s", found, cost)
        return False
    load = getattr(source, "load_stream_state", None)
    if not callable(load):
        log.info("%s holds a data stream position, but this loader (%s) cannot resume from one: %s", found,
                 type(source).__name__, cost)
        return False
    try:
        load(position)
    except ValueError as exc:  # another --num-workers, seed or shard folder: the position means another stream
        log.warning("%s: its data stream position does not fit this loader (%s): %s; the batch sequence will differ "
                    "from an uninterrupted run's (resume with the same --num-workers, seed and shards to continue "
                    "it exactly)", found, exc, cost)
        return False
    log.info("data stream resumed at its saved position (nothing consumed is read again but the open epoch's raw tar "
             "bytes)")
    return True


def stream_state(source: Any) -> dict[str, Any] | None:
    """The position of the batches consumed from ``source`` (``make_batches()``'s result) for the checkpoint, or
    None when it keeps none (a plain iterable: such a checkpoint resumes by fast-forwarding).

    Args:
        source: the iterable the loop is drawing batches from.
    """
    get = getattr(source, "stream_state", None)
    return get() if callable(get) else None


def format_metrics(metrics: dict[str, Any]) -> str:
    """One line ``key=value`` of a run's final metrics (floats to 4 significant digits)."""
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
