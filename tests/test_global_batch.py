"""``batch_size`` is the global batch: one optimiser step of every trainer on two gloo processes equals one step
in one process that computes what the released multi-GPU code computes (docs/training.md "Scale").

Each rank takes ``batch_size / 2`` samples of its own shards (``shards[rank::2]``) and DDP averages the ranks'
gradients. The single-process reference takes the same two half-batches (the trainer's own stream for rank 0 and
for rank 1, batched here at ``batch_size / 2``, not at what the trainer asks for), computes each rank's loss as the
release does and one step on their mean:

- SLidR: the superpixel InfoNCE per rank on its own half-batch (negatives never cross GPUs), BatchNorm
  statistics over the whole global batch (synchronised BatchNorm; the reference runs the 3D network once on both
  halves together, with the second half's batch indices shifted);
- audio (BYOL): a per-sample loss (mean over each rank's half) with the projector's and predictor's BatchNorm
  synchronised, as ATST trains (Audio-WestlakeU/audiossl audiossl/methods/atst/train.py:22); in-batch
  augmentation (mix-up partners, random resized crops) is drawn on each rank, so it is switched off here, the
  per-sample crops being keyed by sample already (``sample_rngs``);
- COMODO: the release trains on one GPU, so its step at batch B is one step on all B windows: each rank's bank
  holds every rank's teacher embeddings of the step (``gather_rows``), the queue advances by all of them, and
  the student head's BatchNorm is synchronised;
- UniSeg: each rank's DINO loss with the same centre, then the centre updated once from the global batch's mean
  teacher logit (DINO's all-reduce).

Augmentation is drawn per sample from its key and epoch (``train.streaming.sample_rngs``), so it does not
depend on which process reads a sample. A trainer that treated ``batch_size`` as per process (the bug this test
was written for) gives each rank twice the samples and fails the comparison; so does a missing BatchNorm sync, a
per-rank queue or centre.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from distillkit.train import distributed
from distillkit.train.registry import get_trainer
from tests.conftest import build_serial, free_port

B = 4  # the global batch: 2 samples per rank

CONFIGS: dict[str, dict[str, Any]] = {
    "slidr": {"split": "all", "sync_batchnorm": True},
    "audio": {"mixup_alpha": 0.0, "rrc": False, "sync_batchnorm": True},
    "comodo": {"queue_size": 8, "sync_batchnorm": True},
    "uniseg": {},
}
MODULES = {"slidr": "slidr", "audio": "audio", "comodo": "comodo", "uniseg": "uniseg"}


# --------------------------------------------------------------------------- tiny shard sets, two or more shards each


@pytest.fixture(scope="module")
def audio_tiny(tmp_path_factory) -> Path:
    from distillkit.sensors.synth.audio import make_audio

    root = make_audio(tmp_path_factory.mktemp("audio") / "data", seed=0, size="small")
    return build_serial("demo-audio", tmp_path_factory.mktemp("audio-shards"), f"source.root={root}",
                        "output.files_per_shard=2", "stages.audio.store_waveform=false")


@pytest.fixture(scope="module")
def comodo_tiny(tmp_path_factory) -> Path:
    from distillkit.sensors.synth.ego import make_ego

    root = make_ego(tmp_path_factory.mktemp("ego") / "v2", seed=1, size="small")
    return build_serial("demo-comodo", tmp_path_factory.mktemp("comodo-shards"), f"source.root={root}",
                        "stages.frames.size=64", "output.recordings_per_shard=1", "output.max_rejected=1.0")


@pytest.fixture(scope="module")
def uniseg_tiny(tmp_path_factory) -> Path:
    from distillkit.sensors.synth.images import make_images

    root = make_images(tmp_path_factory.mktemp("imgs") / "data", seed=2)
    return build_serial("demo-uniseg", tmp_path_factory.mktemp("uniseg-shards"), f"source.root={root}",
                        "output.samples_per_shard=2")


def _shards(request: pytest.FixtureRequest, name: str) -> Path:
    return request.getfixturevalue("slidr_shards" if name == "slidr" else f"{name}_tiny")


def _config(name: str) -> dict[str, Any]:
    return get_trainer(name).resolve_config({"max_steps": 1, "batch_size": B, "seed": 0, "log_every": 1,
                                             **CONFIGS[name]})


# --------------------------------------------------------------------------- the two-process run



def _rank_main(rank: int, world: int, port: int, name: str, shards: str, config: dict, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    import importlib

    from distillkit.train.loop import train_loop

    def loop_keeping_grads(method: nn.Module, *args: Any, **kw: Any) -> dict[str, Any]:
        metrics = train_loop(method, *args, **kw)
        # the gradients of the step, as DDP averaged them (the optimiser leaves them in place)
        torch.save({n: p.grad for n, p in method.named_parameters() if p.grad is not None},
                   Path(out, f"grads{rank}.pt"))
        return metrics

    module = importlib.import_module(f"distillkit.train.{MODULES[name]}")
    try:
        with mock.patch.object(module, "train_loop", loop_keeping_grads):
            metrics = get_trainer(name).train(Path(shards), Path(out), config, device="cpu")
        if rank == 0:
            Path(out, "metrics.json").write_text(json.dumps({k: v for k, v in metrics.items()
                                                             if isinstance(v, int | float | str)}))
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- the single-process reference


class _Captured(Exception):
    pass


def _capture(name: str, shards: Path, config: dict[str, Any], rank: int) -> dict[str, Any]:
    """What the trainer builds as rank ``rank`` of 2: its method, loop configuration and the first half-batch of
    its own stream (batched here at B / 2, whatever the trainer asks for; the size it asked for is recorded)."""
    import importlib

    from distillkit.train import streaming

    module = importlib.import_module(f"distillkit.train.{MODULES[name]}")
    got: dict[str, Any] = {}

    def fake_loader(stream: Any, batch_size: int, collate: Any, **kw: Any) -> Any:
        got["asked"] = batch_size
        return streaming.make_loader(stream, B // 2, collate, **{**kw, "num_workers": 0})

    def fake_loop(method: nn.Module, make_batches: Any, cfg: Any, batch_size: Any = None) -> dict[str, Any]:
        got.update(method=method, cfg=cfg, batch=next(iter(make_batches())))
        raise _Captured

    with mock.patch.object(distributed, "ranks", lambda: distributed.Ranks(rank, 2)), \
            mock.patch.object(distributed, "from_rank0", lambda v: v), \
            mock.patch.object(module, "make_loader", fake_loader), mock.patch.object(module, "train_loop", fake_loop):
        with pytest.raises(_Captured):
            get_trainer(name).train(shards, None, config, device="cpu")
    return got


def _slidr_pair_loss(m: nn.Module, b0: dict, b1: dict) -> torch.Tensor:
    from distillkit.train.slidr_loss import superpixel_nce_loss

    shifted = b1["coords"].clone()
    shifted[:, 0] += len(b0["keys"])
    f3 = m.point_net(torch.cat([b0["coords"], shifted]), torch.cat([b0["feats"], b1["feats"]]))
    n0 = len(b0["coords"])
    losses = []
    for f, b in ((f3[:n0], b0), (f3[n0:], b1)):
        f2 = m.image_features(b["images"])
        losses.append(superpixel_nce_loss(f[b["pairing_points"]], f2, b["superpixels"], b["pairing_images"],
                                          m.temperature))
    return 0.5 * (losses[0] + losses[1])


def _one_batch_loss(m: nn.Module, b0: dict, b1: dict) -> torch.Tensor:
    """The loss on both halves as one batch: for a per-sample loss with synchronised BatchNorm, exactly the
    released two-GPU step (the mean of the two ranks' means over equal halves; BatchNorm over all B).

    COMODO's release trains on one GPU (Breezelled/COMODO comodo/train.py:136): its step at batch B is the loss
    over all B windows against the queue plus the batch's teacher embeddings, the queue then advanced by those B
    embeddings (comodo/loss.py:39-54), the student head's BatchNorm over all B windows."""
    return m.loss({k: torch.cat([b0[k], b1[k]]) for k in b0})


def _dino_pair_loss(m: nn.Module, b0: dict, b1: dict) -> torch.Tensor:
    from distillkit.train.dino import DINOLoss

    original = DINOLoss.update_center
    seen: list[tuple[DINOLoss, torch.Tensor]] = []
    with mock.patch.object(DINOLoss, "update_center", lambda self, t: seen.append((self, t.detach()))):
        losses = _two_halves(m, lambda: m.loss(b0), lambda: m.loss(b1))
    for loss in dict.fromkeys(s for s, _ in seen):  # once per DINO loss, from both halves' teacher rows
        original(loss, torch.cat([t for s, t in seen if s is loss]))
    return 0.5 * (losses[0] + losses[1])


def _set_buffers(m: nn.Module, values: dict[str, torch.Tensor]) -> None:
    for name, v in values.items():  # new tensors: a half's backward still needs the ones its forward used
        owner, _, leaf = name.rpartition(".")
        setattr(m.get_submodule(owner), leaf, v.clone())


def _two_halves(m: nn.Module, first: Any, second: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``first()`` and ``second()``, each rank's loss on its half, both from the buffers as they were before the
    step (a step counter, BatchNorm statistics), which end as rank 0's: DDP broadcasts rank 0's buffers to every
    rank at the next forward. Buffers the ranks share through a collective are the callers' to set."""
    before = {k: v.detach().clone() for k, v in m.named_buffers()}
    a = first()
    rank0 = {k: v.detach().clone() for k, v in m.named_buffers()}
    _set_buffers(m, before)
    b = second()
    _set_buffers(m, rank0)
    return a, b


PAIR_LOSS = {"slidr": _slidr_pair_loss, "audio": _one_batch_loss, "comodo": _one_batch_loss,
             "uniseg": _dino_pair_loss}


class _TwoRanks(nn.Module):
    """The released two-GPU step in one process: ``loss`` of a pair of half-batches (``PAIR_LOSS``)."""

    def __init__(self, method: nn.Module, pair_loss: Any) -> None:
        super().__init__()
        self.method, self.pair_loss = method, pair_loss

    def loss(self, pair: tuple[dict, dict]) -> torch.Tensor:
        return self.pair_loss(self.method, *pair)

    def after_step(self, step: int, max_steps: int) -> None:
        if hasattr(self.method, "after_step"):
            self.method.after_step(step, max_steps)


def _tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a state dict (COMODO's also holds its queue's keys as extra state), copied."""
    return {k: v.detach().clone() for k, v in state.items() if isinstance(v, torch.Tensor)}


def _reference(name: str, shards: Path, config: dict[str, Any]) -> tuple[dict, dict, dict, list[int]]:
    """(state after the reference step, state before it, the step's gradients, batch sizes the trainer asked for
    as rank 0 and 1)."""
    import dataclasses

    from distillkit.train.loop import train_loop

    halves = [_capture(name, shards, config, r) for r in (0, 1)]
    method = halves[0]["method"]  # rank 0's: DDP broadcasts its parameters and buffers to every rank
    before = _tensors(method.state_dict())
    cfg = dataclasses.replace(halves[0]["cfg"], out=None, sync_batchnorm=False)
    pair = (halves[0]["batch"], halves[1]["batch"])
    torch.manual_seed(0)
    train_loop(_TwoRanks(method, PAIR_LOSS[name]), lambda: [pair], cfg)
    grads = {n: p.grad for n, p in method.named_parameters() if p.grad is not None}
    return _tensors(method.state_dict()), before, grads, [h["asked"] for h in halves]


@pytest.mark.parametrize("name", ["slidr", "audio", "comodo", "uniseg"])
def test_one_step_on_two_ranks_equals_the_released_two_gpu_step(name, request, tmp_path):
    shards = _shards(request, name)
    config = _config(name)
    out = tmp_path / "run"
    mp.spawn(_rank_main, args=(2, free_port(), name, str(shards), config, str(out)), nprocs=2, join=True)
    ddp = _tensors(torch.load(out / "latest.pt", map_location="cpu", weights_only=False)["model"])
    torch.set_num_threads(1)
    ref, before, grads, asked = _reference(name, shards, config)
    assert asked == [B // 2, B // 2], f"each of 2 ranks must take batch_size / 2 = {B // 2} samples, asked {asked}"
    # The gradients DDP averaged, on both ranks, equal the reference's: each tensor within 1% (relative norm of the
    # difference). Float32 rounding alone leaves about 0.1% (SLidR's sparse UNet over ~18k voxels, its largest),
    # a per-rank instead of a synchronised BatchNorm 10-70%, a per-process batch all of it.
    worst = {}
    # A tensor whose true gradient is zero (a bias just before a BatchNorm) holds rounding only: its error is taken
    # relative to a thousandth of the largest tensor's gradient norm.
    floor = 1e-3 * max(float(g.double().norm()) for g in grads.values())
    for rank in (0, 1):
        got = torch.load(out / f"grads{rank}.pt")
        assert set(got) == set(grads)
        for k, g in grads.items():
            worst[(rank, k)] = float((got[k].double() - g.double()).norm()) / max(float(g.double().norm()), floor)
    bad = {k: v for k, v in worst.items() if v > 1e-2}
    assert not bad, f"{name}: gradients differ from the released two-GPU step (rank, tensor: relative error): {bad}"
    # The weights and buffers after the step. AdamW's first step moves a weight by lr * g / (|g| + eps): where a
    # gradient is within rounding of zero its sign, and the weight, may differ, so weights are compared where the
    # signs agree and both |g| are above 10% of the tensor's largest (float32 rounding moves single elements of
    # SLidR's gradients by up to 6% of it; the gradients themselves are checked above).
    g0 = torch.load(out / "grads0.pt")
    assert set(ddp) == set(ref)
    moved = max(float((ref[k].double() - before[k].double()).abs().max()) for k in ref if ref[k].is_floating_point())
    assert moved > 1e-4, "the step must change the weights, or the comparison says nothing"
    for k in ref:
        if not ref[k].is_floating_point():
            assert torch.equal(ddp[k], ref[k]), k
            continue
        sure = torch.ones_like(ref[k], dtype=torch.bool)
        if k in grads:  # and where the gradient is not within Adam's eps (1e-8) of zero, where g / (|g| + eps) is not
            g = grads[k]
            big = 0.1 * float(g.abs().max())
            sure = (torch.sign(g0[k]) == torch.sign(g)) & (g.abs() >= big) & (g0[k].abs() >= big)
            if float(g.double().norm()) < floor:  # a zero gradient in truth: Adam steps by the rounding's sign
                sure &= False
        # Tensors without a gradient (an EMA teacher, running statistics) inherit a little of the students' rounding
        # elements through their updates: 1e-5.
        torch.testing.assert_close(ddp[k][sure], ref[k][sure], rtol=1e-4, atol=1e-6 if k in grads else 1e-5,
                                   msg=lambda m, k=k: f"{name} {k}: {m}")
    # the run says its scale: the configuration line and the final metrics
    first = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert (first["world_size"], first["global_batch"], first["rank_batch"]) == (2, B, B // 2)
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["world_size"], metrics["global_batch"], metrics["rank_batch"]) == (2, B, B // 2)


def test_a_global_batch_that_does_not_divide_is_refused():
    with pytest.raises(distributed.BatchSplitError, match="batch_size 5 is the global batch.*multiple of 2"):
        distributed.rank_batch(5, world_size=2)
    assert distributed.rank_batch(6, world_size=2) == 3 and distributed.rank_batch(5) == 5


def _bn_ranks(rank: int, world: int, port: int, x: torch.Tensor, result_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=0.3), nn.Linear(4, 1))
        net = distributed.convert_sync_batchnorm(net, torch.device("cpu"))
        assert isinstance(net[1], distributed.GlobalBatchNorm)
        half = x[rank * 3:(rank + 1) * 3]
        loss = (net(half) ** 2).mean()
        loss.backward()
        grads = [p.grad.clone() for p in net.parameters()]
        for g in grads:  # DDP's average
            dist.all_reduce(g)
            g /= world
        torch.save({"grads": grads, "running": (net[1].running_mean, net[1].running_var)},
                   Path(result_dir, f"{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_global_batchnorm_is_batchnorm_over_the_global_batch(tmp_path):
    """Two gloo ranks with 3 rows each: the averaged gradients and running statistics equal one process's plain
    BatchNorm over the 6 rows with the loss averaged over the two halves (what nn.SyncBatchNorm computes on GPUs)."""
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    mp.spawn(_bn_ranks, args=(2, free_port(), x, str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=0.3), nn.Linear(4, 1))
    y = net(x)
    (0.5 * ((y[:3] ** 2).mean() + (y[3:] ** 2).mean())).backward()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"{rank}.pt")
        for g, p in zip(got["grads"], net.parameters(), strict=True):
            torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got["running"][0], net[1].running_mean)
        torch.testing.assert_close(got["running"][1], net[1].running_var)
    # a per-rank BatchNorm would not: its statistics come from 3 rows
    torch.manual_seed(0)
    local = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=0.3), nn.Linear(4, 1))
    local(x[:3])
    assert not torch.allclose(local[1].running_mean, net[1].running_mean)
