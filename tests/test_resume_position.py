"""Resume from the stream position kept in the checkpoint: the uninterrupted run's batches, bit for bit, without
decoding what was consumed (train.streaming "Resuming from a stream position", train.loop)."""

from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from distillkit.train.checkpoint import load_checkpoint, save_checkpoint
from distillkit.train.loop import LoopConfig, train_loop
from distillkit.train.streaming import ShardStream, make_loader
from tests.test_train_loop import Tiny, _collate
from tests.test_train_streaming import write_shards

DECODED: list[str] = []  # keys the transform saw in this process (num_workers=0)


class Crash(RuntimeError):
    pass


class Crashing(Tiny):
    """Tiny that dies in its ``crash_at``-th loss: the loop drew its batch from the real loader, so the checkpoint
    holds the loader's position (a crashing wrapper around the loader would hide it)."""

    def __init__(self, crash_at: int | None):
        super().__init__()
        self.crash_at, self.calls = crash_at, 0

    def loss(self, batch):
        self.calls += 1
        if self.crash_at is not None and self.calls == self.crash_at:
            raise Crash
        return super().loss(batch)


def _transform(sample, rng, gen):
    n = sample["x.json"]["n"]
    DECODED.append(sample["__key__"])
    if n % 7 == 3:  # a bad sample found only once decoded
        raise ValueError("n % 7 == 3")
    x = torch.tensor([n / 10, (n % 3) / 3, rng.normal(), float(torch.rand(1, generator=gen))], dtype=torch.float32)
    return x, torch.tensor(float(n % 5))


def _sample(key, rng):
    n = int(key[1:])
    if n % 11 == 5:  # a bad sample found before decoding (no x.json)
        return {"__key__": key, "y.json": b"{}"}
    return {"__key__": key, "x.json": json.dumps({"n": n, "part": "a" if n % 4 else "b"}).encode()}


def _select(raw):
    return json.loads(raw["x.json"])["part"] == "a"


def _run(shards, out, max_steps, *, resume=False, crash_at=None, num_workers=0, batch=3, select=False,
         hold_out=(), interleave=1, ckpt_every=3, plain_loader=False, rank=0, world_size=1):
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    model = Crashing(crash_at)
    stream = ShardStream(shards, seed=7, shuffle_buffer=4, transform=_transform, required=["x.json"],
                         select=_select if select else None, hold_out=hold_out, interleave=interleave, rank=rank,
                         world_size=world_size)
    cfg = LoopConfig(max_steps=max_steps, optimizer="sgd", lr=0.05, warmup_steps=2, ckpt_every=ckpt_every, out=out,
                     resume=resume, log_every=0)
    if plain_loader:  # a make_batches whose loader keeps no position (and cannot take one)
        def batches():
            return torch.utils.data.DataLoader(stream, batch_size=batch, collate_fn=_collate, drop_last=True,
                                               generator=torch.Generator().manual_seed(0))
    else:
        def batches():
            return make_loader(stream, batch, _collate, num_workers=num_workers, timeout=60)
    metrics = train_loop(model, batches, cfg, batch_size=lambda b: len(b[0]))
    return model, metrics, stream


def _same(a, b):
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), k


