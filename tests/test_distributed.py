"""Multi-process training with PyTorch's own stack (train/distributed.py): ``torchrun`` starts two
CPU processes (gloo), DDP averages their gradients, each reads its own shards, rank 0 alone writes,
and a run resumes with each rank's RNG stream. The same code runs NCCL on GPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distillkit.train import distributed
from tests.conftest import free_port


def torchrun(*args: str, nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "distillkit", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_torchrun_trains_slidr_on_two_processes_and_resumes(slidr_shards, tmp_path):
    shards = json.loads((slidr_shards / "index.json").read_text())["shards"]
    assert len(shards) >= 2, "each rank needs a shard of its own"
    out = tmp_path / "run"
    base = ["train", "slidr", "--shards", str(slidr_shards), "--split", "all", "--out", str(out), "--log-every", "1"]
    first = torchrun(*base, "--max-steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("step=2") == 1, first.stdout  # metrics printed by rank 0 only
    assert "world_size=2 global_batch=2 rank_batch=1" in first.stdout, first.stdout  # the run says its scale
    assert first.stderr.count("JPEG decoding:") == 1, first.stderr  # start-up messages once, from rank 0
    steps = [json.loads(line).get("step") for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2], steps  # one log, written once (rank 0), not once per rank
    ckpt = torch.load(out / "latest.pt", weights_only=False)
    assert len(ckpt["rng_ranks"]) == 2 and ckpt["step"] == 2
    # the two ranks drew different random streams (seed + rank)
    assert not torch.equal(ckpt["rng_ranks"][0]["torch"], ckpt["rng_ranks"][1]["torch"])
    # and each rank's data stream position (the resume below continues each rank's stream from its own)
    assert [s["rank"] for s in ckpt["stream_ranks"]] == [0, 1] and "stream" not in ckpt
    resumed = torchrun(*base, "--max-steps", "3", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(out / "latest.pt", weights_only=False)["step"] == 3
    from click.testing import CliRunner

    from distillkit.pipelines.cli import main

    alone = CliRunner().invoke(main, [*base, "--max-steps", "4", "--resume"])  # one process, no torchrun
    assert alone.exit_code == 2 and "saved by 2 process(es); resume it with as many, not 1" in alone.output



def _collectives(rank: int, world: int, port: int, result_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        rows = torch.full((rank + 1, 3), float(rank))  # rank 0 has 1 row, rank 1 has 2
        gathered = distributed.gather_rows(rows)
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        distributed.check_in_sync(model)  # equal: passes
        if rank == 1:
            with torch.no_grad():
                model.bias[0] += 1e-6
        try:
            distributed.check_in_sync(model)
            caught = ""
        except RuntimeError as exc:
            caught = str(exc)
        Path(result_dir, f"{rank}.json").write_text(json.dumps({"gathered": gathered.tolist(), "caught": caught}))
    finally:
        dist.destroy_process_group()


def test_gather_rows_and_the_sync_check_across_processes(tmp_path):
    mp.spawn(_collectives, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got["gathered"] == [[0.0] * 3, [1.0] * 3, [1.0] * 3]  # rank order, unequal row counts kept
        assert "rank 1's parameter bias differs" in got["caught"]


def test_one_process_changes_nothing():
    assert distributed.ranks() == distributed.Ranks(0, 1, 0)
    x = torch.arange(6.0).reshape(3, 2)
    assert distributed.gather_rows(x) is x
    method = torch.nn.Linear(2, 1)
    method.loss = lambda batch: method(batch).sum()  # type: ignore[method-assign]
    assert not isinstance(distributed.wrap(method, torch.device("cpu")), torch.nn.parallel.DistributedDataParallel)


@pytest.mark.parametrize("device", ["cpu"])
def test_join_without_torchrun_is_a_no_op(device, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.join(device) == distributed.Ranks() and not dist.is_initialized()


def _uniseg_batch():
    import tempfile

    import cv2
    import numpy as np

    from distillkit.preprocess.patch_features import StatsBackbone, grid_for, resize_to_grid
    from distillkit.preprocess.uniap import uniap
    from distillkit.sensors.synth.images import make_images
    from distillkit.train.uniseg_data import ViewConfig, collate, make_example

    root = make_images(Path(tempfile.mkdtemp()) / "images", seed=2)
    backbone, items = StatsBackbone(8), []
    for i, p in enumerate(sorted(root.glob("images/scene_000[0-1].jpg"))):
        rgb = cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB)
        feats = backbone([resize_to_grid(rgb, grid_for(*rgb.shape[:2], 8, 128), 8)])[0]
        items.append(make_example(rgb, uniap(feats), ViewConfig(), np.random.default_rng(i)))
    return collate(items)


def _uniseg_steps(rank: int, world: int, port: int, batch: dict, empty_on: list[int], result_dir: str) -> None:
    import datetime

    from distillkit.train.uniseg import UnisegTrainer, build_method

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        method = build_method(UnisegTrainer.resolve_config({}), total_steps=10).train()
        forward = distributed.wrap(method, torch.device("cpu"))
        opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
        pairs = []
        for step in range(4):
            b = dict(batch)
            if step == 2 and rank in empty_on:  # no region reaches into any crop on this rank
                b["valid"] = torch.zeros_like(b["valid"])
            loss = forward(b)
            opt.zero_grad()
            loss.backward()
            opt.step()
            pairs.append(method.last_pairs)
        distributed.check_in_sync(method)
        Path(result_dir, f"{rank}.json").write_text(json.dumps({"pairs": pairs, "center": method.loss_fn.center.sum()
                                                                .item()}))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("empty_on", [[1], [0, 1]], ids=["one-rank", "every-rank"])
def test_a_uniseg_step_without_pairs_keeps_the_ranks_in_step(tmp_path, empty_on):
    """A step where no region reaches into a crop distils nothing, but under DDP's static graph every rank
    must still use the same parameters and join the centre's all-reduce, or the next step fails."""
    mp.spawn(_uniseg_steps, args=(2, free_port(), _uniseg_batch(), empty_on, str(tmp_path)), nprocs=2, join=True)
    got = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    for rank in (0, 1):
        assert (got[rank]["pairs"][2] == 0) == (rank in empty_on) and got[rank]["pairs"][3] > 0
    assert got[0]["center"] == got[1]["center"]  # the centre is all-reduced: equal on every rank


