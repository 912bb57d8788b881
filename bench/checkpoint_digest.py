"""What verifying a checkpoint's digest costs against plain loading, on a paper-size SLidR checkpoint (not a test).

    OMP_NUM_THREADS=1 .venv/bin/python bench/checkpoint_digest.py [--out /tmp/paper.pt] [--reps 7]

The checkpoint is the state ``train/loop.py`` saves for ``train slidr --size paper``: the MinkUNet34 point network,
the frozen ResNet-50 teacher and the decoder (``model``), SGD momentum buffers (``optimizer``), RNG states and the
configuration, about 400 MB. Each line compares ``torch.load(weights_only=True)`` (what ``load_checkpoint`` did
before digests) with ``load_checkpoint`` (the same load, then the digest verified), and ``torch.save`` with
``save_checkpoint`` (the digest computed first): warm page cache, memory-mapped, and the file dropped from the
page cache before each load (``posix_fadvise``, this file only). Plain and verified runs alternate and the minimum
of each is kept (on a shared machine, the run least disturbed); CPU time counts every thread's work.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from distillkit.checkpoint_file import state_digest  # noqa: E402
from distillkit.train.checkpoint import load_checkpoint, rng_state, save_checkpoint  # noqa: E402
from distillkit.train.slidr import build_method  # noqa: E402


def paper_state() -> dict:
    """The entries train_loop saves for a paper-size SLidR run (momentum buffers as after a first step)."""
    method = build_method("paper", 0)
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    for group in opt.param_groups:
        for p in group["params"]:
            opt.state[p]["momentum_buffer"] = torch.randn_like(p)
    return {"model": method.state_dict(), "optimizer": opt.state_dict(), "scheduler": {"last_epoch": 10},
            "step": 10, "rng": rng_state(), "config": {"size": "paper"}}


def evict(path: Path) -> None:
    """Drop ``path``'s pages from the page cache: a job starting on a checkpoint reads it cold."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def compare(name: str, plain, verified, reps: int, before=None) -> None:
    best = {"plain": [float("inf")] * 2, "verified": [float("inf")] * 2}
    for _ in range(reps):
        for key, run in (("plain", plain), ("verified", verified)):
            if before is not None:
                before()
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[key] = [min(best[key][0], wall), min(best[key][1], cpu)]
    (pw, pc), (vw, vc) = best["plain"], best["verified"]
    print(f"{name:5s} plain {pw:.3f} s wall {pc:.3f} s cpu | with digest {vw:.3f} s wall {vc:.3f} s cpu | "
          f"ratio wall {vw / pw:.2f}, cpu {vc / pc:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/distillkit-checkpoint-digest.pt"))
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    out, plain_out, reps = args.out, args.out.with_suffix(".plain.pt"), args.reps
    state = paper_state()
    save_checkpoint(out, state)
    size = out.stat().st_size
    threads = min(8, os.cpu_count() or 1)
    print(f"checkpoint {size / 1e6:.0f} MB; min of {reps}; torch {torch.__version__}; {os.cpu_count()} CPUs, "
          f"{threads} hashing threads")
    compare("load", lambda: torch.load(out, map_location="cpu", weights_only=True), lambda: load_checkpoint(out),
            reps)
    compare("mmap", lambda: torch.load(out, map_location="cpu", weights_only=True, mmap=True),
            lambda: load_checkpoint(out, mmap=True), reps)
    compare("cold", lambda: torch.load(out, map_location="cpu", weights_only=True), lambda: load_checkpoint(out),
            reps, before=lambda: evict(out))
    compare("save", lambda: torch.save(state, plain_out), lambda: save_checkpoint(out, state), reps)
    loaded = torch.load(out, map_location="cpu", weights_only=True)
    for workers in sorted({1, threads}):
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            state_digest(loaded, workers=workers)
            times.append(time.perf_counter() - t)
        print(f"digest alone, {workers} thread(s): {min(times):.3f} s ({size / 1e6 / min(times):.0f} MB/s)")
    out.unlink()
    plain_out.unlink()


if __name__ == "__main__":
    main()
