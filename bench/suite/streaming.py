"""Reading SLidR shards back: the trainers' stream reader (``train.streaming.ShardStream``: WebDataset,
checks, label PNGs decoded, JPEGs left as bytes) and the standard-library tar grouping the verifier uses,
against ``cat`` of the same shards (the disk-cache floor). Shards come from the build entry, or are built
here with 2 workers."""

from __future__ import annotations

import subprocess
from pathlib import Path

from bench.suite.common import Context, Figure, Result, best_of

TITLE = "Shard streaming (SLidR shards, medium synthetic nuScenes)"


def shards(ctx: Context) -> Path:
    """The 2-worker shards of the build entry (built now if that entry did not run)."""
    out = ctx.scratch("suite-shards-w2")
    if not (out / "index.json").exists():
        from bench.suite.build import build_once

        build_once(ctx, workers=2, out=out)
    return out


def run(ctx: Context) -> Result:
    from distillkit.pipelines.shards import iter_samples, load_index
    from distillkit.train.streaming import ShardStream

    out = shards(ctx)
    tars = [str(out / s["file"]) for s in load_index(out)["shards"]]
    mb = sum(Path(t).stat().st_size for t in tars) / 1e6
    cat_s = best_of(lambda: subprocess.run(["cat", *tars], stdout=subprocess.DEVNULL, check=True))
    stdlib_s = best_of(lambda: [sum(1 for _ in iter_samples(Path(t))) for t in tars])

    def stream():
        return sum(1 for _ in ShardStream(out, epochs=1, images="raw", strict=True))

    n = stream()
    stream_s = best_of(stream)
    res = Result(TITLE, extra={"shard_mb": mb, "samples": n})
    res.figures.append(Figure(f"ShardStream, {n} samples, {mb:.0f} MB (label PNGs decoded)", stream_s * 1e3, "ms",
                              "cat of the shards", cat_s * 1e3))
    res.figures.append(Figure(f"stdlib tar grouping (pipelines.shards.iter_samples), {mb:.0f} MB", stdlib_s * 1e3,
                              "ms", "cat of the shards", cat_s * 1e3))
    return res