def _crash_and_resume(shards, tmp_path, max_steps, crash_at, saved_step, caplog=None, **kw):
    """The uninterrupted run and the crashed-then-resumed one: their streams, the keys the resumed one decoded and
    the checkpoint it resumed from. With ``caplog``, the resumed run's warnings are captured there (and only
    they)."""
    full, m, s_full = _run(shards, tmp_path / "a", max_steps, **kw)
    with pytest.raises(Crash):
        _run(shards, tmp_path / "b", max_steps, crash_at=crash_at, **kw)
    st = load_checkpoint(tmp_path / "b" / "latest.pt")
    assert st["step"] == saved_step and st["stream"]["format"] == 1
    DECODED.clear()
    if caplog is not None:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="distillkit.train.streaming"):
            resumed, m2, s_res = _run(shards, tmp_path / "b", max_steps, resume=True, **kw)
    else:
        resumed, m2, s_res = _run(shards, tmp_path / "b", max_steps, resume=True, **kw)
    assert m2["step"] == max_steps
    _same(full, resumed)
    assert m["loss"] == m2["loss"]
    return s_full, s_res, list(DECODED), st


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_from_position_matches_uninterrupted_and_decodes_nothing_consumed(tmp_path, num_workers, caplog):
    shards = write_shards(tmp_path / "shards", [5, 4, 6], make=_sample)  # bad samples of both kinds throughout
    # saved at step 9: with 2 workers the next batch is worker 1's, which a fresh iterator would not start with
    s_full, s_res, decoded, st = _crash_and_resume(shards, tmp_path, 14, 11, 9, caplog=caplog,
                                                   num_workers=num_workers)
    if num_workers == 0:
        # 5 steps x 3 samples, plus the bad ones among them: not the 14 x 3 a fast-forward decodes
        assert 15 <= len(decoded) < 21, len(decoded)
        # the counters continue from the saved position: same totals as the uninterrupted run
        assert (s_res.bad_samples, s_res.skipped) == (s_full.bad_samples, s_full.skipped) and s_full.bad_samples > 2
        # the replay of consumed reads reports nothing again: each bad sample met after it continues the count
        saved = st["stream"]["workers"][0]["bad_samples"]
        counts = [int(n) for n in re.findall(r"skipping bad sample \((\d+) so far\)", caplog.text)]
        assert counts and min(counts) == saved + 1, (saved, counts)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_after_several_epochs(tmp_path, num_workers):
    shards = write_shards(tmp_path / "shards", [5, 4, 6], make=_sample)  # ~11 good samples: an epoch is ~3 steps
    _, _, decoded, _ = _crash_and_resume(shards, tmp_path, 30, 28, 25, num_workers=num_workers, batch=4, ckpt_every=5)
    if num_workers == 0:
        assert len(decoded) < 5 * 4 + 8, len(decoded)  # 5 steps left; 25 steps were not decoded again


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_with_select_hold_out_and_interleave(tmp_path, num_workers):
    shards = write_shards(tmp_path / "shards", [6, 6, 6, 6], make=_sample)
    kw = {"num_workers": num_workers, "select": True, "hold_out": {"k00001", "k00009", "k00014"}, "interleave": 2}
    # step 3 is inside epoch 0 (hold-out active), step 15 after it
    _crash_and_resume(shards, tmp_path / "in", 8, 6, 3, **kw)
    s_full, s_res, _, _ = _crash_and_resume(shards, tmp_path / "after", 17, 17, 15, **kw)
    if num_workers == 0:
        assert s_full.held_out == s_res.held_out == 3 and s_full.skipped == s_res.skipped > 0


def test_checkpoint_without_position_resumes_by_fast_forward(tmp_path, caplog):
    """A checkpoint written before positions existed: the old fast-forward, said in the log, same weights."""
    shards = write_shards(tmp_path / "shards", [5, 4, 6], make=_sample)
    full, _, _ = _run(shards, tmp_path / "a", 14)
    with pytest.raises(Crash):
        _run(shards, tmp_path / "b", 14, crash_at=11, ckpt_every=4)
    st = load_checkpoint(tmp_path / "b" / "latest.pt")
    save_checkpoint(tmp_path / "b" / "latest.pt", {k: v for k, v in st.items() if k not in ("stream",)})
    DECODED.clear()
    with caplog.at_level(logging.INFO, logger="distillkit.train.loop"):
        resumed, _, _ = _run(shards, tmp_path / "b", 14, resume=True)
    assert "holds no data stream position" in caplog.text and "fast-forwarding" in caplog.text
    assert len(DECODED) >= 14 * 3  # the consumed batches were decoded again
    _same(full, resumed)


def test_position_for_a_loader_that_takes_none_resumes_by_fast_forward(tmp_path, caplog):
    """A checkpoint with a position, resumed by a make_batches whose loader cannot take one: said as such."""
    shards = write_shards(tmp_path / "shards", [5, 4, 6], make=_sample)
    full, _, _ = _run(shards, tmp_path / "a", 10, plain_loader=True)
    with pytest.raises(Crash):
        _run(shards, tmp_path / "b", 10, crash_at=8)
    assert "stream" in load_checkpoint(tmp_path / "b" / "latest.pt")
    with caplog.at_level(logging.INFO, logger="distillkit.train.loop"):
        resumed, _, _ = _run(shards, tmp_path / "b", 10, resume=True, plain_loader=True)
    assert "holds a data stream position, but this loader (DataLoader) cannot resume from one" in caplog.text
    assert "holds no data stream position" not in caplog.text and "fast-forwarding" in caplog.text
    _same(full, resumed)  # the plain loader gives the same batches: the fast-forward continues them exactly


