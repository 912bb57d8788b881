"""Resume time does not grow with the step: one run (synthetic shards of small camera JPEGs, decoded in the loader,
a linear model) checkpointed at step 10 and at step 1,000, each resumed for one new step; the time from the call to
the end of that step (checkpoint load, loader start, the stream's replay, one step, one save). Both checkpoints sit
at the same place inside their epoch (the data is 990 samples, 4 per batch: step 1,000 is step 10 of epoch 4),
because replaying the open epoch's raw reads is the part that remains (at most one epoch of tar reads, no decoding).
The reference for the second figure is the old resume, a fast-forward that decodes and collates every batch
consumed (the same checkpoint without its stream position).

    .venv/bin/python bench/run.py --device cpu --only resume
"""

from __future__ import annotations

import shutil
import time

import torch

from bench.suite.common import Context, Figure, Result, recorded_shards, synthetic_jpeg

TITLE = "Resume from the stream position (time to the first new step)"
BATCH = 4


def _make_sample(n: int, jpegs: list[bytes]) -> dict[str, bytes]:
    import json

    return {"cam.jpg": jpegs[n % len(jpegs)], "meta.json": json.dumps({"n": n}).encode()}


def _transform(sample, rng, gen):
    image = torch.from_numpy(sample["cam.jpg"]).float().mean(dim=(0, 1)) / 255  # (3,): the decoded picture's mean
    return torch.cat([image, torch.tensor([sample["meta.json"]["n"] % 7 / 7.0])])


class _Linear(torch.nn.Module):
    """The model trained: one linear layer on the 4 numbers ``_transform`` makes of a sample (the loader, not the
    model, is what this entry measures)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        return (self.lin(batch) ** 2).mean()


def _model() -> _Linear:
    """A fresh ``_Linear`` with the same initial weights every call."""
    torch.manual_seed(0)
    return _Linear()


def _train(folder, out, max_steps: int, resume: bool) -> float:
    from distillkit.train.loop import LoopConfig, train_loop
    from distillkit.train.streaming import ShardStream, make_loader

    model = _model()
    stream = ShardStream(folder, seed=0, shuffle_buffer=32, transform=_transform)
    cfg = LoopConfig(max_steps=max_steps, optimizer="sgd", lr=0.01, out=out, resume=resume, log_every=0)
    t = time.perf_counter()
    train_loop(model, lambda: make_loader(stream, BATCH, torch.stack), cfg)
    return time.perf_counter() - t


def run(ctx: Context) -> Result:
    import logging

    from distillkit.train.checkpoint import load_checkpoint, save_checkpoint

    per_shard, shards = 55, 18  # 990 samples: step 10 and step 10 + 990 (= 1,000) are 40 samples into an epoch
    late = 10 + 990 // 2 if ctx.quick else 1000  # quick: 505 steps, 2,020 samples, also 40 into an epoch
    h, w = (360, 640)
    jpegs = [synthetic_jpeg(h, w, seed) for seed in range(4)]
    folder = recorded_shards(ctx.scratch("resume-shards"), shards, per_shard, lambda n: _make_sample(n, jpegs))
    logging.getLogger("distillkit.train.loop").setLevel(logging.WARNING)
    work = ctx.scratch("resume-runs")
    shutil.rmtree(work, ignore_errors=True)
    run_dir = work / "run"
    train_s = _train(folder, run_dir, 10, False)  # the run's first 10 steps, checkpoint at 10
    early = work / "at-10"
    shutil.copytree(run_dir, early)
    train_s += _train(folder, run_dir, late, True)  # on to the late checkpoint
    late_dir = work / f"at-{late}"
    shutil.copytree(run_dir, late_dir)
    st = load_checkpoint(late_dir / "latest.pt")
    assert st["stream"]["workers"][0]["emitted"] == load_checkpoint(early / "latest.pt")["stream"]["workers"][0][
        "emitted"], "the two checkpoints must sit at the same place in their epochs"

    def resume_once(src, extra: int = 1) -> float:
        dst = work / "resume"
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
        steps = int(load_checkpoint(dst / "latest.pt")["step"])
        return _train(folder, dst, steps + extra, True)

    early_s, late_s = [], []
    for _ in range(5):  # alternated, least of each: the two see the same machine load
        early_s.append(resume_once(early))
        late_s.append(resume_once(late_dir))
    t_early, t_late = min(early_s), min(late_s)
    no_position = work / "no-position"
    shutil.copytree(late_dir, no_position)
    save_checkpoint(no_position / "latest.pt", {k: v for k, v in st.items() if k != "stream"})
    t_ff = resume_once(no_position)
    res = Result(TITLE, extra={"samples": shards * per_shard, "batch": BATCH, "late_step": late,
                               "training_s": train_s, "torch_threads": torch.get_num_threads()})
    res.figures.append(Figure(f"resume at step {late}", t_late, "s", "resume at step 10 of the same run", t_early,
                              note="ratio ~1: independent of the step"))
    res.figures.append(Figure(f"resume at step {late} from the stream position", t_late, "s",
                              "the same checkpoint without its position (fast-forward, decodes every batch)", t_ff))
    return res
