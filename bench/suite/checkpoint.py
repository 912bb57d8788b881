"""What verifying a checkpoint's digest costs (issue 22): ``load_checkpoint`` (the load, then the sha256 digest of
the contents checked, ``distillkit/checkpoint_file.py``) against plain ``torch.load(weights_only=True)``, and
``save_checkpoint`` (the digest computed first) against ``torch.save``, on the state ``train/loop.py`` saves for
``train slidr --size paper``: the MinkUNet34 point network, the frozen ResNet-50 teacher and the decoder, SGD
momentum buffers, RNG states and the configuration, about 400 MB (quick: the small size).

Loads with a warm page cache, memory-mapped, and with the file dropped from the page cache first
(``posix_fadvise``, this file only: a job starting on a checkpoint reads it cold). Plain and verified runs
alternate and the least of each is kept, so machine load hits both alike.

    .venv/bin/python bench/run.py --device cpu --only checkpoint
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.suite.common import Context, Figure, Result

TITLE = "Checkpoint digest: verified load and save against plain torch (paper-size SLidR state)"


def _state(size: str) -> dict[str, Any]:
    """The entries ``train_loop`` saves for a SLidR run of ``size`` (momentum buffers as after a first step)."""
    import torch

    from distillkit.train.checkpoint import rng_state
    from distillkit.train.slidr import build_method

    method = build_method(size, 0)
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    for group in opt.param_groups:
        for p in group["params"]:
            opt.state[p]["momentum_buffer"] = torch.randn_like(p)
    return {"model": method.state_dict(), "optimizer": opt.state_dict(), "scheduler": {"last_epoch": 10},
            "step": 10, "rng": rng_state(), "config": {"size": size}}


def _evict(path: Path) -> None:
    """Drop ``path``'s pages from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _alternate(plain: Callable[[], Any], verified: Callable[[], Any], reps: int,
               before: Callable[[], Any] | None = None) -> tuple[float, float]:
    """Least wall time (s) of ``plain`` and of ``verified``, run in turn ``reps`` times each (``before`` each run)."""
    best = {"plain": float("inf"), "verified": float("inf")}
    for _ in range(reps):
        for key, fn in (("plain", plain), ("verified", verified)):
            if before is not None:
                before()
            t = time.perf_counter()
            fn()
            best[key] = min(best[key], time.perf_counter() - t)
    return best["plain"], best["verified"]


def run(ctx: Context) -> Result:
    import torch

    from distillkit.checkpoint_file import state_digest
    from distillkit.train.checkpoint import load_checkpoint, save_checkpoint

    reps = 3 if ctx.quick else 7
    folder = ctx.scratch("checkpoint")
    folder.mkdir(parents=True, exist_ok=True)
    out, plain_out = folder / "latest.pt", folder / "plain.pt"
    state = _state("small" if ctx.quick else "paper")
    save_checkpoint(out, state)
    mb = out.stat().st_size / 1e6
    res = Result(TITLE, extra={"mb": mb})

    def plain_load(**kw: Any) -> Any:
        return torch.load(out, map_location="cpu", weights_only=True, **kw)

    cases = [
        ("load, page cache warm", lambda: plain_load(), lambda: load_checkpoint(out), None),
        ("load, memory-mapped", lambda: plain_load(mmap=True), lambda: load_checkpoint(out, mmap=True), None),
        ("load, file dropped from the page cache", lambda: plain_load(), lambda: load_checkpoint(out),
         lambda: _evict(out)),
        ("save", lambda: torch.save(state, plain_out), lambda: save_checkpoint(out, state), None),
    ]
    for name, plain, verified, before in cases:
        p, v = _alternate(plain, verified, reps, before)
        res.figures.append(Figure(f"{name}, {mb:.0f} MB, digest checked", v, "s", "plain torch", p,
                                  note=f"+{v - p:.3f} s"))
    loaded = plain_load()
    t = time.perf_counter()
    state_digest(loaded, workers=1)
    res.notes.append(f"the digest alone on one thread: {time.perf_counter() - t:.3f} s for {mb:.0f} MB; "
                     "load_checkpoint hashes on up to 8 threads")
    out.unlink()
    plain_out.unlink(missing_ok=True)
    return res