def _one_shard_copy(slidr_shards: Path, dst: Path, keep: int = 1) -> Path:
    """``slidr_shards`` cut to its first ``keep`` shards, index.json rewritten to match."""
    index = json.loads((slidr_shards / "index.json").read_text())
    index["shards"] = index["shards"][:keep]
    index["counts"]["written"] = sum(s["samples"] for s in index["shards"])
    dst.mkdir()
    for s in index["shards"]:
        (dst / s["file"]).write_bytes((slidr_shards / s["file"]).read_bytes())
    (dst / "index.json").write_text(json.dumps(index))
    return dst


def test_torchrun_with_fewer_shards_than_ranks_is_one_line(slidr_shards, tmp_path):
    one = _one_shard_copy(slidr_shards, tmp_path / "one")
    written = json.loads((one / "index.json").read_text())["counts"]["written"]
    out = tmp_path / "run"
    r = torchrun("train", "slidr", "--shards", str(one), "--split", "all", "--out", str(out), timeout=300)
    assert r.returncode != 0
    ours = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert ours == [
        f"error: {one} holds 1 shard(s), but 2 ranks x 1 loader worker(s) need at least 2 (rank r reads "
        f"shards[r::2], and each of its loader workers needs one of them): rebuild it with a smaller "
        f"output.samples_per_shard (now 4), at most {written // 2} for its {written} samples (--set "
        f"output.samples_per_shard={written // 2}), or start fewer ranks or loader workers (--num-workers)"], r.stderr
    assert "this rank has no shard" not in r.stderr and "Traceback" not in r.stdout
    # the only traceback is torchrun's own report of the failed children: no frame of distillkit's
    frames = [line for line in r.stderr.splitlines() if line.strip().startswith('File "')]
    assert all("/torch/" in f or "<frozen" in f for f in frames), frames
    assert not out.exists()  # refused before anything was written


def test_shard_count_check_counts_loader_workers(slidr_shards, tmp_path):
    from distillkit.train.streaming import ShardStream, TooFewShards, check_shard_count, make_loader

    two = _one_shard_copy(slidr_shards, tmp_path / "two", keep=2)
    check_shard_count(two, 1, 8)  # one process: a worker without a shard just ends
    check_shard_count(two, 2, 0)  # in-process loading counts as one worker: 2 >= 2 x 1
    check_shard_count(two, 2, 1)
    with pytest.raises(TooFewShards, match=r"holds 2 shard\(s\), but 2 ranks x 2 loader worker\(s\) need at least 4"):
        check_shard_count(two, 2, 2)
    stream = ShardStream(two, rank=1, world_size=2)
    with pytest.raises(TooFewShards, match="need at least 6"):  # callers that skip the CLI's check
        make_loader(stream, 1, list, num_workers=3)
    make_loader(stream, 1, list, num_workers=1)