@pytest.mark.parametrize("saved,now", [(2, 0), (0, 1)])
def test_position_of_another_loader_layout_falls_back_to_fast_forward(tmp_path, caplog, saved, now):
    """Another --num-workers (as given: 0 loads in-process, 1 in a worker) cannot use the position: the run goes on
    by fast-forwarding, warning that its batches differ from an uninterrupted run's, instead of refusing (the
    checkpoint's digest forbids editing it, so a refusal would leave no way to continue)."""
    shards = write_shards(tmp_path / "shards", [5, 4, 6], make=_sample)
    with pytest.raises(Crash):
        _run(shards, tmp_path / "b", 8, crash_at=5, num_workers=saved)
    assert load_checkpoint(tmp_path / "b" / "latest.pt")["stream"]["num_workers"] == saved
    DECODED.clear()
    with caplog.at_level(logging.INFO, logger="distillkit.train.loop"):
        _, metrics, _ = _run(shards, tmp_path / "b", 8, resume=True, num_workers=now)
    assert metrics["step"] == 8
    assert re.search(rf"latest\.pt: its data stream position does not fit this loader \(saved with num_workers "
                     rf"{saved} \(now {now}\)\): fast-forwarding .* the batch sequence will differ", caplog.text)
    assert all("\n" not in r.getMessage() for r in caplog.records)
    if now == 0:
        assert len(DECODED) >= 8 * 3  # the 3 consumed batches were decoded again, then 5 new ones


def test_loader_state_round_trip_without_training(tmp_path):
    """The loader alone: batches after ``load_stream_state`` are those an uninterrupted iterator gives next."""
    shards = write_shards(tmp_path / "shards", [5, 4, 6, 3], make=_sample)

    def loader(workers):
        stream = ShardStream(shards, seed=3, shuffle_buffer=5, transform=_transform, required=["x.json"])
        return make_loader(stream, 2, _collate, num_workers=workers, timeout=60)

    for workers in (0, 3):
        whole = [b[0] for _, b in zip(range(20), loader(workers), strict=False)]
        first = loader(workers)
        it = iter(first)
        for _ in range(7):
            next(it)
        state = first.stream_state()
        json.dumps(state)  # plain data: fits a weights_only checkpoint
        again = loader(workers)
        again.load_stream_state(state)
        rest = [b[0] for _, b in zip(range(13), again, strict=False)]
        assert all(torch.equal(a, b) for a, b in zip(whole[7:], rest, strict=True)), workers
        assert state["next_worker"] == (7 % workers if workers else 0)


def _two_ranks(rank: int, world: int, port: int, shards: str, tmp: str) -> None:
    """One of two gloo ranks: for 0 and 2 loader workers, the uninterrupted run, the run that crashes at step 7
    (both ranks: the checkpoint of step 6 holds both ranks' positions) and its resume; what each saw, to a file."""
    import multiprocessing

    import torch.distributed as dist

    # A process mp.spawn started defaults to spawning its own children, which would re-import torch in every
    # loader worker (seconds each); torchrun's processes fork their loader workers, as here.
    multiprocessing.set_start_method("fork", force=True)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("distillkit.train.loop").addHandler(handler)
    logging.getLogger("distillkit.train.loop").setLevel(logging.INFO)
    got = {}
    try:
        for workers in (0, 2):
            kw = {"num_workers": workers, "batch": 2, "rank": rank, "world_size": world}
            root = Path(tmp, f"w{workers}")
            full, _, _ = _run(shards, root / "a", 12, **kw)
            try:
                _run(shards, root / "b", 12, crash_at=7, **kw)
            except Crash:
                pass
            seen.clear()
            DECODED.clear()
            resumed, _, _ = _run(shards, root / "b", 12, resume=True, **kw)
            got[workers] = {"same": all(torch.equal(x, y) for x, y in zip(full.state_dict().values(),
                                                                         resumed.state_dict().values(), strict=True)),
                            "from_position": any("resumed at its saved position" in m for m in seen),
                            "decoded": len(DECODED)}
        Path(tmp, f"{rank}.json").write_text(json.dumps(got))
    finally:
        dist.destroy_process_group()


def test_two_ranks_resume_each_from_its_own_position(tmp_path):
    """Under two processes the checkpoint keeps one position per rank (``stream_ranks``) and a resume hands each
    rank its own: both ranks continue without decoding what they consumed, to the uninterrupted run's weights."""
    import torch.multiprocessing as mp

    from tests.conftest import free_port

    shards = write_shards(tmp_path / "shards", [5, 4, 6, 3, 7, 5], make=_sample)
    mp.spawn(_two_ranks, args=(2, free_port(), str(shards), str(tmp_path)), nprocs=2, join=True)
    for workers in (0, 2):
        st = load_checkpoint(tmp_path / f"w{workers}" / "b" / "latest.pt")  # the resumed run's, at step 12
        ranks = st["stream_ranks"]
        assert "stream" not in st and [r["rank"] for r in ranks] == [0, 1] and ranks[0] != ranks[1]
        assert all(r["world_size"] == 2 and r["num_workers"] == workers for r in ranks)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        for workers in ("0", "2"):
            assert got[workers]["same"] and got[workers]["from_position"], (rank, workers, got)
        # 6 steps x 2 samples (and the bad ones among them) decoded on resume, not the 12 x 2 of a fast-forward
        assert got["0"]["decoded"] < 12 * 2, (rank, got)
