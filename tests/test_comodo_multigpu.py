"""COMODO under torchrun: the gathered bank makes a global batch on N ranks compute one GPU's loss with batch B."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distillkit.train.comodo import ComodoTrainer, comodo_loss
from tests.conftest import free_port


def _setup(seed: int = 0) -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = torch.nn.Linear(12, 8)
    with torch.no_grad():
        student.weight.copy_(torch.randn(8, 12, generator=g))
        student.bias.copy_(torch.randn(8, generator=g))
    x = torch.randn(6, 12, generator=g)
    z_t = F.normalize(torch.randn(6, 8, generator=g), dim=1)
    queue = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    return student, x, z_t, queue


def _grad(student: torch.nn.Linear, loss: torch.Tensor) -> torch.Tensor:
    student.zero_grad()
    loss.backward()
    return student.weight.grad.clone()


def _rank_mean_grad(gathered: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(one process with batch 6, mean of two ranks' gradients on 3 each): what DDP's averaging gives."""
    student, x, z_t, queue = _setup()
    full = _grad(student, comodo_loss(F.normalize(student(x), dim=1), z_t, queue))
    grads = []
    for half in (slice(0, 3), slice(3, 6)):
        z_s = F.normalize(student(x[half]), dim=1)
        grads.append(_grad(student, comodo_loss(z_s, z_t[half], queue, batch_bank=z_t if gathered else None)))
    return full, (grads[0] + grads[1]) / 2


def test_gathered_bank_equals_one_process_batch() -> None:
    full, ranks = _rank_mean_grad(gathered=True)
    torch.testing.assert_close(ranks, full, rtol=1e-5, atol=1e-6)


def test_rank_local_bank_differs() -> None:
    # Each rank's bank with only its own half: the other half's targets are missing, so the step differs.
    full, ranks = _rank_mean_grad(gathered=False)
    assert (ranks - full).abs().max() > 1e-4


def test_default_bank_is_the_batch() -> None:
    _, _, z_t, queue = _setup()
    z_s = F.normalize(torch.randn(6, 8), dim=1)
    assert torch.equal(comodo_loss(z_s, z_t, queue), comodo_loss(z_s, z_t, queue, batch_bank=z_t))


def test_effective_config_and_sources() -> None:
    config = ComodoTrainer.resolve_config({})
    assert ComodoTrainer.effective_config(config)["sync_batchnorm"] is True
    assert ComodoTrainer.effective_config({**config, "sync_batchnorm": False})["sync_batchnorm"] is False
    sources = ComodoTrainer.config_sources(config)
    assert set(ComodoTrainer.effective_config(config)) <= set(sources)
    assert "train.py:44" in sources["queue_size"] and "16384" in sources["queue_size"]
    assert all("Breezelled/COMODO" in v or v.startswith("distillkit's choice") for v in sources.values())


# --------------------------------------------------------------------------- two gloo processes

def _comodo_inputs() -> tuple[dict, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    batch = {"imu": torch.randn(8, 6, 64, generator=g), "teacher": torch.randn(8, 16, generator=g)}
    return batch, torch.randn(5, 16, generator=g)  # global batch 8, raw teacher embeddings of the queue


def _comodo_step(batch: dict, raw_queue: torch.Tensor, rank: int = 0, world: int = 1, sync_bn: bool = True) -> dict:
    """One SGD step of COMODO (small size) on this rank's share of ``batch``; weights and queue after it."""
    from distillkit.train import distributed
    from distillkit.train.comodo import SIZES, Comodo

    method = Comodo(SIZES["small"], 16, torch.zeros(5, 128), torch.zeros(6), torch.ones(6), 0.05, 0.1, seed=0)
    method.fill_queue(raw_queue)
    method.train()
    if sync_bn:
        method = distributed.convert_sync_batchnorm(method, torch.device("cpu"))
    forward = distributed.wrap(method, torch.device("cpu"))
    share = len(batch["imu"]) // world
    mine = {k: v[rank * share:(rank + 1) * share] for k, v in batch.items()}
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    loss = forward(mine)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return {"params": torch.cat([p.detach().flatten() for p in method.student.parameters()]),
            "running_mean": method.student.head[1].running_mean.clone(), "queue": method.queue.clone()}


def _comodo_rank(rank: int, world: int, port: int, batch: dict, raw_queue: torch.Tensor, sync_bn: bool,
                 result_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        torch.save(_comodo_step(batch, raw_queue, rank, world, sync_bn), f"{result_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_take_the_step_of_one_process_with_the_global_batch(tmp_path) -> None:
    import torch.multiprocessing as mp

    batch, raw_queue = _comodo_inputs()
    reference = _comodo_step(batch, raw_queue)  # one process, batch 8: the release on one GPU
    mp.spawn(_comodo_rank, args=(2, free_port(), batch, raw_queue, True, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"{rank}.pt")
        torch.testing.assert_close(got["params"], reference["params"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got["running_mean"], reference["running_mean"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got["queue"], reference["queue"], rtol=0, atol=1e-6)  # same FIFO on every rank
    # the test can fail: a rank-local step (4 samples, per-rank BatchNorm) moves the weights elsewhere
    alone = _comodo_step({k: v[:4] for k, v in batch.items()}, raw_queue, sync_bn=False)
    assert (alone["params"] - reference["params"]).abs().max() > 1e-4
