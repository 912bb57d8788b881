"""Training loop: resume gives bit-identical weights to an uninterrupted run; weights_only checkpoints."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest
import torch
from torch import nn

from distillkit.train.checkpoint import load_checkpoint
from distillkit.train.loop import LoopConfig, cosine_lambda, train_loop
from distillkit.train.streaming import ShardStream, make_loader
from tests.test_train_streaming import write_shards


class Tiny(nn.Module):
    """Regression with dropout (uses the torch RNG) and a numpy/python-random term (uses those RNGs)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))

    def loss(self, batch):
        x, y = batch
        jitter = float(np.random.uniform(0, 1e-3)) + random.uniform(0, 1e-3)
        return ((self.net(x).squeeze(1) - y) ** 2).mean() + jitter * self.net[0].weight.sum()


def _transform(sample, rng, gen):
    n = sample["x.json"]["n"]
    x = torch.tensor([n / 10, (n % 3) / 3, rng.normal(), 1.0], dtype=torch.float32)  # rng: augmentation noise
    return x, torch.tensor(float(n % 5))


def _collate(items):
    return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])


class Crash(RuntimeError):
    pass


def _run(shards, out, max_steps, resume=False, crash_after=None, num_workers=0, log_every=0, run_config=None):
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    model = Tiny()
    stream = ShardStream(shards, seed=7, shuffle_buffer=4, transform=_transform)

    def batches():
        dl = make_loader(stream, 3, _collate, num_workers=num_workers, timeout=60)
        for i, b in enumerate(dl):
            if crash_after is not None and i == crash_after:
                raise Crash
            yield b

    cfg = LoopConfig(
        max_steps=max_steps,
        optimizer="sgd",
        lr=0.05,
        warmup_steps=2,
        ckpt_every=4,
        out=out,
        resume=resume,
        log_every=log_every,
        run_config=run_config,
    )
    metrics = train_loop(model, batches, cfg, batch_size=lambda b: len(b[0]))
    return model, metrics


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_matches_uninterrupted(tmp_path, num_workers):
    shards = write_shards(tmp_path / "shards", [5, 4, 6])  # 15 samples: epochs end mid-batch
    full, m = _run(shards, tmp_path / "a", 14, num_workers=num_workers)
    with pytest.raises(Crash):
        _run(shards, tmp_path / "b", 14, crash_after=10, num_workers=num_workers)  # checkpoint at step 8
    assert load_checkpoint(tmp_path / "b" / "latest.pt")["step"] == 8
    resumed, m2 = _run(shards, tmp_path / "b", 14, resume=True, num_workers=num_workers)
    assert m2["step"] == 14
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert m["loss"] == m2["loss"]


def test_checkpoint_is_weights_only(tmp_path):
    shards = write_shards(tmp_path / "shards", [6])
    _, m = _run(shards, tmp_path / "c", 3)
    st = torch.load(m["checkpoint"], weights_only=True)
    assert set(st) == {"model", "optimizer", "scheduler", "step", "rng", "config", "distillkit_digest"}
    assert st["step"] == 3
    assert 0 <= m["data_wait_fraction"] <= 1 and m["samples_per_s"] > 0


def test_cosine_schedule():
    f = cosine_lambda(10, 2, 0.0)
    assert f(0) == 0.5 and f(1) == 1.0 and f(2) == 1.0 and abs(f(10)) < 1e-12 and 0 < f(6) < 1


def test_cosine_over_epochs_matches_torch_cosine_annealing_stepped_per_epoch():
    """SLidR steps CosineAnnealingLR(T_max=epochs) once per epoch; the per-step lambda must give the
    same lr at every step (constant within an epoch)."""
    epochs, spe = 5, 3
    f = cosine_lambda(epochs * spe, 0, 0.0, steps_per_epoch=spe)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for epoch in range(epochs):
        for i in range(spe):
            assert abs(0.5 * f(epoch * spe + i) - opt.param_groups[0]["lr"]) < 1e-12, (epoch, i)
        opt.step()
        ref.step()


def test_stream_with_only_bad_samples_stops_with_a_message(tmp_path):
    shards = write_shards(tmp_path / "shards", [2, 2])
    model = Tiny()
    stream = ShardStream(shards, seed=0, required=["absent.npy"], transform=_transform)  # every sample bad
    cfg = LoopConfig(max_steps=2, optimizer="sgd", lr=0.1, log_every=0)
    with pytest.raises(RuntimeError, match="yields no batch"):
        train_loop(model, lambda: make_loader(stream, 2, _collate), cfg)
    assert stream.bad_samples > 0


def test_first_step_is_left_out_of_throughput_figures():
    def batches():
        time.sleep(0.5)  # loader start-up: only the first batch waits
        while True:
            yield torch.randn(4, 4), torch.randn(4)

    cfg = LoopConfig(max_steps=5, optimizer="sgd", lr=0.01, log_every=0)
    m = train_loop(Tiny(), batches, cfg, batch_size=lambda b: len(b[0]))
    assert m["timed_steps"] == 4 and m["data_wait_fraction"] < 0.5
    assert m["samples_per_s"] > 4 / 0.5  # the 0.5 s start-up is not in the rate


def test_run_log_after_resume_equals_uninterrupted_log(tmp_path):
    """log.jsonl keeps every window; entries the crashed run wrote after its last checkpoint (step 10,
    checkpoint at 8) are dropped on resume, so the log reads as if the run was never interrupted."""
    from distillkit.train.run_log import read_log

    shards = write_shards(tmp_path / "shards", [5, 4, 6])
    _run(shards, tmp_path / "a", 14, log_every=2)
    with pytest.raises(Crash):
        _run(shards, tmp_path / "b", 14, crash_after=11, log_every=2)
    assert [e["step"] for e in read_log(tmp_path / "b")] == [2, 4, 6, 8, 10]
    _run(shards, tmp_path / "b", 14, resume=True, log_every=2)

    def curve(out):
        return [(e["step"], e["loss"], e["lr"]) for e in read_log(out)]

    assert [s for s, _, _ in curve(tmp_path / "a")] == [2, 4, 6, 8, 10, 12, 14]
    assert curve(tmp_path / "b") == curve(tmp_path / "a")
    assert (tmp_path / "b" / "curves.png").stat().st_size > 0
    _run(shards, tmp_path / "b", 4, log_every=2)  # a fresh run in the same directory starts a fresh log
    assert [e["step"] for e in read_log(tmp_path / "b")] == [2, 4]
    # ... including its step-0 configuration line: two fresh runs never leave two runs' lines in one log
    _run(shards, tmp_path / "b", 4, log_every=2, run_config={"run": 1})
    _run(shards, tmp_path / "b", 4, log_every=2, run_config={"run": 2})
    assert [e.get("config") for e in read_log(tmp_path / "b")] == [{"run": 2}, None, None]


class _DecayProbe(nn.Module):
    """A linear layer and a norm whose loss has zero gradient: only weight decay moves them."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        for p in self.parameters():
            nn.init.constant_(p, 1.0)

    def loss(self, batch):
        return sum((p * 0).sum() for p in self.parameters())


@pytest.mark.parametrize("decay_all", [True, False])
def test_norms_and_biases_are_decayed_only_when_asked(decay_all):
    m = _DecayProbe()
    cfg = LoopConfig(max_steps=3, optimizer="adamw", lr=0.1, weight_decay=0.5, grad_clip=None, log_every=0,
                     decay_norm_and_bias=decay_all)
    train_loop(m, lambda: iter([0] * 3), cfg)
    assert (m.lin.weight.detach() < 1.0).all(), "matrices are always decayed"
    for p in (m.lin.bias, m.norm.weight, m.norm.bias):
        assert (p.detach() < 1.0).all() if decay_all else torch.equal(p.detach(), torch.ones_like(p))


def test_weight_decay_follows_a_cosine_to_its_end_value():
    from distillkit.train.loop import weight_decay_at

    cfg = LoopConfig(max_steps=101, weight_decay=0.04, weight_decay_end=0.4)
    assert weight_decay_at(0, cfg) == pytest.approx(0.04)
    assert weight_decay_at(50, cfg) == pytest.approx(0.22)
    assert weight_decay_at(100, cfg) == pytest.approx(0.4)
    assert weight_decay_at(7, LoopConfig(weight_decay=0.1)) == 0.1
    seen = []

    class Record(_DecayProbe):
        def after_step(self, step, max_steps):
            seen.append(self.lin.weight.detach().clone())

    # a constant lr (min_lr_ratio 1): each AdamW step scales the weights by exactly 1 - lr * wd(step)
    cfg = LoopConfig(max_steps=4, optimizer="adamw", lr=0.1, weight_decay=0.1, weight_decay_end=0.9,
                     min_lr_ratio=1.0, grad_clip=None, log_every=0)
    train_loop(Record(), lambda: iter([0] * 4), cfg)
    factors = [float(b[0, 0] / a[0, 0]) for a, b in zip([torch.ones(4, 4)] + seen[:-1], seen, strict=True)]
    assert factors == pytest.approx([1 - 0.1 * weight_decay_at(i, cfg) for i in range(4)], rel=1e-5)
